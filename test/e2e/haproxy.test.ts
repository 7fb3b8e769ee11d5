import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { requirePeer } from '../harness/peers.js';
import { startHaproxy, type Haproxy } from '../harness/haproxy.js';
import { memoryQueue, startServer, type CapturedMessage, type TestServer } from '../harness/server.js';
import { SmtpClient } from '../harness/smtp-client.js';

/**
 * Petrel behind a real HAProxy speaking PROXY v1 (`send-proxy`) and v2 (`send-proxy-v2`). Two
 * loopback addresses stand for two clients: 127.0.0.2 may relay, 127.0.0.3 may not, and HAProxy
 * itself (127.0.0.1, the only address allowed to send a header) may not either — so a relay that
 * succeeds proves the header's address was used, and one that fails proves it was not the proxy's.
 */
describe('behind HAProxy', () => {
  let srv: TestServer | null = null;
  let haproxy: Haproxy | null = null;
  const queued: CapturedMessage[] = [];

  before(async () => {
    const proxyProtocol = { networks: ['127.0.0.1/32'] };
    srv = await startServer({
      plugins: [memoryQueue(queued)],
      entries: [{ name: 'relay', config: { trustedNetworks: ['127.0.0.2/32'] } }, 'test-memory-queue'],
      config: {
        listeners: [
          { kind: 'smtp', name: 'mx', address: '127.0.0.1', port: 0, proxyProtocol },
          { kind: 'submissions', name: 'smtps', address: '127.0.0.1', port: 0, proxyProtocol },
        ],
      },
    });
  });
  after(async () => {
    await haproxy?.stop();
    await srv?.close();
  });

  /** HAProxy, started once for the tests that need it (skipped, or failed in CI, without it). */
  async function proxy(t: TestContext): Promise<Haproxy | null> {
    if (requirePeer(t, 'haproxy', 'apt-get install haproxy') === null) return null;
    if (haproxy) return haproxy;
    const port = (name: string): number => srv!.app.listeners.find((l) => l.name === name)!.port;
    haproxy = await startHaproxy([
      { name: 'v1', backend: port('mx'), send: 'send-proxy' },
      { name: 'v2', backend: port('mx'), send: 'send-proxy-v2' },
      { name: 'tls', backend: port('smtps'), send: 'send-proxy-v2' },
    ]);
    return haproxy;
  }

  async function lines(match: (l: Record<string, unknown>) => boolean): Promise<Record<string, unknown>> {
    for (let i = 0; i < 100; i++) {
      const line = srv!.logs.find(match);
      if (line) return line;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error('expected log line not found');
  }

  for (const version of ['v1', 'v2'] as const) {
    it(`${version}: the client's own address reaches relay control, Received: and the log`, async (t) => {
      const hp = await proxy(t);
      if (!hp) return;
      const token = randomUUID();
      const allowed = await SmtpClient.connect(hp.ports[version]!, '127.0.0.1', {
        localAddress: '127.0.0.2',
      });
      await allowed.expect(/^220 mx\.test /);
      const ehlo = await allowed.cmd('EHLO two.test', /^250[ -]/);
      assert.match(ehlo.lines[0]!, /Hello two\.test \[127\.0\.0\.2\]/);
      await allowed.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await allowed.cmd('RCPT TO:<far@elsewhere.test>', /^250 /);
      await allowed.cmd('DATA', /^354 /);
      allowed.write(`Subject: ${token}\r\n\r\nthrough haproxy\r\n.\r\n`);
      await allowed.expect(/^250 /);
      await allowed.cmd('QUIT', /^221 /);
      await allowed.closed();
      const m = queued.find((q) => q.data.includes(token));
      assert.ok(m, 'the message was queued');
      assert.match(m.data.toString(), /^Received: from two\.test \(\[127\.0\.0\.2\]\)/);
      const summary = await lines((l) => l.msg === 'connection closed' && l.remote === '127.0.0.2');
      assert.match(String(summary.proxy), /^127\.0\.0\.1:\d+$/, 'the log names the proxy too');

      const refused = await SmtpClient.connect(hp.ports[version]!, '127.0.0.1', {
        localAddress: '127.0.0.3',
      });
      await refused.expect(/^220 /);
      const e3 = await refused.cmd('EHLO three.test', /^250[ -]/);
      assert.match(e3.lines[0]!, /\[127\.0\.0\.3\]/);
      await refused.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await refused.cmd('RCPT TO:<far@elsewhere.test>', /^554 5\.7\.1 Relaying denied/);
      await refused.cmd('QUIT', /^221 /);
      const denied = await lines((l) => l.msg === 'relay refused' && l.remote === '127.0.0.3');
      assert.equal(denied.rcpt, 'far@elsewhere.test');
    });
  }

  it('implicit TLS on 465 behind HAProxy: the header comes first, then the handshake', async (t) => {
    const hp = await proxy(t);
    if (!hp) return;
    const c = await SmtpClient.connect(hp.ports.tls!, '127.0.0.1', { tls: true, localAddress: '127.0.0.2' });
    assert.ok(c.tlsSocket?.encrypted);
    await c.expect(/^220 mx\.test /);
    const ehlo = await c.cmd('EHLO two.test', /^250[ -]/);
    assert.match(ehlo.lines[0]!, /\[127\.0\.0\.2\]/);
    assert.ok(ehlo.lines.some((l) => /AUTH|SIZE/.test(l)));
    await c.cmd('QUIT', /^221 /);
    const summary = await lines((l) => l.msg === 'connection closed' && l.remote === '127.0.0.2' && !!l.tls);
    assert.match(String(summary.tls), /^TLSv1\.[23]$/);
  });

  it('refuses a connection from the proxy network that comes without a header', async (t) => {
    if (!(await proxy(t))) return;
    const port = srv!.app.listeners.find((l) => l.name === 'mx')!.port;
    const c = await SmtpClient.connect(port);
    c.send('EHLO direct.test');
    await c.closed();
    assert.equal(c.unread, '');
    await lines((l) => l.msg === 'PROXY protocol: connection refused' && l.reason === 'no PROXY header');
  });

  it('never honours a header from outside the proxy network', async (t) => {
    if (!(await proxy(t))) return;
    const port = srv!.app.listeners.find((l) => l.name === 'mx')!.port;
    const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: '127.0.0.2' });
    c.write('PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n');
    await c.closed();
    assert.equal(c.unread, '');
    await lines(
      (l) =>
        l.msg === 'PROXY protocol: connection refused' &&
        l.proxy === '127.0.0.2' &&
        l.reason === 'peer not in proxyProtocol.networks',
    );
  });

  it('closes a garbage header cleanly', async (t) => {
    if (!(await proxy(t))) return;
    const port = srv!.app.listeners.find((l) => l.name === 'mx')!.port;
    const c = await SmtpClient.connect(port);
    c.write(Buffer.from('0d0a0d0a000d0a515549540a2f11ffff', 'hex'));
    await c.closed();
    assert.equal(c.unread, '');
    await lines(
      (l) =>
        l.msg === 'PROXY protocol: connection refused' &&
        l.reason === 'v2 command 15 is neither LOCAL nor PROXY',
    );
  });
});
