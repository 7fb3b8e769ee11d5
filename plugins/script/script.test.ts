import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defer, deny, proceed } from '../../core/index.js';
import {
  acceptAllRecipients,
  memoryQueue,
  ROOT,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { START } from '../../test/e2e/cli.js';
import { serializeInput } from './input.js';
import { scriptDecision, toVerdict } from './verdict.js';

type LogLine = Record<string, unknown>;

const NODE = join(ROOT, 'node_modules', '.bin', 'node');
const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');
const CHILD_ENTRY = join(ROOT, 'dist', 'plugins', 'script', 'child.js');

/** The first log line from index `from` on that matches, waiting for it up to `timeoutMs`. */
async function waitForLog(
  srv: TestServer,
  from: number,
  match: (l: LogLine) => boolean,
  timeoutMs = 10_000,
): Promise<LogLine> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = srv.logs.slice(from).find(match);
    if (line) return line;
    if (Date.now() > deadline)
      throw new Error(`no such log line; logs: ${JSON.stringify(srv.logs.slice(from))}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function greeted(port: number): Promise<SmtpClient> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo('client.test');
  return c;
}

/** A whole transaction that the scripts let through: MAIL, RCPT, DATA, `250`. */
async function transaction(port: number, from: string): Promise<void> {
  const c = await greeted(port);
  await c.cmd(`MAIL FROM:<${from}>`, /^250 /);
  await c.cmd('RCPT TO:<bob@example.test>', /^250 /);
  await c.cmd('DATA', /^354 /);
  c.write('Subject: hello\r\n\r\nJust a note.\r\n.\r\n');
  await c.expect(/^250 /);
  c.close();
}

function scriptServer(
  file: string,
  config: Record<string, unknown>,
  into: CapturedMessage[] = [],
): Promise<TestServer> {
  return startServer({
    plugins: [acceptAllRecipients, memoryQueue(into)],
    entries: [
      { name: 'script', config: { scripts: [{ file }], ...config } },
      'test-accept-rcpt',
      'test-memory-queue',
    ],
  });
}

describe('script: verdicts and input', () => {
  it('turns what a script returns into a verdict, filling in the reply', () => {
    const v = (x: unknown) => toVerdict(scriptDecision.parse(x));
    assert.deepEqual(v('continue'), proceed());
    assert.deepEqual(v('reject'), deny(550, '5.7.1', 'Message refused by policy'));
    assert.deepEqual(v('defer'), defer(451, '4.7.1', 'Try again later'));
    assert.deepEqual(
      v({ action: 'reject', code: 554, enhanced: '5.7.0', text: 'Not from you' }),
      deny(554, '5.7.0', 'Not from you'),
    );
    assert.equal(v('accept').kind, 'accept');
  });

  it('refuses a verdict a script may not give', () => {
    for (const bad of [
      null,
      'allow',
      { action: 'reject', code: 250 },
      { action: 'reject', code: 451 },
      { action: 'defer', enhanced: '5.7.1' },
      { action: 'reject', text: 'two\r\n250 lines' },
      { action: 'reject', text: 'x'.repeat(201) },
      { action: 'continue', text: 'why' },
      { action: 'reject', extra: 1 },
      ['reject'],
    ]) {
      assert.equal(scriptDecision.safeParse(bad).success, false, JSON.stringify(bad));
    }
  });

  it('keeps the input within maxInputBytes, saying when header fields were left out', () => {
    const base = { hook: 'data_post' as const, session: null as never, envelope: null };
    const fields = Array.from({ length: 100 }, (_, i) => ({ name: `X-Field-${i}`, value: 'v'.repeat(100) }));
    const whole = JSON.parse(serializeInput(base, fields, 1_000_000)!) as {
      headers: unknown[];
      headersTruncated: boolean;
    };
    assert.equal(whole.headers.length, 100);
    assert.equal(whole.headersTruncated, false);
    const json = serializeInput(base, fields, 5000)!;
    assert.ok(Buffer.byteLength(json) <= 5000);
    const cut = JSON.parse(json) as { headers: { name: string }[]; headersTruncated: boolean };
    assert.equal(cut.headersTruncated, true);
    assert.deepEqual(
      cut.headers.map((h) => h.name),
      fields.slice(0, cut.headers.length).map((f) => f.name),
    );
    assert.equal(serializeInput(base, [], 10), null);
  });
});

describe('script: a customer rule over SMTP', () => {
  let dir: string;
  let srv: TestServer;
  const queued: CapturedMessage[] = [];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-script-'));
    const file = join(dir, 'rules.js');
    writeFileSync(
      file,
      `// A customer's filter.
if (hook === 'mail' && envelope.sender !== null && envelope.sender.domain === 'spam.test') {
  return { action: 'reject', code: 550, text: 'No mail from spam.test' };
}
if (hook === 'rcpt' && envelope.recipient.local === 'facts') {
  const facts = [session.helo.hostname, session.remote.address, session.tls === null,
    envelope.sender.address, envelope.recipients.length, envelope.size];
  return { action: 'defer', code: 450, text: facts.join(' ') };
}
if (hook === 'rcpt' && envelope.recipient.local === 'let-me-in') return 'accept';
if (hook === 'data_post' && /buy now/i.test(header('subject') || '')) return 'reject';
return 'continue';
`,
    );
    srv = await scriptServer(file, { poolSize: 1 }, queued);
  });
  after(async () => {
    await srv?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses the senders, recipients and messages the script refuses, with its replies', async () => {
    const c = await greeted(srv.port);
    await c.cmd('MAIL FROM:<eve@spam.test>', /^550 5\.7\.1 No mail from spam\.test\r\n$/);
    await c.cmd('MAIL FROM:<alice@crepes.test> SIZE=1234', /^250 /);
    await c.cmd('RCPT TO:<bob@example.test>', /^250 /);
    // What the script saw: copies of the session facts and the envelope so far.
    await c.cmd(
      'RCPT TO:<facts@example.test>',
      /^450 4\.7\.1 client\.test 127\.0\.0\.1 true alice@crepes\.test 1 1234\r\n$/,
    );
    await c.cmd('DATA', /^354 /);
    c.write('Subject: Buy now!\r\n\r\nCheap.\r\n.\r\n');
    await c.expect(/^550 5\.7\.1 Message refused by policy\r\n$/);
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<bob@example.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: Lunch?\r\n\r\nAt noon.\r\n.\r\n');
    await c.expect(/^250 /);
    c.close();
    assert.equal(queued.length, 1);
    assert.deepEqual(queued[0]!.recipients, ['bob@example.test']);
    const decided = srv.logs.filter((l) => l.msg === 'script decided').map((l) => [l.hook, l.action]);
    assert.deepEqual(decided, [
      ['mail', 'reject'],
      ['rcpt', 'defer'],
      ['data_post', 'reject'],
    ]);
  });

  it('does not let an untrusted script accept, unless the config allows it', async () => {
    const c = await greeted(srv.port);
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<let-me-in@example.test>', /^451 4\.3\.0 /);
    c.close();
    const failed = srv.logs.find((l) => l.msg === 'script failed');
    assert.match(String(failed?.reason), /"accept" is not allowed/);
  });
});

/**
 * The hostile script: what it does depends on the sender's local part, so that one server
 * shows every case while other senders go through.
 */
function hostileScript(port: number, target: string): string {
  return `const port = ${port};
const target = ${JSON.stringify(target)};
const tryAll = (routes, what) => {
  for (const route of routes) {
    try { const got = route(); return { action: 'reject', text: 'escaped ' + String(got).slice(0, 40) }; } catch (e) {}
  }
  throw new Error('no way to ' + what);
};
const sender = envelope.sender === null ? '' : envelope.sender.local;
switch (sender) {
  case 'loop': for (;;) {}
  case 'microtask': { const t = { get then() { Promise.resolve(t); return undefined; } }; Promise.resolve(t); return 'continue'; }
  case 'heap': { const keep = []; for (;;) keep.push(new Array(100000).fill(keep.length)); }
  case 'buffers': { const keep = []; for (;;) { const b = new ArrayBuffer(16 * 1024 * 1024); new Uint8Array(b).fill(1); keep.push(b); } }
  case 'throw': throw new Error('boom');
  case 'garbage': return { action: 'explode' };
  case 'nothing': return;
  case 'huge': return 'x'.repeat(1 << 20);
  case 'mutate': envelope.sender.domain = 'elsewhere.test'; return 'continue';
  case 'require': return require('fs');
  case 'exit': process.exit(0); return 'continue';
  case 'escape': return this.constructor.constructor('return process')();
  case 'escape-object': return ({}).constructor.constructor('return process')();
  case 'passwd': return tryAll([
    () => require('fs').readFileSync('/etc/passwd', 'utf8'),
    () => ({}).constructor.constructor('return process')().getBuiltinModule('fs').readFileSync('/etc/passwd', 'utf8'),
    () => Buffer.from('x').constructor.constructor('return process')().mainModule.require('fs').readFileSync('/etc/passwd'),
    () => import('fs'),
  ], 'the file system');
  case 'write': return tryAll([
    () => require('fs').writeFileSync(target, 'escaped'),
    () => ({}).constructor.constructor('return process')().getBuiltinModule('fs').writeFileSync(target, 'escaped'),
    () => import('fs'),
  ], 'write a file');
  case 'socket': return tryAll([
    () => require('net').connect(port, '127.0.0.1'),
    () => ({}).constructor.constructor('return process')().getBuiltinModule('net').connect(port, '127.0.0.1'),
    () => fetch('http://127.0.0.1:' + port + '/'),
    () => new WebSocket('ws://127.0.0.1:' + port + '/'),
    () => import('net'),
  ], 'the network');
}
return 'continue';
`;
}

describe('script: hostile scripts', () => {
  let dir: string;
  let srv: TestServer;
  let listener: Server;
  let connections = 0;
  const target = join(tmpdir(), `petrel-script-escaped-${process.pid}`);

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-script-'));
    listener = createServer((s) => {
      connections++;
      s.destroy();
    });
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    const port = (listener.address() as { port: number }).port;
    const file = join(dir, 'hostile.js');
    writeFileSync(file, hostileScript(port, target));
    srv = await scriptServer(file, { poolSize: 2, timeout: '1500ms', maxHeapMb: 16, maxMemoryMb: 128 });
  });
  after(async () => {
    await srv?.close();
    await new Promise((resolve) => listener?.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  });

  /**
   * Sends MAIL FROM the given sender, expects `451 4.3.0`, and checks the log: the call failed
   * for `reason`, the process that ran it is gone, and a new one took its place. Returns the
   * reply and the log line of the old process's end.
   */
  async function refusedAndReplaced(
    sender: string,
    reason: RegExp,
  ): Promise<{ reply: string; ended: LogLine }> {
    const from = srv.logs.length;
    const c = await greeted(srv.port);
    const reply = await c.cmd(`MAIL FROM:<${sender}>`, /^451 4\.3\.0 /);
    c.close();
    const failed = await waitForLog(srv, from, (l) => l.msg === 'script failed');
    assert.match(String(failed.reason), reason);
    const pid = failed.childPid as number;
    const ended = await waitForLog(
      srv,
      from,
      (l) => /^script process ended/.test(String(l.msg)) && l.childPid === pid,
    );
    assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' });
    await waitForLog(srv, from, (l) => l.msg === 'script process started' && l.childPid !== pid);
    return { reply: reply.raw, ended };
  }

  it('kills a script that loops, while another client completes a transaction', async () => {
    const from = srv.logs.length;
    const spinner = await greeted(srv.port);
    spinner.send('MAIL FROM:<loop@hostile.test>');
    let answered = false;
    const spun = spinner.reply(10_000).finally(() => (answered = true));
    await waitForLog(srv, from, (l) => l.msg === 'script call started');
    await transaction(srv.port, 'alice@crepes.test');
    assert.equal(answered, false, 'the other client was served while the script spun');
    assert.match((await spun).raw, /^451 4\.3\.0 /);
    spinner.close();
    const failed = await waitForLog(srv, from, (l) => l.msg === 'script failed');
    assert.match(String(failed.reason), /no verdict within 1500 ms/);
    const pid = failed.childPid as number;
    await waitForLog(srv, from, (l) => l.msg === 'script process ended' && l.childPid === pid);
    assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' });
    await waitForLog(srv, from, (l) => l.msg === 'script process started' && l.childPid !== pid);
  });

  it('replaces the process of a script that runs out of memory, on the heap or beside it', async () => {
    const heap = await refusedAndReplaced('heap@hostile.test', /exited \(SIG[A-Z]+\)/);
    assert.match(String(heap.ended.stderr), /JavaScript heap out of memory/);
    // Array buffers live outside the V8 heap: RLIMIT_DATA refuses them (or, when the refusal
    // hits V8 itself, it aborts). Without that limit the script would run until the timeout.
    await refusedAndReplaced(
      'buffers@hostile.test',
      /RangeError: Array buffer allocation failed|exited \(SIG[A-Z]+\)/,
    );
  });

  it('replaces the process of a script that throws, returns garbage or changes its input', async () => {
    await refusedAndReplaced('throw@hostile.test', /the script threw: Error: boom/);
    await refusedAndReplaced('garbage@hostile.test', /no valid verdict/);
    await refusedAndReplaced('nothing@hostile.test', /no valid verdict/);
    await refusedAndReplaced('huge@hostile.test', /broke the protocol: a reply line is too long/);
    await refusedAndReplaced(
      'mutate@hostile.test',
      /the script threw: TypeError: Cannot assign to read only property/,
    );
    await refusedAndReplaced('microtask@hostile.test', /the script threw: VMError: Async not available/);
  });

  it('gives a script no require, no process and no way out through constructors', async () => {
    await refusedAndReplaced('require@hostile.test', /ReferenceError: require is not defined/);
    await refusedAndReplaced('exit@hostile.test', /ReferenceError: process is not defined/);
    await refusedAndReplaced('escape@hostile.test', /TypeError: Cannot read properties of undefined/);
    await refusedAndReplaced(
      'escape-object@hostile.test',
      /EvalError: Code generation from strings disallowed/,
    );
  });

  it('lets a script read no file, write no file and open no socket', async () => {
    const passwd = await refusedAndReplaced('passwd@hostile.test', /no way to the file system/);
    assert.doesNotMatch(passwd.reply, /root:/);
    await refusedAndReplaced('write@hostile.test', /no way to write a file/);
    assert.equal(existsSync(target), false);
    await refusedAndReplaced('socket@hostile.test', /no way to the network/);
    // Give a connection that was started after all a moment to arrive.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(connections, 0, 'the listener saw no connection');
  });

  it('still serves everyone else afterwards', async () => {
    await transaction(srv.port, 'alice@crepes.test');
  });
});

/** Processes whose command line names the script process entry: the pool's, and their `unshare`. */
function scriptProcesses(): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').includes(CHILD_ENTRY))
        pids.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

async function noScriptProcessesLeft(timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (scriptProcesses().length > 0) {
    if (Date.now() > deadline) assert.deepEqual(scriptProcesses(), [], 'script processes left running');
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('script: boot, queue and teardown', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-script-'));
    writeFileSync(
      join(dir, 'loop.js'),
      "if (envelope.sender !== null && envelope.sender.local === 'loop') for (;;) {}\nreturn 'continue';\n",
    );
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('stops the server at boot when a script does not compile, naming the file', async () => {
    const broken = join(dir, 'broken.js');
    writeFileSync(broken, "if (hook === 'mail') {\n  return 'reject';\n");
    await assert.rejects(
      scriptServer(broken, {}),
      /plugins\[0\] \(script\): expected setup to succeed, but it threw: \S*broken\.js: SyntaxError: Unexpected token '\)' \(at the end of the script\)$/,
    );
    await noScriptProcessesLeft();
  });

  it('refuses a call at once when every process is busy and the queue is full', async () => {
    const srv = await scriptServer(join(dir, 'loop.js'), { poolSize: 1, maxQueued: 0, timeout: '1s' });
    try {
      const spinner = await greeted(srv.port);
      spinner.send('MAIL FROM:<loop@hostile.test>');
      let answered = false;
      const spun = spinner.reply(10_000).finally(() => (answered = true));
      // Once the spinning call holds the only process, try another one.
      await waitForLog(srv, 0, (l) => l.msg === 'script call started');
      const other = await greeted(srv.port);
      await other.cmd('MAIL FROM:<alice@crepes.test>', /^451 4\.3\.0 /);
      assert.equal(answered, false);
      const failed = await waitForLog(srv, 0, (l) => l.msg === 'script failed');
      assert.match(String(failed.reason), /too many calls waiting \(maxQueued\)/);
      assert.match((await spun).raw, /^451 4\.3\.0 /);
      // Once the spinning process is replaced, calls go through again.
      const ended = await waitForLog(srv, 0, (l) => l.msg === 'script process ended');
      await waitForLog(srv, srv.logs.indexOf(ended), (l) => l.msg === 'script process started');
      await other.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      spinner.close();
      other.close();
    } finally {
      await srv.close();
    }
  });

  it('kills its processes when the server stops', async () => {
    const srv = await scriptServer(join(dir, 'loop.js'), { poolSize: 2 });
    const ready = await waitForLog(srv, 0, (l) => l.msg === 'script pool ready');
    assert.equal((ready.childPids as number[]).length, 2);
    assert.ok(scriptProcesses().length >= 2);
    await srv.close();
    assert.deepEqual(scriptProcesses(), []);
  });

  it('takes its processes along when the server is killed with SIGKILL', async () => {
    writeFileSync(
      join(dir, 'petrel.config.yaml'),
      [
        'hostname: mx.test',
        'listeners:',
        '  - { kind: smtp, address: 127.0.0.1, port: 0 }',
        'spool:',
        '  dir: ./spool',
        'log:',
        '  format: json',
        'plugins:',
        '  - name: script',
        '    config:',
        '      scripts: [{ file: ./loop.js }]',
        '',
      ].join('\n'),
    );
    const cli = spawn(NODE, [CLI, ...START, '--config', join(dir, 'petrel.config.yaml')], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    try {
      const childPids = await new Promise<number[]>((resolve, reject) => {
        let partial = '';
        let stderr = '';
        cli.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
        cli.once('exit', (code) => reject(new Error(`petrel exited with ${code}: ${stderr}`)));
        cli.stdout!.setEncoding('utf8').on('data', (d: string) => {
          const lines = (partial + d).split('\n');
          partial = lines.pop() ?? '';
          for (const line of lines) {
            if (line.includes('"script pool ready"'))
              resolve((JSON.parse(line) as { childPids: number[] }).childPids);
          }
        });
      });
      assert.ok(scriptProcesses().length >= 2);
      // The process that owns the pool (Petrel, or the worker that runs the plugins).
      const owner = Number(
        /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${childPids[0]}/status`, 'utf8'))?.[1],
      );
      process.kill(owner, 'SIGKILL');
      await noScriptProcessesLeft();
    } finally {
      cli.kill('SIGKILL');
    }
  });
});
