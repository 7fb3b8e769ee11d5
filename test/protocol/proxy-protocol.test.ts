import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { duplexPair } from 'node:stream';
import { SmtpClient } from '../harness/smtp-client.js';
import { memoryQueue, startServer, type CapturedMessage, type TestServer } from '../harness/server.js';

/**
 * PROXY protocol listeners over raw sockets: what a trusted proxy's header does, and how every
 * kind of bad start is closed (without a reply, with a log line naming the reason).
 */
describe('PROXY protocol listener', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  let smtp = 0;
  let submissions = 0;

  before(async () => {
    const proxyProtocol = { networks: ['127.0.0.1/32'], timeout: '600ms' };
    srv = await startServer({
      plugins: [memoryQueue(queued)],
      entries: [{ name: 'relay', config: { trustedNetworks: ['203.0.113.0/24'] } }, 'test-memory-queue'],
      config: {
        listeners: [
          { kind: 'smtp', name: 'mx-proxied', address: '127.0.0.1', port: 0, proxyProtocol },
          { kind: 'submissions', name: 'tls-proxied', address: '127.0.0.1', port: 0, proxyProtocol },
        ],
      },
    });
    smtp = srv.app.listeners.find((l) => l.name === 'mx-proxied')!.port;
    submissions = srv.app.listeners.find((l) => l.name === 'tls-proxied')!.port;
  });
  after(() => srv.close());

  /** The refusal logged for the connection from local port `port`, once it is there. */
  async function refusal(port: number): Promise<Record<string, unknown>> {
    for (let i = 0; i < 100; i++) {
      const line = srv.logs.find((l) => l.msg === 'PROXY protocol: connection refused' && l.port === port);
      if (line) return line;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error(`no refusal logged for port ${port}`);
  }

  async function closedWithoutReply(c: SmtpClient): Promise<void> {
    await c.closed();
    assert.equal(c.unread, '', 'nothing is sent before the header is accepted');
  }

  /** The client's own port (kept: a closed socket no longer says). */
  const ports = new WeakMap<SmtpClient, number>();
  function localPort(c: SmtpClient): number {
    if (!ports.has(c)) ports.set(c, (c as unknown as { socket: Socket }).socket.localPort!);
    return ports.get(c)!;
  }

  it('takes the client from a v1 header: relay control, the EHLO reply, Received: and the log', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.write('PROXY TCP4 203.0.113.9 198.51.100.25 41000 25\r\n');
    await c.expect(/^220 mx\.test /);
    const ehlo = await c.cmd('EHLO client.test', /^250[ -]/);
    assert.match(ehlo.lines[0]!, /Hello client\.test \[203\.0\.113\.9\]/);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RCPT TO:<b@elsewhere.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: proxied v1\r\n\r\nhello\r\n.\r\n');
    await c.expect(/^250 /);
    await c.cmd('QUIT', /^221 /);
    await c.closed();
    const m = queued.find((q) => q.data.includes('proxied v1'))!;
    assert.match(m.data.toString(), /^Received: from client\.test \(\[203\.0\.113\.9\]\)/);
    const closed = srv.logs.find((l) => l.msg === 'connection closed' && l.remote === '203.0.113.9');
    assert.ok(closed, 'the summary line names the declared client');
    assert.equal(closed.proxy, `127.0.0.1:${localPort(c)}`, 'and the proxy it came through');
  });

  it('sees client octets that arrived with the header: an early talker is still refused', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.write('PROXY TCP4 203.0.113.10 198.51.100.25 41000 25\r\nEHLO early.test\r\n');
    await c.expect(/^554 5\.5\.0 Protocol error: client sent data before the greeting/);
    await c.closed();
  });

  it('keeps the real peer for a v2 LOCAL header (a health check)', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.write(Buffer.from('0d0a0d0a000d0a515549540a20000000', 'hex'));
    await c.expect(/^220 /);
    const ehlo = await c.cmd('EHLO probe.test', /^250[ -]/);
    assert.match(ehlo.lines[0]!, /\[127\.0\.0\.1\]/);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RCPT TO:<b@elsewhere.test>', /^554 5\.7\.1 Relaying denied/);
    c.close();
  });

  it('refuses a peer outside proxyProtocol.networks without reading its header', async () => {
    const c = await SmtpClient.connect(smtp, '127.0.0.1', { localAddress: '127.0.0.5' });
    localPort(c);
    c.write('PROXY TCP4 203.0.113.9 198.51.100.25 41000 25\r\n');
    await closedWithoutReply(c);
    const line = await refusal(localPort(c));
    assert.equal(line.proxy, '127.0.0.5');
    assert.equal(line.reason, 'peer not in proxyProtocol.networks');
  });

  it('refuses a trusted peer that starts with SMTP instead of a header', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.send('EHLO client.test');
    await closedWithoutReply(c);
    assert.equal((await refusal(localPort(c))).reason, 'no PROXY header');
  });

  it('refuses a malformed header cleanly, naming what is wrong', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.write('PROXY TCP4 999.0.113.9 198.51.100.25 41000 25\r\n');
    await closedWithoutReply(c);
    assert.equal((await refusal(localPort(c))).reason, 'v1 addresses are not TCP4 addresses');
  });

  it('refuses a v1 header that runs past 107 octets without its CRLF', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    c.write(`PROXY UNKNOWN ${'x'.repeat(200)}`);
    await closedWithoutReply(c);
    assert.equal((await refusal(localPort(c))).reason, 'v1 header longer than 107 octets');
  });

  it('closes a silent peer at proxyProtocol.timeout', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    await closedWithoutReply(c);
    assert.equal((await refusal(localPort(c))).reason, 'no header by the deadline');
  });

  it('counts the deadline from the connection: a header dripped a byte at a time is cut off', async () => {
    const c = await SmtpClient.connect(smtp);
    localPort(c);
    const header = 'PROXY TCP4 203.0.113.9 198.51.100.25 41000 25\r\n';
    let i = 0;
    const drip = setInterval(() => {
      if (i < header.length && !c.isClosed) c.write(header[i++]!);
    }, 50);
    try {
      await closedWithoutReply(c);
    } finally {
      clearInterval(drip);
    }
    assert.ok(i < header.length, 'the header was not complete when the connection was closed');
    assert.equal((await refusal(localPort(c))).reason, 'header incomplete at the deadline');
  });

  it('implicit TLS: the header comes before the handshake, even in the same segment as ClientHello', async () => {
    // The TLS client writes into one end of a pair; its first flight is sent after the header in
    // one write, then both directions are piped.
    const [inner, outer] = duplexPair();
    const raw = netConnect({ port: submissions, host: '127.0.0.1' });
    await new Promise<void>((resolve) => raw.once('connect', resolve));
    const header = Buffer.from('PROXY TCP4 203.0.113.11 198.51.100.25 41000 465\r\n');
    outer.once('data', (hello: Buffer) => {
      raw.write(Buffer.concat([header, hello]));
      outer.on('data', (d: Buffer) => raw.write(d));
    });
    raw.on('data', (d: Buffer) => outer.write(d));
    raw.on('close', () => outer.destroy());
    const secure = await new Promise<TLSSocket>((resolve, reject) => {
      const s = tlsConnect({ socket: inner, rejectUnauthorized: false, servername: 'mx.test' }, () =>
        resolve(s),
      );
      s.once('error', reject);
    });
    const c = SmtpClient.over(secure);
    await c.expect(/^220 mx\.test /);
    const ehlo = await c.cmd('EHLO tls.test', /^250[ -]/);
    assert.match(ehlo.lines[0]!, /\[203\.0\.113\.11\]/);
    await c.cmd('QUIT', /^221 /);
    raw.destroy();
  });

  it("counts maxConnectionsPerIp under the header's client, not the proxy's address", async () => {
    const other = await startServer({
      config: {
        listeners: [
          {
            kind: 'smtp',
            address: '127.0.0.1',
            port: 0,
            proxyProtocol: { networks: ['127.0.0.1/32'] },
            limits: { maxConnectionsPerIp: 1 },
          },
        ],
      },
    });
    try {
      const open = async (client: string): Promise<SmtpClient> => {
        const c = await SmtpClient.connect(other.port);
        c.write(`PROXY TCP4 ${client} 198.51.100.25 41000 25\r\n`);
        return c;
      };
      const a = await open('203.0.113.1');
      await a.expect(/^220 /);
      const b = await open('203.0.113.2');
      await b.expect(/^220 /);
      const again = await open('203.0.113.1');
      await again.expect(/^421 mx\.test Too many connections, try again later/);
      a.close();
      b.close();
    } finally {
      await other.close();
    }
  });

  it('closes a connection still awaiting its header at shutdown, not at the header deadline', async () => {
    const other = await startServer({
      config: {
        listeners: [
          {
            kind: 'smtp',
            address: '127.0.0.1',
            port: 0,
            proxyProtocol: { networks: ['127.0.0.1/32'], timeout: '10m' },
          },
        ],
      },
    });
    const c = await SmtpClient.connect(other.port);
    const port = localPort(c);
    await new Promise((r) => setTimeout(r, 50)); // accepted, header awaited
    await other.close();
    await closedWithoutReply(c);
    const find = (): Record<string, unknown> | undefined =>
      other.logs.find((l) => l.msg === 'PROXY protocol: connection refused' && l.port === port);
    for (let i = 0; i < 50 && !find(); i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(find()?.reason, 'shutting down');
  });
});
