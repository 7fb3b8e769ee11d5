import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { resolveToken, Tokens } from '../../core/di/tokens.js';
import { redisMissing, startRedis, type RedisPeer } from '../../test/harness/redis.js';
import { hashPassword } from './password.js';
import { writeUsersFile } from './users-file.js';

const PASSWORD = 'correct horse battery';
const plain = (user: string, pass: string, authzid = ''): string =>
  Buffer.from(`${authzid}\0${user}\0${pass}`, 'utf8').toString('base64');
const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

/** A folder with a users file (bob, alice) and an aliases file. */
async function directory(): Promise<{ dir: string; usersFile: string; aliasesFile: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-users-'));
  const usersFile = join(dir, 'users.json');
  const aliasesFile = join(dir, 'aliases.yaml');
  const password = await hashPassword(PASSWORD, { iterations: 4096 });
  await writeUsersFile(usersFile, {
    users: {
      'bob@hamburger.edu': { password, addresses: ['robert@hamburger.edu'] },
      'alice@hamburger.edu': { password },
    },
  });
  writeFileSync(
    aliasesFile,
    [
      'postmaster@hamburger.edu: bob@hamburger.edu',
      'team@hamburger.edu: [bob@hamburger.edu, alice@hamburger.edu]',
      "'@fries.test': alice@hamburger.edu",
    ].join('\n'),
  );
  return { dir, usersFile, aliasesFile };
}

/** Connected over implicit TLS to the submissions listener, after EHLO. */
async function submissions(srv: TestServer): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
  await c.expect(/^220 /);
  await c.ehlo();
  return c;
}

/** Connected to the submission listener from a given local address, after STARTTLS and EHLO. */
async function starttls(srv: TestServer, localAddress = '127.0.0.1'): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.submissionPort, '127.0.0.1', { localAddress });
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd('STARTTLS', /^220 /);
  await c.upgrade();
  await c.ehlo();
  return c;
}

describe('users: AUTH over a real session', () => {
  let srv: TestServer;
  let files: Awaited<ReturnType<typeof directory>>;
  const queued: CapturedMessage[] = [];
  before(async () => {
    files = await directory();
    srv = await startServer({
      plugins: [memoryQueue(queued)],
      entries: [
        {
          name: 'users',
          config: {
            usersFile: files.usersFile,
            aliasesFile: files.aliasesFile,
            auth: { maxFailures: 50, delayMs: 300 },
          },
        },
        'test-memory-queue',
      ],
      config: { localDomains: ['hamburger.edu', 'fries.test'] },
    });
  });
  after(async () => {
    await srv.close();
    rmSync(files.dir, { recursive: true, force: true });
  });

  it('AUTH PLAIN with the right password: 235 2.7.0, then the session may send', async () => {
    const c = await submissions(srv);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^235 2\.7\.0 /);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^250 /);
    await c.cmd('RCPT TO:<alice@hamburger.edu>', /^250 /);
    c.close();
  });

  it('AUTH LOGIN after STARTTLS, with the login in another case', async () => {
    const c = await starttls(srv);
    await c.cmd('AUTH LOGIN', /^334 VXNlcm5hbWU6/);
    await c.cmd(b64('Bob@Hamburger.EDU'), /^334 UGFzc3dvcmQ6/);
    await c.cmd(b64(PASSWORD), /^235 2\.7\.0 /);
    c.close();
  });

  it('a wrong password, an unknown login and a foreign authzid each get 535 5.7.8, after the delay', async () => {
    const c = await submissions(srv);
    for (const [user, pass, authzid] of [
      ['bob@hamburger.edu', 'wrong', ''],
      ['nobody@hamburger.edu', PASSWORD, ''],
    ] as const) {
      const started = Date.now();
      await c.cmd(`AUTH PLAIN ${plain(user, pass, authzid)}`, /^535 5\.7\.8 /);
      assert.ok(Date.now() - started >= 250, 'a failure is slowed down');
    }
    c.close();
    const d = await submissions(srv);
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD, 'alice@hamburger.edu')}`, /^535 5\.7\.8 /);
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD, 'bob@hamburger.edu')}`, /^235 2\.7\.0 /);
    d.close();
  });

  it('never writes a password to the log', async () => {
    const c = await submissions(srv);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'a-wrong-one')}`, /^535 /);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^235 /);
    await c.cmd('QUIT', /^221 /);
    await c.closed();
    const log = JSON.stringify(srv.logs);
    assert.ok(log.includes('AUTH failed') && log.includes('AUTH succeeded'), 'the attempts are logged');
    assert.ok(!log.includes('a-wrong-one') && !log.includes(PASSWORD), 'but no password');
  });

  it('RCPT at a local domain: mailboxes, sub-addresses, aliases and catch-alls; 550 5.1.1 for the rest', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<someone@remote.test>', /^250 /);
    await c.cmd('RCPT TO:<bob@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<robert@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<bob+receipts@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<team@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<Postmaster>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<whoever@fries.test>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<carol@hamburger.edu>', /^550 5\.1\.1 No such user here/);
    await c.cmd('RCPT TO:<carol+x@hamburger.edu>', /^550 5\.1\.1 /);
    // Not a local domain, and nobody else here accepts it.
    await c.cmd('RCPT TO:<bob@remote.test>', /^550 5\.7\.1 /);
    c.close();
  });
});

describe('users: AUTH lockout', () => {
  let srv: TestServer;
  let files: Awaited<ReturnType<typeof directory>>;
  before(async () => {
    files = await directory();
    srv = await startServer({
      entries: [
        {
          name: 'users',
          config: {
            usersFile: files.usersFile,
            auth: { maxFailures: 3, windowSeconds: 60, lockoutSeconds: 60, delayMs: 0 },
          },
        },
      ],
      config: { localDomains: ['hamburger.edu'] },
    });
  });
  after(async () => {
    await srv.close();
    rmSync(files.dir, { recursive: true, force: true });
  });

  it('locks a client address out after maxFailures, on new connections too, whatever the password', async () => {
    const c = await submissions(srv);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess1')}`, /^535 5\.7\.8 /);
    c.close();
    const d = await submissions(srv);
    await d.cmd(`AUTH PLAIN ${plain('alice@hamburger.edu', 'guess2')}`, /^535 5\.7\.8 /);
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess3')}`, /^535 5\.7\.8 /);
    d.close();

    const e = await submissions(srv);
    await e.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 Too many failed/);
    e.close();
    const f = await starttls(srv);
    await f.cmd('AUTH LOGIN', /^334 /);
    await f.cmd(b64('bob@hamburger.edu'), /^334 /);
    await f.cmd(b64(PASSWORD), /^454 4\.7\.0 /);
    f.close();
    assert.ok(srv.logs.some((l) => l.msg === 'client locked out after too many AUTH failures'));
  });

  it('does not lock out another client address', async () => {
    const locked = await starttls(srv, '127.0.0.1');
    await locked.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 /);
    locked.close();
    const other = await starttls(srv, '127.0.0.2');
    await other.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^235 2\.7\.0 /);
    other.close();
  });
});

describe('users: one AUTH lockout for every worker, kept across reloads', () => {
  // Two servers on one spool stand for two workers of one server: each runs its own copy of the
  // plugin, and opens the State store (`<spool.dir>/state.sqlite`) on its own.
  let a: TestServer;
  let b: TestServer;
  let spool: string;
  let files: Awaited<ReturnType<typeof directory>>;
  before(async () => {
    files = await directory();
    spool = mkdtempSync(join(tmpdir(), 'petrel-shared-spool-'));
    const opts = {
      entries: [
        {
          name: 'users',
          config: {
            usersFile: files.usersFile,
            auth: { maxFailures: 2, windowSeconds: 60, lockoutSeconds: 60, delayMs: 0 },
          },
        },
      ],
      config: { localDomains: ['hamburger.edu'], spool: { dir: spool } },
    };
    a = await startServer(opts);
    b = await startServer(opts);
  });
  after(async () => {
    await a.close();
    await b.close();
    rmSync(spool, { recursive: true, force: true });
    rmSync(files.dir, { recursive: true, force: true });
  });

  it('counts failures on both workers together, and both refuse the client once it is locked out', async () => {
    const c = await submissions(a);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess1')}`, /^535 5\.7\.8 /);
    c.close();
    const d = await submissions(b);
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess2')}`, /^535 5\.7\.8 /);
    d.close();
    assert.ok(
      b.logs.some((l) => l.msg === 'client locked out after too many AUTH failures'),
      'the second failure, on the other worker, reached the limit',
    );

    for (const srv of [a, b]) {
      const e = await submissions(srv);
      await e.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 Too many failed/);
      e.close();
    }
    const other = await starttls(a, '127.0.0.2');
    await other.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^235 2\.7\.0 /);
    other.close();
  });

  it('keeps the lockout when the config is reloaded', async () => {
    const c = await starttls(a, '127.0.0.4');
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess1')}`, /^535 5\.7\.8 /);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess2')}`, /^535 5\.7\.8 /);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 /);
    c.close();
    await a.app.reload(a.config);
    assert.ok(a.logs.some((l) => l.msg === 'config reloaded'));
    const d = await starttls(a, '127.0.0.4');
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 /);
    d.close();
  });

  it('fails closed when the State store fails: 451 4.3.0, the password is not checked', async () => {
    await resolveToken(b.app.generation.container, Tokens.State).close();
    const c = await starttls(b, '127.0.0.3');
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^451 4\.3\.0 /);
    c.close();
    assert.ok(
      b.logs.some(
        (l) => l.plugin === 'users' && l.hook === 'auth' && /store is closed/.test(JSON.stringify(l)),
      ),
      'the log names the plugin, the hook and the cause',
    );
  });
});

describe('users: one AUTH lockout for servers sharing a Redis', { skip: redisMissing }, () => {
  // Two servers with their own spools, as on two machines: the lockout is shared through Redis.
  let redis: RedisPeer;
  let a: TestServer;
  let b: TestServer;
  let files: Awaited<ReturnType<typeof directory>>;
  before(async () => {
    files = await directory();
    redis = await startRedis();
    const opts = {
      entries: [
        {
          name: 'users',
          config: {
            usersFile: files.usersFile,
            auth: { maxFailures: 2, windowSeconds: 60, lockoutSeconds: 60, delayMs: 0 },
          },
        },
      ],
      config: {
        localDomains: ['hamburger.edu'],
        state: { backend: 'redis' as const, redis: { url: redis.url, timeout: 500 } },
      },
    };
    a = await startServer(opts);
    b = await startServer(opts);
  });
  after(async () => {
    await a.close();
    await b.close();
    await redis.stop();
    rmSync(files.dir, { recursive: true, force: true });
  });

  it('counts failures on both servers together, and both refuse the client once it is locked out', async () => {
    const c = await submissions(a);
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess1')}`, /^535 5\.7\.8 /);
    c.close();
    const d = await submissions(b);
    await d.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', 'guess2')}`, /^535 5\.7\.8 /);
    d.close();
    assert.ok(b.logs.some((l) => l.msg === 'client locked out after too many AUTH failures'));
    for (const srv of [a, b]) {
      const e = await submissions(srv);
      await e.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^454 4\.7\.0 Too many failed/);
      e.close();
    }
    const other = await starttls(a, '127.0.0.2');
    await other.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^235 2\.7\.0 /);
    other.close();
  });

  it('fails closed while Redis is down (451 4.3.0, other commands still served), and recovers', async () => {
    await redis.stop();
    const c = await starttls(a, '127.0.0.3');
    await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^451 4\.3\.0 /);
    await c.cmd('NOOP', /^250 /);
    await c.cmd('RSET', /^250 /);
    c.close();
    const m = await SmtpClient.connect(a.port, '127.0.0.1');
    await m.expect(/^220 /);
    await m.ehlo();
    await m.cmd('MAIL FROM:<someone@fries.test>', /^250 /);
    m.close();
    assert.ok(
      a.logs.some((l) => l.plugin === 'users' && l.hook === 'auth' && /Redis server/.test(JSON.stringify(l))),
      'the log names the plugin, the hook and the cause',
    );
    assert.ok(
      a.logs.some(
        (l) => l.msg === 'state: the Redis server is unreachable; operations fail until it is back',
      ),
    );

    await redis.start();
    // The client reconnects on its own, backing off: retry on new connections until it has.
    for (let i = 0; ; i++) {
      const d = await starttls(a, '127.0.0.3');
      const r = await d.cmd(
        `AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`,
        /^(235 2\.7\.0|451 4\.3\.0) /,
      );
      d.close();
      if (r.code === 235) break;
      assert.ok(i < 50, 'AUTH works again once Redis is back');
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(a.logs.some((l) => l.msg === 'state: the Redis server is reachable again'));
  });

  it('starts while Redis is unreachable, and fails AUTH closed', async () => {
    const down = await startServer({
      entries: [{ name: 'users', config: { usersFile: files.usersFile, auth: { delayMs: 0 } } }],
      config: {
        localDomains: ['hamburger.edu'],
        // Port 1: nothing listens there.
        state: { backend: 'redis' as const, redis: { url: 'redis://127.0.0.1:1', timeout: 300 } },
      },
    });
    try {
      const c = await starttls(down);
      await c.cmd(`AUTH PLAIN ${plain('bob@hamburger.edu', PASSWORD)}`, /^451 4\.3\.0 /);
      await c.cmd('NOOP', /^250 /);
      c.close();
      assert.ok(
        down.logs.some(
          (l) => l.plugin === 'users' && /the Redis server is unreachable/.test(JSON.stringify(l)),
        ),
      );
    } finally {
      await down.close();
    }
  });
});
