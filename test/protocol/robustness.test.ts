import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { SmtpClient } from '../harness/smtp-client.js';
import { definePlugin, deny } from '../../core/index.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';

async function session(srv: TestServer): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.port);
  await c.expect(/^220 /);
  await c.ehlo();
  return c;
}

describe('bad input gets a clear reply', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  before(async () => {
    srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(queued)],
      config: {
        limits: { maxRecipients: 3, maxUnknownCommands: 3, maxMessageSize: 10_000, maxLineLength: 600 },
      },
    });
  });
  after(() => srv.close());

  it('refuses a command line over the limit with 500 5.5.2 and keeps the session usable', async () => {
    const c = await session(srv);
    await c.cmd(`MAIL FROM:<${'a'.repeat(700)}@example.test>`, /^500 5\.5\.2 Line too long/);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 2\.1\.0 /);
    c.close();
  });

  it('refuses a line that never ends, without buffering it all', async () => {
    const c = await session(srv);
    c.write('NOOP ' + 'x'.repeat(50_000));
    c.write('\r\nNOOP\r\n');
    await c.expect(/^500 5\.5\.2 Line too long/);
    await c.expect(/^250 2\.0\.0 OK/);
    c.close();
  });

  it('refuses NUL bytes in a command', async () => {
    const c = await session(srv);
    await c.cmd('NOOP \0', /^500 5\.5\.2 NUL/);
    c.close();
  });

  it('refuses 8-bit bytes in commands without SMTPUTF8', async () => {
    const c = await session(srv);
    c.write(Buffer.from('HELO h\u00e9llo.test\r\n', 'utf8'));
    await c.expect(/^500 5\.5\.2 8-bit/);
    c.write(Buffer.from('MAIL FROM:<jos\u00e9@example.test>\r\n', 'utf8'));
    await c.expect(/^553 5\.6\.7 /);
    c.write(Buffer.from([0x4e, 0x4f, 0x4f, 0x50, 0x20, 0xff, 0x0d, 0x0a])); // not UTF-8 at all
    await c.expect(/^500 5\.5\.2 /);
    c.close();
  });

  it('accepts a UTF-8 address when MAIL carries SMTPUTF8', async () => {
    const c = await session(srv);
    c.write(Buffer.from('MAIL FROM:<jos\u00e9@example.test> SMTPUTF8\r\n', 'utf8'));
    await c.expect(/^250 2\.1\.0 /);
    c.write(Buffer.from('RCPT TO:<\u7528\u6237@\u4f8b\u5b50.test>\r\n', 'utf8'));
    await c.expect(/^250 2\.1\.5 /);
    c.close();
  });

  for (const [label, addr] of [
    ['no brackets', 'bob@example.test'],
    ['no domain', '<bob@>'],
    ['double dot', '<bob..x@example.test>'],
    ['trailing dot in domain', '<bob@example.test.>'],
    ['bad label', '<bob@-example.test>'],
    ['unterminated quote', '<"bob@example.test>'],
    ['two ats', '<bob@x@example.test>'],
    ['unknown literal', '<bob@[foo:bar]>'],
    ['bad IPv4 literal', '<bob@[300.1.1.1]>'],
    ['junk after bracket', '<bob@example.test>junk'],
  ] as const) {
    it(`refuses a malformed recipient (${label}) with 501 5.1.3`, async () => {
      const c = await session(srv);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd(`RCPT TO:${addr}`, /^501 5\.(1\.3|5\.4) /);
      c.close();
    });
  }

  it('refuses a malformed sender with 501 5.1.7', async () => {
    const c = await session(srv);
    await c.cmd('MAIL FROM:<a b@example.test>', /^501 5\.1\.7 /);
    await c.cmd('MAIL TO:<a@example.test>', /^501 5\.5\.4 /);
    c.close();
  });

  it('accepts well-formed unusual addresses', async () => {
    const c = await session(srv);
    await c.cmd('MAIL FROM:<>', /^250 /);
    await c.cmd('RCPT TO:<"john smith"@example.test>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<bob@[192.0.2.1]>', /^250 2\.1\.5 /);
    c.close();
  });

  it('refuses commands out of order with 503 5.5.1', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 Send HELO/);
    await c.ehlo();
    await c.cmd('RCPT TO:<b@example.test>', /^503 5\.5\.1 /);
    await c.cmd('DATA', /^503 5\.5\.1 /);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 /);
    await c.cmd('DATA', /^554 5\.5\.1 No valid recipients/);
    c.close();
  });

  it('refuses recipients past the limit with 452 4.5.3', async () => {
    const c = await session(srv);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    for (let i = 0; i < 3; i++) await c.cmd(`RCPT TO:<r${i}@example.test>`, /^250 /);
    await c.cmd('RCPT TO:<r4@example.test>', /^452 4\.5\.3 Too many recipients/);
    c.close();
  });

  it('disconnects after too many unknown commands', async () => {
    const c = await session(srv);
    await c.cmd('FOO', /^500 5\.5\.1 Command unrecognized/);
    await c.cmd('BAR', /^500 5\.5\.1 /);
    c.send('BAZ');
    await c.expect(/^500 5\.5\.1 /);
    await c.expect(/^421 4\.7\.0 .*Too many errors/);
    await c.closed();
  });

  it('answers an HTTP request once and closes', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.cmd('GET / HTTP/1.1', /^554 5\.7\.0 /);
    await c.closed();
  });

  it('refuses a declared SIZE over the limit at MAIL with 552 5.3.4', async () => {
    const c = await session(srv);
    await c.cmd('MAIL FROM:<a@example.test> SIZE=10001', /^552 5\.3\.4 /);
    await c.cmd('MAIL FROM:<a@example.test> SIZE=100', /^250 /);
    c.close();
  });

  it('refuses content over the limit with 552 5.3.4 after the terminator, and stays in sync', async () => {
    const c = await session(srv);
    const before = queued.length;
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RCPT TO:<b@example.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: big\r\n\r\n' + ('x'.repeat(998) + '\r\n').repeat(20) + '.\r\n');
    await c.expect(/^552 5\.3\.4 /);
    await c.cmd('NOOP', /^250 /);
    assert.equal(queued.length, before);
    c.close();
  });

  it('refuses MAIL parameters it does not know with 555 5.5.4', async () => {
    const c = await session(srv);
    await c.cmd('MAIL FROM:<a@example.test> FROBNICATE=1', /^555 5\.5\.4 /);
    await c.cmd('MAIL FROM:<a@example.test> BODY=BINARYMIME', /^555 5\.5\.4 /);
    await c.cmd('MAIL FROM:<a@example.test> BODY=9BIT', /^501 5\.5\.4 /);
    c.close();
  });
});

describe('SMTP smuggling and line endings', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  before(async () => {
    srv = await startServer({ plugins: [acceptAllRecipients, memoryQueue(queued)] });
  });
  after(() => srv.close());

  async function sendData(c: SmtpClient, body: string): Promise<void> {
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RCPT TO:<b@example.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(body);
  }

  for (const [label, end] of [
    ['<LF>.<LF>', '\n.\n'],
    ['<LF>.<CR><LF>', '\n.\r\n'],
    ['<CR><LF>.<LF>', '\r\n.\n'],
    ['<CR>.<CR>', '\r.\r'],
    ['<CR><LF>.<CR>', '\r\n.\r'],
  ] as const) {
    it(`does not end data at ${label}, and refuses the message for its bare line ending`, async () => {
      const c = await session(srv);
      const before = queued.length;
      await sendData(
        c,
        `Subject: s\r\n\r\nfirst${end}MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n`,
      );
      await c.expect(/^554 5\.6\.0 .*bare LF or CR/);
      // Nothing of the smuggled transaction was run as commands.
      await c.cmd('NOOP', /^250 2\.0\.0 OK\r\n$/);
      assert.equal(c.unread, '');
      assert.equal(queued.length, before);
      c.close();
    });
  }

  it('refuses a bare LF inside an ordinary line', async () => {
    const c = await session(srv);
    await sendData(c, 'Subject: s\r\n\r\nline one\nline two\r\n.\r\n');
    await c.expect(/^554 5\.6\.0 /);
    c.close();
  });

  it('keeps a CRLF split across TCP segments intact', async () => {
    const c = await session(srv);
    await sendData(c, 'Subject: split\r');
    await new Promise((r) => setTimeout(r, 50));
    c.write('\n\r\nbody\r');
    await new Promise((r) => setTimeout(r, 50));
    c.write('\n.');
    await new Promise((r) => setTimeout(r, 50));
    c.write('\r\n');
    await c.expect(/^250 2\.0\.0 /);
    assert.equal(queued.at(-1)!.raw.toString(), 'Subject: split\r\n\r\nbody\r\n');
    c.close();
  });

  it('normalises bare line endings to CRLF when configured to', async () => {
    const norm: CapturedMessage[] = [];
    const s2 = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(norm)],
      config: { smtp: { bareLineEndings: 'normalize', banner: 'ESMTP' } },
    });
    try {
      const c = await session(s2);
      await sendData(c, 'Subject: n\r\n\r\none\ntwo\rthree\n.\nfour\r\n.\r\n');
      await c.expect(/^250 2\.0\.0 /);
      // The bare "\n.\n" did not end the data; it is content, and every line ends in CRLF.
      assert.equal(norm[0]!.raw.toString(), 'Subject: n\r\n\r\none\r\ntwo\r\nthree\r\n.\r\nfour\r\n');
      c.close();
    } finally {
      await s2.close();
    }
  });
});

describe('slow, early and too many clients', () => {
  it('refuses a client that talks before the greeting', async () => {
    const srv = await startServer({ config: { timeouts: { greetingDelay: '300ms' } } });
    try {
      const c = await SmtpClient.connect(srv.port);
      c.send('EHLO impatient.test');
      await c.expect(/^554 5\.5\.0 .*before the greeting/);
      await c.closed();
      const patient = await SmtpClient.connect(srv.port);
      await patient.expect(/^220 /);
      patient.close();
    } finally {
      await srv.close();
    }
  });

  it('closes an idle session with 421 4.4.2 after the command timeout', async () => {
    const srv = await startServer({ config: { timeouts: { command: '300ms' } } });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^220 /);
      await c.expect(/^421 4\.4\.2 .*Timeout/, 3000);
      await c.closed();
    } finally {
      await srv.close();
    }
  });

  it('does not let a client drip one byte at a time past the command timeout', async () => {
    const srv = await startServer({ config: { timeouts: { command: '400ms' } } });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^220 /);
      const drip = setInterval(() => c.write('N'), 100);
      try {
        await c.expect(/^421 4\.4\.2 /, 3000);
      } finally {
        clearInterval(drip);
      }
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('does not let a client drip an AUTH response past the command timeout', async () => {
    const auth = definePlugin({
      name: 'test-auth-refuse',
      setup: () => ({ auth: async () => deny(535, '5.7.8', 'Authentication credentials invalid') }),
    });
    const srv = await startServer({
      plugins: [auth],
      config: {
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0, allowInsecureAuth: true }],
        timeouts: { command: '400ms' },
      },
    });
    try {
      const c = await session(srv);
      await c.cmd('AUTH LOGIN', /^334 VXNlcm5hbWU6/);
      const drip = setInterval(() => c.write('Y'), 100);
      try {
        await c.expect(/^421 4\.4\.2 /, 3000);
      } finally {
        clearInterval(drip);
      }
      assert.ok(
        srv.logs.some((l) => l.msg === 'deadline passed, closing connection' && l.deadline === 'command'),
      );
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('gives a TLS handshake that drips one deadline for the whole of it, and logs why it ended', async () => {
    const srv = await startServer({ config: { timeouts: { command: '400ms' } } });
    try {
      const s = connect(srv.submissionsPort, '127.0.0.1');
      s.on('error', () => undefined);
      const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
      // A TLS record header announcing 512 octets of handshake, which then arrive one at a time.
      s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00]));
      const drip = setInterval(() => s.write(Buffer.from([0])), 100);
      try {
        await closed;
      } finally {
        clearInterval(drip);
      }
      assert.ok(
        srv.logs.some((l) => l.msg === 'deadline passed, closing connection' && l.deadline === 'tls'),
      );
    } finally {
      await srv.close();
    }
  });

  it('after a BDAT message fails, gives the client timeouts.command for its RSET, not what is left of the content deadline', async () => {
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      config: {
        limits: { maxMessageSize: 100 },
        timeouts: { command: '3s', data: '200ms', minDataRate: 1000 },
      },
    });
    try {
      const c = await session(srv);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      const chunk = 'x'.repeat(200);
      c.write(`BDAT ${chunk.length}\r\n${chunk}`);
      await c.expect(/^552 5\.3\.4 /);
      // The content deadline (200 ms + 200 ms for 200 octets) has long passed; the command one has not.
      await new Promise((r) => setTimeout(r, 1000));
      await c.cmd('RSET', /^250 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('closes a session whose DATA stalls, after the data timeout', async () => {
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      config: { timeouts: { data: '300ms' } },
    });
    try {
      const c = await session(srv);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: stalled\r\n');
      await c.expect(/^421 4\.4\.2 /, 3000);
      await c.closed();
    } finally {
      await srv.close();
    }
  });

  it('refuses connections over the per-IP and total limits with 421', async () => {
    const srv = await startServer({ config: { limits: { maxConnectionsPerIp: 2, maxConnections: 3 } } });
    try {
      const a = await SmtpClient.connect(srv.port);
      await a.expect(/^220 /);
      const b = await SmtpClient.connect(srv.port);
      await b.expect(/^220 /);
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^421 .*Too many connections/);
      await c.closed();
      // Another client address (all of 127.0.0.0/8 is loopback) gets in, up to the total.
      const d = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: '127.0.0.2' });
      await d.expect(/^220 /);
      const e = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: '127.0.0.3' });
      await e.expect(/^421 .*Too many connections/);
      a.close();
      await new Promise((r) => setTimeout(r, 100));
      const f = await SmtpClient.connect(srv.port);
      await f.expect(/^220 /);
      b.close();
      d.close();
      f.close();
    } finally {
      await srv.close();
    }
  });

  it('survives a client that resets the connection mid-DATA and keeps serving', async () => {
    const srv = await startServer({ plugins: [acceptAllRecipients] });
    try {
      const c = await session(srv);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: half\r\n\r\nhalf a mess');
      c.close();
      await new Promise<void>((resolve, reject) => {
        const s = connect(srv.port, '127.0.0.1');
        s.once('data', (d) => {
          s.destroy();
          if (/^220 /.test(d.toString())) resolve();
          else reject(new Error(d.toString()));
        });
        s.once('error', reject);
      });
    } finally {
      await srv.close();
    }
  });
});
