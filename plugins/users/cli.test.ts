import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import pino from 'pino';
import { stringify } from 'yaml';
import { Petrel } from '../../core/app.js';
import { commandApi, runCommand } from '../../core/testing/index.js';
import { CLI, NODE } from '../../test/e2e/cli.js';
import { describeRun, killRunning, run, type RunResult } from '../../test/e2e/run.js';
import { requirePeer } from '../../test/harness/peers.js';
import { ROOT, TLS } from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { locateUsersFile } from './cli.js';
import usersPlugin from './index.js';
import type { UsersConfig } from './config.js';

const plain = (user: string, pass: string): string =>
  `AUTH PLAIN ${Buffer.from(`\0${user}\0${pass}`, 'utf8').toString('base64')}`;

/** A project folder with a config enabling relay, users and submission. */
function project(): { dir: string; config: string; usersFile: string } {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-cli-user-'));
  mkdirSync(join(dir, 'etc'));
  const config = join(dir, 'etc', 'petrel.config.yaml');
  writeFileSync(
    config,
    stringify({
      hostname: 'mx.test',
      localDomains: ['hamburger.edu'],
      listeners: [
        { kind: 'smtp', address: '127.0.0.1', port: 0 },
        { kind: 'submission', address: '127.0.0.1', port: 0 },
      ],
      tls: TLS,
      spool: { dir: '../spool' },
      plugins: [
        { name: 'relay', config: { trustedNetworks: [] } },
        { name: 'users', config: { usersFile: './mail/users.json', auth: { delayMs: 0 } } },
        'submission',
      ],
    }),
  );
  mkdirSync(join(dir, 'etc', 'mail'));
  return { dir, config, usersFile: join(dir, 'etc', 'mail', 'users.json') };
}

function petrelUser(args: string[], input: string, cwd: string): Promise<RunResult> {
  return run(NODE, [CLI, 'user', ...args], { cwd, input, timeoutMs: 20_000 });
}

/** STARTTLS on the submission listener, then AUTH PLAIN; resolves to the AUTH reply code. */
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

describe('petrel user, with a running server', () => {
  let p: ReturnType<typeof project>;
  let app: Petrel | null = null;
  before(() => {
    p = project();
  });
  after(async () => {
    killRunning();
    await app?.stop(1000);
    rmSync(p.dir, { recursive: true, force: true });
  });

  it('add: reads the password from stdin and writes a 0600 users file holding only a SCRAM-SHA-256 hash', async () => {
    const r = await petrelUser(['add', 'bob@hamburger.edu', '--config', p.config], 'first secret\n', p.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /added bob@hamburger\.edu to .*etc\/mail\/users\.json/);
    assert.equal(statSync(p.usersFile).mode & 0o777, 0o600);
    const text = readFileSync(p.usersFile, 'utf8');
    assert.ok(!text.includes('first secret'), 'no plain-text password');
    const users = (JSON.parse(text) as { users: Record<string, { password: string }> }).users;
    assert.match(users['bob@hamburger.edu']!.password, /^\{SCRAM-SHA-256\}100000,/);
  });

  it('AUTH over STARTTLS works with that password against a server started from the config', async () => {
    app = await Petrel.start({ configFile: p.config, logger: pino({ level: 'silent' }) });
    const port = app.port('submission');
    assert.equal(await authCode(port, 'bob@hamburger.edu', 'first secret'), 235);
    assert.equal(await authCode(port, 'bob@hamburger.edu', 'first secreT'), 535);
  });

  it('swaks authenticates with it too', async (t: TestContext) => {
    if (!requirePeer(t, 'swaks', 'apt-get install swaks')) return;
    const r = await run(
      'swaks',
      [
        '--server',
        '127.0.0.1',
        '--port',
        String(app!.port('submission')),
        '--tls',
        '--auth',
        'PLAIN',
        '--auth-user',
        'bob@hamburger.edu',
        '--auth-password',
        'first secret',
        '--from',
        'bob@hamburger.edu',
        '--to',
        'bob@hamburger.edu',
        '--quit-after',
        'AUTH',
        '--timeout',
        '10',
      ],
      { timeoutMs: 20_000 },
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /<~\s+235 2\.7\.0 /);
  });

  it('add, passwd and remove take effect on the running server without a restart', async () => {
    const port = app!.port('submission');
    let r = await petrelUser(
      ['add', 'alice@hamburger.edu', '-c', p.config, '--address', 'al@hamburger.edu'],
      'alice pw\n',
      p.dir,
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(await authCode(port, 'alice@hamburger.edu', 'alice pw'), 235);

    r = await petrelUser(
      ['passwd', 'BOB@hamburger.edu', '--config', p.config],
      'second secret\r\nignored\n',
      p.dir,
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(await authCode(port, 'bob@hamburger.edu', 'second secret'), 235);
    assert.equal(await authCode(port, 'bob@hamburger.edu', 'first secret'), 535);

    r = await petrelUser(['list', '--config', p.config], '', p.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(
      r.stdout,
      'alice@hamburger.edu\talice@hamburger.edu al@hamburger.edu\nbob@hamburger.edu\tbob@hamburger.edu\n',
    );

    r = await petrelUser(['remove', 'alice@hamburger.edu', '--config', p.config], '', p.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(await authCode(port, 'alice@hamburger.edu', 'alice pw'), 535);
    const c = await SmtpClient.connect(app!.port('smtp'));
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<someone@remote.test>', /^250 /);
    await c.cmd('RCPT TO:<al@hamburger.edu>', /^550 5\.1\.1 /);
    await c.cmd('RCPT TO:<bob@hamburger.edu>', /^250 /);
    c.close();
  });

  it('finds the config in the working directory when no --config is given', async () => {
    const cwd = join(p.dir, 'etc');
    const r = await petrelUser(['list'], '', cwd);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^bob@hamburger\.edu\t/m);
  });

  it('refuses, leaving the file as it was: a user twice, an unknown user, an empty password, bad usage', async () => {
    const before = readFileSync(p.usersFile, 'utf8');
    const cases: [string[], string, number, RegExp][] = [
      [['add', 'Bob@Hamburger.edu'], 'x\n', 1, /already exists/],
      [['passwd', 'carol@hamburger.edu'], 'x\n', 1, /no user carol@hamburger\.edu/],
      [['remove', 'carol@hamburger.edu'], '', 1, /no user carol@hamburger\.edu/],
      [['add', 'carol@hamburger.edu'], '\n', 1, /empty password/],
      [['add', 'carol@hamburger.edu'], '', 1, /empty password/],
      [['add', 'carol@hamburger.edu', '--address', 'bob@hamburger.edu'], 'x\n', 1, /already belongs to/],
      [['add', 'user%remote.test@hamburger.edu'], 'x\n', 64, /must be an address/],
      [['add', 'not-an-address'], 'x\n', 64, /must be an address/],
      [['add'], '', 64, /add needs an address/],
      [['frobnicate'], '', 64, /unknown command "frobnicate"/],
      [['list', '--bogus'], '', 64, /Unknown option/],
    ];
    for (const [args, input, code, stderr] of cases) {
      const r = await petrelUser([...args, '--config', p.config], input, p.dir);
      assert.equal(r.code, code, `${args.join(' ')}\n${describeRun(r)}`);
      assert.match(r.stderr, stderr, args.join(' '));
    }
    assert.equal(readFileSync(p.usersFile, 'utf8'), before);
  });

  it('warns when the address is not in localDomains or the config does not enable users', async () => {
    const bare = join(p.dir, 'bare.yaml');
    writeFileSync(
      bare,
      stringify({ listeners: [{ kind: 'smtp', port: 0 }], localDomains: ['hamburger.edu'] }),
    );
    const r = await petrelUser(['add', 'dave@elsewhere.test', '--config', bare], 'pw\n', p.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stderr, /does not enable the users plugin/);
    assert.match(r.stderr, /elsewhere\.test is not in localDomains/);
    assert.match(r.stdout, new RegExp(`added dave@elsewhere\\.test to ${join(p.dir, 'users.json')}`));
  });
});

describe('petrel user, in process', () => {
  it('asks twice without echo on a terminal', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-cli-user-'));
    try {
      const config = join(dir, 'petrel.config.yaml');
      writeFileSync(config, stringify({ listeners: [{ kind: 'smtp', port: 0 }], plugins: ['users'] }));
      const stdin = Object.assign(new PassThrough(), { isTTY: true, raw: [] as boolean[] });
      const setRawMode = (mode: boolean): void => void stdin.raw.push(mode);
      let err = '';
      let asked = 0;
      const stderr = new Writable({
        write(chunk: Buffer, _enc, cb) {
          err += chunk.toString();
          // Type each answer only once its prompt is shown, as a person would.
          const prompts = (err.match(/Password( again)?: /g) ?? []).length;
          while (asked < prompts) {
            asked++;
            setImmediate(() => stdin.write('tty secx\u007fret\r'));
          }
          cb();
        },
      });
      const out: string[] = [];
      const stdout = new Writable({
        write(chunk: Buffer, _enc, cb) {
          out.push(chunk.toString());
          cb();
        },
      });
      const code = await runCommand(usersPlugin, ['user', 'add', 'erin@hamburger.edu'], {
        stdin: Object.assign(stdin, { setRawMode }),
        stdout,
        stderr,
        cwd: dir,
      });
      assert.equal(code, 0, err);
      assert.deepEqual(stdin.raw, [true, false, true, false], 'raw mode (no echo) while typing');
      assert.ok(!err.includes('tty'), 'nothing typed is echoed');
      const users = JSON.parse(readFileSync(join(dir, 'users.json'), 'utf8')) as {
        users: Record<string, { password: string }>;
      };
      const { verifyPassword } = await import('./password.js');
      assert.equal(await verifyPassword('tty secret', users.users['erin@hamburger.edu']!.password), true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('uses the embedded default config, and its folder, when the working directory has no config', async () => {
    const empty = mkdtempSync(join(tmpdir(), 'petrel-cli-user-'));
    try {
      const where = locateUsersFile(await commandApi<UsersConfig>(usersPlugin, ['user'], { cwd: empty }));
      // The embedded default enables the users plugin with its file under var/.
      assert.equal(where.usersFile, join(ROOT, 'var', 'users.json'));
      assert.equal(where.enabled, true);
    } finally {
      rmSync(empty, { recursive: true, force: true });
    }
  });
});
