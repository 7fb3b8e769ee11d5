import { after, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import {
  chmodSync,
  chownSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import type { Hooks } from '../../core/hooks/catalogue.js';
import { Tokens } from '../../core/di/tokens.js';
import { validateConfig } from '../../core/config/load.js';
import { setupPlugin } from '../../core/testing/index.js';
import { deliveryRecipient, queuedMessage } from '../../test/harness/dovecot.js';
import maildir from './index.js';

/** nobody:nogroup on Debian: an unprivileged owner that exists everywhere. */
const NOBODY = 65534;
const dirs: string[] = [];
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

function asRoot(t: TestContext): boolean {
  if (process.getuid?.() === 0) return true;
  t.skip('needs root (only root can give files away)');
  return false;
}

/** Sets maildir up in a fresh folder, collecting what it logs. */
async function plugin(
  config: Record<string, unknown>,
  base = mkdtempSync(join(tmpdir(), 'petrel-owner-')),
): Promise<{ hooks: Hooks; base: string; logs: { level: number; msg: string; [k: string]: unknown }[] }> {
  dirs.push(base);
  const logs: { level: number; msg: string }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean))
        logs.push(JSON.parse(line) as { level: number; msg: string });
      done();
    },
  });
  const petrel = validateConfig(
    { hostname: 'mx.test', localDomains: ['example.test'], listeners: [{ kind: 'smtp', port: 0 }] },
    '(test)',
    '/',
  ).config;
  const hooks = await setupPlugin(maildir, {
    baseDir: base,
    config: { root: 'mail', ...config } as never,
    services: new Map([[Tokens.Config, petrel]]),
    logger: pino({ level: 'debug' }, sink),
  });
  return { hooks, base, logs };
}

async function deliver(hooks: Hooks, rcpt: string): Promise<void> {
  const message = queuedMessage('Subject: hi\r\n\r\nhello\r\n');
  const recipient = deliveryRecipient(rcpt);
  const signal = new AbortController().signal;
  const v = await hooks.route!({ message, recipient, signal });
  assert.equal(v.kind, 'route');
  if (v.kind !== 'route') return;
  const out = await hooks.deliver!({
    message,
    sender: null,
    route: v.route,
    recipients: [recipient],
    signal,
  });
  assert.ok(out.kind === 'results' && out.results[0]?.status === 'delivered', JSON.stringify(out));
}

const owner = (path: string): string => {
  const s = statSync(path);
  return `${s.uid}:${s.gid} ${(s.mode & 0o777).toString(8)}`;
};

describe('maildir: mailbox owner', () => {
  it('warns at start when Petrel runs as root and no mailbox owner is set, and not when one is', async (t) => {
    if (!asRoot(t)) return;
    const bare = await plugin({});
    const warning = bare.logs.find((l) => /runs as root and maildir has no mailbox owner/.test(l.msg));
    assert.ok(warning, JSON.stringify(bare.logs));
    assert.equal(warning.level, 40, 'at warn level');
    const owned = await plugin({ uid: 'nobody' });
    assert.equal(owned.logs.filter((l) => /mailbox owner/.test(l.msg)).length, 0, JSON.stringify(owned.logs));
  });

  it('takes the owner by name, with the user’s own group, from the first message on', async (t) => {
    if (!asRoot(t)) return;
    const { hooks, base } = await plugin({ uid: 'nobody' });
    await deliver(hooks, 'bob@example.test');
    const root = join(base, 'mail');
    const box = join(root, 'example.test', 'bob', 'Maildir');
    for (const p of [
      root,
      join(root, 'example.test'),
      join(root, 'example.test', 'bob'),
      box,
      join(box, 'new'),
    ])
      assert.equal(owner(p), `${NOBODY}:${NOBODY} 700`, p);
    const [file] = readdirSync(join(box, 'new'));
    assert.equal(owner(join(box, 'new', file!)), `${NOBODY}:${NOBODY} 600`);
    await assert.rejects(plugin({ uid: 'no-such-user-here' }), /no user named "no-such-user-here"/);
  });

  it('changes folders and messages an earlier run made as root to the owner, and says so', async (t) => {
    if (!asRoot(t)) return;
    // What Petrel run as root without uid/gid left behind: root's folders, mode 0700 and 0755.
    const before = await plugin({});
    await deliver(before.hooks, 'bob@example.test');
    const root = join(before.base, 'mail');
    const box = join(root, 'example.test', 'bob', 'Maildir');
    chmodSync(join(box, 'cur'), 0o755);
    writeFileSync(join(box, 'cur', '1.M1P1.host:2,S'), 'Subject: old\r\n\r\nread before\r\n', {
      mode: 0o644,
    });
    assert.equal(owner(box), '0:0 700');
    // The operator gives the root to the mail user and sets the owner; no chown -R of the rest.
    chownSync(root, NOBODY, NOBODY);
    const after = await plugin({ uid: NOBODY, gid: NOBODY }, before.base);
    await deliver(after.hooks, 'bob@example.test');
    for (const p of [join(root, 'example.test'), join(root, 'example.test', 'bob'), box, join(box, 'cur')])
      assert.equal(owner(p), `${NOBODY}:${NOBODY} 700`, p);
    for (const sub of ['new', 'cur'])
      for (const f of readdirSync(join(box, sub)))
        assert.equal(owner(join(box, sub, f)), `${NOBODY}:${NOBODY} 600`, f);
    const fixed = after.logs.find((l) => /had another owner or mode; changed/.test(l.msg));
    assert.ok(fixed, JSON.stringify(after.logs));
    assert.equal(fixed.level, 40);
    // The domain, user, Maildir, cur, new and tmp folders, and the two messages already there.
    assert.equal(fixed['count'], 8, JSON.stringify(fixed));
  });

  it('warns when the owner cannot pass through an existing root', async (t) => {
    if (!asRoot(t)) return;
    const base = mkdtempSync(join(tmpdir(), 'petrel-owner-'));
    mkdirSync(join(base, 'mail'), { mode: 0o700 });
    const { logs } = await plugin({ uid: NOBODY, gid: NOBODY }, base);
    assert.ok(
      logs.some((l) => l.level === 40 && /cannot enter root/.test(l.msg)),
      JSON.stringify(logs),
    );
  });
});
