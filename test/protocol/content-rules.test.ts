import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { accept, definePlugin } from '../../core/index.js';
import type { PetrelConfigInput } from '../../core/config/schema.js';
import { SmtpClient } from '../harness/smtp-client.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';

async function ready(srv: TestServer): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.port);
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
  await c.cmd('RCPT TO:<b@example.test>', /^250 /);
  return c;
}

/** A server that keeps what it queues, with the given `smtp` settings. */
async function withSmtp(
  smtp: NonNullable<PetrelConfigInput['smtp']>,
): Promise<{ srv: TestServer; queued: CapturedMessage[] }> {
  const queued: CapturedMessage[] = [];
  const srv = await startServer({ plugins: [acceptAllRecipients, memoryQueue(queued)], config: { smtp } });
  return { srv, queued };
}

describe('BDAT content follows the DATA rules', () => {
  let srv: TestServer;
  let queued: CapturedMessage[];
  before(async () => ({ srv, queued } = await withSmtp({})));
  after(() => srv.close());

  it('refuses a LAST chunk that ends in a bare CR, as DATA refuses the same content', async () => {
    const c = await ready(srv);
    const before = queued.length;
    const body = 'Subject: cr\r\n\r\nends in a bare CR\r';
    c.write(`BDAT ${body.length} LAST\r\n${body}`);
    await c.expect(/^554 5\.6\.0 Message contains bare LF or CR/);
    assert.equal(queued.length, before, 'nothing queued, nothing relayed');
    await c.cmd('NOOP', /^250 /);
    c.close();
  });

  it('refuses a bare CR at the end of one chunk when the next one does not start with LF', async () => {
    const c = await ready(srv);
    c.write('BDAT 13\r\nSubject: a\r\n\r');
    await c.expect(/^250 2\.0\.0 13 octets/);
    c.write('BDAT 6 LAST\r\nbody\r\n');
    await c.expect(/^554 5\.6\.0 /);
    c.close();
  });

  it('takes a CRLF split between two chunks as a line end', async () => {
    const c = await ready(srv);
    c.write('BDAT 13\r\nSubject: a\r\n\r');
    await c.expect(/^250 2\.0\.0 13 octets/);
    c.write('BDAT 7 LAST\r\n\nbody\r\n');
    await c.expect(/^250 2\.0\.0 Ok: queued as /);
    assert.equal(queued.at(-1)!.raw.toString(), 'Subject: a\r\n\r\nbody\r\n');
    c.close();
  });

  it('with bareLineEndings: normalize, stores a final bare CR of a LAST chunk as CRLF', async () => {
    const norm = await withSmtp({ bareLineEndings: 'normalize' });
    try {
      const c = await ready(norm.srv);
      const body = 'Subject: cr\r\n\r\nlast line\r';
      c.write(`BDAT ${body.length} LAST\r\n${body}`);
      await c.expect(/^250 2\.0\.0 Ok: queued as /);
      assert.equal(norm.queued[0]!.raw.toString(), 'Subject: cr\r\n\r\nlast line\r\n');
      c.close();
    } finally {
      await norm.srv.close();
    }
  });
});

describe('NUL in message content', () => {
  let srv: TestServer;
  let queued: CapturedMessage[];
  before(async () => ({ srv, queued } = await withSmtp({})));
  after(() => srv.close());

  it('refuses a message with a NUL after DATA with 554 5.6.0 by default', async () => {
    const c = await ready(srv);
    const before = queued.length;
    await c.cmd('DATA', /^354 /);
    c.write('Subject: nul\r\n\r\nbefore\0after\r\n.\r\n');
    await c.expect(/^554 5\.6\.0 Message contains NUL octets/);
    assert.equal(queued.length, before);
    await c.cmd('NOOP', /^250 /);
    c.close();
  });

  it('refuses a message with a NUL in a BDAT chunk the same way', async () => {
    const c = await ready(srv);
    const body = 'Subject: nul\r\n\r\nbefore\0after\r\n';
    c.write(`BDAT ${body.length} LAST\r\n${body}`);
    await c.expect(/^554 5\.6\.0 Message contains NUL octets/);
    c.close();
  });

  it('with smtp.nul: strip, stores the message without its NULs, over DATA and BDAT', async () => {
    const strip = await withSmtp({ nul: 'strip' });
    try {
      const c = await ready(strip.srv);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: nul\0\r\n\r\n\0before\0after\r\n.\r\n');
      await c.expect(/^250 2\.0\.0 Ok: queued as /);
      assert.equal(strip.queued[0]!.raw.toString(), 'Subject: nul\r\n\r\nbeforeafter\r\n');
      assert.equal(strip.queued[0]!.data.includes(0), false);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      const body = 'Subject: nul\r\n\r\nbe\0fore\r\n';
      c.write(`BDAT ${body.length} LAST\r\n${body}`);
      await c.expect(/^250 2\.0\.0 Ok: queued as /);
      assert.equal(strip.queued[1]!.raw.toString(), 'Subject: nul\r\n\r\nbefore\r\n');
      c.close();
    } finally {
      await strip.srv.close();
    }
  });
});

describe('RCPT TO:<postmaster>', () => {
  const seen: string[] = [];
  const recorder = definePlugin({
    name: 'test-record-rcpt',
    setup: () => ({
      async rcpt({ recipient }) {
        seen.push(recipient.address);
        return accept();
      },
    }),
  });

  it('reaches the plugins and the transaction as postmaster@ the first local domain', async () => {
    const queued: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [recorder, memoryQueue(queued)],
      config: { localDomains: ['first.test', 'second.test'] },
    });
    try {
      const c = await ready(srv);
      await c.cmd('RCPT TO:<PostMaster>', /^250 2\.1\.5 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: hello postmaster\r\n\r\nhi\r\n.\r\n');
      await c.expect(/^250 /);
      assert.equal(seen.at(-1), 'postmaster@first.test');
      assert.deepEqual(queued[0]!.recipients, ['b@example.test', 'postmaster@first.test']);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('is refused with 550 5.1.1 by a server without local domains, rather than accepted and lost', async () => {
    const srv = await startServer({ plugins: [recorder] });
    try {
      const c = await ready(srv);
      const before = seen.length;
      await c.cmd('RCPT TO:<postmaster>', /^550 5\.1\.1 /);
      assert.equal(seen.length, before, 'no plugin was asked to take an address that leads nowhere');
      assert.ok(srv.logs.some((l) => /RCPT TO:<postmaster> refused/.test(String(l.msg))));
      c.close();
    } finally {
      await srv.close();
    }
  });
});
