import 'reflect-metadata';
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { TLS } from '../../test/harness/server.js';
import { startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { FAST, freePortOn, smtpPeer, startSender } from './test-support.js';

/** `a.test` → MX `mxName` → `ip`; `mx.test` is the name in the test certificate. */
async function dnsFor(t: TestContext, mxName: string, ip: string): Promise<Dnsmasq | null> {
  return startDnsmasq(t, {
    mx: [{ domain: 'a.test', host: mxName, preference: 10 }],
    hosts: [{ name: mxName, addresses: [ip] }],
  });
}

describe('outbound: STARTTLS', () => {
  it('uses STARTTLS when the peer offers it, without verifying (opportunistic, the default)', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, 'mx.a.test', '127.0.0.2');
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.2', port, { hideSTARTTLS: false });
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(peer.messages[0]!.secure, true, 'the peer got the message over TLS');
    const commands = [...peer.commands.values()][0]!;
    assert.deepEqual(commands.slice(0, 3), ['EHLO petrel.test', 'STARTTLS', 'EHLO petrel.test']);
  });

  it('goes on in plain text when the opportunistic handshake fails', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, 'mx.a.test', '127.0.0.2');
    if (!dns) return;
    // A TLS 1.0-only server: the client (TLS 1.2 at least) cannot complete the handshake.
    const peer = await smtpPeer(t, '127.0.0.2', port, {
      hideSTARTTLS: false,
      minVersion: 'TLSv1',
      maxVersion: 'TLSv1',
    });
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(peer.messages[0]!.secure, false);
    assert.equal(peer.connections.opened, 2, 'one failed handshake, then plain text');
  });

  it('defers (4.7.4) a domain whose policy requires TLS when the peer does not offer it', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, 'mx.a.test', '127.0.0.2');
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.2', port, { hideSTARTTLS: true });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, tls: { 'a.test': 'require' } },
    });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['deferred', 451, '4.7.4']);
    assert.equal(o!.reply.text, 'TLS is required, but was not offered by host mx.a.test [127.0.0.2]');
    assert.equal(peer.messages.length, 0);
  });

  it('verifies the certificate under a required policy: trusted and matching, or deferred (4.7.5)', async (t) => {
    const port = await freePortOn(['127.0.0.2', '127.0.0.3']);
    // mx.test is the name in the test certificate; wrong.a.test is not.
    const dns = await startDnsmasq(t, {
      mx: [
        { domain: 'a.test', host: 'mx.test', preference: 10 },
        { domain: 'b.test', host: 'wrong.a.test', preference: 10 },
      ],
      hosts: [
        { name: 'mx.test', addresses: ['127.0.0.2'] },
        { name: 'wrong.a.test', addresses: ['127.0.0.3'] },
      ],
    });
    if (!dns) return;
    const good = await smtpPeer(t, '127.0.0.2', port, { hideSTARTTLS: false });
    const wrong = await smtpPeer(t, '127.0.0.3', port, { hideSTARTTLS: false });

    // Without our CA the self-signed certificate is not trusted.
    const untrusting = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, tls: { '*': 'require' } },
    });
    const [u] = await untrusting.settled(await untrusting.submit(['bob@a.test']), 1);
    assert.deepEqual([u!.status, u!.reply.enhanced], ['deferred', '4.7.5']);
    assert.match(
      String(u!.reply.text),
      /TLS handshake with mx\.test \[127\.0\.0\.2\] failed: .*self[- ]signed/i,
    );
    await untrusting.close();

    const trusting = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, tls: { 'a.test': 'require', 'b.test': 'require' }, tlsCa: TLS.cert },
    });
    const [ok] = await trusting.settled(await trusting.submit(['bob@a.test']), 1);
    assert.equal(ok!.status, 'delivered');
    assert.equal(good.messages.at(-1)!.secure, true);
    const [mismatch] = await trusting.settled(await trusting.submit(['bob@b.test']), 1);
    assert.deepEqual([mismatch!.status, mismatch!.reply.enhanced], ['deferred', '4.7.5']);
    assert.match(String(mismatch!.reply.text), /wrong\.a\.test/);
    assert.equal(wrong.messages.length, 0);
  });
});

describe('outbound: smarthost', () => {
  it('sends every remote recipient to the smarthost over verified TLS, with AUTH', async (t) => {
    const port = await freePortOn(['127.0.0.7']);
    const dns = await startDnsmasq(t, { hosts: [{ name: 'mx.test', addresses: ['127.0.0.7'] }] });
    if (!dns) return;
    const relay = await smtpPeer(t, '127.0.0.7', port, {
      hideSTARTTLS: false,
      authMethods: ['LOGIN'],
      users: { relayuser: 's3cret pass' },
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: {
        timeouts: FAST,
        tlsCa: TLS.cert,
        smarthost: { host: 'mx.test', port, auth: { user: 'relayuser', pass: 's3cret pass' } },
      },
    });
    // Domains without any DNS records: only the smarthost's name is looked up.
    const id = await sender.submit(['bob@x.test', 'carol@y.test']);
    const outcomes = await sender.settled(id, 2);
    assert.ok(
      outcomes.every((o) => o.status === 'delivered'),
      JSON.stringify(outcomes),
    );
    assert.equal(outcomes[0]!.reply.remote, 'mx.test [127.0.0.7]');
    assert.equal(relay.messages.length, 1, 'one transaction for both domains');
    assert.deepEqual(
      relay.messages[0]!.rcpts.map((r) => r.address),
      ['bob@x.test', 'carol@y.test'],
    );
    assert.equal(relay.messages[0]!.user, 'relayuser');
    assert.equal(relay.messages[0]!.secure, true);
    const logged = JSON.stringify(sender.server.logs);
    assert.ok(!logged.includes('s3cret'), 'the password is never logged');
  });

  it('defers on bad credentials, and never sends credentials without TLS', async (t) => {
    const port = await freePortOn(['127.0.0.7', '127.0.0.8']);
    const dns = await startDnsmasq(t, {
      hosts: [
        { name: 'mx.test', addresses: ['127.0.0.7'] },
        { name: 'plain.test', addresses: ['127.0.0.8'] },
      ],
    });
    if (!dns) return;
    await smtpPeer(t, '127.0.0.7', port, { hideSTARTTLS: false, users: { relayuser: 'right' } });
    const plain = await smtpPeer(t, '127.0.0.8', port, {
      hideSTARTTLS: true,
      allowInsecureAuth: true,
      users: { relayuser: 'right' },
    });
    const wrong = await startSender(t, {
      dnsServer: dns.server,
      outbound: {
        timeouts: FAST,
        tlsCa: TLS.cert,
        smarthost: { host: 'mx.test', port, auth: { user: 'relayuser', pass: 'wrong' } },
      },
    });
    const [w] = await wrong.settled(await wrong.submit(['bob@x.test']), 1);
    assert.deepEqual([w!.status, w!.reply.code, w!.reply.enhanced], ['deferred', 451, '4.7.8']);
    assert.match(String(w!.reply.text), /authentication failed at mx\.test \[127\.0\.0\.7\]: 535/);
    await wrong.close();

    const cleartext = await startSender(t, {
      dnsServer: dns.server,
      outbound: {
        timeouts: FAST,
        smarthost: {
          host: 'plain.test',
          port,
          tls: 'opportunistic',
          auth: { user: 'relayuser', pass: 'right' },
        },
      },
    });
    const [c] = await cleartext.settled(await cleartext.submit(['bob@x.test']), 1);
    assert.deepEqual([c!.status, c!.reply.enhanced], ['deferred', '4.7.4']);
    assert.match(
      String(c!.reply.text),
      /Not sending credentials to plain\.test \[127\.0\.0\.8\] without TLS/,
    );
    const commands = [...plain.commands.values()].flat();
    assert.ok(!commands.some((cmd) => /^AUTH/i.test(cmd)), commands.join(' | '));
  });
});
