/**
 * dnsbl's URI lists over the wire: a Petrel with a `check: [body]` domain list, a dnsmasq serving
 * it (SURBL-shaped: the registered domain under the zone, codes per reason), and messages whose
 * URLs hide in quoted-printable HTML and base64 text.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
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
import { HtmlEntities, hostOf, registeredDomain, UrlHosts } from './urls.js';

/** multi.uri.test: listed-shop.test for abuse, phish.test for phishing; refused.test answers "refused". */
const RECORDS = {
  hosts: [
    { name: 'listed-shop.test.multi.uri.test', addresses: ['127.0.0.64'] },
    { name: 'phish.test.multi.uri.test', addresses: ['127.0.0.8'] },
    { name: 'refused.test.multi.uri.test', addresses: ['127.255.255.254'] },
    // 127.0.0.8 is on the allow list wl.test.
    { name: '8.0.0.127.wl.test', addresses: ['127.0.10.2'] },
  ],
};

const URIBL = {
  zone: 'multi.uri.test',
  name: 'URIBL',
  type: 'domain',
  check: ['body'],
  codes: { '127.0.0.8': 'phishing', '127.0.0.64': 'abuse' },
};

/** A multipart/alternative message: a base64 text/plain part, a quoted-printable text/html part. */
function message(opts: { text: string; html: string; padding?: number }): string {
  const qp = opts.html
    // RFC 2045 §6.7: `=` is `=3D`; lines are cut at 76 with soft breaks, here on purpose inside a host.
    .replaceAll('=', '=3D')
    .replace(/(.{60})/g, '$1=\r\n');
  const b64 = Buffer.from(opts.text).toString('base64');
  return [
    'From: <news@sender.test>',
    'To: <bob@mx.test>',
    'Subject: offers',
    'MIME-Version: 1.0',
    'Content-Type: multipart/alternative; boundary="b1"',
    '',
    '--b1',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: base64',
    '',
    ...(b64.match(/.{1,76}/g) ?? []),
    '--b1',
    'Content-Type: text/html; charset=utf-8',
    'Content-Transfer-Encoding: quoted-printable',
    '',
    qp,
    ...(opts.padding ? ['', 'x'.repeat(opts.padding)] : []),
    '--b1--',
    '',
  ].join('\r\n');
}

async function sendMessage(
  port: number,
  ip: string,
  data: string,
  rcpts: readonly string[] = ['bob@mx.test'],
): Promise<{ rcpts: Reply[]; data: Reply | null }> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: ip });
  try {
    await c.expect(/^220 /);
    await c.ehlo('client.test');
    await c.cmd('MAIL FROM:<news@sender.test>', /^250 /);
    const replies: Reply[] = [];
    for (const r of rcpts) replies.push(await c.cmd(`RCPT TO:<${r}>`, /^\d{3} /));
    await c.cmd('DATA', /^354 /);
    c.write(`${data.replace(/^\./gm, '..')}\r\n.\r\n`);
    const reply = await c.reply(30_000);
    c.send('QUIT');
    return { rcpts: replies, data: reply };
  } finally {
    c.close();
  }
}

function queries(dns: Dnsmasq, name: string): number {
  return dns
    .log()
    .split('\n')
    .filter((l) => l.includes(`query[A] ${name} `)).length;
}

const verdicts = (srv: TestServer) =>
  srv.logs.filter((l) => l.msg === 'dnsbl verdict' && l.stage === 'data_post');

describe('dnsbl: domains of the URLs in the body, in a URI list served by dnsmasq', () => {
  let dns: Dnsmasq | null = null;
  const servers: TestServer[] = [];
  const captured: CapturedMessage[] = [];

  before(async () => {
    if (!has(DNSMASQ)) return; // each test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    dns = await startDnsmasq(shared, RECORDS, { stopWithTest: false });
  });
  after(async () => {
    for (const s of servers) await s.close();
    await dns?.stop();
  });

  async function server(t: TestContext, config: Record<string, unknown> = {}): Promise<TestServer | null> {
    if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return null;
    assert.ok(dns, 'dnsmasq started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured)],
      entries: [
        { name: 'dnsbl', config: { block: [URIBL], trustedNetworks: [], ...config } },
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: { dns: { servers: [dns.server], timeout: 2000 } },
    });
    servers.push(srv);
    return srv;
  }

  it('refuses after DATA a message whose quoted-printable HTML links to a listed domain', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const html =
      '<html><body><p>Today only:</p><a href="https://www.listed-shop.test/offer?id=1&amp;x=2">buy</a></body></html>';
    const data = message({ text: 'Plain text, see https://docs.example.test/ for details.', html });
    // The soft line break cuts the listed host in two: only a decoder finds it.
    assert.match(data, /listed-=\r\nshop|listed-s=\r\nhop|www\.l=\r\nisted/);
    const r = await sendMessage(srv.port, '127.0.0.7', data);
    assert.match(r.rcpts[0]!.raw, /^250 /, 'RCPT is not where the body is judged');
    assert.match(r.data!.raw, /^554 5\.7\.1 listed-shop\.test listed by URIBL \(abuse\)/);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'reject');
    assert.equal(line.list, 'URIBL');
    assert.equal(line.code, '127.0.0.64');
    assert.equal(line.reason, 'abuse');
    // The registered domains, not the hosts: www.listed-shop.test → listed-shop.test.
    assert.equal(line.subject, 'listed-shop.test');
    assert.equal(line.domains, 2); // example.test (from the base64 part) and listed-shop.test
    assert.equal(line.limitReached, false);
    assert.equal(queries(dns!, 'example.test.multi.uri.test'), 1, dns!.log());
  });

  it('finds a listed domain in a base64 text part, and accepts a message whose domains no list knows', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const listed = await sendMessage(
      srv.port,
      '127.0.0.7',
      message({ text: 'Log in at http://secure.phish.test/login now', html: '<p>hello</p>' }),
    );
    assert.match(listed.data!.raw, /^554 5\.7\.1 phish\.test listed by URIBL \(phishing\)/);

    const before = captured.length;
    const clean = await sendMessage(
      srv.port,
      '127.0.0.7',
      message({ text: 'See www.clean-shop.test', html: '<a href="https://clean-shop.test/">shop</a>' }),
    );
    assert.equal(clean.data?.code, 250);
    assert.equal(captured.length, before + 1);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'pass');
    assert.equal(line.reason, 'not listed');
    assert.equal(line.domains, 1);
  });

  it('does not scan a message above body.maxSize, and logs that it did not', async (t) => {
    const srv = await server(t, { body: { maxSize: 4096 } });
    if (!srv) return;
    const before = queries(dns!, 'listed-shop.test.multi.uri.test');
    const data = message({
      text: 'hello',
      html: '<a href="https://www.listed-shop.test/">buy</a>',
      padding: 8000,
    });
    const r = await sendMessage(srv.port, '127.0.0.7', data);
    assert.equal(r.data?.code, 250);
    const skipped = srv.logs.find((l) => l.msg === 'dnsbl: body not scanned');
    assert.ok(skipped, 'logged');
    assert.equal(skipped.reason, 'too large');
    assert.equal(skipped.maxSize, 4096);
    assert.ok((skipped.size as number) > 4096);
    assert.equal(verdicts(srv).length, 0);
    assert.equal(queries(dns!, 'listed-shop.test.multi.uri.test'), before, 'nothing looked up');
  });

  it('looks up at most body.maxDomains distinct domains, and says when it stopped there', async (t) => {
    const srv = await server(t, { body: { maxDomains: 2 } });
    if (!srv) return;
    const text = 'https://a.one.test https://b.one.test https://two.test https://www.listed-shop.test';
    const r = await sendMessage(srv.port, '127.0.0.7', message({ text, html: '<p>hi</p>' }));
    // one.test (twice) and two.test fill the budget: the listed domain after them is not read.
    assert.equal(r.data?.code, 250);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.domains, 2);
    assert.equal(line.limitReached, true);
    assert.equal(line.action, 'pass');
  });

  it('never takes the "refused" code 127.255.255.254 for a listing', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await sendMessage(srv.port, '127.0.0.7', message({ text: 'http://refused.test/', html: '' }));
    assert.equal(r.data?.code, 250);
    assert.deepEqual(verdicts(srv).at(-1)!.failed, ['URIBL']);
    assert.ok(srv.logs.some((l) => l.msg === 'dnsbl: the list refuses our queries; not treated as listed'));
  });

  it('tags rather than refuses mail for postmaster and abuse only, where spam is reported', async (t) => {
    const srv = await server(t);
    if (!srv) return;
    const r = await sendMessage(
      srv.port,
      '127.0.0.7',
      message({ text: 'Spam report: https://www.listed-shop.test/', html: '' }),
      ['abuse@mx.test'],
    );
    assert.equal(r.data?.code, 250);
    assert.match(
      captured.at(-1)!.data.toString(),
      /^X-DNSBL: listed-shop\.test listed by URIBL \(abuse\)\r\n/,
    );
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'tag');
    assert.equal(line.onlyReachable, true);
  });

  it('does not read the body of a client on an allow list', async (t) => {
    const srv = await server(t, { allow: [{ zone: 'wl.test' }] });
    if (!srv) return;
    const data = message({ text: 'https://www.listed-shop.test/', html: '' });
    assert.equal((await sendMessage(srv.port, '127.0.0.8', data)).data?.code, 250);
    const line = verdicts(srv).at(-1)!;
    assert.equal(line.action, 'allow');
    assert.equal(line.list, 'wl.test');
    assert.equal(line.domains, 0);
    // The same message from a client not on it is refused.
    assert.match((await sendMessage(srv.port, '127.0.0.7', data)).data!.raw, /^554 5\.7\.1 /);
  });

  it('applies the list action: defer gives 451 after DATA', async (t) => {
    const srv = await server(t, { block: [{ ...URIBL, action: 'defer' }] });
    if (!srv) return;
    const r = await sendMessage(srv.port, '127.0.0.7', message({ text: 'https://phish.test', html: '' }));
    assert.match(r.data!.raw, /^451 4\.7\.1 phish\.test listed by URIBL \(phishing\)/);
  });
});

describe('dnsbl: URL hosts in text', () => {
  const all = (pieces: readonly string[]): string[] => {
    const u = new UrlHosts();
    return [...pieces.flatMap((p) => u.write(p)), ...u.end()];
  };

  it('finds a URL cut between two pieces of text whole, once', () => {
    assert.deepEqual(all(['go to htt', 'ps://www.exa', 'mple.test/path now']), ['www.example.test']);
    assert.deepEqual(all(['see www.', 'example.test']), ['www.example.test']);
  });

  it('reads the host as a browser would: user info, percent escapes, case, IDN, trailing dot', () => {
    assert.equal(hostOf('paypal.test@EVIL.test:8080'), 'evil.test');
    assert.equal(hostOf('%65vil.test'), 'evil.test');
    assert.equal(hostOf('bücher.test.'), 'xn--bcher-kva.test');
    assert.equal(hostOf('192.0.2.1'), null);
    assert.equal(hostOf('0x7f.1'), null); // 127.0.0.1 in a form browsers accept
    assert.equal(hostOf('localhost'), null);
  });

  it('reduces a host to its registered domain by the Public Suffix List', () => {
    assert.equal(registeredDomain('a.b.example.co.uk'), 'example.co.uk');
    assert.equal(registeredDomain('www.example.com'), 'example.com');
    assert.equal(registeredDomain('spam.blogspot.com'), 'spam.blogspot.com');
    assert.equal(registeredDomain('co.uk'), null);
  });

  it('decodes HTML character references, also one cut between two pieces', () => {
    const e = new HtmlEntities();
    const text = e.write('http&#58;//evil&#4') + e.write('6;test&sol;x &amp;') + e.end();
    assert.equal(text, 'http://evil.test/x &');
    assert.deepEqual(all([text]), ['evil.test']);
  });
});
