import 'reflect-metadata';
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { getCACertificates, setDefaultCACertificates } from 'node:tls';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { policyText, startPolicyServer, type PolicyServer } from '../../test/harness/https-policy.js';
import { makeTestCa, type CertFiles, type TestCa } from '../../test/harness/test-ca.js';
import { FAST, freePortOn, smtpPeer, startSender, type Peer, type Sender } from './test-support.js';

/**
 * The policy fetch trusts the process's default CA store (see README.md): the test CA joins it
 * for one test. MX certificates are checked against outbound's `tlsCa`.
 */
function trustForPolicyFetch(t: TestContext, ca: TestCa): void {
  const before = getCACertificates('default');
  setDefaultCACertificates([...before, ca.pem]);
  t.after(() => setDefaultCACertificates(before));
}

const DOMAIN = 'sts.test';

/** DNS for `sts.test`: the `_mta-sts` TXT record with `id`, one MX host, the policy host. */
function stsDns(
  t: TestContext,
  o: { id: string; mxName: string; mxIp: string; policyIp: string },
): ReturnType<typeof startDnsmasq> {
  return startDnsmasq(t, {
    mx: [{ domain: DOMAIN, host: o.mxName, preference: 10 }],
    hosts: [
      { name: o.mxName, addresses: [o.mxIp] },
      { name: `mta-sts.${DOMAIN}`, addresses: [o.policyIp] },
    ],
    txt: [{ name: `_mta-sts.${DOMAIN}`, text: `v=STSv1; id=${o.id}` }],
  });
}

interface World {
  readonly ca: TestCa;
  readonly policyIp: string;
  readonly mxIp: string;
  readonly policy: PolicyServer;
  readonly mx: Peer;
  readonly dns: string;
  readonly port: number;
}

/**
 * `sts.test` with an MTA-STS policy (`mode`, naming `mx.sts.test`) on its own policy host at
 * `ipBase.1`, and one MX host `mxName` at `ipBase.2`, an smtp-server with STARTTLS and the
 * certificate `mxCert` gives (issued by the test CA by default).
 */
async function world(
  t: TestContext,
  opts: {
    ipBase: string;
    mode: 'enforce' | 'testing';
    mxName: string;
    mxCert?: (ca: TestCa, name: string) => CertFiles;
  },
): Promise<World | null> {
  const ca = makeTestCa(t);
  if (!ca) return null;
  const policyIp = `${opts.ipBase}.1`;
  const mxIp = `${opts.ipBase}.2`;
  const port = await freePortOn([mxIp]);
  const dns = await stsDns(t, { id: '20260101T000000', mxName: opts.mxName, mxIp, policyIp });
  if (!dns) return null;
  trustForPolicyFetch(t, ca);
  const policy = await startPolicyServer(t, {
    ip: policyIp,
    policy: policyText(opts.mode, [`mx.${DOMAIN}`]),
    tls: ca.issue(`mta-sts.${DOMAIN}`),
  });
  const cert = (opts.mxCert ?? ((c, n) => c.issue(n)))(ca, opts.mxName);
  const mx = await smtpPeer(t, mxIp, port, {
    hideSTARTTLS: false,
    key: readFileSync(cert.key),
    cert: readFileSync(cert.cert),
  });
  return { ca, policyIp, mxIp, policy, mx, dns: dns.server, port };
}

function sender(
  t: TestContext,
  w: World,
  extra: { config?: Record<string, unknown>; dnsServer?: string } = {},
): Promise<Sender> {
  return startSender(t, {
    dnsServer: w.dns,
    outbound: { port: w.port, timeouts: FAST, tlsCa: w.ca.certFile },
    ...extra,
  });
}

const logsWith = (s: Sender, msg: RegExp): Record<string, unknown>[] =>
  s.server.logs.filter((l) => msg.test(String(l.msg)));

describe('outbound: MTA-STS', () => {
  it('enforce: defers (4.7.0) when no MX host matches the policy, and says why', async (t) => {
    const w = await world(t, { ipBase: '127.0.43', mode: 'enforce', mxName: 'evil.sts.test' });
    if (!w) return;
    const s = await sender(t, w);
    const id = await s.submit([`bob@${DOMAIN}`]);
    const [o] = await s.settled(id, 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['deferred', 451, '4.7.0']);
    assert.equal(
      o!.reply.text,
      'MTA-STS policy of sts.test (enforce, id 20260101T000000) allows none of the MX hosts (evil.sts.test); it names mx.sts.test',
    );
    assert.equal(w.mx.connections.opened, 0, 'the MX host the policy does not name is never contacted');
    const [refusal] = logsWith(s, /^MTA-STS refused/);
    assert.ok(refusal, 'the refusal is logged');
    assert.deepEqual(refusal.tlsrpt, {
      policyType: 'sts',
      policyDomain: DOMAIN,
      resultType: 'validation-failure',
      receivingMxHostname: 'evil.sts.test',
      failureReason: 'MX host evil.sts.test is not in the policy (mx.sts.test)',
    });
    assert.deepEqual(w.policy.requests, [{ host: 'mta-sts.sts.test', path: '/.well-known/mta-sts.txt' }]);
  });

  it('testing: delivers to an MX host the policy does not name, and logs what enforce would refuse', async (t) => {
    const w = await world(t, { ipBase: '127.0.44', mode: 'testing', mxName: 'evil.sts.test' });
    if (!w) return;
    const s = await sender(t, w);
    const [o] = await s.settled(await s.submit([`bob@${DOMAIN}`]), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(w.mx.messages.length, 1);
    const [note] = logsWith(s, /^MTA-STS testing: enforce would refuse/);
    assert.ok(note, JSON.stringify(s.server.logs.map((l) => l.msg)));
    assert.equal(note.mode, 'testing');
    assert.deepEqual((note.tlsrpt as Record<string, unknown>).receivingMxHostname, 'evil.sts.test');
  });

  it('enforce: delivers to a matching MX host over TLS verified for its name', async (t) => {
    const w = await world(t, { ipBase: '127.0.45', mode: 'enforce', mxName: `mx.${DOMAIN}` });
    if (!w) return;
    const s = await sender(t, w, {});
    const [o] = await s.settled(await s.submit([`bob@${DOMAIN}`]), 1);
    assert.equal(o!.status, 'delivered', String(o!.reply.text));
    assert.equal(w.mx.messages[0]!.secure, true);
    const [done] = logsWith(s, /^transaction finished$/);
    assert.equal(done!.verified, 'pkix', 'the certificate was verified for the MX name');
    assert.equal(logsWith(s, /^MTA-STS (refused|testing)/).length, 0);
    const [fetched] = logsWith(s, /^MTA-STS policy fetched$/);
    assert.deepEqual([fetched!.mode, fetched!.mx, fetched!.maxAge], ['enforce', ['mx.sts.test'], 86_400]);
  });

  it('enforce: defers (4.7.5) a matching MX host whose certificate is not trusted', async (t) => {
    const w = await world(t, {
      ipBase: '127.0.46',
      mode: 'enforce',
      mxName: `mx.${DOMAIN}`,
      mxCert: (ca, name) => ca.selfSigned(name),
    });
    if (!w) return;
    const s = await sender(t, w);
    const [o] = await s.settled(await s.submit([`bob@${DOMAIN}`]), 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['deferred', 451, '4.7.5']);
    assert.match(
      String(o!.reply.text),
      /^MTA-STS policy of sts\.test \(enforce, id 20260101T000000\) requires TLS with a certificate verified for the MX host: TLS handshake with mx\.sts\.test \[127\.0\.46\.2\] failed: self[- ]signed certificate/,
    );
    assert.equal(w.mx.messages.length, 0);
    const [refusal] = logsWith(s, /^MTA-STS refused/);
    assert.equal((refusal!.tlsrpt as Record<string, unknown>).resultType, 'certificate-not-trusted');
  });

  it('keeps the policy across a restart: the second server does not fetch it again', async (t) => {
    const w = await world(t, { ipBase: '127.0.47', mode: 'enforce', mxName: `mx.${DOMAIN}` });
    if (!w) return;
    const spool = mkdtempSync(join(tmpdir(), 'petrel-sts-'));
    t.after(() => rmSync(spool, { recursive: true, force: true }));
    const first = await sender(t, w, { config: { spool: { dir: spool } } });
    const [a] = await first.settled(await first.submit([`bob@${DOMAIN}`]), 1);
    assert.equal(a!.status, 'delivered');
    await first.close();
    assert.equal(w.policy.requests.length, 1);

    const second = await sender(t, w, { config: { spool: { dir: spool } } });
    const [b] = await second.settled(await second.submit([`carol@${DOMAIN}`]), 1);
    assert.equal(b!.status, 'delivered');
    assert.equal(w.policy.requests.length, 1, 'no second HTTPS fetch');
    const [cached] = logsWith(second, /^MTA-STS policy from the cache$/);
    assert.deepEqual([cached!.id, cached!.mode], ['20260101T000000', 'enforce']);
    assert.equal(w.mx.messages.at(-1)!.secure, true, 'the cached policy is still enforced');
  });

  it('fetches the policy again when the TXT id changes', async (t) => {
    const w = await world(t, { ipBase: '127.0.53', mode: 'enforce', mxName: `mx.${DOMAIN}` });
    if (!w) return;
    const spool = mkdtempSync(join(tmpdir(), 'petrel-sts-'));
    t.after(() => rmSync(spool, { recursive: true, force: true }));
    const first = await sender(t, w, { config: { spool: { dir: spool } } });
    assert.equal((await first.settled(await first.submit([`bob@${DOMAIN}`]), 1))[0]!.status, 'delivered');
    await first.close();

    // The domain publishes a new policy (testing) under a new id, and points its MX elsewhere.
    w.policy.policy = policyText('testing', [`mx.${DOMAIN}`]);
    const dns = await stsDns(t, {
      id: '20260202',
      mxName: 'evil.sts.test',
      mxIp: w.mxIp,
      policyIp: w.policyIp,
    });
    if (!dns) return;
    const second = await sender(t, w, { config: { spool: { dir: spool } }, dnsServer: dns.server });
    const [o] = await second.settled(await second.submit([`carol@${DOMAIN}`]), 1);
    assert.equal(w.policy.requests.length, 2, 'the new id was fetched');
    assert.equal(o!.status, 'delivered', 'the new policy (testing) applies, not the cached enforce one');
    const [fetched] = logsWith(second, /^MTA-STS policy fetched$/);
    assert.deepEqual([fetched!.id, fetched!.mode], ['20260202', 'testing']);
  });

  it('keeps enforcing the cached policy when a new one cannot be fetched', async (t) => {
    const w = await world(t, { ipBase: '127.0.54', mode: 'enforce', mxName: `mx.${DOMAIN}` });
    if (!w) return;
    const spool = mkdtempSync(join(tmpdir(), 'petrel-sts-'));
    t.after(() => rmSync(spool, { recursive: true, force: true }));
    const first = await sender(t, w, { config: { spool: { dir: spool } } });
    assert.equal((await first.settled(await first.submit([`bob@${DOMAIN}`]), 1))[0]!.status, 'delivered');
    await first.close();

    // An attacker's DNS: a new id, an MX of their own, and the policy host unreachable.
    await w.policy.close();
    const dns = await stsDns(t, {
      id: 'forged',
      mxName: 'evil.sts.test',
      mxIp: w.mxIp,
      policyIp: w.policyIp,
    });
    if (!dns) return;
    const second = await sender(t, w, { config: { spool: { dir: spool } }, dnsServer: dns.server });
    const [o] = await second.settled(await second.submit([`carol@${DOMAIN}`]), 1);
    assert.deepEqual([o!.status, o!.reply.enhanced], ['deferred', '4.7.0']);
    assert.match(String(o!.reply.text), /^MTA-STS policy of sts\.test \(enforce, id 20260101T000000\)/);
    const [failed] = logsWith(second, /^MTA-STS policy fetch failed; using the cached policy$/);
    assert.equal((failed!.tlsrpt as Record<string, unknown>).resultType, 'sts-policy-fetch-error');
  });

  it('delivers as without MTA-STS when no policy can be fetched and none is cached', async (t) => {
    const w = await world(t, { ipBase: '127.0.55', mode: 'enforce', mxName: 'evil.sts.test' });
    if (!w) return;
    await w.policy.close();
    const s = await sender(t, w);
    const [o] = await s.settled(await s.submit([`bob@${DOMAIN}`]), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(logsWith(s, /^MTA-STS policy fetch failed and none is cached/).length, 1);
  });
});
