import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SmtpClient } from '../harness/smtp-client.js';
import { acceptAllRecipients, ROOT, startServer } from '../harness/server.js';
import { loadConfig, validateConfig } from '../../core/config/load.js';
import { ConfigError } from '../../core/config/errors.js';
import { definePlugin } from '../../core/plugins/define.js';
import { deny } from '../../core/hooks/verdict.js';

const NODE = process.execPath;
const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');

describe('listener limits', () => {
  it('a listener override changes only the keys it names; the rest come from the top level', async () => {
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      config: {
        limits: { maxMessageSize: 1000 },
        listeners: [
          { kind: 'smtp', address: '127.0.0.1', port: 0, limits: { maxRecipients: 2, maxConnections: 1 } },
        ],
      },
    });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^220 /);
      const words = await c.ehlo();
      assert.ok(words.includes('SIZE 1000'), words.join(','));
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('RCPT TO:<c@example.test>', /^250 /);
      await c.cmd('RCPT TO:<d@example.test>', /^452 4\.5\.3 /);
      // The listener allows one connection, counted on its own.
      const second = await SmtpClient.connect(srv.port);
      await second.expect(/^421 .*Too many connections/);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a deny at connect is a 554 greeting whatever code the plugin chose', async () => {
    const srv = await startServer({
      plugins: [definePlugin({ name: 'no', setup: () => ({ connect: async () => deny() }) })],
    });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^554 Denied\r\n$/);
      c.close();
    } finally {
      await srv.close();
    }
  });
});

describe('config mistakes are caught at boot', () => {
  it('a submissions listener needs a tls section', () => {
    assert.throws(
      () => validateConfig({ listeners: [{ kind: 'submissions', port: 465 }] }, 'p.yaml', '/'),
      /p\.yaml: listeners\[0\]\.kind: expected a tls section/,
    );
  });

  it('an empty config file is an error, not a silent fallback to the default', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-empty-'));
    try {
      writeFileSync(join(dir, 'petrel.config.yaml'), '');
      await assert.rejects(
        loadConfig({ cwd: dir }),
        (e: unknown) => e instanceof ConfigError && /empty file/.test(e.message),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the command line', () => {
  it('answers an unknown option with usage and exit code 64', () => {
    const r = spawnSync(NODE, [CLI, 'start', '--bogus'], { encoding: 'utf8', timeout: 10_000 });
    assert.equal(r.status, 64);
    assert.match(r.stderr, /Unknown option '--bogus'/);
    assert.match(r.stderr, /Usage: petrel/);
  });

  it('config check validates plugins without running them or writing anything', () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-check-'));
    try {
      writeFileSync(
        join(dir, 'plugin.mjs'),
        [
          "import { writeFileSync } from 'node:fs';",
          "import { definePlugin, proceed, z } from 'petrel';",
          "export default definePlugin({ name: 'sidefx', config: z.object({ n: z.number() }),",
          `  setup: () => { writeFileSync(${JSON.stringify(join(dir, 'ran'))}, 'x'); return { mail: async () => proceed() }; } });`,
        ].join('\n'),
      );
      const config = (n: unknown) =>
        `listeners: [{ kind: smtp, port: 2525 }]\nspool: { dir: ./spool }\nplugins: [{ name: ./plugin.mjs, config: { n: ${JSON.stringify(n)} } }]\n`;
      writeFileSync(join(dir, 'good.yaml'), config(1));
      writeFileSync(join(dir, 'bad.yaml'), config('one'));
      const good = spawnSync(NODE, [CLI, 'config', 'check', '--config', join(dir, 'good.yaml')], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.equal(good.status, 0, good.stderr);
      assert.match(good.stdout, /OK \(plugins: sidefx\)/);
      assert.ok(!existsSync(join(dir, 'ran')), 'setup did not run');
      assert.ok(!existsSync(join(dir, 'spool')), 'no spool folder was created');
      const bad = spawnSync(NODE, [CLI, 'config', 'check', '--config', join(dir, 'bad.yaml')], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.equal(bad.status, 78);
      assert.match(bad.stderr, /bad\.yaml: plugins\[0\] \(sidefx\)\.config\.n: expected number/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
