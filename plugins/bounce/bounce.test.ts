import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import pino from 'pino';
import { simpleParser, type ParsedMail } from 'mailparser';
import { Petrel } from '../../core/app.js';
import {
  accept,
  definePlugin,
  deny,
  routeTo,
  type DeliveryRecipient,
  type PetrelConfigInput,
  type QueuedMessageView,
  type RecipientReply,
  type RecipientResult,
} from '../../core/index.js';
import { address, setupPlugin } from '../../core/testing/index.js';
import { Queue, type QueueService, type Submission } from '../queue/api.js';
import bounce from './index.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import {
  buildReport,
  encodeUtf8AddrXtext,
  finalRecipient,
  readOriginal,
  remoteMtaName,
  typedAddress,
} from './report.js';

interface Delivery {
  id: string;
  sender: string;
  rcpt: string;
  body: string;
}

interface Attempt {
  sender: string;
  rcpt: string;
  status: 'delivered' | 'deferred' | 'failed';
}

const REMOTE = 'mx.h.test [192.0.2.7]';

/**
 * A transport for tests, deciding by local part: `nowhere…` has no route (a failure decided here,
 * not by a peer), `gone…` fails (550 5.1.1), `stuck…` is always
 * deferred (451 4.2.0), `slow…` is deferred for its first `slowAttempts` attempts, anything else
 * is delivered. Recipients at `remote.test` go through a transport named `outbound`.
 */
function testTransport(delivered: Delivery[], attempts: Attempt[], slowAttempts = 4) {
  return definePlugin({
    name: 'test-transport',
    setup: () => ({
      rcpt: async () => accept(),
      route: async ({ recipient }) =>
        recipient.address.local.startsWith('nowhere')
          ? deny(550, '5.4.4', 'No route to this destination')
          : routeTo(recipient.address.domain === 'remote.test' ? 'outbound' : 'test'),
      deliver: async ({ route, message, recipients }) => {
        if (route.transport !== 'test' && route.transport !== 'outbound') return { kind: 'proceed' };
        const chunks: Buffer[] = [];
        for await (const c of message.stream()) chunks.push(c as Buffer);
        const body = Buffer.concat(chunks).toString('utf8');
        const sender = message.sender?.address ?? '';
        return {
          kind: 'results',
          results: recipients.map((r) => {
            const local = r.address.local;
            const status = local.startsWith('gone')
              ? 'failed'
              : local.startsWith('stuck') || (local.startsWith('slow') && r.attempts < slowAttempts)
                ? 'deferred'
                : 'delivered';
            attempts.push({ sender, rcpt: r.address.address, status });
            if (status === 'delivered')
              delivered.push({ id: message.id, sender, rcpt: r.address.address, body });
            const reply =
              status === 'delivered'
                ? { code: 250, enhanced: '2.0.0', text: 'ok', remote: REMOTE }
                : status === 'deferred'
                  ? { code: 451, enhanced: '4.2.0', text: 'busy', remote: REMOTE }
                  : { code: 550, enhanced: '5.1.1', text: 'gone', remote: REMOTE };
            // `dsn…` at remote.test: a next hop that offered DSN and reports itself from now on.
            const dsnPassedOn = route.transport === 'outbound' && local.startsWith('dsn');
            return { recipient: r.address.address, status, reply, ...(dsnPassedOn ? { dsnPassedOn } : {}) };
          }),
        };
      },
    }),
  });
}

interface Harness {
  app: Petrel;
  dir: string;
  delivered: Delivery[];
  attempts: Attempt[];
  stop(): Promise<void>;
}

async function start(
  opts: {
    queue?: Record<string, unknown>;
    bounce?: Record<string, unknown>;
    slowAttempts?: number;
    dir?: string;
  } = {},
): Promise<Harness> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'petrel-bounce-'));
  const delivered: Delivery[] = [];
  const attempts: Attempt[] = [];
  const transport = testTransport(delivered, attempts, opts.slowAttempts);
  const config: PetrelConfigInput = {
    hostname: 'mx.test',
    localDomains: ['crepes.test'],
    listeners: [{ kind: 'smtp', port: 0 }],
    spool: { dir: join(dir, 'spool') },
    plugins: [
      { name: 'queue', config: { retry: '100ms...', ...opts.queue } },
      { name: 'bounce', config: { ...opts.bounce } },
      transport.name,
    ],
  };
  const app = await Petrel.start({ config, plugins: [transport], logger: pino({ level: 'silent' }) });
  return {
    app,
    dir,
    delivered,
    attempts,
    async stop() {
      await app.stop(1000);
    },
  };
}

async function send(
  port: number,
  opts: { from?: string; mailParams?: string; rcpts: string[]; body?: string },
): Promise<string> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo();
  const params = opts.mailParams ? ` ${opts.mailParams}` : '';
  await c.cmd(`MAIL FROM:<${opts.from ?? 'alice@crepes.test'}>${params}`, /^250 /);
  for (const r of opts.rcpts) await c.cmd(`RCPT TO:${r.startsWith('<') ? r : `<${r}>`}`, /^250 /);
  await c.cmd('DATA', /^354 /);
  c.write(
    `${opts.body ?? 'Subject: lunch\r\nMessage-ID: <lunch@crepes.test>\r\n\r\nsee you at noon\r\n'}.\r\n`,
  );
  const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
  await c.cmd('QUIT', /^221 /);
  return /queued as (\S+)/.exec(reply.text)![1]!;
}

async function until(check: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Reports delivered to an address (reports come from `<>`). */
function reportsTo(h: Harness, rcpt: string): Delivery[] {
  return h.delivered.filter((d) => d.rcpt === rcpt && d.sender === '');
}

/** The raw text of a report's message/delivery-status part. */
function statusPart(raw: string): string {
  const m = /Content-Type: message\/delivery-status\r\n\r\n([\s\S]*?)\r\n--=_report_/.exec(raw);
  assert.ok(m, 'a message/delivery-status part');
  return m[1]!;
}

/** The per-recipient blocks of a delivery-status part (the first block is per-message). */
function blocks(raw: string): string[] {
  return statusPart(raw)
    .split(/\r\n\r\n/)
    .slice(1);
}

/** A field's value from a block, unfolded. */
function field(block: string, name: string): string | undefined {
  return new RegExp(`^${name}: (.*)$`, 'mi').exec(block.replace(/\r\n[ \t]+/g, ' '))?.[1];
}

/** The types of the parts after the delivery-status part (mailparser lists them as attachments). */
function returnedTypes(mail: ParsedMail): string[] {
  return mail.attachments.map((a) => a.contentType).filter((t) => t !== 'message/delivery-status');
}

async function parse(body: string): Promise<ParsedMail> {
  return simpleParser(body);
}

describe('bounce: failure reports', () => {
  it('returns a refused message to its sender with an RFC 3464 report', async () => {
    const h = await start();
    try {
      const id = await send(h.app.port(), { rcpts: ['ok@h.test', 'gone@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const raw = reportsTo(h, 'alice@crepes.test')[0]!.body;
      const mail = await parse(raw);
      assert.equal(mail.subject, 'Undelivered Mail Returned to Sender');
      assert.equal(mail.from?.value[0]?.address, 'MAILER-DAEMON@mx.test');
      assert.equal(mail.from?.value[0]?.name, 'Mail Delivery System');
      assert.equal(mail.headers.get('auto-submitted'), 'auto-replied');
      assert.match(mail.messageId ?? '', /@mx\.test>$/);
      assert.ok(mail.date instanceof Date);
      assert.match(raw, /^Content-Type: multipart\/report; report-type=delivery-status;\r\n\tboundary="/m);
      assert.match(raw, /^MIME-Version: 1\.0\r$/m);
      assert.match(mail.text ?? '', /<gone@h\.test>: refused by mx\.h\.test \[192\.0\.2\.7\]/);
      assert.match(mail.text ?? '', /550 5\.1\.1 gone/);
      assert.doesNotMatch(mail.text ?? '', /ok@h\.test/);

      const perMessage = statusPart(raw).split('\r\n\r\n')[0]!;
      assert.equal(field(perMessage, 'Reporting-MTA'), 'dns; mx.test');
      assert.match(field(perMessage, 'Arrival-Date') ?? '', /^\w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d \+0000$/);
      assert.equal(field(perMessage, 'Original-Envelope-Id'), undefined);
      const [block, ...more] = blocks(raw);
      assert.equal(more.length, 0, 'only the failed recipient');
      assert.equal(field(block!, 'Final-Recipient'), 'rfc822; gone@h.test');
      assert.equal(field(block!, 'Original-Recipient'), undefined);
      assert.equal(field(block!, 'Action'), 'failed');
      assert.equal(field(block!, 'Status'), '5.1.1');
      assert.equal(field(block!, 'Remote-MTA'), 'dns; mx.h.test');
      assert.equal(field(block!, 'Diagnostic-Code'), 'smtp; 550 5.1.1 gone');
      assert.match(field(block!, 'Last-Attempt-Date') ?? '', /\+0000$/);
      assert.equal(field(block!, 'Will-Retry-Until'), undefined);

      assert.match(raw, /^Content-Type: message\/delivery-status\r$/m);
      assert.deepEqual(returnedTypes(mail), ['message/rfc822']);
      const original = mail.attachments
        .find((a) => a.contentType === 'message/rfc822')!
        .content.toString('utf8');
      assert.match(original, /^Received: /, 'the message as stored, Received: included');
      assert.ok(
        original.endsWith('Subject: lunch\r\nMessage-ID: <lunch@crepes.test>\r\n\r\nsee you at noon\r\n'),
      );
      assert.ok(original.includes(id), 'the Received: field names the queue id');
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it("reports a failure decided here without Remote-MTA or an smtp diagnostic; a peer's 5xx keeps both", async () => {
    const h = await start();
    try {
      await send(h.app.port(), { rcpts: ['nowhere@h.test', 'gone@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const raw = reportsTo(h, 'alice@crepes.test')[0]!.body;
      const [local, peer, ...more] = blocks(raw);
      assert.equal(more.length, 0);
      assert.equal(field(local!, 'Final-Recipient'), 'rfc822; nowhere@h.test');
      assert.equal(field(local!, 'Status'), '5.4.4');
      assert.equal(field(local!, 'Remote-MTA'), undefined);
      assert.equal(field(local!, 'Diagnostic-Code'), 'X-Petrel; No route to this destination');
      assert.equal(field(peer!, 'Final-Recipient'), 'rfc822; gone@h.test');
      assert.equal(field(peer!, 'Remote-MTA'), 'dns; mx.h.test');
      assert.equal(field(peer!, 'Diagnostic-Code'), 'smtp; 550 5.1.1 gone');
      const mail = await parse(raw);
      assert.match(
        mail.text ?? '',
        /<nowhere@h\.test>: not delivered; the reason:\n {4}550 5\.4\.4 No route/,
      );
      assert.match(mail.text ?? '', /<gone@h\.test>: refused by mx\.h\.test \[192\.0\.2\.7\], which said:/);
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('puts recipients that fail together into one report', async () => {
    const h = await start();
    try {
      await send(h.app.port(), { rcpts: ['gone1@h.test', 'ok@h.test', 'gone2@h.test', 'gone3@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      await sleep(400);
      const reports = reportsTo(h, 'alice@crepes.test');
      assert.equal(reports.length, 1, 'one report, not one per recipient');
      const bs = blocks(reports[0]!.body);
      assert.deepEqual(
        bs.map((b) => field(b, 'Final-Recipient')),
        ['rfc822; gone1@h.test', 'rfc822; gone2@h.test', 'rfc822; gone3@h.test'],
      );
      assert.ok(bs.every((b) => field(b, 'Action') === 'failed' && field(b, 'Status') === '5.1.1'));
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('reports a recipient whose queue lifetime ran out with status 4.4.7', async () => {
    const h = await start({ queue: { lifetime: '350ms' }, bounce: { delayWarning: false } });
    try {
      await send(h.app.port(), { rcpts: ['stuck@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const raw = reportsTo(h, 'alice@crepes.test')[0]!.body;
      const [block] = blocks(raw);
      assert.equal(field(block!, 'Final-Recipient'), 'rfc822; stuck@h.test');
      assert.equal(field(block!, 'Action'), 'failed');
      assert.equal(field(block!, 'Status'), '4.4.7');
      // The queue gave up, not the peer: no Remote-MTA, and the diagnostic is ours, not `smtp;`.
      assert.equal(field(block!, 'Remote-MTA'), undefined);
      assert.match(
        field(block!, 'Diagnostic-Code') ?? '',
        /^X-Petrel; Message expired .*; last error: mx\.h\.test \[192\.0\.2\.7\] said: 451 4\.2\.0 busy$/,
      );
      const mail = await parse(raw);
      assert.equal(mail.subject, 'Undelivered Mail Returned to Sender');
      assert.match(
        mail.text ?? '',
        /<stuck@h\.test>: still undeliverable when the message's time in the queue ran out/,
      );
      assert.ok(h.attempts.filter((a) => a.rcpt === 'stuck@h.test').length >= 2, 'retried first');
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('returns only the header with RET=HDRS, or when the message is larger than returnLimit', async () => {
    const h = await start({ bounce: { returnLimit: 2000 } });
    try {
      await send(h.app.port(), { mailParams: 'RET=HDRS', rcpts: ['gone@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const big = `Subject: big\r\n\r\n${'z'.repeat(70)}\r\n`.repeat(1) + `${'y'.repeat(70)}\r\n`.repeat(40);
      await send(h.app.port(), { rcpts: ['gone@h.test'], body: big });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 2);
      const [hdrs, large] = reportsTo(h, 'alice@crepes.test').map((r) => r.body);
      for (const raw of [hdrs!, large!]) {
        const mail = await parse(raw);
        assert.deepEqual(returnedTypes(mail), ['text/rfc822-headers']);
        const returned = mail.attachments
          .find((a) => a.contentType === 'text/rfc822-headers')!
          .content.toString('utf8');
        assert.match(returned, /^Received: /);
        assert.match(returned, /^Subject: (lunch|big)\r$/m);
        assert.doesNotMatch(returned, /see you at noon|yyyy|zzzz/, 'no body');
        assert.doesNotMatch(raw, /see you at noon|yyyy/);
      }
      assert.match((await parse(hdrs!)).text ?? '', /The header of the original message is attached/);
      assert.match((await parse(large!)).text ?? '', /too large to return; its header is attached/);
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('never bounces a message from <>: no report, and a failing report makes no loop', async () => {
    const h = await start();
    try {
      await send(h.app.port(), { from: '', rcpts: ['gone@h.test'] });
      // The sender of this one cannot take mail: its report fails, and that failure is not reported.
      await send(h.app.port(), { from: 'gone-sender@h.test', rcpts: ['gone@h.test'] });
      await until(() => h.attempts.some((a) => a.rcpt === 'gone-sender@h.test'));
      await sleep(500);
      assert.deepEqual(h.attempts.map((a) => `${a.sender || '<>'} -> ${a.rcpt} ${a.status}`).sort(), [
        '<> -> gone-sender@h.test failed',
        '<> -> gone@h.test failed',
        'gone-sender@h.test -> gone@h.test failed',
      ]);
      assert.equal(h.delivered.length, 0);
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('sends a copy to the postmaster instead, with copyPostmaster', async () => {
    const h = await start({ bounce: { copyPostmaster: true } });
    try {
      await send(h.app.port(), { from: '', rcpts: ['gone@h.test'] });
      await until(() => reportsTo(h, 'postmaster@crepes.test').length === 1);
      const raw = reportsTo(h, 'postmaster@crepes.test')[0]!.body;
      const mail = await parse(raw);
      assert.equal(mail.subject, 'Postmaster Copy: Undelivered Mail Returned to Sender');
      assert.equal(
        mail.to && !Array.isArray(mail.to) ? mail.to.value[0]?.address : '',
        'postmaster@crepes.test',
      );
      assert.deepEqual(returnedTypes(mail), ['text/rfc822-headers']);
      assert.equal(field(blocks(raw)[0]!, 'Final-Recipient'), 'rfc822; gone@h.test');
      await sleep(300);
      assert.equal(h.delivered.length, 1, 'nothing else');
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('queues a report still waiting for its batch when the server stops', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-bounce-'));
    const first = await start({ dir, bounce: { batchWindow: '1h' } });
    let h = first;
    try {
      await send(h.app.port(), { rcpts: ['gone@h.test'] });
      await until(() => h.attempts.length === 1);
      await sleep(100);
      assert.equal(reportsTo(h, 'alice@crepes.test').length, 0, 'still in its batch window');
      await h.stop();
      // Queued while stopping: delivered before the queue closed, or after the next start.
      h = await start({ dir });
      const reports = () => [...reportsTo(first, 'alice@crepes.test'), ...reportsTo(h, 'alice@crepes.test')];
      await until(() => reports().length === 1);
      await sleep(300);
      assert.equal(reports().length, 1);
      assert.equal(field(blocks(reports()[0]!.body)[0]!, 'Action'), 'failed');
    } finally {
      await h.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('returns a message the queue stored as its own file, though the failure made it final', async () => {
    const h = await start({ queue: { inlineLimit: 100 } });
    try {
      const body = `Subject: big\r\n\r\n${`${'x'.repeat(70)}\r\n`.repeat(10)}`;
      await send(h.app.port(), { rcpts: ['gone@h.test'], body });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const mail = await parse(reportsTo(h, 'alice@crepes.test')[0]!.body);
      const returned = mail.attachments.find((a) => a.contentType === 'message/rfc822');
      assert.ok(returned?.content.toString().endsWith(body), 'the whole original');
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });
});

describe('bounce: the hooks alone', () => {
  const message = (stream: () => Readable): QueuedMessageView => ({
    id: 'Q1',
    sender: address('alice@crepes.test'),
    mailParams: { smtputf8: false },
    receivedAt: new Date(),
    size: 20,
    stream,
  });
  const recipient: DeliveryRecipient = {
    address: address('gone@h.test'),
    params: {},
    sender: null,
    attempts: 0,
    maybeDelivered: false,
  };
  const result: RecipientResult = {
    recipient: 'gone@h.test',
    status: 'failed',
    reply: { code: 550, enhanced: '5.1.1', text: 'gone' },
  };
  const fakeQueue = (submitted: Submission[]): QueueService =>
    ({
      submit: async (m: Submission) => {
        submitted.push(m);
        return 'R1';
      },
      get: () => null,
      settings: { lifetime: 5 * 86_400_000, retryDelays: [300_000], repeatLast: true },
    }) as unknown as QueueService;
  const signal = new AbortController().signal;

  it('reports without the original when it can no longer be read', async () => {
    const submitted: Submission[] = [];
    const hooks = await setupPlugin(bounce, {
      config: { delayWarning: false, batchWindow: 0 },
      services: new Map([[Queue, fakeQueue(submitted)]]),
    });
    const gone = () =>
      new Readable({
        read() {
          this.destroy(Object.assign(new Error('no such file'), { code: 'ENOENT' }));
        },
      });
    await hooks.failed!({
      message: message(gone),
      recipient,
      route: null,
      result,
      reason: 'refused',
      signal,
    });
    assert.equal(submitted.length, 1, 'the report is queued before the hook returns');
    const report = submitted[0]!;
    assert.equal(report.sender, null);
    assert.deepEqual(
      report.recipients.map((r) => r.address.address),
      ['alice@crepes.test'],
    );
    const raw = report.content.toString();
    assert.match(raw, /^Action: failed\r$/m);
    assert.doesNotMatch(raw, /message\/rfc822|text\/rfc822-headers/);
    assert.match((await parse(raw)).text ?? '', /no longer available/);
  });

  it('sends nothing for a message the administrator deleted', async () => {
    const submitted: Submission[] = [];
    const hooks = await setupPlugin(bounce, {
      config: { delayWarning: false, batchWindow: 0 },
      services: new Map([[Queue, fakeQueue(submitted)]]),
    });
    const body = () => Readable.from([Buffer.from('Subject: x\r\n\r\nhi\r\n')]);
    await hooks.failed!({
      message: message(body),
      recipient,
      route: null,
      result,
      reason: 'deleted',
      signal,
    });
    await sleep(50);
    assert.equal(submitted.length, 0);
  });
});

describe('bounce: NOTIFY, ORCPT and ENVID (RFC 3461)', () => {
  it('sends nothing for NOTIFY=NEVER, and reports the others of the message', async () => {
    const h = await start();
    try {
      await send(h.app.port(), {
        rcpts: [
          '<gone-quiet@h.test> NOTIFY=NEVER',
          '<gone-loud@h.test>',
          '<gone-succ@h.test> NOTIFY=SUCCESS',
        ],
      });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      await sleep(300);
      assert.equal(reportsTo(h, 'alice@crepes.test').length, 1);
      assert.deepEqual(
        blocks(reportsTo(h, 'alice@crepes.test')[0]!.body).map((b) => field(b, 'Final-Recipient')),
        ['rfc822; gone-loud@h.test'],
      );
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('sends a success report for NOTIFY=SUCCESS, relayed through outbound unless the next hop took DSN over, with ORCPT and ENVID', async () => {
    const h = await start();
    try {
      await send(h.app.port(), {
        mailParams: 'ENVID=QQ314159 RET=FULL',
        rcpts: [
          '<ok@h.test> NOTIFY=SUCCESS ORCPT=rfc822;Alias+2BTag@Client.example',
          '<far@remote.test> NOTIFY=SUCCESS,FAILURE',
          '<dsnfar@remote.test> NOTIFY=SUCCESS',
          '<quiet@h.test>',
        ],
      });
      await until(() => reportsTo(h, 'alice@crepes.test').length >= 1);
      await sleep(300);
      const reports = reportsTo(h, 'alice@crepes.test');
      assert.equal(reports.length, 1, 'both successes in one report');
      const raw = reports[0]!.body;
      const mail = await parse(raw);
      assert.equal(mail.subject, 'Successful Mail Delivery Report');
      assert.equal(field(statusPart(raw).split('\r\n\r\n')[0]!, 'Original-Envelope-Id'), 'QQ314159');
      const byRcpt = new Map(blocks(raw).map((b) => [field(b, 'Final-Recipient'), b]));
      // dsnfar@ went to a next hop that took NOTIFY over: that hop reports, not this server.
      assert.deepEqual([...byRcpt.keys()].sort(), ['rfc822; far@remote.test', 'rfc822; ok@h.test']);
      const local = byRcpt.get('rfc822; ok@h.test')!;
      assert.equal(field(local, 'Action'), 'delivered');
      assert.equal(field(local, 'Status'), '2.0.0');
      assert.equal(field(local, 'Original-Recipient'), 'rfc822; Alias+Tag@Client.example');
      assert.equal(field(local, 'Diagnostic-Code'), 'smtp; 250 2.0.0 ok');
      const far = byRcpt.get('rfc822; far@remote.test')!;
      assert.equal(field(far, 'Action'), 'relayed');
      assert.equal(field(far, 'Original-Recipient'), undefined);
      assert.match(mail.text ?? '', /<far@remote\.test>: passed on to mx\.h\.test/);
      assert.deepEqual(
        returnedTypes(mail),
        ['text/rfc822-headers'],
        'a success report returns the header only, whatever RET says',
      );
      assert.match(raw, /Content-Description: Delivered message headers\r\n/);
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('carries ORCPT and ENVID into a failure report', async () => {
    const h = await start();
    try {
      await send(h.app.port(), {
        mailParams: 'ENVID=order+2D42',
        rcpts: ['<gone@h.test> ORCPT=rfc822;sales@crepes.test'],
      });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      const raw = reportsTo(h, 'alice@crepes.test')[0]!.body;
      assert.match(raw, /^Original-Envelope-Id: order-42\r$/m);
      const [block] = blocks(raw);
      assert.equal(field(block!, 'Original-Recipient'), 'rfc822; sales@crepes.test');
      assert.equal(field(block!, 'Final-Recipient'), 'rfc822; gone@h.test');
      // Original-Recipient comes first (RFC 3464 §2.3).
      assert.ok(block!.indexOf('Original-Recipient') < block!.indexOf('Final-Recipient'));
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });
});

describe('bounce: delay warnings', () => {
  it('warns once per recipient after delayWarning, unless NOTIFY leaves DELAY out', async () => {
    const h = await start({
      queue: { lifetime: '1h' },
      bounce: { delayWarning: '250ms' },
      slowAttempts: 7,
    });
    try {
      const id = await send(h.app.port(), {
        rcpts: ['<slow@h.test>', '<slow-no-delay@h.test> NOTIFY=FAILURE', '<slow-delay@h.test> NOTIFY=DELAY'],
      });
      await until(() => h.delivered.filter((d) => d.id === id).length === 3, 10_000);
      await sleep(300);
      const reports = reportsTo(h, 'alice@crepes.test');
      assert.equal(reports.length, 1, 'one warning, sent once');
      const raw = reports[0]!.body;
      const mail = await parse(raw);
      assert.equal(mail.subject, 'Delayed Mail (still being retried)');
      const bs = blocks(raw);
      assert.deepEqual(bs.map((b) => field(b, 'Final-Recipient')).sort(), [
        'rfc822; slow-delay@h.test',
        'rfc822; slow@h.test',
      ]);
      for (const b of bs) {
        assert.equal(field(b, 'Action'), 'delayed');
        assert.equal(field(b, 'Status'), '4.2.0');
        assert.equal(field(b, 'Diagnostic-Code'), 'smtp; 451 4.2.0 busy');
      }
      const arrival = Date.parse(field(statusPart(raw).split('\r\n\r\n')[0]!, 'Arrival-Date')!);
      const until_ = Date.parse(field(bs[0]!, 'Will-Retry-Until')!);
      assert.ok(Math.abs(until_ - arrival - 3_600_000) <= 1000, 'arrival plus the queue lifetime');
      assert.match(mail.text ?? '', /keeps trying until/);
      assert.deepEqual(returnedTypes(mail), ['text/rfc822-headers']);
      assert.doesNotMatch(raw, /see you at noon/);
    } finally {
      await h.stop();
      rmSync(h.dir, { recursive: true, force: true });
    }
  });

  it('does not warn twice after a restart', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-bounce-'));
    let h = await start({ dir, queue: { lifetime: '1h' }, bounce: { delayWarning: '150ms' } });
    try {
      await send(h.app.port(), { rcpts: ['stuck@h.test'] });
      await until(() => reportsTo(h, 'alice@crepes.test').length === 1);
      await h.stop();
      h = await start({ dir, queue: { lifetime: '1h' }, bounce: { delayWarning: '150ms' } });
      const before = h.attempts.length;
      await until(() => h.attempts.length >= before + 3);
      await sleep(200);
      assert.equal(reportsTo(h, 'alice@crepes.test').length, 0, 'no second warning');
    } finally {
      await h.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('bounce: report helpers', () => {
  it('encodes addresses for message/delivery-status', () => {
    assert.equal(finalRecipient(address('bob@h.test')), 'rfc822; bob@h.test');
    assert.equal(finalRecipient(address('jösé@bücher.test')), 'utf-8; j\\x{F6}s\\x{E9}@b\\x{FC}cher.test');
    assert.equal(encodeUtf8AddrXtext('a+b=c\\d'), 'a\\x{2B}b\\x{3D}c\\x{5C}d');
    assert.equal(typedAddress('RFC822', 'a b@x'), 'rfc822; a+20b@x');
    assert.equal(remoteMtaName('mx.example.test [192.0.2.1]'), 'mx.example.test');
    assert.equal(remoteMtaName('192.0.2.9:24'), '[192.0.2.9]');
    assert.equal(remoteMtaName('[2001:db8::1]:24'), '[2001:db8::1]');
    assert.equal(remoteMtaName('unix:/run/dovecot/lmtp'), null);
    assert.equal(remoteMtaName(undefined), null);
  });

  it('reads only the header when asked, even with the blank line split between chunks', async () => {
    const chunks = ['Subject: x\r\nFrom: a@b\r', '\n\r', '\nbody line\r\n', 'more\r\n'].map((s) =>
      Buffer.from(s),
    );
    const head = await readOriginal(Readable.from(chunks), { headersOnly: true, limit: 1000 });
    assert.deepEqual(head.kind === 'headers' && head.content.toString(), 'Subject: x\r\nFrom: a@b\r\n');
    const full = await readOriginal(Readable.from(chunks), { headersOnly: false, limit: 1000 });
    assert.equal(full.kind === 'full' && full.content.toString(), chunks.join(''));
    const capped = await readOriginal(Readable.from(chunks), { headersOnly: false, limit: 30 });
    assert.ok(capped.kind === 'headers' && capped.why === 'too-large');
  });

  it("gives a decision made here a local diagnostic and no Remote-MTA, and a peer's reply both", () => {
    const recipient = (local: string, reply: RecipientReply) => ({
      address: address(`${local}@h.test`),
      action: 'failed' as const,
      status: reply.enhanced,
      reply,
      lastAttemptAt: new Date(0),
    });
    const report = buildReport({
      hostname: 'mx.test',
      audience: 'sender',
      to: address('alice@crepes.test'),
      queueId: 'Q1',
      arrivalDate: new Date(0),
      smtputf8: false,
      recipients: [
        // What outbound decides when the peer lacks SMTPUTF8: the peer never said it.
        recipient('ann', {
          code: 553,
          enhanced: '5.6.7',
          text: 'mx.h.test [192.0.2.7] does not support SMTPUTF8, which the message header needs',
        }),
        recipient('bob', { code: 550, enhanced: '5.1.1', text: ['No such user', 'here'], remote: REMOTE }),
      ],
      returned: { kind: 'none', why: 'unavailable' },
      date: new Date(0),
      messageId: 'M1',
    });
    const [ann, bob] = blocks(report.content.toString('utf8'));
    assert.equal(field(ann!, 'Remote-MTA'), undefined);
    assert.equal(
      field(ann!, 'Diagnostic-Code'),
      'X-Petrel; mx.h.test [192.0.2.7] does not support SMTPUTF8, which the message header needs',
    );
    assert.equal(field(bob!, 'Remote-MTA'), 'dns; mx.h.test');
    assert.equal(field(bob!, 'Diagnostic-Code'), 'smtp; 550 5.1.1 No such user here');
  });

  it('keeps an internationalised report valid: UTF-8 text quoted-printable, SMTPUTF8 when needed', async () => {
    const report = buildReport({
      hostname: 'mx.test',
      audience: 'sender',
      to: address('jösé@bücher.test'),
      queueId: 'Q1',
      arrivalDate: new Date(0),
      smtputf8: true,
      recipients: [
        {
          address: address('zoë@h.test'),
          action: 'failed',
          status: '5.1.1',
          reply: { code: 550, enhanced: '5.1.1', text: 'Zoë is gone', remote: REMOTE },
          lastAttemptAt: new Date(0),
        },
      ],
      returned: { kind: 'full', content: Buffer.from('Subject: héllo\r\n\r\nbody\r\n') },
      date: new Date(0),
      messageId: 'M1',
    });
    assert.equal(report.smtputf8, true);
    assert.equal(report.eightBit, true);
    const raw = report.content.toString('utf8');
    assert.match(raw, /^Diagnostic-Code: smtp; 550 5\.1\.1 Zo\? is gone\r$/m);
    assert.match(raw, /^Final-Recipient: utf-8; zo\\x\{EB\}@h\.test\r$/m);
    assert.match(raw, /^Content-Type: message\/global\r\nContent-Transfer-Encoding: 8bit\r$/m);
    const mail = await simpleParser(report.content);
    assert.match(
      mail.text ?? '',
      /<zoë@h\.test>: refused by mx\.h\.test \[192\.0\.2\.7\], which said:\n {4}550 5\.1\.1 Zoë is gone/,
    );
  });
});
