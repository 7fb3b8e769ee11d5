/**
 * greylist over the wire: a Petrel with the plugin and a plugin after it that accepts every
 * recipient, clients on chosen 127.0.x.y addresses (the triplet names the client's /24). Delays
 * are one second; a test that waits for one asserts why the retry was let through (the reply and
 * the log line), never how long anything took.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { accept, definePlugin, deny, Tokens } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import { acceptAllRecipients, startServer, type TestServer } from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { redisMissing, startRedis, type RedisPeer } from '../../test/harness/redis.js';
import { PetrelProcess, type LogLine } from '../../test/e2e/cli.js';
import { DNSMASQ, DNSMASQ_PACKAGE, startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { has, requirePeer } from '../../test/harness/peers.js';
import { greylistConfig } from './config.js';

const DELAY_MS = 1000;
/** Waits out the delay (and a little more): what the test then asserts is the reply and the log. */
const afterDelay = (): Promise<void> => new Promise((r) => setTimeout(r, DELAY_MS + 300));

const testAuth = definePlugin({
  name: 'test-auth',
  setup: () => ({
    auth: async ({ username, password }) =>
      username === 'ceo@example.test' && password === 'sesame' ? accept() : deny(535, '5.7.8', 'No'),
  }),
});

/** One transaction from `ip` up to the RCPT replies, then QUIT. */
async function rcpt(
  port: number,
  opts: { ip: string; from: string; to: readonly string[] | string },
): Promise<Reply[]> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: opts.ip });
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd(`MAIL FROM:<${opts.from}>`, /^250 /);
    const replies: Reply[] = [];
    for (const to of typeof opts.to === 'string' ? [opts.to] : opts.to)
      replies.push(await c.cmd(`RCPT TO:<${to}>`, /^\d{3} /));
    await c.cmd('QUIT', /^221 /);
    return replies;
  } finally {
    c.close();
  }
}

async function one(port: number, ip: string, from: string, to: string): Promise<Reply> {
  return (await rcpt(port, { ip, from, to }))[0]!;
}

/** The greylist log lines about recipient `to`, oldest first. */
function linesFor(logs: readonly Record<string, unknown>[], to: string): Record<string, unknown>[] {
  return logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith('greylist:') && l.to === to);
}

function last(logs: readonly Record<string, unknown>[], to: string): Record<string, unknown> {
  const lines = linesFor(logs, to);
  assert.ok(lines.length > 0, `a greylist line for ${to}`);
  return lines.at(-1)!;
}

describe('greylist: config', () => {
  it('config: Postgrey-like defaults, and a window no longer than the delay is refused', () => {
    const c = greylistConfig.parse({});
    assert.equal(c.delay, 300_000);
    assert.equal(c.retryWindow, 2 * 86_400_000);
    assert.equal(c.expire, 35 * 86_400_000);
    assert.equal(c.autoAllowAfter, 5);
    assert.ok(!greylistConfig.safeParse({ delay: '10m', retryWindow: '5m' }).success);
  });
});

describe('greylist: one server', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({
      plugins: [testAuth, acceptAllRecipients],
      entries: [
        'test-auth',
        {
          name: 'greylist',
          config: {
            delay: DELAY_MS,
            retryWindow: '1m',
            autoAllowAfter: 3,
            trustedNetworks: ['127.0.9.0/24'],
            exemptSenderDomains: ['friends.test'],
            exemptRecipients: ['abuse@mx.test', 'open.test'],
          },
        },
        'test-accept-rcpt',
      ],
    });
  });
  after(async () => srv.close());

  it('defers a new triplet, defers a retry that comes too early, accepts one after the delay, then remembers it', async () => {
    const first = await one(srv.port, '127.0.1.10', 'Alice@Example.test', 'bob@mx.test');
    assert.match(first.raw, /^451 4\.7\.1 Greylisted, please try again in 1 seconds/);
    const l1 = last(srv.logs, 'bob@mx.test');
    assert.equal(l1.msg, 'greylist: greylisted');
    assert.equal(l1.network, '127.0.1.0/24');
    assert.equal(l1.from, 'alice@example.test');

    const early = await one(srv.port, '127.0.1.10', 'alice@example.test', 'bob@mx.test');
    assert.match(early.raw, /^451 4\.7\.1 Greylisted, please try again in \d+ seconds/);
    assert.equal(last(srv.logs, 'bob@mx.test').msg, 'greylist: greylisted, retry too early');

    await afterDelay();
    // Another address of the same /24, the sender in another case: the same triplet.
    const retry = await one(srv.port, '127.0.1.11', 'ALICE@example.test', 'bob@mx.test');
    assert.equal(retry.code, 250);
    const passed = last(srv.logs, 'bob@mx.test');
    assert.equal(passed.msg, 'greylist: passed after retry');
    assert.ok((passed.waited as number) >= 1, 'the log says how long the client waited');

    const again = await one(srv.port, '127.0.1.12', 'alice@example.test', 'bob@mx.test');
    assert.equal(again.code, 250);
    assert.equal(last(srv.logs, 'bob@mx.test').msg, 'greylist: passed, known triplet');

    // Another sender, another recipient, another network: each is a new triplet.
    assert.equal((await one(srv.port, '127.0.1.10', 'carol@example.test', 'bob@mx.test')).code, 451);
    assert.equal((await one(srv.port, '127.0.1.10', 'alice@example.test', 'dave@mx.test')).code, 451);
    assert.equal((await one(srv.port, '127.0.2.10', 'alice@example.test', 'bob@mx.test')).code, 451);
  });

  it('renews a known triplet when it is used, writing it at most once per 1/100 of expire', async () => {
    const state = resolveToken(srv.app.generation.container, Tokens.State);
    const ip = '127.0.5.10';
    const triplet = createHash('sha256')
      .update('127.0.5.0/24\0renew@example.test\0rita@mx.test')
      .digest('base64url');
    const key = `greylist:pass:${triplet}`;
    assert.equal((await one(srv.port, ip, 'renew@example.test', 'rita@mx.test')).code, 451);
    await afterDelay();
    assert.equal((await one(srv.port, ip, 'renew@example.test', 'rita@mx.test')).code, 250);
    assert.ok((await state.get(key)) !== null, 'the triplet is remembered');
    // As if it was last written 1/50 of `expire` (35 days) ago, and stored that long before. (Set
    // before the plugin first reads it: once read, the plugin answers from its own copy for a
    // while, and a pass never goes back in time but here.)
    const longAgo = String(Date.now() - (35 * 86_400_000) / 50);
    await state.set(key, longAgo, { ttlMs: 60_000 });
    assert.equal((await one(srv.port, ip, 'renew@example.test', 'rita@mx.test')).code, 250);
    assert.equal(last(srv.logs, 'rita@mx.test').msg, 'greylist: passed, known triplet');
    const renewed = await state.get(key);
    assert.ok(Number(renewed) > Number(longAgo), 'renewed: written again, with the time of this use');
    assert.equal((await one(srv.port, ip, 'renew@example.test', 'rita@mx.test')).code, 250);
    assert.equal(last(srv.logs, 'rita@mx.test').msg, 'greylist: passed, known triplet');
    assert.equal(await state.get(key), renewed, 'used again at once: not written again');
  });

  it('greylists the null sender too, as <>', async () => {
    assert.equal((await one(srv.port, '127.0.1.10', '', 'null@mx.test')).code, 451);
    assert.equal(last(srv.logs, 'null@mx.test').from, '<>');
  });

  it('lets a whole network through once enough of its triplets got through', async () => {
    const to = ['a1@mx.test', 'a2@mx.test', 'a3@mx.test'];
    const ip = '127.0.3.20';
    for (const r of await rcpt(srv.port, { ip, from: 'list@bulk.test', to })) assert.equal(r.code, 451);
    await afterDelay();
    for (const r of await rcpt(srv.port, { ip, from: 'list@bulk.test', to })) assert.equal(r.code, 250);
    const allowed = srv.logs.find((l) => l.msg === 'greylist: network auto-allowed');
    assert.ok(allowed, 'the third triplet through allows the network');
    assert.equal(allowed.network, '127.0.3.0/24');
    assert.equal(allowed.passes, 3);

    // A new triplet from another host of that network passes at once, and says why.
    const fresh = await one(srv.port, '127.0.3.99', 'someone@else.test', 'new@mx.test');
    assert.equal(fresh.code, 250);
    assert.equal(last(srv.logs, 'new@mx.test').msg, 'greylist: passed, auto-allowed network');
    // The same triplet from another network is still greylisted.
    assert.equal((await one(srv.port, '127.0.4.99', 'someone@else.test', 'new@mx.test')).code, 451);
  });

  it('never greylists postmaster, exempt recipients and sender domains, trusted networks or authenticated clients', async () => {
    const [pm, bob] = await rcpt(srv.port, {
      ip: '127.0.5.1',
      from: 'x@stranger.test',
      to: ['postmaster@mx.test', 'bob@mx.test'],
    });
    assert.equal(pm!.code, 250, 'postmaster is reachable at once (RFC 5321 §4.5.1)');
    assert.equal(bob!.code, 451, 'the other recipient of the same transaction is greylisted');
    assert.equal(last(srv.logs, 'postmaster@mx.test').reason, 'postmaster');

    assert.equal((await one(srv.port, '127.0.5.1', 'x@stranger.test', 'abuse@mx.test')).code, 250);
    assert.equal(last(srv.logs, 'abuse@mx.test').reason, 'exempt recipient');
    assert.equal((await one(srv.port, '127.0.5.1', 'x@stranger.test', 'anyone@open.test')).code, 250);
    assert.equal(last(srv.logs, 'anyone@open.test').reason, 'exempt recipient');
    assert.equal((await one(srv.port, '127.0.5.1', 'x@mail.friends.test', 'eve@mx.test')).code, 250);
    assert.equal(last(srv.logs, 'eve@mx.test').reason, 'exempt sender domain');

    assert.equal((await one(srv.port, '127.0.9.7', 'x@stranger.test', 'bob@mx.test')).code, 250);
    assert.ok(
      srv.logs.some(
        (l) => l.msg === 'greylist: exempt' && l.ip === '127.0.9.7' && l.reason === 'trusted network',
      ),
    );

    const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
    try {
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd(`AUTH PLAIN ${Buffer.from('\0ceo@example.test\0sesame').toString('base64')}`, /^235 /);
      // The loopback is not trusted here: only the authentication exempts this client.
      await c.cmd('MAIL FROM:<ceo@example.test>', /^250 /);
      await c.cmd('RCPT TO:<partner@far.test>', /^250 /);
    } finally {
      c.close();
    }
    assert.ok(srv.logs.some((l) => l.msg === 'greylist: exempt' && l.reason === 'authenticated'));
  });

  it('fails open when the State service fails: the recipient is accepted and the failure logged at error', async () => {
    await resolveToken(srv.app.generation.container, Tokens.State).close();
    assert.equal((await one(srv.port, '127.0.6.1', 'x@stranger.test', 'late@mx.test')).code, 250);
    const line = last(srv.logs, 'late@mx.test');
    assert.equal(line.level, 50);
    assert.match(String(line.msg), /fail open/);
    assert.match(JSON.stringify(line.err), /closed/);
  });
});

describe('greylist: clients on a DNS allow list of the dnsbl plugin', () => {
  let dns: Dnsmasq | null = null;
  let srv: TestServer | null = null;
  before(async () => {
    if (!has(DNSMASQ)) return; // the test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    // 127.0.10.20 is on the allow list wl.test; its neighbour 127.0.10.21 is not.
    dns = await startDnsmasq(
      shared,
      { hosts: [{ name: '20.10.0.127.wl.test', addresses: ['127.0.10.2'] }] },
      {
        stopWithTest: false,
      },
    );
    if (!dns) return;
    srv = await startServer({
      plugins: [acceptAllRecipients],
      entries: [
        { name: 'dnsbl', config: { allow: [{ zone: 'wl.test' }], trustedNetworks: [] } },
        { name: 'greylist', config: { delay: DELAY_MS, retryWindow: '1m', trustedNetworks: [] } },
        'test-accept-rcpt',
      ],
      config: { dns: { servers: [dns.server], timeout: 2000 } },
    });
  });
  after(async () => {
    await srv?.close();
    await dns?.stop();
  });

  it('lets an allow-listed client through at once, and greylists its neighbour that is not listed', async (t) => {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return;
    assert.ok(srv, 'server started with dnsmasq');
    assert.equal((await one(srv.port, '127.0.10.20', 'x@stranger.test', 'bob@mx.test')).code, 250);
    const exempt = srv.logs.find((l) => l.msg === 'greylist: exempt' && l.ip === '127.0.10.20');
    assert.ok(exempt, 'the exemption is logged');
    assert.equal(exempt.reason, 'dns allow list');
    assert.deepEqual(exempt.allowedBy, ['wl.test']);
    assert.equal((await one(srv.port, '127.0.10.21', 'x@stranger.test', 'bob@mx.test')).code, 451);
  });
});

describe('greylist: senders whose domain publishes SPF for the client', () => {
  let dns: Dnsmasq | null = null;
  let withMailauth: TestServer | null = null;
  let withoutMailauth: TestServer | null = null;
  before(async () => {
    if (!has(DNSMASQ)) return; // the test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    // spf-sender.test sends from 127.0.20.0/24 only; ~all so that SPF alone refuses nobody.
    dns = await startDnsmasq(
      shared,
      { txt: [{ name: 'spf-sender.test', text: 'v=spf1 ip4:127.0.20.0/24 ~all' }] },
      { stopWithTest: false },
    );
    if (!dns) return;
    const greylist = {
      name: 'greylist',
      config: { delay: DELAY_MS, retryWindow: '1m', trustedNetworks: [] },
    };
    const config = { dns: { servers: [dns.server], timeout: 2000 } };
    withMailauth = await startServer({
      plugins: [acceptAllRecipients],
      entries: [{ name: 'mailauth', config: { trustedNetworks: [] } }, greylist, 'test-accept-rcpt'],
      config,
    });
    withoutMailauth = await startServer({
      plugins: [acceptAllRecipients],
      entries: [greylist, 'test-accept-rcpt'],
      config,
    });
  });
  after(async () => {
    await withMailauth?.close();
    await withoutMailauth?.close();
    await dns?.stop();
  });

  it('accepts at once a client the SPF of the sender domain covers, and greylists one it does not', async (t) => {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return;
    const srv = withMailauth;
    assert.ok(srv, 'server started with dnsmasq');
    assert.equal((await one(srv.port, '127.0.20.5', 'news@spf-sender.test', 'bob@mx.test')).code, 250);
    const exempt = last(srv.logs, 'bob@mx.test');
    assert.equal(exempt.msg, 'greylist: exempt');
    assert.equal(exempt.reason, 'spf pass');
    assert.equal(exempt.spfDomain, 'spf-sender.test');

    // The same sender from a network its SPF does not name: softfail, greylisted, and said why.
    const outside = await one(srv.port, '127.0.21.5', 'news@spf-sender.test', 'carol@mx.test');
    assert.match(outside.raw, /^451 4\.7\.1 Greylisted/);
    const line = last(srv.logs, 'carol@mx.test');
    assert.equal(line.msg, 'greylist: greylisted');
    assert.equal(line.spf, 'softfail');
  });

  it('without the mailauth plugin no SPF result is known, and the exemption does not apply', async (t) => {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return;
    const srv = withoutMailauth;
    assert.ok(srv, 'server started with dnsmasq');
    const r = await one(srv.port, '127.0.20.5', 'news@spf-sender.test', 'bob@mx.test');
    assert.match(r.raw, /^451 4\.7\.1 Greylisted/);
    assert.equal(last(srv.logs, 'bob@mx.test').spf, null);
  });
});

describe('greylist: two servers sharing one Redis', { skip: redisMissing }, () => {
  let redis: RedisPeer;
  let a: TestServer;
  let b: TestServer;
  before(async () => {
    redis = await startRedis();
    const opts = {
      plugins: [acceptAllRecipients],
      entries: [
        { name: 'greylist', config: { delay: DELAY_MS, retryWindow: '1m', trustedNetworks: [] } },
        'test-accept-rcpt',
      ],
      config: { state: { backend: 'redis' as const, redis: { url: redis.url, timeout: 500 } } },
    };
    a = await startServer(opts);
    b = await startServer(opts);
  });
  after(async () => {
    await a.close();
    await b.close();
    await redis.stop();
  });

  it('a triplet greylisted by one server is let through by the other after the delay, and both remember it', async () => {
    assert.equal((await one(a.port, '127.0.7.1', 'alice@example.test', 'bob@mx.test')).code, 451);
    assert.equal(last(a.logs, 'bob@mx.test').msg, 'greylist: greylisted');
    assert.equal((await one(b.port, '127.0.7.1', 'alice@example.test', 'bob@mx.test')).code, 451);
    assert.equal(last(b.logs, 'bob@mx.test').msg, 'greylist: greylisted, retry too early');
    await afterDelay();
    assert.equal((await one(b.port, '127.0.7.1', 'alice@example.test', 'bob@mx.test')).code, 250);
    assert.equal(last(b.logs, 'bob@mx.test').msg, 'greylist: passed after retry');
    assert.equal((await one(a.port, '127.0.7.1', 'alice@example.test', 'bob@mx.test')).code, 250);
    assert.equal(last(a.logs, 'bob@mx.test').msg, 'greylist: passed, known triplet');
  });
});

const ACCEPT_ALL = `import { definePlugin, accept } from 'petrel';
export default definePlugin({ name: 'accept-all', setup: () => ({ rcpt: async () => accept() }) });
`;

describe('greylist: two workers of one server sharing the embedded State store', () => {
  let dir: string;
  let server: PetrelProcess;
  let port: number;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-greylist-'));
    writeFileSync(join(dir, 'accept-all.mjs'), ACCEPT_ALL);
    writeFileSync(
      join(dir, 'petrel.yaml'),
      stringify({
        hostname: 'mx.workers.test',
        workers: 2,
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0, limits: { maxConnectionsPerIp: 200 } }],
        spool: { dir: './spool' },
        log: { level: 'info' },
        plugins: [
          { name: 'greylist', config: { delay: DELAY_MS, retryWindow: '1m', trustedNetworks: [] } },
          './accept-all.mjs',
        ],
      }),
    );
    server = await PetrelProcess.start(join(dir, 'petrel.yaml'), dir, 30_000);
    const started = server.logs.find((l) => l.msg === 'petrel started');
    port = (started?.listeners as { port: number }[])[0]!.port;
    for (const w of [0, 1]) await server.waitForLog((l) => l.msg === 'worker started' && l.worker === w);
  });
  after(() => {
    server?.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  it('a triplet greylisted by one worker is let through by the other after the delay', async () => {
    const ip = '127.0.8.1';
    assert.equal((await one(port, ip, 'alice@example.test', 'bob@mx.test')).code, 451);
    const first = await server.waitForLog((l) => l.msg === 'greylist: greylisted' && l.to === 'bob@mx.test');
    await afterDelay();
    // Connections go to whichever worker accepts first: find one served by the other worker. A
    // probe recipient (greylisted, never retried) names the worker serving the connection.
    let passed: LogLine | null = null;
    for (let i = 0; i < 40 && !passed; i++) {
      const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: ip });
      try {
        await c.expect(/^220 /);
        await c.ehlo();
        await c.cmd('MAIL FROM:<probe@example.test>', /^250 /);
        await c.cmd(`RCPT TO:<probe${i}@mx.test>`, /^451 /);
        const probe = await server.waitForLog((l) => l.to === `probe${i}@mx.test`);
        if (probe.worker === first.worker) continue;
        await c.cmd('RSET', /^250 /);
        await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
        await c.cmd('RCPT TO:<bob@mx.test>', /^250 /);
        passed = await server.waitForLog(
          (l) => l.msg === 'greylist: passed after retry' && l.to === 'bob@mx.test',
        );
      } finally {
        c.close();
      }
    }
    assert.ok(passed, 'a connection reached the other worker');
    assert.notEqual(passed.worker, first.worker);
  });

  it('of two workers seeing a new triplet at once, exactly one records it as the first attempt', async () => {
    const ip = '127.0.8.2';
    const replies = await Promise.all(
      Array.from({ length: 8 }, () => one(port, ip, 'race@example.test', 'race@mx.test')),
    );
    for (const r of replies) assert.equal(r.code, 451);
    await server.waitForLog(
      () =>
        server.logs.filter((l) => l.to === 'race@mx.test' && String(l.msg).startsWith('greylist:')).length ===
        8,
    );
    const lines = server.logs.filter((l) => l.to === 'race@mx.test');
    assert.equal(lines.filter((l) => l.msg === 'greylist: greylisted').length, 1);
    assert.equal(lines.filter((l) => l.msg === 'greylist: greylisted, retry too early').length, 7);
  });
});
