import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { address, runHook, session, transaction } from '../../core/testing/index.js';
import {
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { Directory, type DirectoryService } from '../users/directory.js';
import { hashPassword } from '../users/password.js';
import { writeUsersFile } from '../users/users-file.js';
import submission from './index.js';

const PASSWORD = 'submission test password';
const AUTH_BOB = `AUTH PLAIN ${Buffer.from(`\0bob@hamburger.edu\0${PASSWORD}`).toString('base64')}`;
const RFC5322_DATE =
  /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$/;

async function usersDir(): Promise<{ dir: string; usersFile: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-submission-'));
  const usersFile = join(dir, 'users.json');
  const password = await hashPassword(PASSWORD, { iterations: 4096 });
  await writeUsersFile(usersFile, {
    users: {
      'bob@hamburger.edu': { password, addresses: ['robert@hamburger.edu'] },
      'alice@hamburger.edu': { password },
    },
  });
  return { dir, usersFile };
}

async function server(
  usersFile: string,
  queued: CapturedMessage[],
  submissionConfig: object = {},
): Promise<TestServer> {
  return startServer({
    plugins: [memoryQueue(queued)],
    entries: [
      { name: 'relay', config: { trustedNetworks: [] } },
      { name: 'users', config: { usersFile, auth: { delayMs: 0 } } },
      { name: 'submission', config: submissionConfig },
      'test-memory-queue',
    ],
    config: { localDomains: ['hamburger.edu'] },
  });
}

/** Implicit TLS on the submissions listener, EHLO done, authenticated as bob unless told not to. */
async function submit(srv: TestServer, auth = true): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
  await c.expect(/^220 /);
  await c.ehlo();
  if (auth) await c.cmd(AUTH_BOB, /^235 /);
  return c;
}

/** Header field values of a stored message, by lower-case name. */
function headerValues(m: CapturedMessage, name: string): string[] {
  const head = m.data.toString('utf8').split('\r\n\r\n')[0]!;
  return head
    .replace(/\r\n[ \t]+/g, ' ')
    .split('\r\n')
    .filter((l) => l.toLowerCase().startsWith(`${name.toLowerCase()}:`))
    .map((l) => l.slice(name.length + 1).trim());
}

describe('submission: over real sessions', () => {
  let srv: TestServer;
  let dir: string;
  const queued: CapturedMessage[] = [];
  before(async () => {
    const d = await usersDir();
    dir = d.dir;
    srv = await server(d.usersFile, queued);
  });
  after(async () => {
    await srv.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses MAIL before AUTH on both submission listeners with 530 5.7.0', async () => {
    const c = await submit(srv, false);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^530 5\.7\.0 /);
    c.close();
    const d = await SmtpClient.connect(srv.submissionPort);
    await d.expect(/^220 /);
    await d.ehlo();
    await d.cmd('MAIL FROM:<bob@hamburger.edu>', /^530 5\.7\.0 /);
    d.close();
  });

  it("accepts the user's own addresses as sender, in any case and with a sub-address", async () => {
    const c = await submit(srv);
    for (const from of [
      'bob@hamburger.edu',
      'robert@hamburger.edu',
      'BOB@Hamburger.EDU',
      'bob+lists@hamburger.edu',
    ]) {
      await c.cmd(`MAIL FROM:<${from}>`, /^250 2\.1\.0 /);
      await c.cmd('RSET', /^250 /);
    }
    c.close();
  });

  it("refuses another user's address, a stranger's and the null sender with 553 5.7.1", async () => {
    const c = await submit(srv);
    for (const from of [
      'alice@hamburger.edu',
      'ceo@remote.test',
      'bob@remote.test',
      'bob%x@hamburger.edu',
      '',
    ]) {
      await c.cmd(`MAIL FROM:<${from}>`, /^553 5\.7\.1 Sender address not owned by user/);
    }
    c.close();
    assert.ok(srv.logs.some((l) => l.msg === 'sender address not owned by the authenticated user'));
  });

  it('checks the sender after AUTH on the smtp listener too, and leaves unauthenticated MX mail alone', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<ceo@remote.test>', /^250 /);
    await c.cmd('RSET', /^250 /);
    await c.cmd('STARTTLS', /^220 /);
    await c.upgrade();
    await c.ehlo();
    await c.cmd(AUTH_BOB, /^235 /);
    await c.cmd('MAIL FROM:<ceo@remote.test>', /^553 5\.7\.1 /);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^250 /);
    c.close();
  });

  it('adds Message-ID and Date (RFC 5322 format) to submitted mail that lacks them', async () => {
    const c = await submit(srv);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^250 /);
    await c.cmd('RCPT TO:<alice@hamburger.edu>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: no id, no date\r\nFrom: bob@hamburger.edu\r\n\r\nHello Alice\r\n.\r\n');
    await c.expect(/^250 2\.0\.0 /);
    const m = queued.at(-1)!;
    const ids = headerValues(m, 'Message-ID');
    assert.equal(ids.length, 1);
    assert.match(ids[0]!, /^<[^<>@\s]+@mx\.test>$/);
    const dates = headerValues(m, 'Date');
    assert.equal(dates.length, 1);
    assert.match(dates[0]!, RFC5322_DATE);
    assert.ok(Math.abs(Date.parse(dates[0]!) - Date.now()) < 60_000, 'the date is now');
    assert.ok(m.data.toString('utf8').endsWith('\r\n\r\nHello Alice\r\n'), 'the body is untouched');
    c.close();
  });

  it('leaves Message-ID and Date alone when the message has them', async () => {
    const c = await submit(srv);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^250 /);
    await c.cmd('RCPT TO:<alice@hamburger.edu>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(
      'Message-ID: <original.1@client.test>\r\ndate: Tue, 1 Jul 2025 10:00:00 +0200\r\nSubject: complete\r\n\r\nHi\r\n.\r\n',
    );
    await c.expect(/^250 2\.0\.0 /);
    const m = queued.at(-1)!;
    assert.deepEqual(headerValues(m, 'Message-ID'), ['<original.1@client.test>']);
    assert.deepEqual(headerValues(m, 'Date'), ['Tue, 1 Jul 2025 10:00:00 +0200']);
    c.close();
  });

  it('adds nothing to mail received on the MX listener', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<someone@remote.test>', /^250 /);
    await c.cmd('RCPT TO:<alice@hamburger.edu>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: from outside\r\n\r\nHi\r\n.\r\n');
    await c.expect(/^250 2\.0\.0 /);
    const m = queued.at(-1)!;
    assert.deepEqual(headerValues(m, 'Message-ID'), []);
    assert.deepEqual(headerValues(m, 'Date'), []);
    c.close();
  });
});

describe('submission: configuration', () => {
  let srv: TestServer;
  let dir: string;
  before(async () => {
    const d = await usersDir();
    dir = d.dir;
    srv = await server(d.usersFile, [], { allowNullSender: true });
  });
  after(async () => {
    await srv.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("with allowNullSender: true, takes the null sender but still no one else's address", async () => {
    const c = await submit(srv);
    await c.cmd('MAIL FROM:<>', /^250 /);
    await c.cmd('RSET', /^250 /);
    await c.cmd('MAIL FROM:<alice@hamburger.edu>', /^553 5\.7\.1 /);
    c.close();
  });

  it('fails closed (an error, so 451) without the users plugin; enforceSender: false turns the check off', async () => {
    const ctx = {
      session: session({ listener: { kind: 'submission', name: 'sub' }, user: 'bob@hamburger.edu' }),
      transaction: transaction(),
      sender: address('bob@hamburger.edu'),
      params: { smtputf8: false },
    };
    await assert.rejects(runHook(submission, 'mail', ctx), /needs the users plugin/);
    const owner: Pick<DirectoryService, 'maySendAs'> = {
      maySendAs: async (login, sender) =>
        login === 'bob@hamburger.edu' && typeof sender !== 'string' && sender.address === 'bob@hamburger.edu',
    };
    const services = new Map([[Directory, owner as DirectoryService]]);
    assert.equal((await runHook(submission, 'mail', ctx, { services })).kind, 'proceed');
    const other = { ...ctx, sender: address('mallory@hamburger.edu') };
    assert.equal((await runHook(submission, 'mail', other, { services })).kind, 'deny');
    const relaxed = { services, config: { enforceSender: false } };
    assert.equal((await runHook(submission, 'mail', other, relaxed)).kind, 'proceed');
  });
});
