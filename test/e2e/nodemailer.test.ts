import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { simpleParser } from 'mailparser';
import nodemailer, { type Transporter } from 'nodemailer';
import type SMTPTransport from 'nodemailer/lib/smtp-transport/index.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';
import { aliceOnly, PASSWORD, receivedWith, USER } from './common.js';

describe('nodemailer against Petrel', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  const transports: Transporter[] = [];

  before(async () => {
    srv = await startServer({ plugins: [aliceOnly, acceptAllRecipients, memoryQueue(queued)] });
  });
  after(async () => {
    for (const t of transports) t.close();
    await srv.close();
  });

  function transport(opts: SMTPTransport.Options): Transporter<SMTPTransport.SentMessageInfo> {
    const t = nodemailer.createTransport({
      host: '127.0.0.1',
      name: 'nodemailer.test',
      connectionTimeout: 10_000,
      greetingTimeout: 10_000,
      socketTimeout: 10_000,
      tls: { rejectUnauthorized: false },
      ...opts,
    });
    transports.push(t);
    return t;
  }

  /** Sends text plus two attachments (one large enough to spill to the spool) and checks what was queued. */
  async function sendAndCompare(
    t: Transporter<SMTPTransport.SentMessageInfo>,
    from: string,
  ): Promise<CapturedMessage> {
    const token = randomUUID();
    const text = `Hello from nodemailer ✓ ${token}\nSecond line, ünïcödé.\n.a line with a leading dot\n`;
    const binary = randomBytes(300_000);
    const csv = Buffer.from('id,name\n1,Zoë\n2,Łukasz\n', 'utf8');
    const n = queued.length;
    const info = await t.sendMail({
      from,
      to: 'bob@example.test',
      cc: 'carol@example.test',
      subject: `attachment ${token}`,
      text,
      attachments: [
        { filename: 'blob.bin', content: binary, contentType: 'application/octet-stream' },
        { filename: 'people.csv', content: csv, contentType: 'text/csv' },
      ],
    });
    assert.deepEqual(info.accepted, ['bob@example.test', 'carol@example.test']);
    assert.deepEqual(info.rejected, []);
    assert.match(info.response, /^250 2\.0\.0 Ok: queued as \S+$/);
    assert.equal(queued.length, n + 1, 'one message queued');
    const m = queued.at(-1)!;
    assert.equal(m.sender, from);
    assert.deepEqual(m.recipients, ['bob@example.test', 'carol@example.test']);

    const parsed = await simpleParser(m.data);
    assert.equal(parsed.subject, `attachment ${token}`);
    assert.equal(parsed.messageId, info.messageId);
    assert.equal(parsed.text, text);
    assert.deepEqual(
      parsed.attachments.map((a) => [a.filename, a.contentType]),
      [
        ['blob.bin', 'application/octet-stream'],
        ['people.csv', 'text/csv'],
      ],
    );
    assert.ok(parsed.attachments[0]!.content.equals(binary), 'binary attachment bytes intact');
    assert.ok(parsed.attachments[1]!.content.equals(csv), 'text attachment bytes intact');
    return m;
  }

  it('sends text and attachments over STARTTLS on the MX port', async () => {
    const t = transport({ port: srv.port, secure: false, requireTLS: true });
    const m = await sendAndCompare(t, 'mailer@example.test');
    assert.equal(receivedWith(m), 'ESMTPS');
    assert.match(m.data.toString(), /^Received: from nodemailer\.test \(\[127\.0\.0\.1\]\)/);
  });

  it('authenticates on the submission port after STARTTLS and records ESMTPSA', async () => {
    const t = transport({
      port: srv.submissionPort,
      secure: false,
      requireTLS: true,
      auth: { user: USER, pass: PASSWORD },
    });
    const m = await sendAndCompare(t, 'alice@example.test');
    assert.equal(receivedWith(m), 'ESMTPSA');
  });

  it('authenticates over implicit TLS on the submissions port', async () => {
    const t = transport({ port: srv.submissionsPort, secure: true, auth: { user: USER, pass: PASSWORD } });
    const m = await sendAndCompare(t, 'alice@example.test');
    assert.equal(receivedWith(m), 'ESMTPSA');
  });

  it('reports a wrong password as 535 and queues nothing', async () => {
    const t = transport({
      port: srv.submissionPort,
      secure: false,
      requireTLS: true,
      auth: { user: USER, pass: 'wrong' },
    });
    const n = queued.length;
    await assert.rejects(
      t.sendMail({ from: 'alice@example.test', to: 'bob@example.test', subject: 'x', text: 'x' }),
      (err: Error & { responseCode?: number; response?: string }) => {
        assert.equal(err.responseCode, 535, String(err));
        assert.match(err.response ?? '', /^535 5\.7\.8 /);
        return true;
      },
    );
    assert.equal(queued.length, n);
  });
});
