/**
 * Outbound throttling over the wire: Petrel takes mail over SMTP and relays it (queue, outbound
 * through a smarthost) to an smtp-server peer, with `limit.outbound` holding one destination
 * domain to a low rate. Deliveries over the rate wait in the queue and go out later; they count
 * no attempt, send no delay notice, and nothing is bounced or lost. Two servers sharing a Redis
 * share the rate.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { definePlugin } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import { acceptAllRecipients, startServer, type TestServer } from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { redisMissing, startRedis, type RedisPeer } from '../../test/harness/redis.js';
import { freePort } from '../../test/harness/peers.js';
import { FAST, smtpPeer, type Peer } from '../outbound/test-support.js';
import { Queue } from '../queue/api.js';
import { limitConfig } from './config.js';

type Log = Record<string, unknown>;

/** Remembers what the queue tells the plugins after each attempt (delivered, deferred, failed). */
function recorder(into: string[]) {
  return definePlugin({
    name: 'test-told',
    setup: () => ({
      delivered: async ({ message }) => void into.push(`delivered ${message.id}`),
      deferred: async ({ message }) => void into.push(`deferred ${message.id}`),
      failed: async ({ message, reason }) => void into.push(`failed ${message.id} ${reason}`),
    }),
  });
}

/**
 * Petrel that relays everything to `peer`, with `limit.outbound` as given, the queue, `bounce`
 * warning of delays after one second (so a postponement taken for a deferral would send one),
 * and the outbound transport.
 */
async function relay(
  t: TestContext | null,
  peer: Peer,
  outbound: unknown[],
  told: string[],
  config: Record<string, unknown> = {},
): Promise<TestServer> {
  const srv = await startServer({
    plugins: [acceptAllRecipients, recorder(told)],
    entries: [
      'test-accept-rcpt',
      { name: 'limit', config: { outbound } },
      { name: 'queue', config: { retry: '10m' } },
      { name: 'bounce', config: { delayWarning: '1s' } },
      {
        name: 'outbound',
        config: { smarthost: { host: peer.host, port: peer.port, tls: 'opportunistic' }, timeouts: FAST },
      },
      'test-told',
    ],
    config: { hostname: 'relay.test', localDomains: ['relay.test'], ...config },
  });
  t?.after(() => srv.close());
  return srv;
}

/** One message over SMTP, asking for failure and delay notices; resolves to its queue id. */
async function send(port: number, to: string, subject: string): Promise<string> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo('client.test');
    await c.cmd('MAIL FROM:<alice@sender.test>', /^250 /);
    await c.cmd(`RCPT TO:<${to}> NOTIFY=FAILURE,DELAY`, /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`From: alice@sender.test\r\nTo: ${to}\r\nSubject: ${subject}\r\n\r\nHello.\r\n.\r\n`);
    const reply = await c.expect(/^250 /);
    await c.cmd('QUIT', /^221 /);
    return /queued as (\S+)/.exec(reply.text)![1]!;
  } finally {
    c.close();
  }
}

async function until<T>(check: () => T | undefined | false, what: string, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const postponements = (logs: readonly Log[], id?: string): Log[] =>
  logs.filter((l) => l.msg === 'delivery postponed' && (id === undefined || l.queueId === id));
const attempts = (logs: readonly Log[], id: string): Log[] =>
  logs.filter((l) => l.msg === 'delivery attempt' && l.queueId === id);

describe('limit: outbound config', () => {
  it('reads rates per destination domain as A-labels, and refuses a domain in two entries', () => {
    const c = limitConfig.parse({
      outbound: [{ domains: ['Gmail.com.', 'bücher.test'], max: 100, per: '1m' }],
    });
    assert.deepEqual(c.outbound, [{ domains: ['gmail.com', 'xn--bcher-kva.test'], max: 100, per: 60_000 }]);
    assert.deepEqual(limitConfig.parse({}).outbound, []);
    const twice = limitConfig.safeParse({
      outbound: [
        { domains: ['gmail.com'], max: 1, per: '1m' },
        { domains: ['googlemail.com', 'GMAIL.com'], max: 1, per: '1m' },
      ],
    });
    assert.match(twice.error?.issues[0]?.message ?? '', /gmail\.com is in another outbound entry/);
    assert.equal(limitConfig.safeParse({ outbound: [{ domains: ['x'], max: 1, per: '1m' }] }).success, false);
    assert.equal(
      limitConfig.safeParse({ outbound: [{ domains: ['a.test'], max: 1, per: '10ms' }] }).success,
      false,
    );
  });
});

describe('limit: outbound rate per destination domain', () => {
  it('delivers the messages over the rate later, without counting an attempt, warning or bouncing', async (t) => {
    const peer = await smtpPeer(t, '127.0.0.1', await freePort());
    const told: string[] = [];
    const srv = await relay(t, peer, [{ domains: ['slow.test'], max: 2, per: '3s' }], told);
    const queue = resolveToken(srv.app.generation.container, Queue);

    // Four at once, over a rate of two.
    const ids = await Promise.all(
      [1, 2, 3, 4].map((i) => send(srv.port, `bob${i}@slow.test`, `number ${i}`)),
    );
    // Another domain is not held back by this rate.
    const other = await send(srv.port, 'carol@fast.test', 'elsewhere');

    // While one waits, the queue says why, and that no attempt was made.
    const first = await until(() => postponements(srv.logs)[0], 'a postponement');
    assert.equal(first.postponedBy, 'limit');
    assert.equal(first.reason, 'throttled: at most 2 per 3s to slow.test');
    const waiting = (await queue.get(first.queueId as string))!.recipients[0]!;
    assert.equal(waiting.attempts, 0);
    assert.equal(waiting.status, 'pending');
    assert.deepEqual(waiting.postponed, { reason: 'throttled: at most 2 per 3s to slow.test', by: 'limit' });
    assert.ok(waiting.nextAttemptAt!.getTime() > Date.parse(String(first.nextAttemptAt)) - 1000);

    await until(() => peer.messages.length === 5, 'all five messages at the peer');
    await until(() => ids.every((id) => told.includes(`delivered ${id}`)), 'every delivery told');
    // The peer got each message once, and no delivery report (from <>) came with them.
    assert.deepEqual(peer.messages.map((m) => m.mailFrom).sort(), Array(5).fill('alice@sender.test'));
    assert.equal(postponements(srv.logs, other).length, 0);
    const postponed = ids.filter((id) => postponements(srv.logs, id).length > 0);
    assert.ok(postponed.length >= 2, `two of four over a rate of two: ${JSON.stringify(postponed)}`);
    for (const id of ids) {
      // One attempt each, however often it was postponed: the one that delivered it.
      assert.deepEqual(
        attempts(srv.logs, id).map((l) => [l.status, l.attempts]),
        [['delivered', 1]],
      );
    }
    assert.deepEqual(
      told.filter((e) => !e.startsWith('delivered ')),
      [],
      'no deferral, failure or bounce',
    );
    // The rate held: the third delivery ended at least a window (3s) after the first began, so
    // at least a window less the time one delivery takes after the first ended.
    const ended = ids.map((id) => Number(attempts(srv.logs, id)[0]!.time)).sort((a, b) => a - b);
    assert.ok(ended[2]! - ended[0]! >= 3000 - 1500, `deliveries ended at ${ended.join(', ')}`);
  });

  it('a flush asks again at once: still over the rate, it waits on, with no attempt counted', async (t) => {
    const peer = await smtpPeer(t, '127.0.0.1', await freePort());
    const told: string[] = [];
    const srv = await relay(t, peer, [{ domains: ['slow.test'], max: 1, per: '1h' }], told);
    const queue = resolveToken(srv.app.generation.container, Queue);
    await send(srv.port, 'bob@slow.test', 'first');
    await until(() => peer.messages.length === 1, 'the first message at the peer');
    const id = await send(srv.port, 'bob@slow.test', 'second');
    await until(() => postponements(srv.logs, id).length === 1, 'the second postponed');
    assert.equal(await queue.flush({ id }), 1);
    await until(() => postponements(srv.logs, id).length === 2, 'postponed again after the flush');
    const r = (await queue.get(id))!.recipients[0]!;
    assert.equal(r.attempts, 0);
    assert.equal(r.postponed?.by, 'limit');
    assert.equal(attempts(srv.logs, id).length, 0);
    assert.equal(peer.messages.length, 1);
    assert.deepEqual(
      told.filter((e) => e.includes(id)),
      [],
    );
  });
});

describe('limit: one outbound rate for servers sharing a Redis', { skip: redisMissing }, () => {
  let redis: RedisPeer;
  before(async () => {
    redis = await startRedis();
  });
  after(async () => {
    await redis?.stop();
  });

  it('a server that sent nothing itself holds back a delivery the other server used the rate for', async (t) => {
    const peer = await smtpPeer(t, '127.0.0.1', await freePort());
    const state = { state: { backend: 'redis', redis: { url: redis.url, timeout: 1000 } } };
    const rate = [{ domains: ['shared.test'], max: 2, per: '8s' }];
    const toldA: string[] = [];
    const toldB: string[] = [];
    const a = await relay(t, peer, rate, toldA, state);
    const b = await relay(t, peer, rate, toldB, state);

    const fromA = [await send(a.port, 'one@shared.test', 'a1'), await send(a.port, 'two@shared.test', 'a2')];
    await until(() => fromA.every((id) => toldA.includes(`delivered ${id}`)), 'both from a delivered');
    assert.equal(postponements(a.logs).length, 0);

    const fromB = await send(b.port, 'three@shared.test', 'b1');
    const held = await until(() => postponements(b.logs, fromB)[0], 'b postponing its first delivery');
    assert.equal(held.reason, 'throttled: at most 2 per 8s to shared.test');
    assert.equal(attempts(b.logs, fromB).length, 0);

    await until(() => toldB.includes(`delivered ${fromB}`), 'b delivering it once the window moved on');
    assert.deepEqual(
      attempts(b.logs, fromB).map((l) => [l.status, l.attempts]),
      [['delivered', 1]],
    );
    assert.equal(peer.messages.length, 3);
    assert.deepEqual(
      [...toldA, ...toldB].filter((e) => !e.startsWith('delivered ')),
      [],
    );
  });
});
