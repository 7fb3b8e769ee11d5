import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mailIds } from '../harness/maildir.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { CLI, freePort, NODE, START } from './cli.js';

/** Starts the real CLI and resolves once its port answers with a greeting. */
async function startCli(config: string, cwd: string, port: number): Promise<ChildProcess> {
  const child = spawn(NODE, [CLI, ...START, '--config', config], {
    cwd,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}: ${err}`);
    try {
      const c = await SmtpClient.connect(port);
      await c.expect(/^220 /, 2000);
      c.close();
      return child;
    } catch {
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`server did not start: ${err}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

describe('crash safety', () => {
  const children: ChildProcess[] = [];
  after(() => {
    for (const c of children) c.kill('SIGKILL');
  });

  it('after kill -9 mid-load, every message that got a 250 is in a Maildir exactly once', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-crash-'));
    try {
      const port = await freePort();
      writeFileSync(
        join(dir, 'accept.mjs'),
        "import { definePlugin, accept, proceed } from 'petrel';\n" +
          "export default definePlugin({ name: 'accept-local', setup: () => ({ rcpt: async ({ recipient }) => recipient.domain === 'hamburger.test' ? accept() : proceed() }) });\n",
      );
      const config = join(dir, 'petrel.yaml');
      writeFileSync(
        config,
        [
          'hostname: mx.crash.test',
          'localDomains: [hamburger.test]',
          `listeners: [{ kind: smtp, address: 127.0.0.1, port: ${port}, limits: { maxConnectionsPerIp: 100 } }]`,
          'spool: { dir: ./spool }',
          'log: { level: warn }',
          'plugins:',
          '  - ./accept.mjs',
          '  - queue',
          '  - { name: maildir, config: { root: ./mail } }',
          '',
        ].join('\n'),
      );
      let server = await startCli(config, dir, port);
      children.push(server);

      const acked: string[] = [];
      const killAt = 1500;
      const total = 4000;
      let next = 0;
      let killed = false;
      const worker = async (w: number): Promise<void> => {
        let c: SmtpClient | null = null;
        try {
          c = await SmtpClient.connect(port);
          await c.expect(/^220 /);
          await c.ehlo();
          while (!killed && next < total) {
            const n = next++;
            const id = `m${n}.w${w}@crash.test`;
            c.write(`MAIL FROM:<alice@crepes.test>\r\nRCPT TO:<bob${n % 7}@hamburger.test>\r\nDATA\r\n`);
            await c.expect(/^250 /);
            await c.expect(/^250 /);
            await c.expect(/^354 /);
            c.write(`Message-ID: <${id}>\r\nSubject: load ${n}\r\n\r\nbody of ${n}\r\n.\r\n`);
            const r = await c.reply();
            if (r.code === 250) acked.push(id);
            if (acked.length >= killAt && !killed) {
              killed = true;
              server.kill('SIGKILL');
            }
          }
        } catch {
          // the server died under us: expected
        } finally {
          c?.close();
        }
      };
      await Promise.all(Array.from({ length: 8 }, (_, w) => worker(w)));
      assert.ok(killed, 'the server was killed mid-load');
      await new Promise<void>((r) =>
        server.exitCode !== null || server.signalCode ? r() : server.once('exit', () => r()),
      );

      server = await startCli(config, dir, port);
      children.push(server);
      const root = join(dir, 'mail');
      const deadline = Date.now() + 60_000;
      let found = mailIds(root);
      while (Date.now() < deadline) {
        const have = new Set(found);
        if (acked.every((id) => have.has(id))) break;
        await new Promise((r) => setTimeout(r, 250));
        found = mailIds(root);
      }
      await new Promise((r) => setTimeout(r, 500)); // let any duplicate land before counting
      found = mailIds(root);
      const counts = new Map<string, number>();
      for (const id of found) counts.set(id, (counts.get(id) ?? 0) + 1);
      const missing = acked.filter((id) => !counts.has(id));
      const duplicated = [...counts].filter(([, n]) => n > 1).map(([id]) => id);
      if (missing.length && process.env.PETREL_KEEP_CRASH_DIR) {
        writeFileSync(join(dir, 'missing.txt'), missing.join('\n'));
        process.stderr.write(`kept ${dir}\n`);
        return;
      }
      assert.deepEqual(missing, [], `${missing.length} of ${acked.length} acknowledged messages are missing`);
      assert.deepEqual(duplicated, [], 'no message was delivered twice');
      assert.ok(acked.length >= killAt);
      server.kill('SIGTERM');
    } finally {
      if (!process.env.PETREL_KEEP_CRASH_DIR) rmSync(dir, { recursive: true, force: true });
    }
  });

  it('after kill -9 of the primary mid-load, its workers exit on their own', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-orphans-'));
    try {
      const port = await freePort();
      const config = join(dir, 'petrel.yaml');
      writeFileSync(
        config,
        [
          'hostname: mx.orphans.test',
          'workers: 2',
          `listeners: [{ kind: smtp, address: 127.0.0.1, port: ${port}, limits: { maxConnectionsPerIp: 100 } }]`,
          'spool: { dir: ./spool }',
          'log: { level: info }',
          '',
        ].join('\n'),
      );
      // Its log goes to a pipe this test reads, as under a supervisor: a worker whose primary is
      // gone writes to a pipe with no reader.
      const primary = spawn(NODE, [CLI, ...START, '--config', config], {
        cwd: dir,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.push(primary);
      primary.stdout!.resume();
      primary.stderr!.resume();
      for (let i = 0; ; i++) {
        try {
          const c = await SmtpClient.connect(port);
          await c.expect(/^220 /, 2000);
          c.close();
          break;
        } catch {
          if (i > 300) throw new Error('server did not start');
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const workers = execFileSync('pgrep', ['-P', String(primary.pid)], { encoding: 'utf8' })
        .trim()
        .split('\n')
        .map(Number);
      assert.equal(workers.length, 2);
      // Connections opening and closing on both workers, so each is talking to the primary.
      let stop = false;
      const churn = async (): Promise<void> => {
        while (!stop) {
          try {
            const c = await SmtpClient.connect(port);
            await c.expect(/^220 /, 2000);
            c.close();
          } catch {
            await new Promise((r) => setTimeout(r, 10));
          }
        }
      };
      const clients = Array.from({ length: 8 }, () => churn());
      await new Promise((r) => setTimeout(r, 500));
      primary.kill('SIGKILL');
      primary.stdout!.destroy();
      primary.stderr!.destroy();
      const alive = (pid: number): boolean => {
        try {
          process.kill(pid, 0);
          return true;
        } catch {
          return false;
        }
      };
      const deadline = Date.now() + 10_000;
      while (workers.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      stop = true;
      await Promise.all(clients);
      const left = workers.filter(alive);
      for (const pid of left) process.kill(pid, 'SIGKILL');
      assert.deepEqual(left, [], 'every worker left once its primary was gone');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
