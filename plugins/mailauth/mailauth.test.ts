/**
 * mailauth over the wire: a Petrel with the plugin, a dnsmasq serving the SPF, DKIM and DMARC
 * records, and messages signed and sealed by python3-dkim (dkimpy), sent over SMTP from chosen
 * 127.0.0.x addresses (SPF judges the client address).
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { dkimSign } from 'mailauth';
import { accept, definePlugin, deny, type PluginDefinition } from '../../core/index.js';
import { DNSMASQ, DNSMASQ_PACKAGE, startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { has, requirePeer } from '../../test/harness/peers.js';
import { resolveToken } from '../../core/di/tokens.js';
import { Queue } from '../queue/api.js';
import { dkimpyArcSign, dkimpySign, requireDkimpy } from '../../test/harness/dkimpy.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { authResultsValue, authservIdOf, claimsAuthservId } from './header.js';
import { decide, messageFindings, spfFinding } from './policy.js';
import { budgeted } from './checks.js';
import { mailauthConfig } from './config.js';
import { MailAuth, type MailAuthResults } from './api.js';

function rsaKey(): { pem: string; dns: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    pem: privateKey.export({ type: 'pkcs1', format: 'pem' }).toString(),
    dns: `v=DKIM1; k=rsa; p=${publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`,
  };
}

const KEY = rsaKey(); // s1._domainkey.example.test
const OTHER = rsaKey(); // published nowhere: "wrong key"
const ARC_KEY = rsaKey(); // arc._domainkey.relay.test

/** The zone: example.test (SPF -all for .21, DMARC p=reject), and one domain per SPF outcome. */
const RECORDS = {
  txt: [
    { name: 's1._domainkey.example.test', text: KEY.dns },
    { name: 'arc._domainkey.relay.test', text: ARC_KEY.dns },
    { name: 'example.test', text: 'v=spf1 ip4:127.0.0.21 -all' },
    { name: '_dmarc.example.test', text: 'v=DMARC1; p=reject' },
    { name: 'soft.test', text: 'v=spf1 ip4:127.0.0.21 ~all' },
    { name: 'neutral.test', text: 'v=spf1 ?all' },
    // RFC 7208 §4.5: two SPF records are a permerror.
    { name: 'twice.test', text: 'v=spf1 ip4:127.0.0.21 -all' },
    { name: 'twice.test', text: 'v=spf1 ip4:127.0.0.22 -all' },
    { name: 'relay.test', text: 'v=spf1 ip4:127.0.0.31 -all' },
    // RFC 7208 §4.6.4: eleven includes are one DNS-querying term too many; three names that do
    // not exist are one void lookup too many.
    {
      name: 'many.test',
      text: `v=spf1 ${Array.from({ length: 11 }, (_, i) => `include:i${i}.many.test`).join(' ')} -all`,
    },
    ...Array.from({ length: 11 }, (_, i) => ({ name: `i${i}.many.test`, text: 'v=spf1 -all' })),
    { name: 'void.test', text: 'v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all' },
    { name: 'held.test', text: 'v=spf1 -all' },
    { name: '_dmarc.held.test', text: 'v=DMARC1; p=quarantine' },
  ],
  // Queries for slow.test go to a server that never answers: SPF temperror.
  unanswered: ['slow.test'],
};

const AUTHSERV = 'mx.test';

function message(opts: { from: string; subject?: string; body?: string; extra?: readonly string[] }): Buffer {
  return Buffer.from(
    [
      ...(opts.extra ?? []),
      `From: <${opts.from}>`,
      'To: <bob@mx.test>',
      `Subject: ${opts.subject ?? 'Lunch'}`,
      'Date: Wed, 02 Dec 2026 04:30:00 +0000',
      `Message-ID: <${Math.random().toString(36).slice(2)}@client.test>`,
      '',
      opts.body ?? 'Shall we meet at noon?',
      '',
    ].join('\r\n'),
  );
}

interface Sent {
  readonly mail: Reply;
  readonly rcpts: Reply[];
  /** The reply after the message, if any recipient was accepted. */
  readonly data: Reply | null;
}

/** One SMTP transaction from `ip`, as a transcript: EHLO, MAIL, each RCPT, DATA if any was taken. */
async function send(
  port: number,
  opts: { ip: string; helo?: string; from: string; rcpts?: readonly string[]; data: Buffer },
): Promise<Sent> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: opts.ip });
  try {
    await c.expect(/^220 /);
    await c.ehlo(opts.helo ?? 'client.test');
    const mail = await c.cmd(`MAIL FROM:<${opts.from}>`, /^\d{3} /);
    const rcpts: Reply[] = [];
    for (const r of opts.rcpts ?? ['bob@mx.test']) rcpts.push(await c.cmd(`RCPT TO:<${r}>`, /^\d{3} /));
    let data: Reply | null = null;
    if (rcpts.some((r) => r.code === 250)) {
      await c.cmd('DATA', /^354 /);
      c.write(Buffer.concat([opts.data, Buffer.from('.\r\n')]));
      data = await c.reply(30_000);
    }
    await c.cmd('QUIT', /^221 /);
    return { mail, rcpts, data };
  } finally {
    c.close();
  }
}

/** The header section of a stored message, unfolded, one field per entry. */
function fields(stored: Buffer): { name: string; value: string }[] {
  const head = stored.toString('utf8').split(/\r\n\r\n/)[0]!;
  return head
    .replace(/\r\n[ \t]/g, ' ')
    .split('\r\n')
    .map((l) => ({ name: l.slice(0, l.indexOf(':')), value: l.slice(l.indexOf(':') + 1).trim() }));
}

function ourResults(stored: Buffer): string {
  const ar = fields(stored).filter(
    (f) => f.name.toLowerCase() === 'authentication-results' && f.value.startsWith(`${AUTHSERV};`),
  );
  assert.equal(ar.length, 1, `one Authentication-Results of ours in:\n${stored.toString()}`);
  return ar[0]!.value;
}

/** Keeps the MailAuth note of each judged message, as a later filter would read it. */
function noteReader(into: MailAuthResults[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async data_post({ transaction }) {
        const r = transaction.notes.get(MailAuth);
        if (r) into.push(r);
        return { kind: 'proceed' } as const;
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

/** Skips (or, in CI, fails) a test whose peers are missing. */
async function skipUnlessPeers(t: TestContext, dns: Dnsmasq | null): Promise<boolean> {
  if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null || !(await requireDkimpy(t))) return false;
  assert.ok(dns, 'dnsmasq started');
  return true;
}

describe('mailauth: judging incoming mail against real DNS records and dkimpy signatures', () => {
  let dns: Dnsmasq | null = null;
  let srv: TestServer;
  const captured: CapturedMessage[] = [];
  const notes: MailAuthResults[] = [];

  before(async () => {
    if (!has(DNSMASQ)) return; // each test says so (skips, or fails under PETREL_REQUIRE_PEERS=1)
    const shared = { skip: () => undefined, after: () => undefined } as unknown as TestContext;
    dns = await startDnsmasq(shared, RECORDS, { stopWithTest: false });
    if (!dns) return;
    srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured), noteReader(notes), testAuth],
      entries: [
        'test-auth',
        { name: 'mailauth', config: { trustedNetworks: ['127.0.0.50/32'] } },
        'test-note-reader',
        'test-accept-rcpt',
        'test-memory-queue',
      ],
      config: { dns: { servers: [dns.server], timeout: 300 } },
    });
  });
  after(async () => {
    await srv?.close();
    await dns?.stop();
  });

  /** Sends and returns the stored message (asserting it was accepted). */
  async function deliver(opts: Parameters<typeof send>[1]): Promise<Buffer> {
    const before = captured.length;
    const r = await send(srv.port, opts);
    assert.equal(r.data?.code, 250, `accepted: ${JSON.stringify(r)}`);
    assert.equal(captured.length, before + 1);
    return captured.at(-1)!.data;
  }

  it('passes a message signed by dkimpy from an SPF-allowed address: dkim, spf and dmarc pass', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    const signed = await dkimpySign(message({ from: 'alice@example.test' }), {
      domain: 'example.test',
      selector: 's1',
      privateKey: KEY.pem,
    });
    const stored = await deliver({ ip: '127.0.0.21', from: 'alice@example.test', data: signed });
    const ar = ourResults(stored);
    assert.match(ar, /dkim=pass header\.i=@example\.test header\.s=s1 header\.a=rsa-sha256/);
    assert.match(ar, /spf=pass .*smtp\.mailfrom=alice@example\.test/);
    assert.match(ar, /dmarc=pass .*header\.from=example\.test/);
    // Our field is on top, above the Received field the server added.
    assert.equal(fields(stored)[0]!.name, 'Authentication-Results');
    assert.equal(fields(stored)[1]!.name, 'Received');
    const note = notes.at(-1)!;
    assert.equal(note.dmarc?.result, 'pass');
    assert.deepEqual(
      note.dkim.map((d) => [d.result, d.domain, d.selector]),
      [['pass', 'example.test', 's1']],
    );
    assert.equal(note.action, 'ignore');
    const line = srv.logs.filter((l) => l.msg === 'mailauth verdict').at(-1)!;
    assert.equal(line.spf, 'pass');
    assert.equal(line.dmarc, 'pass example.test p=reject');
    assert.deepEqual(line.dkim, ['pass example.test/s1']);
    assert.equal(line.action, 'ignore');
  });

  it('reports a body changed after signing, a header changed after signing, and a key that is not published', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    const sign = (m: Buffer, privateKey = KEY.pem) =>
      dkimpySign(m, { domain: 'example.test', selector: 's1', privateKey });
    const good = await sign(message({ from: 'alice@example.test', body: 'Noon it is.' }));

    const body = Buffer.from(good.toString().replace('Noon it is.', 'Midnight it is.'));
    assert.match(
      ourResults(await deliver({ ip: '127.0.0.21', from: 'alice@example.test', data: body })),
      /dkim=neutral \(body hash did not verify\) header\.i=@example\.test/,
    );

    const header = Buffer.from(good.toString().replace('Subject: Lunch', 'Subject: Dinner'));
    assert.match(
      ourResults(await deliver({ ip: '127.0.0.21', from: 'alice@example.test', data: header })),
      /dkim=fail \(bad signature\) header\.i=@example\.test header\.s=s1/,
    );

    const wrongKey = await sign(message({ from: 'alice@example.test' }), OTHER.pem);
    assert.match(
      ourResults(await deliver({ ip: '127.0.0.21', from: 'alice@example.test', data: wrongKey })),
      /dkim=fail \(bad signature\) header\.i=@example\.test header\.s=s1/,
    );
    // SPF is aligned and passes: DMARC passes, so none of these is refused.
    assert.deepEqual(
      notes.slice(-3).map((n) => n.dmarc?.result),
      ['pass', 'pass', 'pass'],
    );
  });

  it('reports a signature whose x= expiry has passed', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    // dkimpy writes no x= tag, so this signature is mailauth's, made two days ago for one day.
    const m = message({ from: 'alice@example.test' });
    const day = 24 * 3600 * 1000;
    const sig = await dkimSign(m, {
      signatureData: [{ signingDomain: 'example.test', selector: 's1', privateKey: KEY.pem }],
      signTime: new Date(Date.now() - 2 * day),
      expires: new Date(Date.now() - day),
    } as Parameters<typeof dkimSign>[1]);
    const stored = await deliver({
      ip: '127.0.0.21',
      from: 'alice@example.test',
      data: Buffer.concat([Buffer.from(sig.signatures), m]),
    });
    assert.match(ourResults(stored), /dkim=neutral \(expired\) header\.i=@example\.test header\.s=s1/);
  });

  it('gives each SPF result its configured action: fail refused at RCPT, softfail tagged, temperror deferred', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    // fail (-all): 550 5.7.1 for the recipient, but postmaster stays reachable (RFC 5321 §4.5.1).
    const fail = await send(srv.port, {
      ip: '127.0.0.22',
      from: 'alice@example.test',
      rcpts: ['bob@mx.test', 'postmaster@mx.test'],
      data: message({ from: 'alice@example.test' }),
    });
    assert.match(fail.rcpts[0]!.raw, /^550 5\.7\.1 .*SPF/);
    assert.match(fail.rcpts[1]!.raw, /^250 /);
    assert.equal(fail.data?.code, 550, 'DMARC p=reject refuses the message itself'); // not aligned, not signed
    const refusedAtRcpt = srv.logs.filter((l) => l.msg === 'mailauth verdict' && l.spf === 'fail');
    assert.ok(refusedAtRcpt.some((l) => l.action === 'reject' && String(l.reasons).includes('spf=fail')));

    const soft = ourResults(
      await deliver({
        ip: '127.0.0.22',
        from: 'carol@soft.test',
        data: message({ from: 'carol@soft.test' }),
      }),
    );
    assert.match(soft, /spf=softfail .*smtp\.mailfrom=carol@soft\.test/);
    const tagged = fields(captured.at(-1)!.data).find((f) => f.name === 'X-Mailauth-Warning');
    assert.equal(tagged?.value, 'spf=softfail smtp.mailfrom=soft.test');

    const neutral = ourResults(
      await deliver({
        ip: '127.0.0.22',
        from: 'dan@neutral.test',
        data: message({ from: 'dan@neutral.test' }),
      }),
    );
    assert.match(neutral, /spf=neutral /);
    assert.equal(
      fields(captured.at(-1)!.data).find((f) => f.name === 'X-Mailauth-Warning'),
      undefined,
    );

    const perm = ourResults(
      await deliver({
        ip: '127.0.0.22',
        from: 'erin@twice.test',
        data: message({ from: 'erin@twice.test' }),
      }),
    );
    assert.match(perm, /spf=permerror /);

    for (const [domain, why] of [
      ['many.test', /Too many DNS requests/],
      ['void.test', /Too many void DNS results/],
    ] as const) {
      await deliver({ ip: '127.0.0.22', from: `ivan@${domain}`, data: message({ from: `ivan@${domain}` }) });
      assert.equal(notes.at(-1)!.spf.mailFrom.result, 'permerror', domain);
      assert.match(notes.at(-1)!.spf.mailFrom.info, why);
    }

    // The HELO identity is checked too (RFC 7208 §2.3); for <> it is the MAIL FROM check (§2.4).
    const helo = ourResults(
      await deliver({
        ip: '127.0.0.31',
        helo: 'relay.test',
        from: 'dan@neutral.test',
        data: message({ from: 'dan@neutral.test' }),
      }),
    );
    assert.match(helo, /spf=neutral .*smtp\.mailfrom=dan@neutral\.test;\s+spf=pass smtp\.helo=relay\.test;/);
    const bounce = ourResults(
      await deliver({
        ip: '127.0.0.31',
        helo: 'relay.test',
        from: '',
        data: message({ from: 'mailer@relay.test' }),
      }),
    );
    assert.match(bounce, /spf=pass smtp\.mailfrom=postmaster@relay\.test;/);
    assert.doesNotMatch(bounce, /smtp\.helo=/);
    assert.equal(notes.at(-1)!.dmarc?.result, 'none'); // relay.test publishes no DMARC record

    const temp = await send(srv.port, {
      ip: '127.0.0.22',
      from: 'frank@slow.test',
      data: message({ from: 'frank@slow.test' }),
    });
    assert.match(temp.rcpts[0]!.raw, /^451 4\.4\.3 /);
    assert.equal(temp.data, null);
  });

  it('refuses a spoofed From: of a p=reject domain with 550 5.7.1 after DATA', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    const r = await send(srv.port, {
      ip: '127.0.0.99',
      helo: 'evil.test',
      from: 'attacker@evil.test',
      data: message({ from: 'ceo@example.test', subject: 'Wire the money' }),
    });
    assert.equal(r.rcpts[0]!.code, 250);
    assert.match(r.data!.raw, /^550 5\.7\.1 .*DMARC/);
    const line = srv.logs.filter((l) => l.msg === 'mailauth verdict').at(-1)!;
    assert.equal(line.action, 'reject');
    assert.equal(line.dmarc, 'fail example.test p=reject');
    assert.deepEqual(line.reasons, ['dmarc=fail policy=reject header.from=example.test']);
  });

  it('removes an Authentication-Results field that claims our authserv-id and keeps another', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    const stored = await deliver({
      ip: '127.0.0.21',
      from: 'alice@example.test',
      data: message({
        from: 'alice@example.test',
        extra: [
          'Authentication-Results: mx.test; dkim=pass header.d=forged.example',
          'Authentication-Results: other.test;',
          ' spf=pass smtp.mailfrom=alice@example.test',
          'Authentication-Results: (a comment) MX.TEST 1; dmarc=pass',
        ],
      }),
    });
    const ar = fields(stored).filter((f) => f.name === 'Authentication-Results');
    assert.equal(ar.length, 2, stored.toString());
    assert.match(ar[0]!.value, /^mx\.test;.*spf=pass/); // ours
    assert.equal(ar[1]!.value, 'other.test; spf=pass smtp.mailfrom=alice@example.test');
    assert.doesNotMatch(stored.toString(), /forged\.example|dmarc=pass\r\n/);
    const line = srv.logs.filter((l) => l.msg === 'mailauth verdict').at(-1)!;
    assert.equal(line.forgedRemoved, 2);
  });

  it('validates an ARC chain sealed by dkimpy: arc=pass', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    // relay.test received the message, wrote its results and sealed them (ARC set i=1).
    const original = await dkimpySign(message({ from: 'alice@example.test' }), {
      domain: 'example.test',
      selector: 's1',
      privateKey: KEY.pem,
    });
    const withResults = Buffer.concat([
      Buffer.from(
        'Authentication-Results: relay.test; dkim=pass header.d=example.test; spf=pass smtp.mailfrom=alice@example.test\r\n',
      ),
      original,
    ]);
    const sealed = await dkimpyArcSign(withResults, {
      domain: 'relay.test',
      selector: 'arc',
      privateKey: ARC_KEY.pem,
      srvId: 'relay.test',
    });
    assert.equal(sealed.added, 3);
    const stored = await deliver({ ip: '127.0.0.31', from: 'list@relay.test', data: sealed.message });
    const ar = ourResults(stored);
    assert.match(ar, /arc=pass \(i=1 /);
    assert.equal(notes.at(-1)!.arc.result, 'pass');
    assert.equal(notes.at(-1)!.arc.instance, 1);
    // The relay's own field does not claim our id: it stays.
    assert.ok(
      fields(stored).some((f) => f.name === 'Authentication-Results' && f.value.startsWith('relay.test;')),
    );
  });

  it('does not judge a client that authenticated, nor one in trustedNetworks', async (t) => {
    if (!(await skipUnlessPeers(t, dns))) return;
    const spoof = message({
      from: 'ceo@example.test',
      extra: ['Authentication-Results: mx.test; dkim=pass header.d=example.test'],
    });
    const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
    await c.expect(/^220 /);
    await c.ehlo('laptop.test');
    await c.cmd(`AUTH PLAIN ${Buffer.from('\0ceo@example.test\0sesame').toString('base64')}`, /^235 /);
    await c.cmd('MAIL FROM:<ceo@example.test>', /^250 /);
    await c.cmd('RCPT TO:<bob@mx.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(Buffer.concat([spoof, Buffer.from('.\r\n')]));
    await c.expect(/^250 /);
    c.close();
    const stored = captured.at(-1)!.data;
    // Not judged: no results of ours; the forged field is still removed.
    assert.equal(
      fields(stored).filter((f) => f.name === 'Authentication-Results').length,
      0,
      stored.toString(),
    );
    const line = srv.logs.filter((l) => l.msg === 'message not judged').at(-1)!;
    assert.equal(line.reason, 'authenticated');
    assert.equal(line.forgedRemoved, 1);

    // 127.0.0.50 is trusted: SPF would fail and DMARC reject, but the message goes through as sent.
    const trusted = await deliver({ ip: '127.0.0.50', from: 'ceo@example.test', data: spoof });
    assert.match(trusted.toString(), /Authentication-Results: mx\.test; dkim=pass header\.d=example\.test/);
    assert.equal(srv.logs.filter((l) => l.msg === 'message not judged').at(-1)!.reason, 'trusted network');
  });
});

describe('mailauth: quarantine holds the message in the queue, with the reason', () => {
  it('stores a DMARC p=quarantine failure held, and says why', async (t) => {
    const dns = await startDnsmasq(t, RECORDS);
    if (!dns) return;
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      entries: [
        { name: 'mailauth', config: { trustedNetworks: [] } },
        'test-accept-rcpt',
        { name: 'queue', config: {} },
      ],
      config: { dns: { servers: [dns.server], timeout: 300 } },
    });
    t.after(() => srv.close());
    const r = await send(srv.port, {
      ip: '127.0.0.22',
      from: 'gina@held.test',
      rcpts: ['postmaster@mx.test'], // SPF fails, but postmaster is always reachable
      data: message({ from: 'gina@held.test' }),
    });
    const id = /queued as (\S+)/.exec(r.data!.text)?.[1];
    assert.ok(id, r.data!.raw);
    const queue = resolveToken(srv.app.generation.container, Queue);
    const held = await queue.get(id);
    assert.equal(held?.held, true);
    assert.match(held?.heldReason ?? '', /^mailauth: dmarc=fail policy=quarantine header\.from=held\.test/);
    assert.ok(srv.logs.some((l) => l.msg === 'message held at acceptance' && l.queueId === id));
  });
});

describe('mailauth: the pieces', () => {
  it('reads the authserv-id of a field past comments, version and quotes', () => {
    assert.equal(authservIdOf('mx.test; spf=pass'), 'mx.test');
    assert.equal(authservIdOf('(forged) MX.Test 1; none'), 'mx.test');
    assert.equal(authservIdOf('"mx.test"; none'), 'mx.test');
    assert.equal(claimsAuthservId('mx.test.evil; none', 'mx.test'), false);
    assert.equal(authResultsValue('mx.test', []), 'mx.test; none');
  });

  it('stops answering DNS questions past the per-message budget, its time, or the hook time', async () => {
    const asked: string[] = [];
    const lookup = async (name: string): Promise<string[][]> => {
      asked.push(name);
      return [['v=spf1 -all']];
    };
    const { resolver, used } = budgeted(lookup, { max: 2, deadline: Date.now() + 60_000 });
    await resolver('a.test', 'TXT');
    await resolver('b.test', 'TXT');
    await assert.rejects(resolver('c.test', 'TXT'), { code: 'ESERVFAIL', message: /limit of 2/ });
    assert.deepEqual(asked, ['a.test', 'b.test']);
    assert.equal(used(), 3);
    const late = budgeted(lookup, { max: 10, deadline: Date.now() - 1 });
    await assert.rejects(late.resolver('d.test', 'TXT'), { message: /time is up/ });
    const aborted = budgeted(lookup, { max: 10, deadline: Date.now() + 60_000, signal: AbortSignal.abort() });
    await assert.rejects(aborted.resolver('e.test', 'TXT'), { message: /time is up/ });
    assert.deepEqual(asked, ['a.test', 'b.test']);
  });

  it('picks the strongest action and lists the findings that led to it', () => {
    const config = mailauthConfig.parse({});
    const spf = spfFinding(config, { result: 'softfail', domain: 'soft.test', info: '' });
    const findings = [
      spf,
      ...messageFindings(config, {
        dkim: [{ result: 'fail', domain: 'example.test', selector: 's1', algorithm: 'rsa-sha256', info: '' }],
        arc: { result: 'none', instance: null, info: '' },
        dmarc: { result: 'fail', from: 'example.test', policy: 'quarantine', alignment: {}, info: '' },
      }),
    ];
    assert.deepEqual(decide(findings), {
      action: 'quarantine',
      reasons: [
        'dmarc=fail policy=quarantine header.from=example.test',
        'spf=softfail smtp.mailfrom=soft.test',
      ],
    });
  });
});
