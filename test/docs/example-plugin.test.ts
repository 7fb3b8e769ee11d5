import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SmtpClient } from '../harness/smtp-client.js';
import { START } from '../e2e/cli.js';

/** The repository root (this file runs from dist/test/docs/). */
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');
const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');
const EXAMPLE = join(ROOT, 'docs', 'examples', 'save-to-folder.ts');

interface Running {
  readonly child: ChildProcess;
  readonly port: number;
  /** JSON log lines so far. */
  readonly logs: Record<string, unknown>[];
  readonly stderr: () => string;
}

/** Starts the real CLI and waits (at most `timeoutMs`) for its "petrel started" log line. */
function startCli(configFile: string, timeoutMs = 20_000): Promise<Running> {
  const child = spawn(NODE, [CLI, ...START, '--config', configFile], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  let err = '';
  let partial = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  return new Promise((resolve, reject) => {
    const fail = (why: string): void => {
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(new Error(`${why}\nstderr: ${err}\nlogs: ${JSON.stringify(logs)}`));
    };
    const timer = setTimeout(() => fail(`petrel did not start within ${timeoutMs} ms`), timeoutMs);
    child.once('exit', (code) => fail(`petrel exited with code ${code} before it started`));
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        let entry: Record<string, unknown>;
        try {
          entry = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue; // not a log line
        }
        logs.push(entry);
        if (entry.msg === 'petrel started') {
          clearTimeout(timer);
          child.removeAllListeners('exit');
          // The start line lists what was bound: a worker's own `listening` line may come later.
          const bound = (entry.listeners ?? []) as { kind: string; port: number }[];
          const smtp = bound.find((l) => l.kind === 'smtp');
          if (!smtp) return fail(`no smtp listener in ${JSON.stringify(entry)}`);
          resolve({ child, port: smtp.port, logs, stderr: () => err });
        }
      }
    });
  });
}

/** Runs the CLI to its end. */
function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(NODE, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr })));
}

/** Resolves with the exit code, or null if the process is still running after `timeoutMs`. */
function exited(child: ChildProcess, timeoutMs: number): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), timeoutMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

describe('docs/examples/save-to-folder.ts, loaded by the real CLI', () => {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-example-'));
  const mailDir = join(dir, 'mail');
  let server: Running;

  before(async () => {
    // The folder is relative: it resolves against the config file's folder.
    const config = [
      'hostname: mx.example.test',
      'listeners:',
      '  - { kind: smtp, address: 127.0.0.1, port: 0 }',
      'spool:',
      '  dir: ./spool',
      'log:',
      '  format: json',
      'plugins:',
      `  - name: ${JSON.stringify(EXAMPLE)}`,
      '    config:',
      '      folder: ./mail',
      '      domains: [example.test]',
      '',
    ].join('\n');
    writeFileSync(join(dir, 'petrel.config.yaml'), config);
    server = await startCli(join(dir, 'petrel.config.yaml'));
  });

  after(async () => {
    if (server && server.child.exitCode === null && server.child.signalCode === null) {
      server.child.kill('SIGTERM');
      if ((await exited(server.child, 5000)) === null) {
        server.child.kill('SIGKILL');
        await exited(server.child, 5000);
      }
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('loads the .ts file without a build step', () => {
    const started = server.logs.find((l) => l.msg === 'petrel started');
    assert.deepEqual(started?.plugins, ['save-to-folder']);
  });

  it('refuses a recipient outside its domains and saves a message for one inside', async () => {
    const c = await SmtpClient.connect(server.port);
    try {
      await c.expect(/^220 mx\.example\.test ESMTP Petrel\r\n$/);
      await c.ehlo('client.example');
      await c.cmd('MAIL FROM:<alice@example.org>', /^250 2\.1\.0 /);
      await c.cmd('RCPT TO:<carol@elsewhere.test>', /^550 5\.7\.1 Recipient not accepted here\r\n$/);
      await c.cmd('RCPT TO:<bob@Example.TEST>', /^250 2\.1\.5 /);
      await c.cmd('DATA', /^354 /);
      c.write(
        'From: alice@example.org\r\nSubject: test\r\n\r\nHello Bob\r\n..a line that starts with a dot\r\n.\r\n',
      );
      const saved = await c.expect(/^250 2\.0\.0 Ok: saved as [0-9A-Z]+\.eml\r\n$/);
      await c.cmd('QUIT', /^221 2\.0\.0 /);
      await c.closed();

      const name = /saved as (\S+)/.exec(saved.text)![1]!;
      assert.deepEqual(readdirSync(mailDir), [name], 'one file, no temporary file left behind');
      const text = readFileSync(join(mailDir, name), 'utf8');
      assert.match(
        text,
        /^Return-Path: <alice@example\.org>\r\nReceived: from client\.example \(\[127\.0\.0\.1\]\)\r\n/,
      );
      assert.match(text, /\tfor <bob@example\.test>;\r\n/);
      assert.ok(
        text.endsWith(
          'From: alice@example.org\r\nSubject: test\r\n\r\nHello Bob\r\n.a line that starts with a dot\r\n',
        ),
        `saved content: ${JSON.stringify(text)}`,
      );
    } finally {
      c.close();
    }
  });

  it('its command `petrel saved` lists what it saved, and `petrel --help` names the command', async () => {
    const config = join(dir, 'petrel.config.yaml');
    const saved = await runCli(['saved', '--config', config]);
    assert.equal(saved.code, 0, saved.stderr);
    const [name] = readdirSync(mailDir);
    assert.match(saved.stdout, new RegExp(`^${name}\\t\\d+\\n1 saved in ${mailDir}\\n$`));
    const help = await runCli(['--help', '--config', config]);
    assert.match(help.stdout, /^ {2}saved +list the messages save-to-folder has saved/m);
  });

  it('stops on SIGTERM with exit code 0', async () => {
    server.child.kill('SIGTERM');
    assert.equal(await exited(server.child, 10_000), 0, server.stderr());
  });
});
