import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { PYTHON, requirePeer } from '../harness/peers.js';
import {
  acceptAllRecipients,
  FIXTURES,
  memoryQueue,
  startServer,
  TLS,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';
import { describeRun, killRunning, run } from './run.js';

const SCRIPT = join(FIXTURES, 'e2e', 'smtplib_send.py');

interface SmtplibJob {
  readonly port: number;
  readonly mode: 'send_message' | 'sendmail';
  readonly starttls?: boolean;
  readonly from: string;
  readonly to: readonly string[];
  readonly subject: string;
  readonly body: string;
  readonly mail_options?: readonly string[];
}

interface SmtplibReport {
  readonly smtputf8_offered: boolean;
  readonly tls_version?: string;
  readonly refused: Record<string, [number, string]>;
  readonly from: string;
  readonly to: string[];
  readonly mail_options: string[];
  readonly data_b64: string;
}

describe('Python smtplib against Petrel', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];

  before(async () => {
    srv = await startServer({ plugins: [acceptAllRecipients, memoryQueue(queued)] });
  });
  after(async () => {
    killRunning();
    await srv.close();
  });

  async function smtplib(t: TestContext, job: SmtplibJob): Promise<SmtplibReport | null> {
    if (!requirePeer(t, PYTHON, 'apt-get install python3')) return null;
    const r = await run(PYTHON, [SCRIPT], {
      input: JSON.stringify({ host: '127.0.0.1', cafile: TLS.cert, ...job }),
      env: { ...process.env, PYTHONIOENCODING: 'utf-8' },
      timeoutMs: 20_000,
    });
    assert.equal(r.code, 0, describeRun(r));
    return JSON.parse(r.stdout) as SmtplibReport;
  }

  it('sends with send_message over SMTPUTF8: UTF-8 envelope, headers and body arrive intact', async (t) => {
    const token = randomUUID();
    const n = queued.length;
    const subject = `Grüße aus Zürich — 你好 ${token}`;
    const body = `Hallo 用户,\nça marche: ÄÖÜ ß € ${token}\n.leading dot stays\n`;
    const report = await smtplib(t, {
      port: srv.port,
      mode: 'send_message',
      from: 'josé@example.test',
      to: ['用户@例子.test'],
      subject,
      body,
    });
    if (!report) return;
    assert.ok(report.smtputf8_offered, 'EHLO offers SMTPUTF8');
    assert.ok(
      report.mail_options.includes('SMTPUTF8'),
      `smtplib asserted SMTPUTF8: ${report.mail_options.join(' ')}`,
    );
    assert.deepEqual(report.refused, {});
    assert.equal(queued.length, n + 1, 'one message queued');
    const m = queued.at(-1)!;
    assert.equal(m.sender, 'josé@example.test');
    assert.deepEqual(m.recipients, ['用户@例子.test']);
    // Byte for byte what smtplib handed to DATA.
    assert.deepEqual(m.raw, Buffer.from(report.data_b64, 'base64'));
    // And, independently of smtplib's own account: raw UTF-8, no encoded words, 8-bit body.
    assert.ok(m.raw.includes(Buffer.from(`\r\nSubject: ${subject}\r\n`, 'utf8')), m.raw.toString('utf8'));
    assert.ok(m.raw.includes(Buffer.from('To: 用户@例子.test\r\n', 'utf8')), m.raw.toString('utf8'));
    assert.ok(m.raw.includes(Buffer.from(body.replaceAll('\n', '\r\n'), 'utf8')), m.raw.toString('utf8'));
    const received = m.data.toString('utf8');
    assert.match(
      received,
      /^Received: from python\.test \(\[127\.0\.0\.1\]\)\r\n\tby mx\.test \(Petrel\) with UTF8SMTP id /,
    );
    assert.match(received, /\r\n\tfor <用户@例子\.test>;/);
  });

  it("send_message(msg, mail_options=['SMTPUTF8']) repeats SMTPUTF8 and the message is accepted", async (t) => {
    const token = randomUUID();
    const n = queued.length;
    const subject = `Grüße ${token}`;
    const report = await smtplib(t, {
      port: srv.port,
      mode: 'send_message',
      mail_options: ['SMTPUTF8'],
      from: 'josé@example.test',
      to: ['用户@例子.test'],
      subject,
      body: `Hallo ${token}\n`,
    });
    if (!report) return;
    // smtplib adds its own SMTPUTF8 to the caller's for a message that needs it: MAIL names it twice.
    assert.equal(
      report.mail_options.filter((o) => o === 'SMTPUTF8').length,
      2,
      `smtplib sent: ${report.mail_options.join(' ')}`,
    );
    assert.deepEqual(report.refused, {});
    assert.equal(queued.length, n + 1, 'one message queued');
    const m = queued.at(-1)!;
    assert.equal(m.sender, 'josé@example.test');
    assert.deepEqual(m.recipients, ['用户@例子.test']);
    assert.deepEqual(m.raw, Buffer.from(report.data_b64, 'base64'));
    assert.match(m.data.toString('utf8'), /with UTF8SMTP id /);
  });

  it('sends with sendmail after starttls(), verifying the certificate, and records ESMTPS', async (t) => {
    const token = randomUUID();
    const n = queued.length;
    const report = await smtplib(t, {
      port: srv.port,
      mode: 'sendmail',
      starttls: true,
      from: 'ops@example.test',
      to: ['a@example.test', 'b@example.test'],
      subject: `nightly report ${token}`,
      body: `All green.\n${token}\n`,
    });
    if (!report) return;
    assert.match(report.tls_version ?? '', /^TLSv1\.[23]$/);
    assert.deepEqual(report.refused, {});
    assert.equal(queued.length, n + 1, 'one message queued');
    const m = queued.at(-1)!;
    assert.equal(m.sender, 'ops@example.test');
    assert.deepEqual(m.recipients, ['a@example.test', 'b@example.test']);
    assert.deepEqual(m.raw, Buffer.from(report.data_b64, 'base64'));
    assert.equal(
      m.raw.toString('utf8'),
      `From: ops@example.test\r\nTo: a@example.test, b@example.test\r\nSubject: nightly report ${token}\r\n\r\nAll green.\r\n${token}\r\n`,
    );
    const received = m.data.toString('utf8');
    assert.match(
      received,
      /^Received: from python\.test \(\[127\.0\.0\.1\]\)\r\n\tby mx\.test \(Petrel\) with ESMTPS id /,
    );
    assert.ok(received.includes(`(using ${report.tls_version} with cipher `), received.slice(0, 400));
  });
});
