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
import { definePlugin } from '../../core/plugins/define.js';
import { accept, deny, proceed } from '../../core/hooks/verdict.js';
import type { MailParams, Recipient } from '../../core/hooks/catalogue.js';

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

/** Accepts alice / "correct horse" and nobody else. */
const testAuth = definePlugin({
  name: 'test-auth',
  setup: () => ({
    async auth({ username, password }) {
      if (username === 'alice' && password === 'correct horse') return accept();
      return username === 'blocked' ? deny(535, '5.7.8', 'No way') : proceed();
    },
  }),
});

interface Envelope {
  params: MailParams;
  recipients: Recipient[];
  user: string | null;
}
function envelopeQueue(into: Envelope[]) {
  return definePlugin({
    name: 'test-envelope',
    setup: () => ({
      async queue({ transaction, session }) {
        into.push({
          params: transaction.mailParams,
          recipients: [...transaction.recipients],
          user: session.user,
        });
        return proceed();
      },
    }),
  });
}

describe('ESMTP extensions', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  const envelopes: Envelope[] = [];
  before(async () => {
    srv = await startServer({
      plugins: [testAuth, acceptAllRecipients, envelopeQueue(envelopes), memoryQueue(queued)],
    });
  });
  after(() => srv.close());

  it('PIPELINING: answers a pipelined group in order, in one batch', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    c.write(
      'MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<bad@@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n',
    );
    await c.expect(/^250 2\.1\.0 /);
    await c.expect(/^250 2\.1\.5 /);
    await c.expect(/^501 5\.1\.3 /);
    await c.expect(/^250 2\.1\.5 /);
    await c.expect(/^354 /);
    c.write('Subject: piped\r\n\r\nx\r\n.\r\nRSET\r\nNOOP\r\n');
    await c.expect(/^250 2\.0\.0 Ok: queued/);
    await c.expect(/^250 2\.0\.0 OK/);
    await c.expect(/^250 2\.0\.0 OK/);
    assert.deepEqual(queued.at(-1)!.recipients, ['b@example.test', 'c@example.test']);
    c.close();
  });

  it('8BITMIME and SMTPUTF8: 8-bit content and UTF-8 headers arrive byte for byte', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    c.write(Buffer.from('MAIL FROM:<\u00e9l\u00e8ve@\u00e9cole.test> BODY=8BITMIME SMTPUTF8\r\n', 'utf8'));
    await c.expect(/^250 /);
    c.write(Buffer.from('RCPT TO:<\u8001\u5e08@\u5b66\u6821.test>\r\n', 'utf8'));
    await c.expect(/^250 /);
    await c.cmd('DATA', /^354 /);
    const body = Buffer.concat([
      Buffer.from('Subject: \u4f60\u597d\r\n\r\n\u4e2d\u6587 caf\u00e9\r\n', 'utf8'),
      Buffer.from([0xe9, 0x0d, 0x0a]), // a Latin-1 byte: 8-bit, not UTF-8
      Buffer.from('.\r\n'),
    ]);
    c.write(body);
    await c.expect(/^250 2\.0\.0 /);
    const m = queued.at(-1)!;
    assert.deepEqual(m.raw, body.subarray(0, body.length - 3));
    assert.equal(m.sender, '\u00e9l\u00e8ve@\u00e9cole.test');
    assert.match(m.data.toString('utf8'), /with UTF8SMTP id /);
    assert.equal(envelopes.at(-1)!.params.body, '8BITMIME');
    assert.equal(envelopes.at(-1)!.params.smtputf8, true);
    c.close();
  });

  it('DSN: RET, ENVID, NOTIFY and ORCPT are kept on the envelope', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<a@example.test> RET=HDRS ENVID=QQ314159+2B1', /^250 /);
    await c.cmd('RCPT TO:<b@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B+2Bx@example.test', /^250 /);
    await c.cmd('RCPT TO:<c@example.test> NOTIFY=NEVER', /^250 /);
    await c.cmd('RCPT TO:<d@example.test> NOTIFY=NEVER,SUCCESS', /^501 5\.5\.4 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: dsn\r\n\r\n.\r\n');
    await c.expect(/^250 /);
    const env = envelopes.at(-1)!;
    assert.equal(env.params.ret, 'HDRS');
    assert.equal(env.params.envid, 'QQ314159+1');
    assert.deepEqual(env.recipients[0]!.params, {
      notify: ['SUCCESS', 'DELAY'],
      orcpt: { type: 'rfc822', address: 'B+x@example.test' },
    });
    assert.deepEqual(env.recipients[1]!.params.notify, ['NEVER']);
    c.close();
  });

  it('a parameter repeated with the same value is accepted; a conflicting repeat is refused', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd(
      'MAIL FROM:<a@example.test> BODY=7BIT BODY=8BITMIME',
      /^501 5\.5\.4 Duplicate parameter BODY/,
    );
    await c.cmd('MAIL FROM:<a@example.test> RET=FULL RET=HDRS', /^501 5\.5\.4 Duplicate parameter RET/);
    await c.cmd('MAIL FROM:<a@example.test> SMTPUTF8 SMTPUTF8 BODY=8BITMIME body=8bitmime', /^250 2\.1\.0 /);
    await c.cmd(
      'RCPT TO:<b@example.test> NOTIFY=FAILURE NOTIFY=SUCCESS',
      /^501 5\.5\.4 Duplicate parameter NOTIFY/,
    );
    await c.cmd(
      'RCPT TO:<b@example.test> ORCPT=rfc822;b@example.test ORCPT=rfc822;x@example.test',
      /^501 5\.5\.4 Duplicate parameter ORCPT/,
    );
    await c.cmd(
      'RCPT TO:<b@example.test> NOTIFY=FAILURE,DELAY NOTIFY=failure,delay ORCPT=rfc822;b@example.test ORCPT=rfc822;b@example.test',
      /^250 2\.1\.5 /,
    );
    await c.cmd('DATA', /^354 /);
    c.write('Subject: repeats\r\n\r\n.\r\n');
    await c.expect(/^250 /);
    const env = envelopes.at(-1)!;
    assert.equal(env.params.smtputf8, true);
    assert.equal(env.params.body, '8BITMIME');
    assert.deepEqual(
      env.recipients.map((r) => r.params),
      [{ notify: ['FAILURE', 'DELAY'], orcpt: { type: 'rfc822', address: 'b@example.test' } }],
    );
    c.close();
  });

  it('ENHANCEDSTATUSCODES: every reply after the greeting and EHLO carries one', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 mx\.test /);
    await c.ehlo();
    for (const cmd of [
      'NOOP',
      'RSET',
      'VRFY x',
      'FOO',
      'MAIL FROM:<x',
      'RCPT TO:<a@b.test>',
      'DATA',
      'STARTTLS x',
      'BDAT x',
    ]) {
      const r = await c.cmd(cmd, /^\d{3}/);
      assert.match(r.raw, /^\d{3}[ -][245]\.\d+\.\d+ /, `${cmd} → ${r.raw}`);
    }
    c.close();
  });

  it('STARTTLS: upgrades, forgets the EHLO, and lists AUTH only inside TLS', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    const plain = await c.ehlo();
    assert.ok(plain.includes('STARTTLS'));
    assert.ok(!plain.some((w) => w.startsWith('AUTH')));
    await c.cmd('AUTH PLAIN ' + b64('\0alice\0correct horse'), /^538 5\.7\.11 /);
    await c.cmd('STARTTLS', /^220 2\.0\.0 /);
    const tls = await c.upgrade();
    assert.ok(tls.encrypted);
    await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 Send HELO/); // state was reset
    const words = await c.ehlo();
    assert.ok(!words.includes('STARTTLS'));
    assert.ok(words.includes('AUTH PLAIN LOGIN SCRAM-SHA-256'));
    await c.cmd('STARTTLS', /^503 5\.5\.1 /);
    c.close();
  });

  it('STARTTLS: discards commands pipelined behind it in plain text (CVE-2011-0411)', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    c.write('STARTTLS\r\nMAIL FROM:<injected@example.test>\r\n');
    await c.expect(/^220 2\.0\.0 /);
    await c.upgrade();
    await c.ehlo();
    // Had the injected MAIL run inside TLS, this would be "503 Sender already specified".
    await c.cmd('MAIL FROM:<real@example.test>', /^250 2\.1\.0 /);
    assert.equal(c.unread, '');
    c.close();
  });

  it('STARTTLS: picks the certificate by SNI', async () => {
    const { startServer: start, FIXTURES } = await import('../harness/server.js');
    const s2 = await start({
      config: {
        tls: {
          cert: `${FIXTURES}/tls/cert.pem`,
          key: `${FIXTURES}/tls/key.pem`,
          sni: {
            'other.test': { cert: `${FIXTURES}/tls/other-cert.pem`, key: `${FIXTURES}/tls/other-key.pem` },
          },
        },
      },
    });
    try {
      for (const [name, cn] of [
        ['other.test', 'other.test'],
        ['mx.test', 'mx.test'],
      ] as const) {
        const c = await SmtpClient.connect(s2.port);
        await c.expect(/^220 /);
        await c.ehlo();
        await c.cmd('STARTTLS', /^220 /);
        const tls = await c.upgrade(name);
        assert.equal(tls.getPeerCertificate().subject.CN, cn);
        c.close();
      }
    } finally {
      await s2.close();
    }
  });

  it('AUTH PLAIN and LOGIN verify through the auth hook, over TLS', async () => {
    for (const mech of ['PLAIN-initial', 'PLAIN-prompt', 'LOGIN']) {
      const c = await SmtpClient.connect(srv.submissionPort);
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<alice@example.test>', /^530 5\.7\.0 Authentication required/);
      await c.cmd('STARTTLS', /^220 /);
      await c.upgrade();
      await c.ehlo();
      if (mech === 'PLAIN-initial') {
        await c.cmd('AUTH PLAIN ' + b64('\0alice\0correct horse'), /^235 2\.7\.0 /);
      } else if (mech === 'PLAIN-prompt') {
        await c.cmd('AUTH PLAIN', /^334 \r\n$/);
        await c.cmd(b64('\0alice\0correct horse'), /^235 2\.7\.0 /);
      } else {
        await c.cmd('AUTH LOGIN', /^334 VXNlcm5hbWU6/);
        await c.cmd(b64('alice'), /^334 UGFzc3dvcmQ6/);
        await c.cmd(b64('correct horse'), /^235 2\.7\.0 /);
      }
      await c.cmd('AUTH PLAIN ' + b64('\0alice\0correct horse'), /^503 5\.5\.1 Already/);
      await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
      await c.cmd('RCPT TO:<bob@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: authed\r\n\r\nhi\r\n.\r\n');
      await c.expect(/^250 /);
      assert.equal(envelopes.at(-1)!.user, 'alice');
      assert.match(queued.at(-1)!.data.toString(), /with ESMTPSA id /);
      c.close();
    }
  });

  it('AUTH: wrong password gets 535 5.7.8, a cancel 501, and too many failures close the session', async () => {
    const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('AUTH PLAIN ' + b64('\0alice\0wrong'), /^535 5\.7\.8 /);
    await c.cmd('AUTH LOGIN', /^334 /);
    await c.cmd('*', /^501 5\.0\.0 /);
    await c.cmd('AUTH CRAM-MD5', /^504 5\.5\.4 /);
    await c.cmd('AUTH PLAIN !!!notbase64', /^501 5\.5\.2 /);
    await c.cmd('AUTH PLAIN ' + b64('\0blocked\0x'), /^535 5\.7\.8 No way/);
    c.send('AUTH PLAIN ' + b64('\0mallory\0x'));
    await c.expect(/^535 5\.7\.8 /);
    await c.expect(/^421 4\.7\.0 .*failed authentication/);
    await c.closed();
    const logged = JSON.stringify(srv.logs);
    assert.ok(!logged.includes('correct horse') && !logged.includes('"wrong"'), 'no password in the logs');
  });

  it('submissions: implicit TLS from the first byte (RFC 8314)', async () => {
    const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
    await c.expect(/^220 mx\.test /);
    const words = await c.ehlo();
    assert.ok(!words.includes('STARTTLS'));
    assert.ok(words.includes('AUTH PLAIN LOGIN SCRAM-SHA-256'));
    await c.cmd('MAIL FROM:<a@example.test>', /^530 5\.7\.0 /);
    c.close();
  });
});

describe('CHUNKING (BDAT, RFC 3030)', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  before(async () => {
    srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(queued)],
      config: { limits: { maxMessageSize: 1000 } },
    });
  });
  after(() => srv.close());

  async function ready(): Promise<SmtpClient> {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('RCPT TO:<b@example.test>', /^250 /);
    return c;
  }

  it('takes a message in chunks, with no dot-stuffing, and queues it at LAST', async () => {
    const c = await ready();
    const part1 = 'Subject: chunks\r\n\r\n.not stuffed\r\n';
    const part2 = '.\r\nend\r\n';
    c.write(`BDAT ${part1.length}\r\n${part1}`);
    await c.expect(new RegExp(`^250 2\\.0\\.0 ${part1.length} octets received`));
    c.write(`BDAT ${part2.length} LAST\r\n${part2}`);
    await c.expect(/^250 2\.0\.0 Ok: queued as /);
    assert.equal(queued.at(-1)!.raw.toString(), part1 + part2);
    c.close();
  });

  it('takes pipelined chunks and an empty LAST chunk', async () => {
    const c = await ready();
    c.write('BDAT 5\r\nab\r\nxBDAT 3\r\nyz\nBDAT 0 LAST\r\n');
    await c.expect(/^250 2\.0\.0 5 octets/);
    await c.expect(/^250 2\.0\.0 3 octets/);
    // The chunk had a bare LF: the message is refused like with DATA.
    await c.expect(/^554 5\.6\.0 /);
    c.close();
  });

  it('reads and refuses a chunk sent without a transaction, and stays in sync', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    c.write('BDAT 10 LAST\r\nNOOP\r\nNOOPNOOP\r\n');
    await c.expect(/^503 5\.5\.1 /);
    await c.expect(/^250 2\.0\.0 OK/);
    c.close();
  });

  it('refuses a message over the size limit and DATA after BDAT', async () => {
    const c = await ready();
    const big = 'x'.repeat(600) + '\r\n';
    c.write(`BDAT ${big.length}\r\n${big}`);
    await c.expect(/^250 /);
    await c.cmd('DATA', /^503 5\.5\.1 /);
    c.write(`BDAT ${big.length} LAST\r\n${big}`);
    await c.expect(/^552 5\.3\.4 /);
    await c.cmd('NOOP', /^250 /);
    c.close();
  });

  it('closes on a BDAT whose size it cannot read', async () => {
    const c = await ready();
    await c.cmd('BDAT lots', /^501 5\.5\.4 /);
    await c.closed();
  });
});
