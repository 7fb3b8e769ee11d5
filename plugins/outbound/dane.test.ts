import 'reflect-metadata';
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { startSignedZone } from '../../test/harness/dnssec.js';
import { makeTestCa, type CertFiles, type TestCa } from '../../test/harness/test-ca.js';
import { FAST, freePortOn, smtpPeer, startSender, type Peer, type Sender } from './test-support.js';

const ZONE = 'secure.test';
const MX = `mx.${ZONE}`;

/** TLSA 3 1 1 data: SHA-256 of the certificate's public key (SPKI). */
function spkiSha256(certFile: string): string {
  const spki = new X509Certificate(readFileSync(certFile)).publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(spki).digest('hex');
}

/** TLSA 2 0 1 data: SHA-256 of the whole (CA) certificate. */
function certSha256(pem: string): string {
  return createHash('sha256').update(new X509Certificate(pem).raw).digest('hex');
}

interface Setup {
  readonly mx: Peer;
  readonly sender: Sender;
  readonly port: number;
}

/**
 * `secure.test`, signed, MX `mx.secure.test` at `ip`, with the TLSA records `tlsa(ca, mxCert)`
 * gives for `_<port>._tcp.mx.secure.test`; the MX host is an smtp-server presenting `mxCert`
 * (and `chain` after it), with STARTTLS unless `noTls`. Petrel resolves through unbound and
 * has DANE on.
 */
async function signed(
  t: TestContext,
  opts: {
    ip: string;
    cert: (ca: TestCa) => CertFiles;
    tlsa: (ca: TestCa, mxCert: CertFiles) => string[];
    withCa?: boolean;
    noTls?: boolean;
  },
): Promise<Setup | null> {
  const ca = makeTestCa(t);
  if (!ca) return null;
  const port = await freePortOn([opts.ip]);
  const mxCert = opts.cert(ca);
  const zone = await startSignedZone(t, ZONE, [
    `@ IN MX 10 ${MX}.`,
    `mx IN A ${opts.ip}`,
    ...opts.tlsa(ca, mxCert).map((r) => `_${port}._tcp.mx IN TLSA ${r}`),
  ]);
  if (!zone) return null;
  const certPem = readFileSync(mxCert.cert, 'utf8') + (opts.withCa ? ca.pem : '');
  const mx = await smtpPeer(t, opts.ip, port, {
    hideSTARTTLS: opts.noTls === true,
    key: readFileSync(mxCert.key),
    cert: certPem,
  });
  const sender = await startSender(t, {
    dnsServer: zone.server,
    outbound: { port, timeouts: FAST, dane: { enabled: true } },
  });
  return { mx, sender, port };
}

const logsWith = (s: Sender, msg: RegExp): Record<string, unknown>[] =>
  s.server.logs.filter((l) => msg.test(String(l.msg)));

describe('outbound: DANE (validated TLSA records)', () => {
  it('DANE-EE 3 1 1: delivers over TLS to a host whose key matches, self-signed as it is', async (t) => {
    const s = await signed(t, {
      ip: '127.0.48.2',
      cert: (ca) => ca.selfSigned(MX),
      tlsa: (_ca, c) => [`3 1 1 ${spkiSha256(c.cert)}`],
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.equal(o!.status, 'delivered', String(o!.reply.text));
    assert.equal(s.mx.messages[0]!.secure, true);
    const [done] = logsWith(s.sender, /^transaction finished$/);
    assert.equal(done!.verified, 'dane');
    const [matched] = logsWith(s.sender, /^DANE: certificate matches$/);
    assert.match(String(matched!.tlsa), /^3 1 1 /);
  });

  it('DANE-EE: defers (4.7.5) when the certificate matches no TLSA record', async (t) => {
    const s = await signed(t, {
      ip: '127.0.49.2',
      cert: (ca) => ca.selfSigned(MX),
      // The record is for another key.
      tlsa: (ca) => [`3 1 1 ${spkiSha256(ca.selfSigned(MX).cert)}`],
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['deferred', 451, '4.7.5']);
    assert.match(
      String(o!.reply.text),
      new RegExp(
        `^DANE: validated TLSA records for _${s.port}\\._tcp\\.mx\\.secure\\.test require TLS with a matching certificate: mx\\.secure\\.test \\[127\\.0\\.49\\.2\\]: the certificate matches none of the TLSA records \\(3 1 1 `,
      ),
    );
    assert.equal(s.mx.messages.length, 0);
    const [refusal] = logsWith(s.sender, /^DANE refused/);
    assert.equal((refusal!.tlsrpt as Record<string, unknown>).resultType, 'tlsa-invalid');
  });

  it('DANE-TA 2 0 1: delivers when the chain leads to the named CA and the certificate is for the MX host', async (t) => {
    const s = await signed(t, {
      ip: '127.0.50.2',
      cert: (ca) => ca.issue(MX),
      tlsa: (ca) => [`2 0 1 ${certSha256(ca.pem)}`],
      withCa: true,
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.equal(o!.status, 'delivered', String(o!.reply.text));
    const [done] = logsWith(s.sender, /^transaction finished$/);
    assert.equal(done!.verified, 'dane');
  });

  it('DANE-TA: defers (4.7.5) a certificate from the named CA that is for another host', async (t) => {
    const s = await signed(t, {
      ip: '127.0.57.2',
      cert: (ca) => ca.issue(`other.${ZONE}`),
      tlsa: (ca) => [`2 0 1 ${certSha256(ca.pem)}`],
      withCa: true,
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.deepEqual([o!.status, o!.reply.enhanced], ['deferred', '4.7.5']);
    assert.match(
      String(o!.reply.text),
      /the certificate is not for mx\.secure\.test \(DANE-TA names are checked\)$/,
    );
    assert.equal(s.mx.messages.length, 0);
  });

  it('defers (4.7.4) a host with TLSA records that does not offer STARTTLS', async (t) => {
    const s = await signed(t, {
      ip: '127.0.51.2',
      cert: (ca) => ca.selfSigned(MX),
      tlsa: (_ca, c) => [`3 1 1 ${spkiSha256(c.cert)}`],
      noTls: true,
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.deepEqual([o!.status, o!.reply.enhanced], ['deferred', '4.7.4']);
    assert.match(String(o!.reply.text), /require TLS with a matching certificate, but TLS was not offered/);
    assert.equal(s.mx.messages.length, 0);
  });

  it('with only unusable records (PKIX-EE) TLS is mandatory but not authenticated', async (t) => {
    const s = await signed(t, {
      ip: '127.0.56.2',
      cert: (ca) => ca.selfSigned(MX),
      tlsa: (_ca, c) => [`1 1 1 ${spkiSha256(c.cert)}`],
    });
    if (!s) return;
    const [o] = await s.sender.settled(await s.sender.submit([`bob@${ZONE}`]), 1);
    assert.equal(o!.status, 'delivered', String(o!.reply.text));
    assert.equal(s.mx.messages[0]!.secure, true);
    const [done] = logsWith(s.sender, /^transaction finished$/);
    assert.equal(done!.verified, null, 'neither DANE nor PKIX vouched for the certificate');
    assert.equal(logsWith(s.sender, /^DANE: no usable TLSA record/).length, 1);
  });

  it('ignores TLSA records the resolver did not validate (no AD bit)', async (t) => {
    const ca = makeTestCa(t);
    if (!ca) return;
    const ip = '127.0.52.2';
    const port = await freePortOn([ip]);
    const cert = ca.selfSigned('mx.plain.test');
    const other = spkiSha256(ca.selfSigned('mx.plain.test').cert);
    // The same mismatching record as above, from dnsmasq, which does not validate.
    const dns = await startDnsmasq(t, {
      mx: [{ domain: 'plain.test', host: 'mx.plain.test', preference: 10 }],
      hosts: [{ name: 'mx.plain.test', addresses: [ip] }],
      raw: [{ name: `_${port}._tcp.mx.plain.test`, type: 52, hex: `030101${other}` }],
    });
    if (!dns) return;
    const mx = await smtpPeer(t, ip, port, {
      hideSTARTTLS: false,
      key: readFileSync(cert.key),
      cert: readFileSync(cert.cert),
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, dane: { enabled: true } },
    });
    const [o] = await sender.settled(await sender.submit(['bob@plain.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(mx.messages[0]!.secure, true, 'opportunistic TLS, as without DANE');
    assert.equal(logsWith(sender, /^DANE/).length, 0);
    assert.match(dns.log(), /query\[TLSA\] _\d+\._tcp\.mx\.plain\.test/, 'the TLSA record was asked for');
  });
});
