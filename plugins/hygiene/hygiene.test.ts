/**
 * hygiene over the wire: a Petrel with the plugin, a dnsmasq serving PTR and A records, and SMTP
 * sessions from chosen 127.0.0.x source addresses so each client has its own reverse DNS.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { accept, definePlugin, deny, proceed, type PluginDefinition } from '../../core/index.js';
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
import { Hygiene, type HygieneResults } from './api.js';
import { heloFindings } from './checks.js';
import { hygieneConfig } from './config.js';

/**
 * 127.0.0.2: PTR good.test, which resolves back (pass). 127.0.0.3: no PTR (fail).
 * 127.0.0.4: PTR liar.test, which resolves elsewhere (fail). 127.0.0.5: no PTR, but on the DNS
 * allow list wl.test. 127.0.0.7: its reverse zone never answers (temperror).
 */
const RECORDS = {
  ptr: [
    { name: '2.0.0.127.in-addr.arpa', target: 'good.test' },
    { name: '4.0.0.127.in-addr.arpa', target: 'liar.test' },
  ],
  hosts: [
    { name: 'good.test', addresses: ['127.0.0.2'] },
    { name: 'liar.test', addresses: ['127.0.0.99'] },
    { name: '5.0.0.127.wl.test', addresses: ['127.0.10.2'] },
  ],
  local: ['test', '0.0.127.in-addr.arpa'],
  unanswered: ['7.0.0.127.in-addr.arpa'],
};

/** The Hygiene note at RCPT, as a plugin listed after hygiene would read it. */
function noteReader(into: (HygieneResults | undefined)[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async rcpt({ session }) {
        into.push(session.notes.get(Hygiene));
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
  readonly ehlo: Reply;
  readonly mail: Reply | null;
  readonly rcpts: Reply[];
  readonly data: Reply | null;
}

/** One SMTP transaction from `ip` as a transcript; stops at the first refusal of the session. */
async function send(
  port: number,
  opts: { ip: string; helo?: string; rcpts?: readonly string[]; auth?: boolean },
): Promise<Sent> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: opts.ip });
  try {
    const greeting = await c.expect(/^220 /);
    const helo = opts.helo ?? 'good.test';
    const ehlo = await c.cmd(`EHLO ${helo}`, /^\d{3}[ -]/);
    if (ehlo.code !== 250) return { greeting, ehlo, mail: null, rcpts: [], data: null };
    if (opts.auth) {
      await c.cmd('STARTTLS', /^220 /);
      await c.upgrade();
      await c.ehlo(helo);
      await c.cmd(`AUTH PLAIN ${Buffer.from('\0ceo@example.test\0sesame').toString('base64')}`, /^235 /);
    }
    const mail = await c.cmd('MAIL FROM:<alice@example.test>', /^\d{3} /);
    const rcpts: Reply[] = [];
    if (mail.code === 250)
      for (const r of opts.rcpts ?? ['bob@mail.test']) rcpts.push(await c.cmd(`RCPT TO:<${r}>`, /^\d{3} /));
    let data: Reply | null = null;
    if (rcpts.some((r) => r.code === 250)) {
      await c.cmd('DATA', /^354 /);
      c.write('Subject: hello\r\n\r\nHello.\r\n.\r\n');
      data = await c.reply(30_000);
    }
    c.send('QUIT');
    return { greeting, ehlo, mail, rcpts, data };
  } finally {
    c.close();
  }
}

const verdicts = (srv: TestServer) => srv.logs.filter((l) => l.msg === 'hygiene verdict');

describe('hygiene: FCrDNS and HELO checks against dnsmasq', () => {
  let dns: Dnsmasq | null = null;
  const servers: TestServer[] = [];
  const captured: CapturedMessage[] = [];
  const notes: (HygieneResults | undefined)[] = [];

  before(async () => {
    if (!has(DNSMASQ)) return; // each test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    dns = await startDnsmasq(shared, RECORDS, { stopWithTest: false });
  });
  after(async () => {
    for (const s of servers) await s.close();
    await dns?.stop();
  });

  /** A Petrel named mx.petrel.test for mail.test, with the plugin configured so. */
  async function server(
    t: TestContext,
    config: Record<string, unknown> = {},
    withDnsbl = false,
  ): Promise<TestServer | null> {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return null;
    assert.ok(dns, 'dnsmasq started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured), noteReader(notes), testAuth],
      entries: [
        'test-auth',
        ...(withDnsbl
          ? [{ name: 'dnsbl', config: { allow: [{ zone: 'wl.test' }], trustedNetworks: ['127.0.0.9/32'] } }]
          : []),
        { name: 'hygiene', config: { trustedNetworks: ['127.0.0.9/32'], timeout: 1500, ...config } },
        'test-note-reader',
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: {
        hostname: 'mx.petrel.test',
        localDomains: ['mail.test'],
        dns: { servers: [dns.server], timeout: 500 },
      },
    });
    servers.push(srv);
    return srv;
  }

  it('passes a client whose PTR name resolves back, and publishes the results as a note', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const before = notes.length;
    const r = await send(srv.port, { ip: '127.0.0.2' });
    assert.equal(r.rcpts[0]?.code, 250);
    assert.equal(r.data?.code, 250);
    assert.doesNotMatch(captured.at(-1)!.data.toString(), /^X-Hygiene:/m);
    const v = verdicts(srv).at(-1)!;
    assert.equal(v.fcrdns, 'pass');
    assert.equal(v.action, 'pass');
    assert.deepEqual(v.ptr, ['good.test']);
    const note = notes.slice(before).at(-1);
    assert.equal(note?.fcrdns.result, 'pass');
    assert.equal(note?.fcrdns.confirmed, 'good.test');
    assert.equal(note?.helo, 'good.test');
    assert.deepEqual(note?.findings, []);
  });

  it('tags a client without reverse DNS by default, and one whose PTR name does not resolve back', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.3' });
    assert.equal(r.rcpts[0]?.code, 250);
    assert.equal(r.data?.code, 250);
    assert.match(captured.at(-1)!.data.toString(), /^X-Hygiene: no reverse DNS for 127\.0\.0\.3\r\n/);
    const r2 = await send(srv.port, { ip: '127.0.0.4' });
    assert.equal(r2.data?.code, 250);
    assert.match(
      captured.at(-1)!.data.toString(),
      /^X-Hygiene: reverse DNS of 127\.0\.0\.4 \(liar\.test\) does not resolve back to it\r\n/,
    );
    const v = verdicts(srv).at(-1)!;
    assert.equal(v.fcrdns, 'fail');
    assert.deepEqual(v.findings, ['fcrdns-fail']);
    assert.equal(v.action, 'tag');
  });

  it('refuses an FCrDNS fail when configured to, yet takes mail for postmaster', async (t) => {
    const srv = await server(t, { actions: { 'fcrdns-fail': 'reject' } });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.3', rcpts: ['bob@mail.test', 'postmaster@mail.test'] });
    assert.equal(r.greeting.code, 220);
    assert.match(r.rcpts[0]!.raw, /^550 5\.7\.1 no reverse DNS for 127\.0\.0\.3/);
    assert.equal(r.rcpts[1]?.code, 250);
    assert.equal(r.data?.code, 250);
    assert.deepEqual(captured.at(-1)!.recipients, ['postmaster@mail.test']);
  });

  it('greets the client while its reverse DNS is still being looked up', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const c = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: '127.0.0.7' });
    try {
      await c.expect(/^220 /);
      const checked = () =>
        srv.logs.filter((l) => l.msg === 'hygiene: fcrdns checked' && l.ip === '127.0.0.7');
      // The reverse zone never answers: the check ends only at `timeout`, after the greeting.
      assert.equal(checked().length, 0, 'the greeting did not wait for the check');
      await c.ehlo('good.test');
      await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
      await c.cmd('RCPT TO:<bob@mail.test>', /^250 /);
      assert.equal(checked().at(-1)?.detail, 'timeout', 'RCPT waited for it');
      c.send('QUIT');
    } finally {
      c.close();
    }
  });

  it('reports a reverse zone that never answers as a temperror, and defers it when configured to', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.7' });
    assert.equal(r.data?.code, 250, 'ignored by default');
    const v = verdicts(srv).at(-1)!;
    assert.equal(v.fcrdns, 'temperror');
    assert.equal(v.action, 'ignore');

    const strict = await server(t, { actions: { 'fcrdns-temperror': 'defer' } });
    if (!strict) return;
    const r2 = await send(strict.port, { ip: '127.0.0.7' });
    assert.equal(r2.greeting.code, 220);
    assert.match(r2.rcpts[0]!.raw, /^451 4\.7\.1 reverse DNS of 127\.0\.0\.7 could not be checked/);
  });

  const heloCases: { helo: string; finding: string; reply: RegExp | null; tag: RegExp | null }[] = [
    {
      helo: 'bad_name!',
      finding: 'helo-invalid',
      reply: /^550 5\.7\.1 HELO bad_name! is not a valid domain name or address literal/,
      tag: null,
    },
    {
      helo: 'mx.petrel.test',
      finding: 'helo-ours',
      reply: /^550 5\.7\.1 HELO mx\.petrel\.test is our own/,
      tag: null,
    },
    { helo: 'mail.test', finding: 'helo-ours', reply: /^550 5\.7\.1 HELO mail\.test is our own/, tag: null },
    {
      helo: '[127.0.0.1]',
      finding: 'helo-ours',
      reply: /^550 5\.7\.1 HELO \[127\.0\.0\.1\] is our own/,
      tag: null,
    },
    {
      helo: '[127.0.0.5]',
      finding: 'helo-literal-mismatch',
      reply: null,
      tag: /^X-Hygiene: HELO \[127\.0\.0\.5\] is not your address 127\.0\.0\.2\r\n/,
    },
    {
      helo: '127.0.0.2',
      finding: 'helo-bare-ip',
      reply: null,
      tag: /^X-Hygiene: HELO 127\.0\.0\.2 is an address without brackets/,
    },
  ];
  for (const c of heloCases)
    it(`finds ${c.finding} in HELO ${c.helo} and acts on it by default`, async (t) => {
      const srv = await server(t);
      if (!srv) return;
      const r = await send(srv.port, {
        ip: '127.0.0.2',
        helo: c.helo,
        rcpts: ['bob@mail.test', 'postmaster@mail.test'],
      });
      assert.equal(r.ehlo.code, 250, 'judged at RCPT, not at EHLO');
      const v = verdicts(srv).at(-1)!;
      assert.deepEqual(v.findings, [c.finding]);
      if (c.reply) {
        assert.match(r.rcpts[0]!.raw, c.reply);
        assert.equal(r.rcpts[1]?.code, 250, 'postmaster stays reachable');
        assert.equal(v.action, 'reject');
      } else {
        assert.equal(r.rcpts[0]?.code, 250);
        assert.match(captured.at(-1)!.data.toString(), c.tag!);
        assert.equal(v.action, 'tag');
      }
    });

  it('passes an address literal of the client itself', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.2', helo: '[127.0.0.2]' });
    assert.equal(r.data?.code, 250);
    assert.deepEqual(verdicts(srv).at(-1)!.findings, []);
  });

  it('logs a name without a dot only, unless configured to act on it', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.2', helo: 'localhost' });
    assert.equal(r.data?.code, 250);
    const v = verdicts(srv).at(-1)!;
    assert.deepEqual(v.findings, ['helo-no-dot']);
    assert.equal(v.action, 'ignore');

    const strict = await server(t, { actions: { 'helo-no-dot': 'defer' } });
    if (!strict) return;
    const r2 = await send(strict.port, { ip: '127.0.0.2', helo: 'localhost' });
    assert.match(r2.rcpts[0]!.raw, /^451 4\.7\.1 HELO localhost is not a fully qualified domain name/);
  });

  it('acts at HELO when applyAt is helo', async (t) => {
    const srv = await server(t, { applyAt: 'helo' });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.2', helo: 'mx.petrel.test' });
    assert.match(r.ehlo.raw, /^550 5\.7\.1 HELO mx\.petrel\.test is our own name or address/);
    assert.equal(verdicts(srv).at(-1)!.stage, 'helo');
  });

  it('acts at MAIL when applyAt is mail', async (t) => {
    const srv = await server(t, { applyAt: 'mail', actions: { 'fcrdns-fail': 'defer' } });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.4' });
    assert.equal(r.ehlo.code, 250);
    assert.match(
      r.mail!.raw,
      /^451 4\.7\.1 reverse DNS of 127\.0\.0\.4 \(liar\.test\) does not resolve back/,
    );
    assert.equal(verdicts(srv).at(-1)!.stage, 'mail');
  });

  it('does not judge authenticated clients', async (t) => {
    const srv = await server(t, { actions: { 'fcrdns-fail': 'reject' } });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.3', auth: true });
    assert.equal(r.rcpts[0]?.code, 250);
    const v = verdicts(srv).at(-1)!;
    assert.equal(v.action, 'exempt');
    assert.equal(v.reason, 'authenticated');
    assert.deepEqual(v.findings, ['fcrdns-fail'], 'checked all the same');
  });

  it('does not check trusted networks', async (t) => {
    const srv = await server(t, { actions: { 'fcrdns-fail': 'reject', 'helo-ours': 'reject' } });
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.9', helo: 'mx.petrel.test' });
    assert.equal(r.rcpts[0]?.code, 250);
    assert.equal(verdicts(srv).length, 0);
    assert.ok(srv.logs.some((l) => l.msg === 'hygiene: not checked' && l.reason === 'trusted network'));
  });

  it('does not judge clients on a dnsbl allow list', async (t) => {
    const srv = await server(t, { actions: { 'fcrdns-fail': 'reject' } }, true);
    if (!srv) return;
    const r = await send(srv.port, { ip: '127.0.0.5' });
    assert.equal(r.rcpts[0]?.code, 250);
    const v = verdicts(srv).at(-1)!;
    assert.equal(v.action, 'exempt');
    assert.equal(v.reason, 'dns allow list');
  });
});

describe('hygiene: HELO checks and config', () => {
  const ours = { names: ['mx.petrel.test', 'mail.test'], address: '192.0.2.1' };
  it('accepts what RFC 5321 allows and finds the rest', () => {
    assert.deepEqual(heloFindings('mail.example.com', '198.51.100.7', ours), []);
    assert.deepEqual(heloFindings('MAIL.EXAMPLE.COM.', '198.51.100.7', ours), []);
    assert.deepEqual(heloFindings('[IPv6:2001:db8::7]', '2001:db8:0:0::7', ours), []);
    assert.deepEqual(heloFindings('[198.51.100.7]', '::ffff:198.51.100.7', ours), []);
    assert.deepEqual(heloFindings('[IPv6:2001:db8::8]', '2001:db8::7', ours), ['helo-literal-mismatch']);
    assert.deepEqual(heloFindings('[192.0.2.1]', '198.51.100.7', ours), ['helo-ours']);
    assert.deepEqual(heloFindings('Mail.Test', '198.51.100.7', ours), ['helo-ours']);
    assert.deepEqual(heloFindings('2001:db8::7', '2001:db8::7', ours), ['helo-bare-ip']);
    assert.deepEqual(heloFindings('-bad.example', '198.51.100.7', ours), ['helo-invalid']);
    assert.deepEqual(heloFindings('a..b', '198.51.100.7', ours), ['helo-invalid']);
    assert.deepEqual(heloFindings('[300.1.1.1]', '198.51.100.7', ours), ['helo-invalid']);
    assert.deepEqual(heloFindings(`${'a'.repeat(64)}.example`, '198.51.100.7', ours), ['helo-invalid']);
  });
  it('has conservative defaults', () => {
    const c = hygieneConfig.parse({});
    assert.equal(c.applyAt, 'rcpt');
    assert.equal(c.actions['fcrdns-fail'], 'tag');
    assert.equal(c.actions['helo-ours'], 'reject');
    assert.equal(c.actions['helo-invalid'], 'reject');
    assert.equal(c.actions['helo-literal-mismatch'], 'tag');
    assert.ok(!hygieneConfig.safeParse({ actions: { 'fcrdns-fail': 'drop' } }).success);
  });
});
