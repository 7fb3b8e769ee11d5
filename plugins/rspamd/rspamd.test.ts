/**
 * rspamd over the wire: a Petrel with the plugin, a real rspamd started here on a free port
 * (test/harness/rspamd.ts), and SMTP sessions carrying GTUBE, a clean message, or a message above
 * maxSize. rspamd's actions other than `reject` and `no action` are reached through the plugin's
 * `actions` map, so each verdict runs against rspamd's real answer.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { definePlugin, proceed, type PluginDefinition } from '../../core/index.js';
import { requirePeer } from '../../test/harness/peers.js';
import { RSPAMD, RSPAMD_PACKAGE, startRspamd, type Rspamd as RspamdPeer } from '../../test/harness/rspamd.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { freePort, GTUBE } from '../../test/harness/spamd.js';
import { HoldOnAccept } from '../queue/api.js';
import { Rspamd, type RspamdResult } from './api.js';
import { parseAnswer } from './checkv2.js';

const HAM = 'Just a normal short message about lunch tomorrow.';

interface Seen {
  readonly result: RspamdResult | undefined;
  readonly hold: readonly string[] | undefined;
}

/** The Rspamd note and any hold request at `queue`, as a later plugin (and the queue) see them. */
function noteReader(into: Seen[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async queue({ transaction }) {
        into.push({
          result: transaction.notes.get(Rspamd),
          hold: transaction.notes.get(HoldOnAccept)?.reasons,
        });
        return proceed();
      },
    }),
  });
}

/** One message with two recipients; resolves to the reply after DATA. */
async function send(port: number, body: string, extraHeaders = ''): Promise<Reply> {
  const c = await SmtpClient.connect(port, '127.0.0.1');
  try {
    await c.expect(/^220 /);
    await c.ehlo('mail.example.org');
    await c.cmd('MAIL FROM:<sender@example.org>', /^250 /);
    await c.cmd('RCPT TO:<rcpt@example.com>', /^250 /);
    await c.cmd('RCPT TO:<other@example.com>', /^250 /);
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

describe('rspamd: scanning with a real rspamd', () => {
  let rspamd: RspamdPeer | null = null;
  const servers: TestServer[] = [];
  const captured: CapturedMessage[] = [];
  const seen: Seen[] = [];

  before(async () => {
    const quiet = { skip: () => undefined } as unknown as TestContext;
    if (requirePeer(quiet, RSPAMD, RSPAMD_PACKAGE) === null) return;
    rspamd = await startRspamd();
  });
  after(async () => {
    for (const s of servers) await s.close();
    await rspamd?.stop();
  });

  async function server(t: TestContext, config: Record<string, unknown>): Promise<TestServer | null> {
    if (requirePeer(t, RSPAMD, RSPAMD_PACKAGE) === null) return null;
    assert.ok(rspamd, 'rspamd started');
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured), noteReader(seen)],
      entries: [
        'test-accept-rcpt',
        { name: 'rspamd', config: { url: rspamd.url, ...config } },
        'test-note-reader',
        'test-memory-queue',
      ],
    });
    servers.push(srv);
    return srv;
  }
  const last = (): string => captured.at(-1)!.data.toString();
  /** The line of rspamd's log that has `needle` (its log is written asynchronously). */
  async function rspamdLogLine(needle: string): Promise<string> {
    for (let i = 0; i < 50; i++) {
      const line = rspamd!
        .log()
        .split('\n')
        .find((l) => l.includes(needle));
      if (line) return line;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`rspamd logged no line with ${needle}:\n${rspamd!.log().slice(-2000)}`);
  }

  it('refuses GTUBE with 550 5.7.1 and the configured text, and logs action, score and symbols', async (t) => {
    const srv = await server(t, { rejectMessage: 'Spam refused here' });
    if (!srv) return;
    const before = captured.length;
    assert.match((await send(srv.port, GTUBE)).raw, /^550 5\.7\.1 Spam refused here/);
    assert.equal(captured.length, before, 'nothing queued');
    const [v] = lines(srv, 'rspamd verdict');
    assert.equal(v?.action, 'reject');
    assert.equal(v?.verdict, 'reject');
    assert.equal(v?.score, 15);
    assert.deepEqual(v?.symbols, ['GTUBE(0.00)']);
    assert.equal(v?.smtpMessage, 'Gtube pattern');
  });

  it('accepts a clean message with score and symbols in headers, forged ones removed, and the note set', async (t) => {
    const srv = await server(t, {});
    if (!srv) return;
    const reply = await send(srv.port, HAM, 'X-Spam: No\r\nX-Rspamd-Score: -100\r\n');
    assert.match(reply.raw, /^250 /);
    assert.match(last(), /^X-Rspamd-Score: -?\d+\.\d\d\r\n/m);
    assert.match(last(), /^X-Spamd-Result: default: False \[-?\d+\.\d\d \/ 15\.00\]/m);
    assert.doesNotMatch(last(), /X-Spam: No|-100/);
    const { result, hold } = seen.at(-1)!;
    assert.equal(result?.action, 'no action');
    assert.equal(result?.verdict, 'accept');
    assert.ok(result!.score < 15);
    assert.equal(hold, undefined);
    const [v] = lines(srv, 'rspamd verdict');
    assert.equal(v?.forgedRemoved, 2);
    // rspamd's own log line names the envelope it was given in the request headers.
    const task = await rspamdLogLine(`qid: <${String(v?.tx)}>`);
    assert.match(task, /ip: 127\.0\.0\.1/);
    assert.match(task, /from: <sender@example\.org>/);
    assert.match(task, /rcpts: <rcpt@example\.com,other@example\.com>/);
  });

  it('defers with 451 4.7.1 for an action mapped to defer (soft reject, greylist)', async (t) => {
    const srv = await server(t, { actions: { reject: 'defer' }, deferMessage: 'Later please' });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^451 4\.7\.1 Later please/);
  });

  it('adds X-Spam: Yes for add header', async (t) => {
    const srv = await server(t, { actions: { 'no action': 'add-header' } });
    if (!srv) return;
    assert.match((await send(srv.port, HAM)).raw, /^250 /);
    assert.match(last(), /^X-Spam: Yes\r\n/m);
    assert.match(last(), /^X-Spamd-Result: default: True /m);
  });

  it('rewrites the Subject by taking it out and adding the new one', async (t) => {
    const srv = await server(t, { actions: { 'no action': 'rewrite-subject' } });
    if (!srv) return;
    assert.match((await send(srv.port, HAM)).raw, /^250 /);
    const subjects = last().match(/^Subject: .*$/gm);
    assert.deepEqual(subjects, ['Subject: ***SPAM*** hello']);
  });

  it('holds a message in the queue for an action mapped to quarantine', async (t) => {
    const srv = await server(t, { actions: { 'no action': 'quarantine' } });
    if (!srv) return;
    assert.match((await send(srv.port, HAM)).raw, /^250 /);
    const { hold } = seen.at(-1)!;
    assert.equal(hold?.length, 1);
    assert.match(hold![0]!, /^rspamd: no action \(score /);
  });

  it('does not scan a message above maxSize: accepted, logged, no header', async (t) => {
    const srv = await server(t, { maxSize: 2000 });
    if (!srv) return;
    assert.match((await send(srv.port, `${GTUBE}\r\n${'x'.repeat(70)}\r\n`.repeat(40))).raw, /^250 /);
    assert.doesNotMatch(last(), /X-Rspamd-Score|X-Spamd-Result/);
    assert.equal(lines(srv, 'rspamd: message not scanned')[0]?.reason, 'too large');
    assert.equal(lines(srv, 'rspamd verdict').length, 0);
  });

  it('skips trusted networks', async (t) => {
    const srv = await server(t, { trustedNetworks: ['127.0.0.0/8'] });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    assert.equal(lines(srv, 'rspamd: message not scanned')[0]?.reason, 'trusted network');
  });

  it('fails open when rspamd is down: accepted, logged at error', async (t) => {
    const srv = await server(t, { url: `http://127.0.0.1:${await freePort()}` });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    const [e] = lines(srv, 'rspamd: scan failed, message accepted unscanned');
    assert.equal(e?.level, 50);
    assert.match(String(e?.reason), /ECONNREFUSED/);
  });

  it('gives up on an rspamd that never answers after the total timeout, and fails open', async (t) => {
    // Takes the whole request and says nothing: only the deadline ends the wait.
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
    const port = (silent.address() as AddressInfo).port;
    const srv = await server(t, { url: `http://127.0.0.1:${port}`, timeout: '500ms' });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^250 /);
    const [e] = lines(srv, 'rspamd: scan failed, message accepted unscanned');
    assert.equal(e?.reason, 'no answer within 500 ms');
    assert.equal(held.length, 1, 'the scan reached the silent server');
  });

  it('fails closed when so configured: 451 4.3.0', async (t) => {
    const srv = await server(t, { url: `http://127.0.0.1:${await freePort()}`, fail: 'closed' });
    if (!srv) return;
    assert.match((await send(srv.port, GTUBE)).raw, /^451 4\.3\.0 /);
    assert.equal(lines(srv, 'rspamd: scan failed, message deferred').length, 1);
  });
});

describe('rspamd: the /checkv2 answer', () => {
  it('reads action, score, required score, symbols and the suggested reply', () => {
    const a = parseAnswer(
      '{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject","symbols":{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},"messages":{"smtp_message":"Gtube pattern"}}',
    );
    assert.equal(a.action, 'reject');
    assert.equal(a.score, 15);
    assert.deepEqual(a.symbols, [{ name: 'GTUBE', score: 0, options: [] }]);
    assert.equal(a.smtpMessage, 'Gtube pattern');
  });
  it('refuses an error answer', () => {
    assert.throws(() => parseAnswer('{"error":"bad request"}'), /bad request/);
  });
});
