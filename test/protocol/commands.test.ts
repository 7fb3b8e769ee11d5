import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { SmtpClient } from '../harness/smtp-client.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';

describe('RFC 5321 commands', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  before(async () => {
    srv = await startServer({ plugins: [acceptAllRecipients, memoryQueue(queued)] });
  });
  after(() => srv.close());

  it('greets with 220 and the hostname, without an enhanced code', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 mx\.test ESMTP Petrel\r\n$/);
    c.close();
  });

  it('answers EHLO with the ESMTP keywords and HELO with a single line', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    const words = await c.ehlo();
    for (const w of [
      'PIPELINING',
      '8BITMIME',
      'SMTPUTF8',
      'SIZE 26214400',
      'ENHANCEDSTATUSCODES',
      'DSN',
      'CHUNKING',
      'STARTTLS',
    ]) {
      assert.ok(words.includes(w), `EHLO lists ${w}: ${words.join(', ')}`);
    }
    assert.ok(!words.some((w) => w.startsWith('AUTH')), 'no AUTH without an auth plugin');
    await c.cmd('HELO client.test', /^250 mx\.test Hello client\.test \[127\.0\.0\.1\]\r\n$/);
    c.close();
  });

  it('runs a whole transaction and replies 250 with the queue id', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@crepes.fr>', /^250 2\.1\.0 /);
    await c.cmd('RCPT TO:<bob@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: hi\r\n\r\nHello Bob\r\n..leading dot\r\n.\r\n');
    const r = await c.expect(/^250 2\.0\.0 Ok: queued as [0-9A-Z]+\r\n$/);
    await c.cmd('QUIT', /^221 2\.0\.0 /);
    await c.closed();
    const m = queued.at(-1)!;
    assert.equal(m.sender, 'alice@crepes.fr');
    assert.deepEqual(m.recipients, ['bob@hamburger.edu']);
    assert.equal(
      m.raw.toString(),
      'Subject: hi\r\n\r\nHello Bob\r\n.leading dot\r\n',
      'dot-unstuffed, terminator removed',
    );
    const id = /queued as (\S+)/.exec(r.text)![1];
    assert.match(
      m.data.toString(),
      new RegExp(
        `^Received: from client\\.test \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.test \\(Petrel\\) with ESMTP id ${id}\\r\\n\\tfor <bob@hamburger\\.edu>;`,
      ),
    );
  });

  it('answers NOOP, RSET, VRFY and HELP', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.cmd('NOOP', /^250 2\.0\.0 OK/);
    await c.cmd('RSET', /^250 2\.0\.0 OK/);
    await c.cmd('VRFY bob', /^252 2\.5\.0 /);
    await c.cmd('VRFY', /^501 5\.5\.4 /);
    const help = await c.cmd('HELP', /^214-2\.0\.0 Commands: /);
    assert.equal(help.lines.length, 2);
    await c.cmd('EXPN staff', /^502 5\.5\.1 /);
    c.close();
  });

  it('resets the transaction on RSET', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RSET', /^250 2\.0\.0 /);
    await c.cmd('RCPT TO:<b@example.test>', /^503 5\.5\.1 /);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    c.close();
  });
});
