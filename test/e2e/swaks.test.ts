import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { requirePeer } from '../harness/peers.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../harness/server.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { aliceOnly, PASSWORD, receivedWith, USER } from './common.js';
import { describeRun, killRunning, run, type RunResult } from './run.js';

describe('swaks against Petrel', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];

  before(async () => {
    srv = await startServer({ plugins: [aliceOnly, acceptAllRecipients, memoryQueue(queued)] });
  });
  after(async () => {
    killRunning();
    await srv.close();
  });

  function peer(t: TestContext): boolean {
    return requirePeer(t, 'swaks', 'apt-get install swaks') !== null;
  }

  /** Runs swaks against one of the listeners; the transcript (not hidden) is in stdout. */
  function swaks(port: number, args: string[]): Promise<RunResult> {
    return run(
      'swaks',
      ['--server', '127.0.0.1', '--port', String(port), '--helo', 'client.test', '--timeout', '10', ...args],
      { timeoutMs: 20_000 },
    );
  }

  /** The one message queued since `before` whose body carries `token`. */
  function queuedWith(before: number, token: string): CapturedMessage {
    const mine = queued.slice(before).filter((m) => m.raw.includes(token));
    assert.equal(mine.length, 1, `exactly one queued message carries ${token}`);
    return mine[0]!;
  }

  it('delivers a plain message, envelope and body intact', async (t) => {
    if (!peer(t)) return;
    const token = randomUUID();
    const n = queued.length;
    const r = await swaks(srv.port, [
      '--from',
      'sender@example.test',
      '--to',
      'bob@example.test',
      '--header',
      `Subject: plain ${token}`,
      '--body',
      `Hello Bob ${token}`,
    ]);
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(queued.length, n + 1, 'one message queued');
    const m = queuedWith(n, token);
    assert.equal(m.sender, 'sender@example.test');
    assert.deepEqual(m.recipients, ['bob@example.test']);
    const raw = m.raw.toString('utf8');
    assert.match(raw, new RegExp(`^(?:.+\\r\\n)*Subject: plain ${token}\\r\\n`));
    assert.match(raw, new RegExp(`\\r\\n\\r\\nHello Bob ${token}\\r\\n`));
    assert.equal(receivedWith(m), 'ESMTP');
    assert.match(r.stdout, /<- {2}250 2\.0\.0 Ok: queued as /);
  });

  it('upgrades with STARTTLS and records ESMTPS', async (t) => {
    if (!peer(t)) return;
    const token = randomUUID();
    const n = queued.length;
    const r = await swaks(srv.port, [
      '--tls',
      '--from',
      'a@example.test',
      '--to',
      'b@example.test',
      '--body',
      token,
    ]);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /-> STARTTLS/);
    assert.match(r.stdout, /<- {2}220 2\.0\.0 /);
    const m = queuedWith(n, token);
    assert.equal(receivedWith(m), 'ESMTPS');
    assert.match(m.data.toString(), /\(using TLSv1\.[23] with cipher \S+\)/);
  });

  for (const mech of ['PLAIN', 'LOGIN']) {
    it(`authenticates with AUTH ${mech} after STARTTLS on submission and records ESMTPSA`, async (t) => {
      if (!peer(t)) return;
      const token = randomUUID();
      const n = queued.length;
      const r = await swaks(srv.submissionPort, [
        '--tls',
        '--auth',
        mech,
        '--auth-user',
        USER,
        '--auth-password',
        PASSWORD,
        '--from',
        'alice@example.test',
        '--to',
        'carol@example.test',
        '--body',
        token,
      ]);
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, new RegExp(`~> AUTH ${mech}`));
      assert.match(r.stdout, /<~ {2}235 2\.7\.0 /);
      const m = queuedWith(n, token);
      assert.equal(receivedWith(m), 'ESMTPSA');
      assert.equal(m.sender, 'alice@example.test');
    });
  }

  it('refuses a wrong password with 535 5.7.8 and queues nothing', async (t) => {
    if (!peer(t)) return;
    const n = queued.length;
    const r = await swaks(srv.submissionPort, [
      '--tls',
      '--auth',
      'PLAIN',
      '--auth-user',
      USER,
      '--auth-password',
      'not the password',
      '--from',
      'alice@example.test',
      '--to',
      'carol@example.test',
    ]);
    assert.equal(r.code, 28, `swaks reports an AUTH error\n${describeRun(r)}`);
    assert.match(r.stdout, /<~\* 535 5\.7\.8 /);
    assert.doesNotMatch(r.stdout, /MAIL FROM/);
    assert.equal(queued.length, n, 'nothing queued');
  });

  it('does not offer AUTH in plain text on submission, so swaks --auth without --tls fails', async (t) => {
    if (!peer(t)) return;
    const n = queued.length;
    const r = await swaks(srv.submissionPort, [
      '--auth',
      'PLAIN',
      '--auth-user',
      USER,
      '--auth-password',
      PASSWORD,
      '--from',
      'alice@example.test',
      '--to',
      'carol@example.test',
    ]);
    assert.equal(r.code, 28, `swaks cannot authenticate\n${describeRun(r)}`);
    const ehlo = r.stdout.split('\n').filter((l) => /^ *<- {2}250[ -]/.test(l));
    assert.ok(ehlo.length > 1, `an EHLO reply in the transcript\n${r.stdout}`);
    assert.ok(!ehlo.some((l) => /\bAUTH\b/.test(l)), `no AUTH before TLS: ${ehlo.join('\n')}`);
    assert.doesNotMatch(r.stdout, /-> AUTH/, 'no credentials sent in clear');
    assert.equal(queued.length, n);
  });

  it('refuses AUTH sent in plain text anyway with 538 5.7.11', async (t) => {
    const c = await SmtpClient.connect(srv.submissionPort);
    t.after(() => c.close());
    await c.expect(/^220 /);
    await c.ehlo();
    const plain = Buffer.from(`\0${USER}\0${PASSWORD}`).toString('base64');
    await c.cmd(`AUTH PLAIN ${plain}`, /^538 5\.7\.11 /);
    await c.cmd('MAIL FROM:<alice@example.test>', /^530 5\.7\.0 /);
    c.close();
  });

  it('answers MAIL without AUTH on submission with 530 5.7.0', async (t) => {
    if (!peer(t)) return;
    const n = queued.length;
    const r = await swaks(srv.submissionPort, [
      '--tls',
      '--from',
      'alice@example.test',
      '--to',
      'carol@example.test',
    ]);
    assert.equal(r.code, 23, `swaks reports a MAIL error\n${describeRun(r)}`);
    assert.match(r.stdout, /<~\* 530 5\.7\.0 /);
    assert.equal(queued.length, n);
  });

  it('pipelines MAIL, several RCPTs and DATA and queues one message for all recipients', async (t) => {
    if (!peer(t)) return;
    const token = randomUUID();
    const n = queued.length;
    const rcpts = ['one@example.test', 'two@example.test', 'three@example.test', 'four@example.test'];
    const r = await swaks(srv.port, [
      '--pipeline',
      '--from',
      'p@example.test',
      '--to',
      rcpts.join(','),
      '--body',
      token,
    ]);
    assert.equal(r.code, 0, describeRun(r));
    // Pipelined: every command of the batch went out before the first of their replies came back.
    const lines = r.stdout.split('\n');
    const mail = lines.findIndex((l) => /^ *-> MAIL FROM:/.test(l));
    const lastRcpt = lines.findLastIndex((l) => /^ *-> RCPT TO:/.test(l));
    const firstReply = lines.findIndex((l, i) => i > mail && /^ *<- /.test(l));
    assert.ok(
      mail >= 0 && lastRcpt > mail && firstReply > lastRcpt,
      `commands sent as one batch\n${r.stdout}`,
    );
    assert.equal(lines.filter((l) => /^ *<- {2}250 2\.1\.5 /.test(l)).length, rcpts.length);
    const m = queuedWith(n, token);
    assert.deepEqual(m.recipients, rcpts);
    assert.doesNotMatch(m.data.toString(), /\r\n\tfor </, 'no single "for" clause with several recipients');
  });

  it('speaks implicit TLS on the submissions listener', async (t) => {
    if (!peer(t)) return;
    const token = randomUUID();
    const n = queued.length;
    const r = await swaks(srv.submissionsPort, [
      '--tls-on-connect',
      '--auth',
      'PLAIN',
      '--auth-user',
      USER,
      '--auth-password',
      PASSWORD,
      '--from',
      'alice@example.test',
      '--to',
      'dave@example.test',
      '--body',
      token,
    ]);
    assert.equal(r.code, 0, describeRun(r));
    assert.doesNotMatch(r.stdout, /STARTTLS/);
    assert.match(r.stdout, /<~ {2}220 mx\.test ESMTP Petrel/);
    const m = queuedWith(n, token);
    assert.equal(receivedWith(m), 'ESMTPSA');
    assert.deepEqual(m.recipients, ['dave@example.test']);
  });
});
