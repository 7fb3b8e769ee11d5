/**
 * spamassassin over the wire: a Petrel with the plugin, a real spamd started here on a free
 * port, and SMTP sessions carrying GTUBE, a clean message, or a message above maxSize.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { definePlugin, proceed, type PluginDefinition } from '../../core/index.js';
import { requirePeer } from '../../test/harness/peers.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { freePort, GTUBE, SPAMD, SPAMD_PACKAGE, startSpamd, type Spamd } from '../../test/harness/spamd.js';
import { SpamAssassin, type SpamAssassinResult } from './api.js';
import { parseAnswer } from './spamd.js';

const HAM = 'Just a normal short message about lunch tomorrow.';

/** The SpamAssassin note at `queue`, as a later plugin would read it. */
function noteReader(into: (SpamAssassinResult | undefined)[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async queue({ transaction }) {
        into.push(transaction.notes.get(SpamAssassin));
        return proceed();
      },
    }),
  });
}

/** One message; resolves to the reply after DATA. */
async function send(port: number, body: string, extraHeaders = ''): Promise<Reply> {
  const c = await SmtpClient.connect(port, '127.0.0.1');
  try {
    await c.expect(/^220 /);
    await c.ehlo('client.test');
    await c.cmd('MAIL FROM:<sender@example.org>', /^250 /);
    await c.cmd('RCPT TO:<rcpt@example.com>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(
      'From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: hello\r\n' +
        'Message-ID: <t1@example.org>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n' +
        extraHeaders +
        `\r\n${body}\r\n.\r\n`,
    );
    const reply = await c.reply(60_000);
    c.send('QUIT');
    return reply;
  } finally {
    c.close();
  }
}

const lines = (srv: TestServer, msg: string) => srv.logs.filter((l) => l.msg === msg);

describe('spamassassin: scanning with a real spamd', () => {
  let spamd: Spamd | null = null;
  const servers: TestServer[] = [];
  const captured: CapturedMessage[] = [];
  const notes: (SpamAssassinResult | undefined)[] = [];

  before(async () => {
    if (!requirePeerQuietly()) return;
    spamd = await startSpamd();
  });
  after(async () => {
    for (const s of servers) await s.close();
    await spamd?.stop();
  });

  function requirePeerQuietly(): boolean {
    const shared = { skip: () => undefined } as unknown as TestContext;
    return requirePeer(shared, SPAMD, SPAMD_PACKAGE) !== null;
  }

  async function server(t: TestContext, config: Record<string, unknown>): Promise<TestServer | null> {
    if (requirePeer(t, SPAMD, SPAMD_PACKAGE) === null) return null;
    assert.ok(spamd, 'spamd started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured), noteReader(notes)],
      entries: [
        'test-accept-rcpt',
        { name: 'spamassassin', config: { port: spamd.port, ...config } },
        'test-note-reader',
        'test-memory-queue',
      ],
    });
    servers.push(srv);
    return srv;
  }

  it('refuses GTUBE with 550 5.7.1 and logs the score and rules', async (t) => {
    const srv = await server(t, { rejectMessage: 'Spam refused here' });
    if (!srv) return;
    const before = captured.length;
    const reply = await send(srv.port, GTUBE);
    assert.match(reply.raw, /^550 5\.7\.1 Spam refused here/);
    assert.equal(captured.length, before, 'nothing queued');
    const [v] = lines(srv, 'spamassassin verdict');
    assert.equal(v?.action, 'reject');
    assert.ok((v?.score as number) >= 15, `score ${String(v?.score)}`);
    assert.ok((v?.symbols as string[]).includes('GTUBE'));
  });

  it('accepts a clean message with its score and rules in headers, forged ones removed, and the note set', async (t) => {
    const srv = await server(t, {});
    if (!srv) return;
    const reply = await send(srv.port, HAM, 'X-Spam-Status: No, forged by the sender\r\n');
    assert.match(reply.raw, /^250 /);
    const data = captured.at(-1)!.data.toString();
    assert.match(data, /^X-Spam-Status: No, score=-?\d+\.\d required=5\.0 tests=\S+\r\n/m);
    assert.match(data, /^X-Spam-Score: -?\d+\.\d\r\n/m);
    assert.doesNotMatch(data, /forged by the sender/);
    const note = notes.at(-1);
    assert.equal(note?.action, 'pass');
    assert.ok(note!.score < 5);
    assert.equal(note!.required, 5);
    const [v] = lines(srv, 'spamassassin verdict');
    assert.equal(v?.action, 'pass');
    assert.equal(v?.forgedRemoved, 1);
  });

  it("tags from tagAbove instead of spamd's threshold", async (t) => {
    const srv = await server(t, { tagAbove: -50 });
    if (!srv) return;
    assert.match((await send(srv.port, HAM)).raw, /^250 /);
    assert.match(captured.at(-1)!.data.toString(), /^X-Spam-Status: Yes, score=\S+ required=-50\.0 /m);
    assert.equal(notes.at(-1)?.action, 'tag');
  });

  it('does not scan a message above maxSize: accepted, logged, no header', async (t) => {
    const srv = await server(t, { maxSize: 2000 });
    if (!srv) return;
    const reply = await send(srv.port, `${GTUBE}\r\n${'x'.repeat(70)}\r\n`.repeat(40));
    assert.match(reply.raw, /^250 /);
    assert.doesNotMatch(captured.at(-1)!.data.toString(), /X-Spam-/);
    const [n] = lines(srv, 'spamassassin: message not scanned');
    assert.equal(n?.reason, 'too large');
    assert.equal(lines(srv, 'spamassassin verdict').length, 0);
  });

  it('skips trusted networks', async (t) => {
    const srv = await server(t, { trustedNetworks: ['127.0.0.0/8'] });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    assert.equal(lines(srv, 'spamassassin: message not scanned')[0]?.reason, 'trusted network');
  });

  it('fails open when spamd is down: accepted, logged at error', async (t) => {
    const srv = await server(t, { port: await freePort() });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    const [e] = lines(srv, 'spamassassin: scan failed, message accepted unscanned');
    assert.equal(e?.level, 50);
    assert.match(String(e?.reason), /ECONNREFUSED/);
  });

  it('gives up on a spamd that never answers after the total timeout, and fails open', async (t) => {
    // Takes the whole message and says nothing: only the deadline ends the wait.
    const held: Socket[] = [];
    const silent = createServer({ allowHalfOpen: true }, (s) => {
      held.push(s);
      s.resume();
    });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    t.after(() => {
      for (const s of held) s.destroy();
      silent.close();
    });
    const srv = await server(t, { port: (silent.address() as AddressInfo).port, timeout: '500ms' });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    const [e] = lines(srv, 'spamassassin: scan failed, message accepted unscanned');
    assert.equal(e?.reason, 'no answer within 500 ms');
    assert.equal(held.length, 1, 'the scan reached the silent server');
  });

  it('fails closed when so configured: 451 4.3.0', async (t) => {
    const srv = await server(t, { port: await freePort(), fail: 'closed' });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^451 4\.3\.0 /);
    assert.equal(lines(srv, 'spamassassin: scan failed, message deferred').length, 1);
  });
});

describe('spamassassin: the spamd answer', () => {
  it('reads score, threshold and rules', () => {
    assert.deepEqual(
      parseAnswer(
        'SPAMD/1.1 0 EX_OK\r\nContent-length: 27\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE,NO_RECEIVED,NO_RELAYS',
      ),
      { score: 1000, required: 5, symbols: ['GTUBE', 'NO_RECEIVED', 'NO_RELAYS'] },
    );
  });
  it('refuses an error status', () => {
    assert.throws(() => parseAnswer('SPAMD/1.0 76 Bad header line: x\r\n\r\n'), /error 76/);
  });
});
