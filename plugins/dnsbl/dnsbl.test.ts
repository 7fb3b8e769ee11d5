/**
 * dnsbl over the wire: a Petrel with the plugin, a dnsmasq serving block and allow lists, and
 * SMTP sessions from chosen 127.0.0.x source addresses (and ::1) so each client has its own
 * answer.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type AddressInfo } from 'node:net';
import {
  accept,
  definePlugin,
  deny,
  proceed,
  type PetrelConfigInput,
  type PluginDefinition,
} from '../../core/index.js';
import { DNSMASQ, DNSMASQ_PACKAGE, startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { has, requirePeer } from '../../test/harness/peers.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { Dnsbl, type DnsblClient } from './api.js';
import { classify, domainName, expandIPv6, reversedName } from './codes.js';
import { dnsblConfig } from './config.js';

const V6_NAME = `${'0'.repeat(31).split('').join('.')}`;

/**
 * bl.test: a DNSBL (127.0.0.2 spam, 127.0.0.4 exploit); wl.test: a DNSWL; dbl.test: an RHSBL;
 * slow.test never answers.
 */
const RECORDS = {
  hosts: [
    { name: '2.0.0.127.bl.test', addresses: ['127.0.0.2'] },
    // Two codes (dnsmasq takes one IPv4 address per host record).
    { name: '3.0.0.127.bl.test', addresses: ['127.0.0.4'] },
    { name: '3.0.0.127.bl.test', addresses: ['127.0.0.2'] },
    // The "you query too much" answer of an open resolver: never a listing.
    { name: '5.0.0.127.bl.test', addresses: ['127.255.255.254'] },
    // Listed, but also on the allow list.
    { name: '6.0.0.127.bl.test', addresses: ['127.0.0.2'] },
    { name: '6.0.0.127.wl.test', addresses: ['127.0.10.2'] },
    // Listed, but in trustedNetworks.
    { name: '9.0.0.127.bl.test', addresses: ['127.0.0.2'] },
    // ::1 in nibble form (RFC 5782 §2.4).
    { name: `1.${V6_NAME}.bl.test`, addresses: ['127.0.0.2'] },
    { name: 'spammer.test.dbl.test', addresses: ['127.0.1.2'] },
    { name: 'bad-helo.test.dbl.test', addresses: ['127.0.1.2'] },
  ],
  unanswered: ['slow.test'],
};

const BL = { zone: 'bl.test', name: 'Test BL', codes: { '127.0.0.2': 'spam', '127.0.0.4': 'exploit' } };
const WL = { zone: 'wl.test', refused: ['127.0.0.255'] };
const DBL = { zone: 'dbl.test', type: 'domain', message: 'see https://dbl.test/?q={subject}' };

/** The Dnsbl note at RCPT, as a greylisting plugin listed after dnsbl would read it. */
function noteReader(into: (DnsblClient | undefined)[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async rcpt({ session }) {
        into.push(session.notes.get(Dnsbl));
        return proceed();
      },
    }),
  });
}

const testAuth = definePlugin({
  name: 'test-auth',
  setup: () => ({
    auth: async ({ username, password }) =>
      username === 'ceo@example.test' && password === 'sesame' ? accept() : deny(535, '5.7.8', 'No'),
  }),
});

interface Sent {
  readonly greeting: Reply;
  readonly mail: Reply | null;
  readonly rcpts: Reply[];
  readonly data: Reply | null;
}

/** One SMTP transaction from `ip` as a transcript; stops at the first refusal of the session. */
async function send(
  port: number,
  opts: {
    ip: string;
    host?: string;
    helo?: string;
    from?: string;
    rcpts?: readonly string[];
    auth?: boolean;
  },
): Promise<Sent> {
  const c = await SmtpClient.connect(port, opts.host ?? '127.0.0.1', { localAddress: opts.ip });
  try {
    const greeting = await c.expect(/^\d{3} /);
    if (greeting.code !== 220) return { greeting, mail: null, rcpts: [], data: null };
    await c.ehlo(opts.helo ?? 'client.test');
    if (opts.auth) {
      await c.cmd('STARTTLS', /^220 /);
      await c.upgrade();
      await c.ehlo(opts.helo ?? 'client.test');
      await c.cmd(`AUTH PLAIN ${Buffer.from('\0ceo@example.test\0sesame').toString('base64')}`, /^235 /);
    }
    const mail = await c.cmd(`MAIL FROM:<${opts.from ?? 'alice@example.test'}>`, /^\d{3} /);
    const rcpts: Reply[] = [];
    if (mail.code === 250)
      for (const r of opts.rcpts ?? ['bob@mx.test']) rcpts.push(await c.cmd(`RCPT TO:<${r}>`, /^\d{3} /));
    let data: Reply | null = null;
    if (rcpts.some((r) => r.code === 250)) {
      await c.cmd('DATA', /^354 /);
      c.write('Subject: hello\r\n\r\nHello.\r\n.\r\n');
      data = await c.reply(30_000);
    }
    c.send('QUIT');
    return { greeting, mail, rcpts, data };
  } finally {
    c.close();
  }
}

/** How many times dnsmasq was asked for `name` (its query log). */
function queries(dns: Dnsmasq, name: string): number {
  return dns
    .log()
    .split('\n')
    .filter((l) => l.includes(`query[A] ${name} `)).length;
}

const verdicts = (srv: TestServer) => srv.logs.filter((l) => l.msg === 'dnsbl verdict');

describe('dnsbl: block and allow lists served by dnsmasq', () => {
  let dns: Dnsmasq | null = null;
  const servers: TestServer[] = [];
  const captured: CapturedMessage[] = [];
  const notes: (DnsblClient | undefined)[] = [];

  before(async () => {
    if (!has(DNSMASQ)) return; // each test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    dns = await startDnsmasq(shared, RECORDS, { stopWithTest: false });
  });
  after(async () => {
    for (const s of servers) await s.close();
    await dns?.stop();
  });

  /** A Petrel with the plugin configured so, on 127.0.0.1 and ::1. */
  async function server(
    t: TestContext,
    config: Record<string, unknown>,
    dnsTimeout = 2000,
    serverConfig: Partial<PetrelConfigInput> = {},
  ): Promise<TestServer | null> {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return null;
    assert.ok(dns, 'dnsmasq started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured), noteReader(notes), testAuth],
      entries: [
        'test-auth',
        { name: 'dnsbl', config: { trustedNetworks: ['127.0.0.9/32'], ...config } },
        'test-note-reader',
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: {
        dns: { servers: [dns.server], timeout: dnsTimeout },
        listeners: [
          { kind: 'smtp', address: '127.0.0.1', port: 0 },
          { kind: 'smtp', address: '::1', port: 0 },
        ],
        ...serverConfig,
      },
    });
    servers.push(srv);
    return srv;
  }
  const v6Port = (srv: TestServer): number => srv.app.listeners.find((l) => l.address === '::1')!.port;

  it('refuses a listed client at RCPT naming the list, and still takes mail for postmaster and abuse', async (t) => {
    const srv = await server(t, { block: [BL], allow: [WL] });
    if (!srv) return;
    const r = await send(srv.port, {
      ip: '127.0.0.2',
      rcpts: ['bob@mx.test', 'postmaster@mx.test', 'abuse@mx.test'],
    });
    assert.equal(r.greeting.code, 220);
    assert.equal(r.mail?.code, 250);
    assert.match(r.rcpts[0]!.raw, /^550 5\.7\.1 127\.0\.0\.2 listed by Test BL \(spam\)/);
    assert.match(r.rcpts[1]!.raw, /^250 /);
    assert.match(r.rcpts[2]!.raw, /^250 /);
    assert.equal(r.data?.code, 250);
    assert.deepEqual(captured.at(-1)!.recipients, ['postmaster@mx.test', 'abuse@mx.test']);
    // One line for the decision, with the list, the code and the reason.
    const lines = verdicts(srv);
    assert.equal(lines.length, 1, JSON.stringify(lines));
    assert.equal(lines[0]!.action, 'reject');
    assert.equal(lines[0]!.list, 'Test BL');
    assert.equal(lines[0]!.code, '127.0.0.2');
    assert.equal(lines[0]!.reason, 'spam');
    assert.equal(lines[0]!.stage, 'rcpt');
    // What a later plugin sees: listed, not allowed.
    const note = notes.at(-1)!;
    assert.deepEqual(note.listedBy, ['Test BL']);
    assert.equal(note.allowed, false);
  });

  it('accepts a client no list knows, and logs the decision as a pass', async (t) => {
    const srv = await server(t, { block: [BL], allow: [WL] });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.7' });
    assert.match(r.rcpts[0]!.raw, /^250 /);
    assert.equal(r.data?.code, 250);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'pass');
    assert.equal(line.reason, 'not listed');
    assert.deepEqual(
      notes.at(-1)!.lists.map((l) => [l.list, l.status]),
      [
        ['wl.test', 'clear'],
        ['Test BL', 'clear'],
      ],
    );
  });

  it('does not take the "refused" code 127.255.255.254 for a listing, and says the list refuses us', async (t) => {
    const srv = await server(t, { block: [BL] });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.5' });
    assert.match(r.rcpts[0]!.raw, /^250 /);
    const warn = srv.logs.find((l) => l.msg === 'dnsbl: the list refuses our queries; not treated as listed');
    assert.ok(warn, 'warned');
    assert.equal(warn.code, '127.255.255.254');
    assert.equal(warn.level, 40);
    assert.equal(notes.at(-1)!.lists[0]!.status, 'refused');
  });

  it('fails open when a list does not answer in time, with a log line saying so', async (t) => {
    const srv = await server(t, { block: [{ zone: 'slow.test' }, BL], timeout: 300 }, 5000);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.2' });
    // slow.test gave nothing; bl.test still answered and still counts.
    assert.match(r.rcpts[0]!.raw, /^550 5\.7\.1 .*Test BL/);
    const fail = srv.logs.find((l) => l.msg === 'dnsbl: lookup failed, not treated as listed');
    assert.equal(fail?.list, 'slow.test');
    assert.equal(fail?.error, 'timeout');
    const clean = await send(srv.port, { ip: '127.0.0.7' });
    assert.equal(clean.data?.code, 250);
    assert.deepEqual(verdicts(srv).at(-1)!.failed, ['slow.test']);
  });

  it('answers the greeting, EHLO and MAIL while the lookups are still running; RCPT waits for them', async (t) => {
    const srv = await server(t, { block: [{ zone: 'slow.test' }], timeout: 2000 }, 5000);
    if (!srv) return;
    const failed = () => srv.logs.filter((l) => l.msg === 'dnsbl: lookup failed, not treated as listed');
    const c = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: '127.0.0.11' });
    try {
      await c.expect(/^220 /);
      await c.ehlo('client.test');
      await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
      assert.equal(failed().length, 0, 'the lookup has not ended yet');
      await c.cmd('RCPT TO:<bob@mx.test>', /^250 /);
      assert.equal(failed().length, 1, 'RCPT was answered once the lookup had failed');
    } finally {
      c.close();
    }
  });

  it('exempts a client on an allow list from the block lists, and tells later plugins', async (t) => {
    const srv = await server(t, { block: [BL], allow: [WL] });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.6' });
    assert.match(r.rcpts[0]!.raw, /^250 /);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'allow');
    assert.equal(line.list, 'wl.test');
    assert.equal(line.code, '127.0.10.2');
    const note = notes.at(-1)!;
    assert.equal(note.allowed, true);
    assert.deepEqual(note.allowedBy, ['wl.test']);
    assert.deepEqual(note.listedBy, ['Test BL']);
  });

  it('refuses a sender domain on a domain list, and a HELO name on it', async (t) => {
    const srv = await server(t, { block: [DBL] });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.7', from: 'eve@spammer.test' });
    assert.match(
      r.rcpts[0]!.raw,
      /^550 5\.7\.1 spammer\.test listed by dbl\.test; see https:\/\/dbl\.test\/\?q=spammer\.test/,
    );
    const byHelo = await send(srv.port, { ip: '127.0.0.7', helo: 'bad-helo.test' });
    assert.match(byHelo.rcpts[0]!.raw, /^550 5\.7\.1 bad-helo\.test listed by dbl\.test/);
    const fine = await send(srv.port, { ip: '127.0.0.7', from: 'alice@example.test' });
    assert.equal(fine.data?.code, 250);
  });

  it('looks up an IPv6 client in nibble form', async (t) => {
    const srv = await server(t, { block: [BL], trustedNetworks: [] });
    if (!srv) return;
    const r = await send(v6Port(srv), { ip: '::1', host: '::1' });
    assert.match(r.rcpts[0]!.raw, /^550 5\.7\.1 ::1 listed by Test BL \(spam\)/);
  });

  it('neither looks up a trusted client nor refuses an authenticated one', async (t) => {
    const srv = await server(t, { block: [BL] });
    if (!srv) return;
    const trusted = await send(srv.port, { ip: '127.0.0.9' });
    assert.equal(trusted.data?.code, 250);
    assert.equal(queries(dns!, '9.0.0.127.bl.test'), 0, dns!.log());
    assert.equal(notes.at(-1), undefined);

    const authed = await send(srv.port, { ip: '127.0.0.3', auth: true });
    assert.equal(authed.data?.code, 250);
    assert.ok(!verdicts(srv).some((l) => l.action === 'reject'));
  });

  it('caches answers in the State service: a second connection asks DNS nothing', async (t) => {
    // 127.0.0.8 is on no list: the cached answer is the NXDOMAIN.
    const srv = await server(t, { block: [BL] });
    if (!srv) return;
    const before = queries(dns!, '8.0.0.127.bl.test');
    await send(srv.port, { ip: '127.0.0.8' });
    assert.equal(queries(dns!, '8.0.0.127.bl.test'), before + 1);
    await send(srv.port, { ip: '127.0.0.8' });
    assert.equal(queries(dns!, '8.0.0.127.bl.test'), before + 1, 'answered from the cache');
    assert.equal(notes.at(-1)!.lists[0]!.cached, true);
  });

  it('keeps a cached answer no longer than its TTL: then DNS is asked again', async (t) => {
    const srv = await server(t, { block: [BL], cache: { negativeTtl: '1s' } });
    if (!srv) return;
    const name = '13.0.0.127.bl.test';
    const before = queries(dns!, name);
    await send(srv.port, { ip: '127.0.0.13' });
    await send(srv.port, { ip: '127.0.0.13' });
    assert.equal(queries(dns!, name), before + 1, 'the second from the cache');
    await new Promise((r) => setTimeout(r, 1200));
    await send(srv.port, { ip: '127.0.0.13' });
    assert.equal(queries(dns!, name), before + 2, 'asked again once the answer expired');
    assert.equal(notes.at(-1)!.lists[0]!.cached, false);
  });

  it('still judges by DNS when the State service fails: no cache, a warning, no listing made up', async (t) => {
    // A Redis that is not there: every State operation fails after its timeout.
    const port = await new Promise<number>((resolve) => {
      const s = createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    const srv = await server(t, { block: [BL] }, 2000, {
      state: { backend: 'redis', redis: { url: `redis://127.0.0.1:${port}`, timeout: 200 } },
    });
    if (!srv) return;
    const clean = await send(srv.port, { ip: '127.0.0.7' });
    assert.equal(clean.data?.code, 250);
    const listed = await send(srv.port, { ip: '127.0.0.2' });
    assert.match(listed.rcpts[0]!.raw, /^550 5\.7\.1 127\.0\.0\.2 listed by Test BL/);
    assert.ok(
      srv.logs.some((l) => l.msg === 'dnsbl: state cache not readable, querying DNS' && l.level === 40),
    );
    assert.ok(srv.logs.some((l) => l.msg === 'dnsbl: answer not cached, state not writable'));
  });

  it('applies the configured action: defer at RCPT, tag with a header, reject at connect', async (t) => {
    const deferring = await server(t, { block: [{ ...BL, action: 'defer' }] });
    if (!deferring) return;
    const d = await send(deferring.port, { ip: '127.0.0.2' });
    assert.match(d.rcpts[0]!.raw, /^451 4\.7\.1 127\.0\.0\.2 listed by Test BL/);

    const tagging = await server(t, { block: [{ ...BL, action: 'tag' }] });
    const tg = await send(tagging!.port, { ip: '127.0.0.3' });
    assert.equal(tg.data?.code, 250);
    assert.match(
      captured.at(-1)!.data.toString(),
      /^X-DNSBL: 127\.0\.0\.3 listed by Test BL \(spam, exploit\)\r\n/,
    );

    const early = await server(t, { block: [BL], applyAt: 'connect' });
    const e = await send(early!.port, { ip: '127.0.0.2' });
    // The greeting carries no enhanced code: EHLO has not offered ENHANCEDSTATUSCODES yet.
    assert.match(e.greeting.raw, /^554 127\.0\.0\.2 listed by Test BL/);
    assert.equal(verdicts(early!).at(-1)!.stage, 'connect');
  });
});

describe('dnsbl: names and codes', () => {
  it('reverses IPv4 octets and IPv6 nibbles under the zone (RFC 5782 §2.1, §2.4)', () => {
    assert.equal(reversedName('192.0.2.99', 'bl.test'), '99.2.0.192.bl.test');
    assert.equal(reversedName('::ffff:192.0.2.99', 'bl.test'), '99.2.0.192.bl.test');
    assert.equal(
      reversedName('2001:db8:1:2::5', 'bl.test'),
      '5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test',
    );
    assert.equal(expandIPv6('::'), '0'.repeat(32));
    assert.equal(reversedName('not an address', 'bl.test'), null);
  });

  it('queries domains in ASCII and skips names a domain list cannot hold', () => {
    assert.equal(domainName('Example.TEST', 'dbl.test'), 'example.test.dbl.test');
    assert.equal(domainName('bücher.test', 'dbl.test'), 'xn--bcher-kva.test.dbl.test');
    assert.equal(domainName('[192.0.2.1]', 'dbl.test'), null);
    assert.equal(domainName('localhost', 'dbl.test'), null);
  });

  it('reads codes: mapped ones list, 127.255.255.x and codes outside 127/8 are refusals', () => {
    const list = { codes: { '127.0.0.2': 'spam' }, refused: ['127.0.0.255'] };
    assert.deepEqual(classify(['127.0.0.2'], list), {
      status: 'listed',
      reasons: ['spam'],
      decisive: ['127.0.0.2'],
    });
    assert.equal(classify(['127.0.0.3'], list).status, 'clear'); // not mapped
    assert.equal(classify(['127.255.255.255'], list).status, 'refused');
    assert.equal(classify(['127.0.0.255'], list).status, 'refused');
    assert.equal(classify(['10.0.0.1'], { refused: [] }).status, 'refused');
    assert.equal(classify(['127.0.0.3'], { refused: [] }).status, 'listed');
  });

  it('refuses at startup a config that maps a refusal code to a listing', () => {
    const bad = dnsblConfig.safeParse({ block: [{ zone: 'bl.test', codes: { '127.255.255.254': 'spam' } }] });
    assert.equal(bad.success, false);
    assert.match(JSON.stringify(bad.error?.issues), /cannot mean a listing/);
  });

  it('refuses at startup two lists of one name, which replies and logs could not tell apart', () => {
    const twice = dnsblConfig.safeParse({
      block: [{ zone: 'bl.test' }, { zone: 'bl.test', type: 'domain' }],
    });
    assert.equal(twice.success, false);
    assert.match(twice.error?.issues[0]?.message ?? '', /already called "bl\.test"/);
    const named = dnsblConfig.safeParse({
      block: [{ zone: 'bl.test' }, { zone: 'bl.test', type: 'domain', name: 'BL domains' }],
    });
    assert.equal(named.success, true);
  });
});
