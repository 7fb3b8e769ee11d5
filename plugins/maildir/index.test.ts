import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type {
  DeliveryRecipient,
  Hooks,
  QueuedMessageView,
  RecipientResult,
  Route,
} from '../../core/hooks/catalogue.js';
import { Tokens } from '../../core/di/tokens.js';
import { validateConfig } from '../../core/config/load.js';
import { setupPlugin } from '../../core/testing/index.js';
import { deliveryRecipient, queuedMessage } from '../../test/harness/dovecot.js';
import { Directory, type DirectoryService, type ResolvedTarget } from '../users/directory.js';
import maildir, { resultForError } from './index.js';

const NAME = /^(\d+)\.M(\d+)P(\d+)Q(\d+)K([0-9a-f]{16})\.([^/]+),S=(\d+)$/;
const MESSAGE = 'From: alice@crepes.test\r\nSubject: Hello\r\n\r\nLine one\r\n.leading dot\r\n';
const dirs: string[] = [];
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'petrel-maildir-'));
  dirs.push(d);
  return d;
}

function petrelConfig(localDomains: string[]) {
  return validateConfig(
    { hostname: 'mx.test', localDomains, listeners: [{ kind: 'smtp', port: 0 }] },
    '(test)',
    '/',
  ).config;
}

interface Setup {
  readonly config?: Record<string, unknown>;
  readonly directory?: DirectoryService;
  readonly localDomains?: string[];
}

/** Sets the plugin up with `root` in a fresh folder; returns its hooks and that folder. */
async function plugin(setup: Setup = {}): Promise<{ hooks: Hooks; base: string }> {
  const base = tempDir();
  const services = new Map<symbol, unknown>([
    [Tokens.Config, petrelConfig(setup.localDomains ?? ['example.test', 'bücher.test'])],
  ]);
  if (setup.directory) services.set(Directory, setup.directory);
  const hooks = await setupPlugin(maildir, {
    baseDir: base,
    config: { root: 'mail', ...setup.config } as never,
    services,
  });
  return { hooks, base };
}

const signal = (): AbortSignal => new AbortController().signal;

async function route(hooks: Hooks, rcpt: string) {
  return hooks.route!({
    recipient: deliveryRecipient(rcpt),
    message: queuedMessage(MESSAGE),
    signal: signal(),
  });
}

/** Routes each recipient, then delivers them as the queue would (one call per route key). */
async function deliver(
  hooks: Hooks,
  recipients: DeliveryRecipient[],
  message: QueuedMessageView = queuedMessage(MESSAGE),
): Promise<RecipientResult[]> {
  const groups = new Map<string, { route: Route; recipients: DeliveryRecipient[] }>();
  for (const r of recipients) {
    const v = await hooks.route!({ recipient: r, message, signal: signal() });
    assert.equal(v.kind, 'route', `routes ${r.address.address}`);
    if (v.kind !== 'route') continue;
    const g = groups.get(v.route.key) ?? { route: v.route, recipients: [] };
    g.recipients.push(r);
    groups.set(v.route.key, g);
  }
  const results: RecipientResult[] = [];
  for (const g of groups.values()) {
    const out = await hooks.deliver!({ ...g, message, sender: message.sender, signal: signal() });
    assert.equal(out.kind, 'results');
    if (out.kind === 'results') results.push(...out.results);
  }
  return results;
}

function files(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

describe('maildir: route', () => {
  it('routes a recipient in a local domain to its own mailbox, and leaves other domains alone', async () => {
    const { hooks } = await plugin();
    const v = await route(hooks, 'Bob@Example.test');
    assert.equal(v.kind, 'route');
    if (v.kind !== 'route') return;
    assert.equal(v.route.transport, 'maildir');
    assert.deepEqual(v.route.data, { mailboxes: [{ user: 'bob', domain: 'example.test' }] });
    assert.equal((await route(hooks, 'bob@elsewhere.test')).kind, 'proceed');
  });

  it('splits a sub-address off the local part, and names IDN domains by their A-label', async () => {
    const { hooks } = await plugin();
    const tagged = await route(hooks, 'bob+Lists@example.test');
    assert.ok(tagged.kind === 'route');
    assert.deepEqual(tagged.route.data.mailboxes, [{ user: 'bob', domain: 'example.test', tag: 'lists' }]);
    const unicode = await route(hooks, 'anna@bücher.test');
    const ascii = await route(hooks, 'anna@xn--bcher-kva.test');
    assert.ok(unicode.kind === 'route' && ascii.kind === 'route');
    assert.deepEqual(unicode.route.data.mailboxes, [{ user: 'anna', domain: 'xn--bcher-kva.test' }]);
    assert.deepEqual(ascii.route, unicode.route);
  });

  it('gives each set of mailboxes its own route key, since recipients under one key share its data', async () => {
    const { hooks } = await plugin();
    const a = await route(hooks, 'bob@example.test');
    const b = await route(hooks, 'carol@example.test');
    const c = await route(hooks, 'BOB@example.test');
    assert.ok(a.kind === 'route' && b.kind === 'route' && c.kind === 'route');
    assert.notEqual(a.route.key, b.route.key);
    assert.equal(a.route.key, c.route.key);
  });

  it('refuses a local part that cannot be a folder name (550 5.1.1)', async () => {
    const { hooks } = await plugin();
    for (const rcpt of ['"../../etc"@example.test', '"a/b"@example.test', '".hidden"@example.test']) {
      const v = await route(hooks, rcpt);
      assert.equal(v.kind, 'deny', rcpt);
      if (v.kind === 'deny') assert.deepEqual([v.reply.code, v.reply.enhanced], [550, '5.1.1']);
    }
  });

  it('asks the users directory when one is provided: aliases, unknown and forwarded addresses', async () => {
    const local = (user: string, tag: string | null = null): ResolvedTarget => ({
      kind: 'local',
      user: `${user}@example.test`,
      local: user,
      domain: 'example.test',
      tag,
    });
    const table: Record<string, ResolvedTarget[]> = {
      'team@example.test': [local('bob'), local('carol')],
      'bob+news@example.test': [local('bob', 'news')],
      'fwd@example.test': [{ kind: 'remote', address: 'x@elsewhere.test', tag: null }],
    };
    const asked: string[] = [];
    const directory = {
      async resolve(a: { address: string } | string) {
        const text = typeof a === 'string' ? a : a.address;
        asked.push(text);
        const targets = table[text];
        return targets ? { address: text, targets } : null;
      },
    } as unknown as DirectoryService;
    const { hooks } = await plugin({ directory });
    const team = await route(hooks, 'team@example.test');
    assert.ok(team.kind === 'route');
    assert.deepEqual(team.route.data.mailboxes, [
      { user: 'bob', domain: 'example.test' },
      { user: 'carol', domain: 'example.test' },
    ]);
    const tagged = await route(hooks, 'bob+news@example.test');
    assert.ok(tagged.kind === 'route');
    assert.deepEqual(tagged.route.data.mailboxes, [{ user: 'bob', domain: 'example.test', tag: 'news' }]);
    const unknown = await route(hooks, 'nobody@example.test');
    assert.ok(unknown.kind === 'deny' && unknown.reply.enhanced === '5.1.1');
    assert.equal(
      (await route(hooks, 'fwd@example.test')).kind,
      'proceed',
      'forwarding is for another transport',
    );
    assert.equal((await route(hooks, 'x@elsewhere.test')).kind, 'proceed');
    assert.ok(!asked.includes('x@elsewhere.test'), 'other domains are not looked up');
  });
});

describe('maildir: deliver', () => {
  it('writes into new/ under a Maildir unique name with the size, Return-Path and Delivered-To on top', async () => {
    const { hooks, base } = await plugin();
    const results = await deliver(hooks, [deliveryRecipient('bob+x@example.test')]);
    assert.deepEqual(results, [
      {
        recipient: 'bob+x@example.test',
        status: 'delivered',
        reply: { code: 250, enhanced: '2.0.0', text: 'Delivered' },
      },
    ]);
    const box = join(base, 'mail', 'example.test', 'bob', 'Maildir');
    assert.deepEqual(files(box), ['cur', 'new', 'tmp']);
    assert.deepEqual(files(join(box, 'tmp')), [], 'nothing left in tmp/');
    const [name] = files(join(box, 'new'));
    const m = NAME.exec(name ?? '');
    assert.ok(m, `unique name: ${name}`);
    assert.equal(Number(m[3]), process.pid);
    const file = join(box, 'new', name!);
    const bytes = readFileSync(file);
    assert.equal(Number(m[7]), bytes.length, 'S= is the file size');
    assert.equal(
      bytes.toString(),
      `Return-Path: <alice@crepes.test>\r\nDelivered-To: bob+x@example.test\r\n${MESSAGE}`,
    );
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.equal(statSync(box).mode & 0o777, 0o700);
  });

  it('streams a large binary message byte for byte, whatever its chunking', async () => {
    const { hooks, base } = await plugin();
    const body = Buffer.concat([Buffer.from('Subject: big\r\n\r\n'), randomBytes(3 * 1024 * 1024 + 17)]);
    const message = queuedMessage(body, { sender: null, chunkSize: 7777 });
    const [r] = await deliver(hooks, [deliveryRecipient('bob@example.test')], message);
    assert.equal(r?.status, 'delivered');
    const dir = join(base, 'mail', 'example.test', 'bob', 'Maildir', 'new');
    const bytes = readFileSync(join(dir, files(dir)[0]!));
    const head = Buffer.from('Return-Path: <>\r\nDelivered-To: bob@example.test\r\n');
    assert.ok(bytes.subarray(0, head.length).equals(head), 'null sender is Return-Path: <>');
    assert.ok(bytes.subarray(head.length).equals(body), 'body is byte-exact');
  });

  it('writes one copy per recipient, each with its own Delivered-To', async () => {
    const { hooks, base } = await plugin();
    const results = await deliver(hooks, [
      deliveryRecipient('bob@example.test'),
      deliveryRecipient('BOB@example.test'),
      deliveryRecipient('carol@example.test'),
    ]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['delivered', 'delivered', 'delivered'],
    );
    const bob = join(base, 'mail', 'example.test', 'bob', 'Maildir', 'new');
    const tos = files(bob).map((f) => /Delivered-To: (.*)\r\n/.exec(readFileSync(join(bob, f), 'utf8'))?.[1]);
    assert.deepEqual(tos.sort(), ['BOB@example.test', 'bob@example.test']);
    assert.equal(files(join(base, 'mail', 'example.test', 'carol', 'Maildir', 'new')).length, 1);
  });

  it('does not write again when an earlier attempt may have delivered and its copy is there', async () => {
    const { hooks, base } = await plugin();
    const message = queuedMessage(MESSAGE, { id: 'Q1' });
    await deliver(hooks, [deliveryRecipient('bob@example.test')], message);
    const box = join(base, 'mail', 'example.test', 'bob', 'Maildir');
    // A reader has seen it: moved to cur/ with flags.
    const [first] = files(join(box, 'new'));
    renameSync(join(box, 'new', first!), join(box, 'cur', `${first}:2,S`));
    const again = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test', { maybeDelivered: true, attempts: 1 })],
      message,
    );
    assert.equal(again[0]?.status, 'delivered');
    assert.deepEqual(files(join(box, 'new')), [], 'no second copy');
    // Another message (another queue id) is a new delivery, even to the same recipient.
    await deliver(
      hooks,
      [deliveryRecipient('bob@example.test', { maybeDelivered: true, attempts: 1 })],
      queuedMessage(MESSAGE, { id: 'Q2' }),
    );
    assert.equal(files(join(box, 'new')).length, 1);
  });

  it('after a partial failure, a retry writes only the copies that are missing', async () => {
    const team: ResolvedTarget[] = ['bob', 'carol'].map((u) => ({
      kind: 'local',
      user: u,
      local: u,
      domain: 'example.test',
      tag: null,
    }));
    const directory = {
      resolve: async (a: unknown) => ({ address: String(a), targets: team }),
    } as unknown as DirectoryService;
    const { hooks, base } = await plugin({ directory });
    const carol = join(base, 'mail', 'example.test', 'carol');
    mkdirSync(join(base, 'mail', 'example.test'), { recursive: true });
    writeFileSync(carol, 'not a folder'); // carol's mailbox cannot be made
    const message = queuedMessage(MESSAGE, { id: 'Q3' });
    const [first] = await deliver(hooks, [deliveryRecipient('team@example.test')], message);
    assert.equal(first?.status, 'deferred');
    rmSync(carol);
    const [retry] = await deliver(hooks, [deliveryRecipient('team@example.test', { attempts: 1 })], message);
    assert.equal(retry?.status, 'delivered');
    assert.equal(files(join(base, 'mail', 'example.test', 'bob', 'Maildir', 'new')).length, 1);
    assert.equal(files(join(carol, 'Maildir', 'new')).length, 1);
  });

  it('writes a local part with $ and & as it is, not as a replacement pattern', async () => {
    const { hooks, base } = await plugin();
    const [r] = await deliver(hooks, [deliveryRecipient("a$&b$'c@example.test")]);
    assert.equal(r?.status, 'delivered');
    assert.equal(files(join(base, 'mail', 'example.test', "a$&b$'c", 'Maildir', 'new')).length, 1);
  });

  it('defers (never throws) when the mailbox cannot be written, and leaves no partial file', async () => {
    const { hooks, base } = await plugin();
    await deliver(hooks, [deliveryRecipient('bob@example.test')]);
    const box = join(base, 'mail', 'example.test', 'bob', 'Maildir');
    const tmp = join(box, 'tmp');
    if (process.getuid?.() === 0) {
      // Permissions do not bind root: a tmp/ that is not a folder fails the same way.
      rmSync(tmp, { recursive: true });
      writeFileSync(tmp, '');
    } else {
      chmodSync(tmp, 0o500);
      chmodSync(join(box, 'new'), 0o500);
    }
    const [r] = await deliver(hooks, [deliveryRecipient('bob@example.test')]);
    assert.deepEqual(r, {
      recipient: 'bob@example.test',
      status: 'deferred',
      reply: { code: 451, enhanced: '4.3.0', text: 'Temporary local problem' },
    });
    assert.equal(files(join(box, 'new')).length, 1, 'only the first copy');
  });

  it('gives up when the hook is aborted while the message stalls, and leaves nothing in tmp/', async () => {
    const { hooks, base } = await plugin();
    const stalled: QueuedMessageView = {
      ...queuedMessage(MESSAGE),
      stream: () => new Readable({ read() {} }), // never delivers a byte
    };
    const recipient = deliveryRecipient('bob@example.test');
    const v = await hooks.route!({ recipient, message: stalled, signal: signal() });
    assert.ok(v.kind === 'route');
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('hook timed out')), 100);
    const out = await hooks.deliver!({
      route: v.route,
      recipients: [recipient],
      message: stalled,
      sender: stalled.sender,
      signal: controller.signal,
    });
    assert.ok(out.kind === 'results');
    assert.deepEqual([out.results[0]!.status, out.results[0]!.reply.code], ['deferred', 451]);
    const box = join(base, 'mail', 'example.test', 'bob', 'Maildir');
    assert.deepEqual([...files(join(box, 'tmp')), ...files(join(box, 'new'))], []);
  });

  it('maps errors to results: quota and disk full are 452, other system errors 451', () => {
    const err = (code: string): Error => Object.assign(new Error(code), { code });
    assert.deepEqual(resultForError('a@b', err('EDQUOT')).reply, {
      code: 452,
      enhanced: '4.2.2',
      text: 'Mailbox full',
    });
    assert.deepEqual(resultForError('a@b', err('ENOSPC')).reply, {
      code: 452,
      enhanced: '4.3.1',
      text: 'Insufficient system storage',
    });
    for (const code of ['EIO', 'EACCES', 'EROFS']) {
      const r = resultForError('a@b', err(code));
      assert.deepEqual([r.status, r.reply.code, r.reply.enhanced], ['deferred', 451, '4.3.0'], code);
    }
  });

  it('with createMailboxes: false, fails mail for a missing mailbox and delivers to an existing one', async () => {
    const { hooks, base } = await plugin({ config: { createMailboxes: false } });
    mkdirSync(join(base, 'mail', 'example.test', 'bob', 'Maildir'), { recursive: true });
    const results = await deliver(hooks, [
      deliveryRecipient('bob@example.test'),
      deliveryRecipient('gone@example.test'),
    ]);
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code, r.reply.enhanced]),
      [
        ['bob@example.test', 'delivered', 250, '2.0.0'],
        ['gone@example.test', 'failed', 550, '5.1.1'],
      ],
    );
    assert.ok(!existsSync(join(base, 'mail', 'example.test', 'gone')));
  });

  it('puts sub-addressed mail in a Maildir++ folder with subaddressFolders, else in the inbox', async () => {
    const { hooks, base } = await plugin({ config: { subaddressFolders: true } });
    await deliver(hooks, [
      deliveryRecipient('bob+Lists@example.test'),
      deliveryRecipient('bob+a.b@example.test'),
    ]);
    const box = join(base, 'mail', 'example.test', 'bob', 'Maildir');
    assert.equal(files(join(box, '.lists', 'new')).length, 1);
    assert.ok(existsSync(join(box, '.lists', 'maildirfolder')));
    assert.equal(files(join(box, 'new')).length, 1, 'a tag that is no safe folder name goes to the inbox');
    const plain = await plugin();
    await deliver(plain.hooks, [deliveryRecipient('bob+lists@example.test')]);
    assert.equal(files(join(plain.base, 'mail', 'example.test', 'bob', 'Maildir', 'new')).length, 1);
  });

  it('follows the template and the configured modes', async () => {
    const { hooks, base } = await plugin({
      config: { template: '{root}/{user}.{domain}', fileMode: '0640', dirMode: '0750' },
    });
    await deliver(hooks, [deliveryRecipient('bob@example.test')]);
    const box = join(base, 'mail', 'bob.example.test');
    const [name] = files(join(box, 'new'));
    assert.equal(statSync(join(box, 'new', name!)).mode & 0o777, 0o640);
    assert.equal(statSync(box).mode & 0o777, 0o750);
  });

  it('leaves routes of other transports to other plugins', async () => {
    const { hooks } = await plugin();
    const out = await hooks.deliver!({
      route: { transport: 'lmtp', key: 'lmtp', data: {} },
      recipients: [deliveryRecipient('bob@example.test')],
      message: queuedMessage(MESSAGE),
      sender: null,
      signal: signal(),
    });
    assert.deepEqual(out, { kind: 'proceed' });
  });
});

describe('maildir: config', () => {
  it('refuses bad modes, unknown placeholders and a template without {user}', async () => {
    await assert.rejects(plugin({ config: { fileMode: '644x' } }), /octal mode/);
    await assert.rejects(plugin({ config: { template: '{root}/{domain}/{local}' } }), /placeholders/);
    await assert.rejects(plugin({ config: { template: '{root}/{domain}' } }), /\{user\}/);
    await assert.rejects(plugin({ config: { uid: -1 } }), /uid/);
  });
});
