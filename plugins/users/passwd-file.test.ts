import { after, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { stringify } from 'yaml';
import { Petrel } from '../../core/app.js';
import { CLI, NODE } from '../../test/e2e/cli.js';
import { describeRun, run } from '../../test/e2e/run.js';
import { requirePeer } from '../../test/harness/peers.js';
import { TLS } from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { hashPassword, hashScrypt } from './password.js';
import { renderPasswdFile } from './passwd-file.js';
import { parseUsersFile } from './users-file.js';

const DOVEADM = '/usr/bin/doveadm';

/** Dovecot's own check of a password against a stored hash (`doveadm pw -t`). */
async function doveadmVerifies(hash: string, password: string): Promise<boolean> {
  const r = await run(DOVEADM, ['pw', '-t', hash, '-p', password], { timeoutMs: 20_000 });
  return r.code === 0 && /\(verified\)/.test(r.stdout + r.stderr);
}

/** The hash on the passwd-file line of `login`, or null when it has none. */
function passwdHash(file: string, login: string): string | null {
  const line = readFileSync(file, 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${login}:`));
  return line ? line.split(':')[1]! : null;
}

const plain = (user: string, pass: string): string =>
  `AUTH PLAIN ${Buffer.from(`\0${user}\0${pass}`, 'utf8').toString('base64')}`;

async function authCode(port: number, user: string, pass: string): Promise<number> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('STARTTLS', /^220 /);
    await c.upgrade();
    await c.ehlo();
    c.send(plain(user, pass));
    return (await c.reply()).code;
  } finally {
    c.close();
  }
}

describe('users: the passwd-file for Dovecot', () => {
  it('has one line per login with the SCRAM hash, the primary address beside a login that is not one, and leaves scrypt users out', async () => {
    const scram = await hashPassword('x', { iterations: 4096 });
    const old = await hashScrypt('y', { N: 1024, r: 8, p: 1 });
    const { users } = parseUsersFile(
      JSON.stringify({
        users: {
          'Bob@Hamburger.edu': { password: scram, addresses: ['robert@hamburger.edu'] },
          alice: { password: scram, address: 'alice@hamburger.edu' },
          'carol@hamburger.edu': { password: old },
        },
      }),
      'users.json',
    );
    const { text, skipped } = renderPasswdFile(users, '/etc/petrel/users.json');
    assert.equal(
      text,
      [
        '# Written by Petrel from /etc/petrel/users.json; change it with `petrel user`.',
        `alice:${scram}::::::user=alice@hamburger.edu`,
        `alice@hamburger.edu:${scram}::::::`,
        `bob@hamburger.edu:${scram}::::::`,
        '',
      ].join('\n'),
    );
    assert.deepEqual(skipped, ['carol@hamburger.edu']);
  });

  describe('written by petrel user and by the server', () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-passwd-'));
    let app: Petrel | null = null;
    after(async () => {
      await app?.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    });
    const config = join(dir, 'petrel.yaml');
    const usersFile = join(dir, 'users.json');
    const passwd = join(dir, 'users.passwd');
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.test',
        localDomains: ['hamburger.edu'],
        listeners: [{ kind: 'submission', address: '127.0.0.1', port: 0 }],
        tls: TLS,
        spool: { dir: './spool' },
        plugins: [
          {
            name: 'users',
            config: {
              usersFile: './users.json',
              passwdFile: './users.passwd',
              passwdFileGroup: 'dovecot',
              auth: { delayMs: 0 },
            },
          },
          'submission',
        ],
      }),
    );

    it('petrel user add and passwd write a passwd-file Dovecot reads, mode 0640 for its group', async (t: TestContext) => {
      if (!requirePeer(t, DOVEADM, 'apt-get install dovecot-core')) return;
      let r = await run(NODE, [CLI, 'user', 'add', 'bob@hamburger.edu', '-c', config], {
        input: 'first secret\n',
        timeoutMs: 20_000,
      });
      assert.equal(r.code, 0, describeRun(r));
      const st = statSync(passwd);
      assert.equal(st.mode & 0o777, 0o640);
      assert.equal(st.gid, Number(/^dovecot:[^:]*:(\d+):/m.exec(readFileSync('/etc/group', 'utf8'))![1]));
      const first = passwdHash(passwd, 'bob@hamburger.edu');
      assert.ok(first, readFileSync(passwd, 'utf8'));
      assert.equal(await doveadmVerifies(first, 'first secret'), true);
      assert.equal(await doveadmVerifies(first, 'first secreT'), false);

      r = await run(NODE, [CLI, 'user', 'passwd', 'bob@hamburger.edu', '-c', config], {
        input: 'second secret\n',
        timeoutMs: 20_000,
      });
      assert.equal(r.code, 0, describeRun(r));
      const second = passwdHash(passwd, 'bob@hamburger.edu')!;
      assert.equal(await doveadmVerifies(second, 'second secret'), true);
      assert.equal(await doveadmVerifies(second, 'first secret'), false);
    });

    it('an scrypt user logs in over SMTP, and from then on has a SCRAM hash that Dovecot checks too', async (t: TestContext) => {
      if (!requirePeer(t, DOVEADM, 'apt-get install dovecot-core')) return;
      const data = JSON.parse(readFileSync(usersFile, 'utf8')) as {
        users: Record<string, { password: string }>;
      };
      data.users['carol@hamburger.edu'] = { password: await hashScrypt('carol pw', { N: 1024, r: 8, p: 1 }) };
      writeFileSync(usersFile, JSON.stringify(data));
      app = await Petrel.start({ configFile: config, logger: pino({ level: 'silent' }) });
      // The start brought the passwd-file in line with the hand-edited users file: carol cannot
      // be in it yet, bob still is.
      assert.equal(passwdHash(passwd, 'carol@hamburger.edu'), null);
      assert.ok(passwdHash(passwd, 'bob@hamburger.edu'));
      const port = app.port('submission');

      assert.equal(await authCode(port, 'carol@hamburger.edu', 'wrong'), 535);
      assert.match(readFileSync(usersFile, 'utf8'), /"\$scrypt\$/, 'a failed login upgrades nothing');
      assert.equal(await authCode(port, 'carol@hamburger.edu', 'carol pw'), 235);
      const stored = (JSON.parse(readFileSync(usersFile, 'utf8')) as typeof data).users[
        'carol@hamburger.edu'
      ]!;
      assert.match(stored.password, /^\{SCRAM-SHA-256\}/);
      const line = passwdHash(passwd, 'carol@hamburger.edu');
      assert.equal(line, stored.password);
      assert.equal(await doveadmVerifies(line!, 'carol pw'), true);
      // The upgraded hash works for SMTP AUTH as well, and the wrong password still fails.
      assert.equal(await authCode(port, 'carol@hamburger.edu', 'carol pw'), 235);
      assert.equal(await authCode(port, 'carol@hamburger.edu', 'carol pX'), 535);

      // A hand edit while the server runs: the next lookup reads the users file again and the
      // passwd-file follows, so Dovecot knows dave without anyone running petrel user.
      const now = JSON.parse(readFileSync(usersFile, 'utf8')) as typeof data;
      now.users['dave@hamburger.edu'] = { password: await hashPassword('dave pw', { iterations: 4096 }) };
      writeFileSync(usersFile, JSON.stringify(now));
      assert.equal(await authCode(port, 'dave@hamburger.edu', 'dave pw'), 235);
      const deadline = Date.now() + 10_000;
      while (passwdHash(passwd, 'dave@hamburger.edu') === null && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
      assert.equal(await doveadmVerifies(passwdHash(passwd, 'dave@hamburger.edu')!, 'dave pw'), true);
    });
  });
});
