import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { SmtpClient } from '../harness/smtp-client.js';
import { freePort, petrel, PetrelProcess, Project, START, type LogLine } from './cli.js';
import { describeRun, killRunning } from './run.js';

const MY_RULES = './plugins-local/my-rules.ts';
const RULES = { bannedHelo: 'spammer.example', bannedRcpt: 'blocked@example.test', outDir: './received' };

/** A config as a user writes it: one listener, a spool in the project, the plugin files by path. */
function userConfig(port: number, plugins: unknown[]): Record<string, unknown> {
  return {
    hostname: 'mx.e2e.test',
    listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
    spool: { dir: './spool' },
    log: { level: 'info', format: 'json' },
    plugins,
  };
}

/** Connects and reads the greeting; the client is closed when the test ends. */
async function connect(port: number, t: TestContext): Promise<SmtpClient> {
  const c = await SmtpClient.connect(port);
  t.after(() => c.close());
  await c.expect(/^220 mx\.e2e\.test ESMTP Petrel\r\n$/);
  return c;
}

/** The message a test sends; the token tells its stored copy apart. */
function messageText(to: string, token: string): string {
  return `From: sender@example.test\r\nTo: ${to}\r\nSubject: e2e ${token}\r\n\r\nHello ${token}\r\n..a dotted line\r\n`;
}

/** A whole transaction on a new connection; returns the queue id from the 250 reply. */
async function deliver(port: number, t: TestContext, to = 'friend@example.test'): Promise<string> {
  const c = await connect(port, t);
  await c.ehlo('good.example');
  await c.cmd('MAIL FROM:<sender@example.test>', /^250 2\.1\.0 /);
  await c.cmd(`RCPT TO:<${to}>`, /^250 2\.1\.5 /);
  await c.cmd('DATA', /^354 /);
  c.write(`${messageText(to, randomUUID())}.\r\n`);
  const r = await c.expect(/^250 2\.0\.0 Ok: queued as (\S+)\r\n$/);
  await c.cmd('QUIT', /^221 2\.0\.0 /);
  c.close();
  return /queued as (\S+)/.exec(r.text)![1]!;
}

/** Reply to RCPT for `to` in a fresh session (EHLO and MAIL first). */
async function rcptReply(port: number, t: TestContext, to: string): Promise<string> {
  const c = await connect(port, t);
  await c.ehlo('good.example');
  await c.cmd('MAIL FROM:<sender@example.test>', /^250 /);
  const r = await c.cmd(`RCPT TO:<${to}>`, /^\d{3} /);
  c.close();
  return r.raw;
}

function errText(line: LogLine): string {
  const err = line.err;
  if (typeof err === 'string') return err;
  if (err && typeof err === 'object' && 'message' in err)
    return String((err as { message: unknown }).message);
  return JSON.stringify(err);
}

describe('a TypeScript plugin file outside the project, run by petrel start', { timeout: 60_000 }, () => {
  let project: Project;
  let port: number;
  let proc: PetrelProcess;

  before(async () => {
    project = new Project();
    port = await freePort();
    const file = project.writeConfig(
      'petrel.yaml',
      userConfig(port, [
        { name: './plugins-local/thrower.ts', config: { address: 'explode@example.test' } },
        { name: './plugins-local/hanger.ts', timeout: '500ms', config: { sender: 'slow@example.test' } },
        { name: MY_RULES, config: RULES },
      ]),
    );
    proc = await PetrelProcess.start(file, project.dir);
  });
  after(() => {
    proc?.kill();
    project?.remove();
  });

  it('starts, listing the plugins from the config in order', () => {
    const started = proc.logs.find((l) => l.msg === 'petrel started')!;
    assert.deepEqual(started.plugins, ['thrower', 'hanger', 'my-rules']);
    assert.equal(started.config, project.path('petrel.yaml'));
  });

  it('refuses the banned HELO, accepts a good EHLO, refuses the banned recipient and stores the message', async (t) => {
    const c = await connect(port, t);
    await c.cmd('HELO spammer.example', /^550 5\.7\.1 HELO refused\r\n$/);
    await c.cmd('MAIL FROM:<sender@example.test>', /^503 5\.5\.1 /);
    const words = await c.ehlo('good.example');
    assert.ok(words.includes('PIPELINING'), words.join(', '));
    await c.cmd('MAIL FROM:<sender@example.test>', /^250 2\.1\.0 /);
    await c.cmd(
      'RCPT TO:<blocked@example.test>',
      /^550 5\.7\.1 Mail for blocked@example\.test is not accepted\r\n$/,
    );
    await c.cmd('RCPT TO:<friend@example.test>', /^250 2\.1\.5 /);
    await c.cmd('DATA', /^354 /);
    const token = randomUUID();
    c.write(`${messageText('friend@example.test', token)}.\r\n`);
    const r = await c.expect(/^250 2\.0\.0 Ok: queued as (\S+)\r\n$/);
    await c.cmd('QUIT', /^221 2\.0\.0 /);
    const id = /queued as (\S+)/.exec(r.text)![1]!;

    const stored = project.path('received', `${id}.eml`);
    assert.ok(existsSync(stored), `the plugin wrote ${stored}`);
    const text = readFileSync(stored, 'utf8');
    assert.match(
      text,
      new RegExp(
        `^Received: from good\\.example \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.e2e\\.test \\(Petrel\\) with ESMTP id ${id}\\r\\n\\tfor <friend@example\\.test>;\\r\\n\\t[^\\r\\n]+\\r\\n`,
      ),
    );
    // Below our Received: field (folded over several lines), the message exactly as sent, dot-unstuffed.
    const ours = /^Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*/.exec(text)![0];
    assert.equal(
      text.slice(ours.length),
      messageText('friend@example.test', token).replace('..a dotted', '.a dotted'),
    );
  });

  it('answers 451 4.3.0 when a plugin throws at rcpt, logs plugin and hook, and keeps serving', async (t) => {
    const from = proc.logs.length;
    const c = await connect(port, t);
    await c.ehlo('good.example');
    await c.cmd('MAIL FROM:<sender@example.test>', /^250 /);
    const r = await c.cmd('RCPT TO:<explode@example.test>', /^451 4\.3\.0 /);
    assert.doesNotMatch(r.raw, /database/, 'the error detail stays in the log');
    await c.cmd('RCPT TO:<friend@example.test>', /^250 2\.1\.5 /);
    c.close();
    const line = await proc.waitForLog((l) => l.msg === 'hook failed' && l.plugin === 'thrower', 5000, from);
    assert.equal(line.hook, 'rcpt');
    assert.match(errText(line), /user database unreachable/);
    const id = await deliver(port, t);
    assert.ok(existsSync(project.path('received', `${id}.eml`)));
  });

  it('answers 451 4.3.0 when a plugin never resolves at mail, after its own 500ms timeout', async (t) => {
    const from = proc.logs.length;
    const c = await connect(port, t);
    await c.ehlo('good.example');
    await c.cmd('MAIL FROM:<slow@example.test>', /^451 4\.3\.0 /);
    await c.cmd('MAIL FROM:<sender@example.test>', /^250 2\.1\.0 /);
    c.close();
    const line = await proc.waitForLog((l) => l.msg === 'hook failed' && l.plugin === 'hanger', 5000, from);
    assert.equal(line.hook, 'mail');
    assert.match(errText(line), /500 ms/, 'the per-plugin timeout applied, not the 30 s default');
    const id = await deliver(port, t);
    assert.ok(existsSync(project.path('received', `${id}.eml`)));
    assert.equal(proc.exit, null, 'still running');
  });
});

describe('petrel start and config check on bad and good configs', { timeout: 60_000 }, () => {
  let project: Project;
  let port: number;

  before(async () => {
    project = new Project();
    port = await freePort();
  });
  after(() => {
    killRunning();
    project?.remove();
  });

  /** `petrel start` must fail fast, naming file, key and expectation on stderr. */
  async function startFails(file: string, expected: readonly (string | RegExp)[]): Promise<void> {
    const r = await petrel([...START, '--config', file], project.dir, 10_000);
    assert.ok(!r.timedOut, `petrel start should have refused the config\n${describeRun(r)}`);
    assert.notEqual(r.code, 0, describeRun(r));
    assert.doesNotMatch(r.stdout, /petrel started/);
    assert.ok(r.stderr.includes(file), `stderr names the file ${file}\n${r.stderr}`);
    for (const e of expected) {
      if (typeof e === 'string')
        assert.ok(r.stderr.includes(e), `stderr has ${JSON.stringify(e)}\n${r.stderr}`);
      else assert.match(r.stderr, e);
    }
  }

  it('refuses a listener port that is not a number', async () => {
    const file = project.writeConfig(
      'bad-port.yaml',
      'hostname: mx.e2e.test\nlisteners:\n  - { kind: smtp, port: "abc" }\nspool:\n  dir: ./spool\n',
    );
    await startFails(file, [/listeners\[0\]\.port: expected number/]);
  });

  it('refuses a plugin that returns an unknown hook', async () => {
    const file = project.writeConfig('bad-hook.yaml', userConfig(port, ['./plugins-local/bad-hooks.ts']));
    await startFails(file, [
      'plugins[0] (bad-hooks)',
      'unknown hook "recipient"',
      /expected one of [a-z_, ]*\brcpt\b/,
    ]);
  });

  it("refuses a plugin config that fails the plugin's schema", async () => {
    const file = project.writeConfig(
      'bad-plugin-config.yaml',
      userConfig(port, [{ name: MY_RULES, config: { bannedHelo: 42, outDir: './received' } }]),
    );
    await startFails(file, [
      /plugins\[0\] \(my-rules\)\.config\.bannedHelo: expected string/,
      /plugins\[0\] \(my-rules\)\.config\.bannedRcpt: expected string/,
    ]);
  });

  it('config check accepts a good config and prints the effective one', async () => {
    const file = project.writeConfig(
      'good.yaml',
      userConfig(port, [{ name: MY_RULES, timeout: '500ms', config: RULES }]),
    );
    const r = await petrel(['config', 'check', '--config', file], project.dir);
    assert.equal(r.code, 0, describeRun(r));
    const [first, ...rest] = r.stdout.split('\n');
    assert.equal(first, `# ${file}: OK (plugins: my-rules)`);
    const effective = parseYaml(rest.join('\n')) as {
      hostname: string;
      listeners: Record<string, unknown>[];
      spool: { dir: string };
      limits: { maxMessageSize: number };
      timeouts: { hook: number };
      plugins: Record<string, unknown>[];
    };
    assert.equal(effective.hostname, 'mx.e2e.test');
    assert.deepEqual(effective.listeners, [
      { kind: 'smtp', address: '127.0.0.1', port, allowInsecureAuth: false, name: `smtp:${port}` },
    ]);
    assert.equal(
      effective.spool.dir,
      project.path('spool'),
      'relative paths resolved against the config file',
    );
    assert.equal(effective.limits.maxMessageSize, 26_214_400, 'defaults filled in');
    assert.equal(effective.timeouts.hook, 30_000);
    assert.deepEqual(effective.plugins, [{ name: MY_RULES, timeout: 500, config: RULES, enabled: true }]);
  });

  it('config check never prints a secret: a password in a URL or under a secret-named key', async () => {
    const file = project.writeConfig('secrets.yaml', {
      ...userConfig(port, [{ name: MY_RULES, config: { ...RULES, secret: 'plugin-secret-42' } }]),
      state: { backend: 'redis', redis: { url: 'redis://petrel:hunter2-redis@127.0.0.1:6399/0' } },
    });
    const r = await petrel(['config', 'check', '--config', file], project.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.doesNotMatch(r.stdout + r.stderr, /hunter2-redis|plugin-secret-42/);
    assert.match(r.stdout, /url: redis:\/\/petrel:\[redacted\]@127\.0\.0\.1:6399\/0/);
    assert.match(r.stdout, /secret: "?\[redacted\]"?/);
  });

  it('config check refuses a plugin config that start would refuse', async () => {
    const file = project.writeConfig(
      'check-bad-plugin-config.yaml',
      userConfig(port, [{ name: MY_RULES, config: { bannedHelo: 42, bannedRcpt: 'x@example.test' } }]),
    );
    const r = await petrel(['config', 'check', '--config', file], project.dir);
    assert.notEqual(r.code, 0, `config check passed a config that petrel start refuses\n${describeRun(r)}`);
    assert.ok(r.stderr.includes(file), r.stderr);
    assert.match(r.stderr, /plugins\[0\] \(my-rules\)\.config\.bannedHelo: expected string/);
  });
});

describe('SIGHUP reloads the config', { timeout: 60_000 }, () => {
  let project: Project;
  let port: number;
  let proc: PetrelProcess;
  let file: string;

  before(async () => {
    project = new Project();
    port = await freePort();
    file = project.writeConfig('petrel.yaml', userConfig(port, [{ name: MY_RULES, config: RULES }]));
    proc = await PetrelProcess.start(file, project.dir);
  });
  after(() => {
    proc?.kill();
    project?.remove();
  });

  it('refuses a broken config and keeps serving with the old one', async (t) => {
    assert.match(await rcptReply(port, t, 'blocked@example.test'), /^550 5\.7\.1 /);
    const broken: [string, string | object, RegExp][] = [
      ['YAML syntax error', 'listeners: [ { kind: smtp, port: \n', /expected a readable YAML/],
      [
        'listener port not a number',
        { ...userConfig(port, []), listeners: [{ kind: 'smtp', port: 'abc' }] },
        /listeners\[0\]\.port/,
      ],
      [
        'plugin config failing its schema',
        userConfig(port, [{ name: MY_RULES, config: { ...RULES, bannedRcpt: 7 } }]),
        /plugins\[0\] \(my-rules\)\.config\.bannedRcpt/,
      ],
    ];
    for (const [what, config, key] of broken) {
      project.writeConfig('petrel.yaml', config);
      const from = proc.logs.length;
      proc.signal('SIGHUP');
      const refused = await proc.waitForLog((l) => /reload refused/.test(l.msg ?? ''), 10_000, from);
      assert.ok(errText(refused).includes(file), `${what}: the log names the file: ${errText(refused)}`);
      assert.match(errText(refused), key, what);
      assert.ok(!proc.logs.slice(from).some((l) => l.msg === 'config reloaded'), what);
      assert.match(
        await rcptReply(port, t, 'blocked@example.test'),
        /^550 5\.7\.1 /,
        `${what}: old rules still apply`,
      );
      assert.match(
        await rcptReply(port, t, 'other@example.test'),
        /^250 2\.1\.5 /,
        `${what}: old rules still apply`,
      );
    }
    assert.equal(proc.exit, null, 'still running');
  });

  it('applies a changed valid config to new sessions while open sessions keep the old one', async (t) => {
    const open = await connect(port, t);
    await open.ehlo('good.example');

    project.writeConfig(
      'petrel.yaml',
      userConfig(port, [
        { name: './plugins-local/thrower.ts', config: { address: 'explode@example.test' } },
        {
          name: MY_RULES,
          config: { ...RULES, bannedHelo: 'newspammer.example', bannedRcpt: 'other@example.test' },
        },
      ]),
    );
    const from = proc.logs.length;
    proc.signal('SIGHUP');
    const reloaded = await proc.waitForLog(
      (l) => l.msg === 'config reloaded' || /reload refused/.test(l.msg ?? ''),
      10_000,
      from,
    );
    assert.equal(reloaded.msg, 'config reloaded', proc.dump());
    assert.deepEqual(reloaded.plugins, ['thrower', 'my-rules']);

    // New sessions: the new rules, and the newly listed plugin.
    assert.match(await rcptReply(port, t, 'other@example.test'), /^550 5\.7\.1 /);
    assert.match(await rcptReply(port, t, 'blocked@example.test'), /^250 2\.1\.5 /);
    assert.match(await rcptReply(port, t, 'explode@example.test'), /^451 4\.3\.0 /);
    const c = await connect(port, t);
    await c.cmd('HELO newspammer.example', /^550 5\.7\.1 HELO refused/);
    await c.cmd('HELO spammer.example', /^250 /);
    c.close();

    // The session that was open before the reload finishes on the old plugin set.
    await open.cmd('MAIL FROM:<sender@example.test>', /^250 /);
    await open.cmd('RCPT TO:<blocked@example.test>', /^550 5\.7\.1 /);
    await open.cmd('RCPT TO:<other@example.test>', /^250 2\.1\.5 /);
    await open.cmd('RCPT TO:<explode@example.test>', /^250 2\.1\.5 /);
    await open.cmd('QUIT', /^221 /);
  });
});

describe('SIGTERM stops the server gracefully', { timeout: 60_000 }, () => {
  let project: Project;
  let port: number;
  let proc: PetrelProcess;

  before(async () => {
    project = new Project();
    port = await freePort();
    const file = project.writeConfig('petrel.yaml', {
      ...userConfig(port, [{ name: MY_RULES, config: RULES }]),
      timeouts: { shutdown: '20s' },
    });
    proc = await PetrelProcess.start(file, project.dir);
  });
  after(() => {
    proc?.kill();
    project?.remove();
  });

  it('lets a transaction in progress finish, tells an idle session 421 4.3.2, and exits 0', async (t) => {
    const busy = await connect(port, t);
    await busy.ehlo('good.example');
    await busy.cmd('MAIL FROM:<sender@example.test>', /^250 /);
    await busy.cmd('RCPT TO:<friend@example.test>', /^250 2\.1\.5 /);
    const idle = await connect(port, t);
    await idle.ehlo('good.example');

    const from = proc.logs.length;
    proc.signal('SIGTERM');
    await proc.waitForLog((l) => l.msg === 'shutting down', 5000, from);

    // The transaction in progress completes and its message is stored.
    await busy.cmd('DATA', /^354 /);
    const token = randomUUID();
    busy.write(`${messageText('friend@example.test', token)}.\r\n`);
    const r = await busy.expect(/^250 2\.0\.0 Ok: queued as (\S+)\r\n$/, 5000);
    const id = /queued as (\S+)/.exec(r.text)![1]!;
    assert.ok(readFileSync(project.path('received', `${id}.eml`), 'utf8').includes(token));
    busy.send('QUIT');
    await busy.expect(/^(221 2\.0\.0|421 4\.3\.2) /, 5000);
    await busy.closed(5000);

    // The idle session is told, and the connection closed.
    await idle.expect(/^421 4\.3\.2 mx\.e2e\.test Service shutting down/, 5000);
    await idle.closed(5000);

    const exit = await proc.waitForExit(10_000);
    assert.deepEqual(exit, { code: 0, signal: null }, proc.dump());
    assert.ok(proc.logs.some((l) => l.msg === 'signal received' && l.signal === 'SIGTERM'));
  });
});
