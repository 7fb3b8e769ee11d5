import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from '../harness/server.js';
import { requirePeer } from '../harness/peers.js';
import { run } from '../e2e/run.js';
import { CLI, NODE } from '../e2e/cli.js';

/**
 * contrib/petrel.service is what docs/operations.md installs: systemd must accept every line of it
 * (`systemd-analyze verify` warns on stderr about an unknown key, a bad value or a missing
 * program, and fails on the worst), with ExecStart pointing at this checkout's built CLI.
 */
const UNIT = join(ROOT, 'contrib', 'petrel.service');

describe('contrib/petrel.service', () => {
  const dirs: string[] = [];
  after(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('passes systemd-analyze verify without a warning, run against the built CLI', async (t) => {
    const analyze = requirePeer(t, 'systemd-analyze', 'apt-get install systemd');
    if (!analyze) return;
    const unit = readFileSync(UNIT, 'utf8');
    assert.ok(unit.includes('/opt/petrel/node_modules/.bin/node /opt/petrel/dist/core/cli/main.js start'));
    const dir = mkdtempSync(join(tmpdir(), 'petrel-unit-'));
    dirs.push(dir);
    const here = unit
      .replaceAll('/opt/petrel/node_modules/.bin/node', realpathSync(NODE))
      .replaceAll('/opt/petrel/dist/core/cli/main.js', CLI)
      .replaceAll('/opt/petrel', ROOT);
    const copy = join(dir, 'petrel.service');
    writeFileSync(copy, here);
    const r = await run(analyze, ['verify', copy], { cwd: dir, timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '', 'no warning');
  });

  it('is hardened, reloads with SIGHUP and keeps only the capabilities that bind and drop need', () => {
    const lines = readFileSync(UNIT, 'utf8')
      .split('\n')
      .filter((l) => l && !l.startsWith('#'));
    for (const expected of [
      'ExecReload=/bin/kill -HUP $MAINPID',
      'ProtectSystem=strict',
      'ReadWritePaths=/var/lib/petrel',
      'NoNewPrivileges=yes',
      'PrivateTmp=yes',
      'ProtectHome=yes',
      'Restart=on-failure',
      'RestartPreventExitStatus=78',
      'CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID',
      'Type=exec',
    ])
      assert.ok(lines.includes(expected), expected);
    // The bind-then-drop model: systemd starts it as root and the config's `user` takes over.
    assert.ok(!lines.some((l) => /^User=/.test(l)), 'no User=: Petrel drops to the config user itself');
  });
});
