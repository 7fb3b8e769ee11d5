import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
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
});
