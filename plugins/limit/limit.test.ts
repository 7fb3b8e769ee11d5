/**
 * The limit plugin over the wire: Petrel started here with the plugin first, clients connecting
 * from chosen 127.0.0.x addresses (one per test, so each test has its own counts). Each limit
 * lets the first N through, refuses the next with its reply and one log line, and lets the
 * client in again once its window has moved on.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { stringify } from 'yaml';
import { accept, definePlugin, deny, networkOf, Tokens } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import { acceptAllRecipients, memoryQueue, startServer, type TestServer } from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { redisMissing, startRedis, type RedisPeer } from '../../test/harness/redis.js';
import { PetrelProcess, type LogLine } from '../../test/e2e/cli.js';
import { DNSMASQ, DNSMASQ_PACKAGE, startDnsmasq } from '../../test/harness/dnsmasq.js';
import { requirePeer } from '../../test/harness/peers.js';
import limit, { limitConfig } from './index.js';
import { memoryState, session as testSession, setupPlugin } from '../../core/testing/index.js';

const STATE_MODULE = new URL('../../core/services/state-sqlite.js', import.meta.url).href;

const testAuth = definePlugin({
  name: 'test-auth',
  setup: () => ({
    auth: async ({ username, password }) =>
      password === 'sesame' && username.endsWith('@mx.test') ? accept() : deny(535, '5.7.8', 'No'),
  }),
});

/** Petrel with `limit` (this config) first, then a plugin that takes every recipient. */
async function startLimited(t: TestContext | null, config: Record<string, unknown>): Promise<TestServer> {
  const srv = await startServer({
    plugins: [testAuth, acceptAllRecipients, memoryQueue([])],
    entries: [{ name: 'limit', config }, 'test-auth', 'test-accept-rcpt', 'test-memory-queue'],
  });
  t?.after(() => srv.close());
  return srv;
}

/** Connects from `ip` and reads the greeting; the client stays open unless refused. */
async function connect(port: number, ip: string): Promise<{ c: SmtpClient; greeting: Reply }> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: ip });
  return { c, greeting: await c.reply() };
}

async function helloFrom(port: number, ip: string): Promise<SmtpClient> {
  const { c, greeting } = await connect(port, ip);
  assert.match(greeting.raw, /^220 /);
  await c.ehlo();
  return c;
}

/** An authenticated session on the submissions port (from 127.0.0.1). */
async function loggedIn(srv: TestServer, user: string): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
  await c.expect(/^220 /);
  await c.ehlo('laptop.test');
  await c.cmd(`AUTH PLAIN ${Buffer.from(`\0${user}\0sesame`).toString('base64')}`, /^235 /);
  return c;
}

/** Tries to connect from `ip` until greeted with 220 (the limit's count has come down). */
async function admittedEventually(port: number, ip: string): Promise<SmtpClient> {
  for (let i = 0; i < 100; i++) {
    const { c, greeting } = await connect(port, ip);
    if (greeting.code === 220) return c;
    c.close();
    await sleep(100);
  }
  assert.fail(`${ip} was never let in again`);
}

function refusals(logs: readonly Record<string, unknown>[], limit: string): Record<string, unknown>[] {
  return logs.filter((l) => l.msg === 'limit reached' && l.limit === limit);
}

/** A whole transaction to one recipient in an open session; the reply to MAIL if refused there. */
async function transaction(c: SmtpClient, from = 'alice@crepes.test', rcpt = 'bob@mx.test'): Promise<Reply> {
  const mail = await c.cmd(`MAIL FROM:<${from}>`, /^\d{3} /);
  if (mail.code !== 250) return mail;
  await c.cmd(`RCPT TO:<${rcpt}>`, /^250 /);
  await c.cmd('DATA', /^354 /);
  c.write('Subject: hi\r\n\r\nhello\r\n.\r\n');
  return c.expect(/^250 /);
}

describe('limit: config', () => {
  it('reads rates with durations, and refuses a bad network or a zero max at boot', () => {
    const cfg = limitConfig.parse({ connections: { max: 5, per: '1m' }, concurrency: { max: 3 } });
    assert.deepEqual(cfg.connections, { max: 5, per: 60_000 });
    assert.equal(cfg.concurrency?.lease, 600_000);
    assert.deepEqual(cfg.clientPrefix, { ipv4: 32, ipv6: 64 });
    assert.deepEqual(cfg.trustedNetworks, ['127.0.0.0/8', '::1/128']);
    assert.throws(() => limitConfig.parse({ trustedNetworks: ['10.0.0.1/8'] }), /host bits/);
    assert.throws(() => limitConfig.parse({ connections: { max: 0, per: '1m' } }));
    assert.throws(() => limitConfig.parse({ messages: { perClient: { max: 1, per: 'soon' } } }), /duration/);
  });

  it('counts a client by its network: the address, a /24, the /64 of IPv6', () => {
    assert.equal(networkOf('192.0.2.77', { ipv4: 32, ipv6: 64 }), '192.0.2.77/32');
    assert.equal(networkOf('192.0.2.77', { ipv4: 24, ipv6: 64 }), '192.0.2.0/24');
    assert.equal(networkOf('::ffff:192.0.2.77', { ipv4: 24, ipv6: 64 }), '192.0.2.0/24');
    assert.equal(networkOf('203.0.113.255', { ipv4: 8, ipv6: 64 }), '203.0.0.0/8');
    assert.equal(networkOf('198.51.100.130', { ipv4: 25, ipv6: 64 }), '198.51.100.128/25');
    assert.equal(networkOf('198.51.100.130', { ipv4: 1, ipv6: 64 }), '128.0.0.0/1');
    assert.equal(networkOf('2001:db8:1:2:aa::5', { ipv4: 32, ipv6: 64 }), '2001:db8:1:2::/64');
    assert.equal(networkOf('2001:db8:1:2:aa::5', { ipv4: 32, ipv6: 48 }), '2001:db8:1::/48');
  });
});

describe('limit: connections per client per time', () => {
  it('lets the first N in, closes the next with 421, and lets the client in again when the window has passed', async (t) => {
    const srv = await startLimited(t, { trustedNetworks: [], connections: { max: 2, per: '2s' } });
    const first = await connect(srv.port, '127.0.0.11');
    const second = await connect(srv.port, '127.0.0.11');
    assert.equal(first.greeting.code, 220);
    assert.equal(second.greeting.code, 220);
    first.c.close();
    second.c.close();
    const third = await connect(srv.port, '127.0.0.11');
    assert.match(third.greeting.raw, /^421 .*Too many connections from your network/);
    await third.c.closed();
    const [line] = refusals(srv.logs, 'connections');
    assert.deepEqual(
      { counted: line?.counted, count: line?.count, max: line?.max },
      { counted: '127.0.0.11/32', count: 3, max: 2 },
    );
    // Another client has its own count.
    const other = await connect(srv.port, '127.0.0.12');
    assert.equal(other.greeting.code, 220);
    other.c.close();
    await sleep(2100);
    (await admittedEventually(srv.port, '127.0.0.11')).close();
  });

  it('counts a whole /24 as one client when clientPrefix.ipv4 is 24', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      clientPrefix: { ipv4: 24 },
      connections: { max: 1, per: '1m' },
    });
    (await connect(srv.port, '127.0.3.1')).c.close();
    const next = await connect(srv.port, '127.0.3.2');
    assert.match(next.greeting.raw, /^421 /);
    assert.equal(refusals(srv.logs, 'connections')[0]?.counted, '127.0.3.0/24');
  });
});

describe('limit: open connections per client', () => {
  it('refuses a connection over the limit with 421, and admits again once one closes', async (t) => {
    const srv = await startLimited(t, { trustedNetworks: [], concurrency: { max: 2 } });
    const a = await helloFrom(srv.port, '127.0.0.21');
    const b = await helloFrom(srv.port, '127.0.0.21');
    const third = await connect(srv.port, '127.0.0.21');
    assert.match(third.greeting.raw, /^421 .*Too many open connections/);
    await third.c.closed();
    const [line] = refusals(srv.logs, 'concurrency');
    assert.deepEqual({ count: line?.count, max: line?.max }, { count: 3, max: 2 });
    await a.cmd('QUIT', /^221 /);
    (await admittedEventually(srv.port, '127.0.0.21')).close();
    b.close();
  });

  it("stops counting a dead worker's connections once their lease ends", async (t) => {
    const srv = await startLimited(t, { trustedNetworks: [], concurrency: { max: 1, lease: '2s' } });
    // Another worker, on the same State file, holding a connection from the client: then killed
    // (kill -9) before it could give it back.
    const worker = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `const { SqliteState } = await import(${JSON.stringify(STATE_MODULE)});
         const s = new SqliteState({ path: ${JSON.stringify(join(srv.spoolDir, 'state.sqlite'))} });
         await s.hold('limit:concurrency:127.0.0.22/32', { leaseMs: 2000 });
         process.stdout.write('held\\n');
         setInterval(() => {}, 1000);`,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    t.after(() => worker.kill('SIGKILL'));
    await new Promise((resolve) => worker.stdout.once('data', resolve));
    const refused = await connect(srv.port, '127.0.0.22');
    assert.match(refused.greeting.raw, /^421 .*Too many open connections/);
    // While it lived, its share was renewed past the lease.
    await sleep(2500);
    assert.match((await connect(srv.port, '127.0.0.22')).greeting.raw, /^421 /);
    worker.kill('SIGKILL');
    await new Promise((resolve) => worker.once('exit', resolve));
    await sleep(2100);
    (await admittedEventually(srv.port, '127.0.0.22')).close();
  });

  it('gives a connection back when its connect hook was given up on, which no disconnect would', async () => {
    const state = memoryState();
    const hooks = await setupPlugin(limit, {
      config: { trustedNetworks: [], concurrency: { max: 5 } },
      services: new Map([[Tokens.State, state]]),
    });
    const open = (): Promise<number> =>
      state.hold('limit:concurrency:192.0.2.9/32', { leaseMs: 600_000, by: 0 });
    const client = { remote: { address: '192.0.2.9', port: 40000 } };
    // Answered in time: counted.
    await hooks.connect!({ session: testSession(client), signal: new AbortController().signal });
    assert.equal(await open(), 1);
    // The hook runner's timeout fires before the store answers.
    const timeout = new AbortController();
    const late = hooks.connect!({ session: testSession(client), signal: timeout.signal });
    timeout.abort(new Error('timed out'));
    await late;
    assert.equal(await open(), 1, 'the connection whose hook was given up on is not counted');
    await state.close();
  });

  it('keeps counting a connection open longer than its lease, even one that sends nothing', async (t) => {
    const srv = await startLimited(t, { trustedNetworks: [], concurrency: { max: 1, lease: '2s' } });
    const idle = await helloFrom(srv.port, '127.0.0.23');
    await sleep(3000);
    const refused = await connect(srv.port, '127.0.0.23');
    assert.match(refused.greeting.raw, /^421 /);
    await idle.cmd('QUIT', /^221 /);
    (await admittedEventually(srv.port, '127.0.0.23')).close();
  });
});

describe('limit: messages per time', () => {
  it('per client: 451 4.7.1 at MAIL over the limit, the message refused before its content', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      messages: { perClient: { max: 2, per: '2s' } },
    });
    const c = await helloFrom(srv.port, '127.0.0.31');
    assert.equal((await transaction(c)).code, 250);
    assert.equal((await transaction(c)).code, 250);
    const refused = await transaction(c);
    assert.match(refused.raw, /^451 4\.7\.1 Too many messages from your network/);
    const [line] = refusals(srv.logs, 'messages.perClient');
    assert.deepEqual(
      { counted: line?.counted, count: line?.count, max: line?.max },
      { counted: '127.0.0.31/32', count: 3, max: 2 },
    );
    // The session goes on; once the window has moved on, the client may send again.
    await sleep(2100);
    assert.equal((await transaction(c)).code, 250);
    c.close();
  });

  it('per authenticated user, from any address', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      messages: { perUser: { max: 1, per: '1m' } },
    });
    const a = await loggedIn(srv, 'carol@mx.test');
    assert.equal((await transaction(a, 'carol@mx.test')).code, 250);
    a.close();
    const b = await loggedIn(srv, 'Carol@mx.test');
    const refused = await transaction(b, 'carol@mx.test');
    assert.match(refused.raw, /^451 4\.7\.1 Too many messages from this user/);
    b.close();
    assert.equal(refusals(srv.logs, 'messages.perUser')[0]?.counted, 'carol@mx.test');
    // Another user, and unauthenticated clients, are not counted under carol.
    const d = await loggedIn(srv, 'dave@mx.test');
    assert.equal((await transaction(d, 'dave@mx.test')).code, 250);
    d.close();
  });

  it('per sender domain, whatever the client; the null sender is not counted', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      messages: { perSenderDomain: { max: 1, per: '1m' } },
    });
    const a = await helloFrom(srv.port, '127.0.0.32');
    assert.equal((await transaction(a, 'alice@crepes.test')).code, 250);
    a.close();
    const b = await helloFrom(srv.port, '127.0.0.33');
    assert.match(
      (await transaction(b, 'bert@CREPES.test')).raw,
      /^451 4\.7\.1 Too many messages from this sender domain/,
    );
    assert.equal((await transaction(b, '')).code, 250);
    assert.equal((await transaction(b, '')).code, 250);
    b.close();
    const [line] = refusals(srv.logs, 'messages.perSenderDomain');
    assert.deepEqual(
      { counted: line?.counted, count: line?.count, max: line?.max },
      { counted: 'crepes.test', count: 2, max: 1 },
    );
  });
});

describe('limit: several limits on one command', () => {
  it('a command refused by one limit counts in none of the others', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      messages: { perClient: { max: 10, per: '1m' }, perSenderDomain: { max: 1, per: '1m' } },
    });
    const c = await helloFrom(srv.port, '127.0.0.34');
    assert.equal((await transaction(c, 'alice@galettes.test')).code, 250);
    assert.match(
      (await transaction(c, 'bert@galettes.test')).raw,
      /^451 4\.7\.1 Too many messages from this sender domain/,
    );
    c.close();
    const state = resolveToken(srv.app.generation.container, Tokens.State);
    const perClient = await state.addToRate('limit:messages.perClient:127.0.0.34/32', {
      windowMs: 60_000,
      by: 0,
    });
    assert.equal(perClient, 1, 'the refused message was given back to the per-client count');
  });
});

describe('limit: recipients', () => {
  it('per message: 452 4.5.3 for the recipient over the limit; the message goes to the others', async (t) => {
    const srv = await startLimited(t, { trustedNetworks: [], recipients: { perMessage: 3 } });
    const c = await helloFrom(srv.port, '127.0.0.41');
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    for (const r of ['a', 'b', 'c']) await c.cmd(`RCPT TO:<${r}@mx.test>`, /^250 /);
    await c.cmd('RCPT TO:<d@mx.test>', /^452 4\.5\.3 Too many recipients/);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: hi\r\n\r\nhello\r\n.\r\n');
    await c.expect(/^250 /);
    // A new message starts its own count.
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<d@mx.test>', /^250 /);
    c.close();
    const [line] = refusals(srv.logs, 'recipients.perMessage');
    assert.deepEqual({ count: line?.count, max: line?.max }, { count: 4, max: 3 });
  });

  it('per client per time, across messages; the window moving on lets it send again', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      recipients: { perClient: { max: 3, per: '2s' } },
    });
    const c = await helloFrom(srv.port, '127.0.0.42');
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<a@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<b@mx.test>', /^250 /);
    await c.cmd('RSET', /^250 /);
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<c@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<d@mx.test>', /^451 4\.7\.1 Too many recipients from your network/);
    const [line] = refusals(srv.logs, 'recipients.perClient');
    assert.deepEqual(
      { counted: line?.counted, count: line?.count, max: line?.max },
      { counted: '127.0.0.42/32', count: 4, max: 3 },
    );
    await sleep(2100);
    await c.cmd('RCPT TO:<d@mx.test>', /^250 /);
    c.close();
  });

  it('per authenticated user per time', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      recipients: { perUser: { max: 2, per: '1m' } },
    });
    const c = await loggedIn(srv, 'erin@mx.test');
    await c.cmd('MAIL FROM:<erin@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<a@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<b@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<c@mx.test>', /^451 4\.7\.1 Too many recipients from this user/);
    c.close();
    assert.equal(refusals(srv.logs, 'recipients.perUser')[0]?.counted, 'erin@mx.test');
  });
});

describe('limit: exemptions and failures', () => {
  it('does not limit clients in trustedNetworks', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: ['127.0.0.99/32'],
      connections: { max: 1, per: '1m' },
      concurrency: { max: 1 },
      messages: { perClient: { max: 1, per: '1m' } },
      recipients: { perMessage: 1, perClient: { max: 1, per: '1m' } },
    });
    const held = await helloFrom(srv.port, '127.0.0.99');
    const c = await helloFrom(srv.port, '127.0.0.99');
    for (let i = 0; i < 3; i++) {
      await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      await c.cmd('RCPT TO:<a@mx.test>', /^250 /);
      await c.cmd('RCPT TO:<b@mx.test>', /^250 /);
      await c.cmd('RSET', /^250 /);
    }
    c.close();
    held.close();
    assert.equal(srv.logs.filter((l) => l.msg === 'limit reached').length, 0);
    // The same config limits a client outside them.
    (await connect(srv.port, '127.0.0.98')).c.close();
    assert.match((await connect(srv.port, '127.0.0.98')).greeting.raw, /^421 /);
  });

  it('fails open when the State store fails: the client is served and the failure logged at error', async (t) => {
    const srv = await startLimited(t, {
      trustedNetworks: [],
      connections: { max: 1, per: '1m' },
      concurrency: { max: 1 },
      messages: { perClient: { max: 1, per: '1m' } },
    });
    await resolveToken(srv.app.generation.container, Tokens.State).close();
    const a = await helloFrom(srv.port, '127.0.0.51');
    const b = await helloFrom(srv.port, '127.0.0.51');
    assert.equal((await transaction(b)).code, 250);
    assert.equal((await transaction(b)).code, 250);
    a.close();
    b.close();
    const failed = srv.logs.filter(
      (l) => l.level === 50 && l.msg === 'limit not checked: the State store failed; letting it through',
    );
    assert.deepEqual([...new Set(failed.map((l) => l.limit))].sort(), [
      'concurrency',
      'connections',
      'messages.perClient',
    ]);
  });
});

describe('limit: clients on a DNS allow list', () => {
  it('does not limit a client the dnsbl plugin finds on an allow list', async (t) => {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return;
    // 127.0.0.81 is on wl.test; 127.0.0.82 is not.
    const dns = await startDnsmasq(t, { hosts: [{ name: '81.0.0.127.wl.test', addresses: ['127.0.10.2'] }] });
    assert.ok(dns, 'dnsmasq started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue([])],
      entries: [
        { name: 'dnsbl', config: { trustedNetworks: [], allow: [{ zone: 'wl.test' }], applyAt: 'connect' } },
        {
          name: 'limit',
          config: {
            trustedNetworks: [],
            connections: { max: 1, per: '1m' },
            recipients: { perClient: { max: 1, per: '1m' } },
          },
        },
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: { dns: { servers: [dns.server], timeout: 2000 } },
    });
    t.after(() => srv.close());
    for (let i = 0; i < 3; i++) {
      const c = await helloFrom(srv.port, '127.0.0.81');
      await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      await c.cmd('RCPT TO:<a@mx.test>', /^250 /);
      await c.cmd('RCPT TO:<b@mx.test>', /^250 /);
      c.close();
    }
    assert.equal(srv.logs.filter((l) => l.msg === 'limit reached').length, 0);
    // The same limits hold for a client on no list.
    const c = await helloFrom(srv.port, '127.0.0.82');
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<a@mx.test>', /^250 /);
    await c.cmd('RCPT TO:<b@mx.test>', /^451 4\.7\.1 /);
    c.close();
    assert.match((await connect(srv.port, '127.0.0.82')).greeting.raw, /^421 /);
  });
});

describe('limit: one count for the workers of one server', () => {
  let dir: string;
  let server: PetrelProcess;
  let port: number;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-limit-workers-'));
    writeFileSync(
      join(dir, 'petrel.yaml'),
      stringify({
        hostname: 'mx.workers.test',
        workers: 2,
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0 }],
        spool: { dir: './spool' },
        log: { level: 'info' },
        plugins: [{ name: 'limit', config: { trustedNetworks: [], concurrency: { max: 1 } } }],
      }),
    );
    server = await PetrelProcess.start(join(dir, 'petrel.yaml'), dir, 30_000);
    const started = server.logs.find((l) => l.msg === 'petrel started');
    port = (started?.listeners as { port: number }[])[0]!.port;
  });
  after(() => {
    server?.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a second open connection whichever worker it reaches', async () => {
    const held = await helloFrom(port, '127.0.0.61');
    // Connections spread over both workers: keep trying until both have refused one.
    const refusedBy = new Set<unknown>();
    for (let i = 0; i < 40 && refusedBy.size < 2; i++) {
      const from = server.logs.length;
      const { c, greeting } = await connect(port, '127.0.0.61');
      assert.match(greeting.raw, /^421 .*Too many open connections/);
      await c.closed();
      const line = await server.waitForLog((l: LogLine) => l.msg === 'limit reached', 10_000, from);
      assert.equal(line.limit, 'concurrency');
      refusedBy.add(line.pid ?? line.worker);
    }
    assert.equal(refusedBy.size, 2, 'both workers refused a connection');
    held.close();
  });
});

describe('limit: one count for servers sharing a Redis', { skip: redisMissing }, () => {
  let redis: RedisPeer;
  let a: TestServer;
  let b: TestServer;
  before(async () => {
    redis = await startRedis();
    const opts = {
      plugins: [acceptAllRecipients, memoryQueue([])],
      entries: [
        {
          name: 'limit',
          config: {
            trustedNetworks: [],
            concurrency: { max: 1 },
            messages: { perClient: { max: 2, per: '1m' } },
          },
        },
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: { state: { backend: 'redis' as const, redis: { url: redis.url, timeout: 500 } } },
    };
    a = await startServer(opts);
    b = await startServer(opts);
  });
  after(async () => {
    await a?.close();
    await b?.close();
    await redis?.stop();
  });

  it('counts open connections on both servers together', async () => {
    const held = await helloFrom(a.port, '127.0.0.71');
    const refused = await connect(b.port, '127.0.0.71');
    assert.match(refused.greeting.raw, /^421 .*Too many open connections/);
    assert.equal(refusals(b.logs, 'concurrency')[0]?.count, 2);
    await held.cmd('QUIT', /^221 /);
    (await admittedEventually(b.port, '127.0.0.71')).close();
  });

  it('counts messages on both servers together', async () => {
    const c = await helloFrom(a.port, '127.0.0.72');
    assert.equal((await transaction(c)).code, 250);
    await c.cmd('QUIT', /^221 /);
    const d = await admittedEventually(b.port, '127.0.0.72');
    await d.ehlo();
    assert.equal((await transaction(d)).code, 250);
    assert.match((await transaction(d)).raw, /^451 4\.7\.1 /);
    d.close();
    assert.equal(refusals(b.logs, 'messages.perClient')[0]?.count, 3);
  });

  it('fails open while Redis is down, and counts again once it is back', async () => {
    await redis.stop();
    const c = await helloFrom(a.port, '127.0.0.73');
    const d = await helloFrom(a.port, '127.0.0.73');
    assert.ok(a.logs.some((l) => l.level === 50 && l.limit === 'concurrency'));
    c.close();
    d.close();
    await redis.start();
    // Once the client reconnects to Redis, a connection held on one server counts on the other.
    let refused: Reply | null = null;
    for (let i = 0; i < 50 && refused === null; i++) {
      const held = await helloFrom(a.port, '127.0.0.74');
      const { c: e, greeting } = await connect(b.port, '127.0.0.74');
      e.close();
      held.close();
      if (greeting.code === 421) refused = greeting;
      else await sleep(200);
    }
    assert.match(refused?.raw ?? '', /^421 .*Too many open connections/);
  });
});
