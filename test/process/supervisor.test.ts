import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { mailIds } from '../harness/maildir.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { petrel, PetrelProcess, type LogLine } from '../e2e/cli.js';

/**
 * `petrel start` as a primary over several worker processes, tried from outside: real processes,
 * real sockets, kill -9, a plugin that never returns.
 */

const RULES = `import { definePlugin, accept, proceed, deny } from 'petrel';
export default definePlugin({
  name: 'rules',
  setup: ({ config }) => {
    if (config && config.failSetup) throw new Error('this setup always fails');
    return {
      async rcpt({ recipient }) {
        // A plugin bug that never yields: only the watchdog can end it.
        if (recipient.local === 'spin') for (;;) {}
        if (recipient.local === 'refused') return deny(550, '5.1.1', 'refused by rules');
        if (recipient.local === 'crash') setTimeout(() => { throw new Error('bug in a timer'); }, 10);
        // Accepted, but no transport routes it: it waits in the queue, deferred.
        if (recipient.domain === 'later.test') return accept();
        return recipient.domain === 'hamburger.test' ? accept() : proceed();
      },
    };
  },
});
`;

interface Setup {
  readonly dir: string;
  readonly config: string;
  write(extra?: Record<string, unknown>, rules?: Record<string, unknown>): void;
}

function project(base: Record<string, unknown>): Setup {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-workers-'));
  writeFileSync(join(dir, 'rules.mjs'), RULES);
  const config = join(dir, 'petrel.yaml');
  const write = (extra: Record<string, unknown> = {}, rules: Record<string, unknown> = {}): void => {
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.workers.test',
        localDomains: ['hamburger.test'],
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0, limits: { maxConnectionsPerIp: 200 } }],
        spool: { dir: './spool' },
        log: { level: 'info' },
        plugins: [
          { name: './rules.mjs', config: rules },
          'queue',
          { name: 'maildir', config: { root: './mail' } },
        ],
        ...base,
        ...extra,
      }),
    );
  };
  write();
  return { dir, config, write };
}

function portOf(p: PetrelProcess): number {
  const started = p.logs.find((x) => x.msg === 'petrel started');
  const port = (started?.listeners as { port: number }[] | undefined)?.[0]?.port;
  assert.ok(port, 'petrel started names the listeners');
  return port;
}

function pidsOf(p: PetrelProcess): number[] {
  const started = p.logs.find((x) => x.msg === 'petrel started');
  return (started?.pids as number[]) ?? [];
}

/** One whole transaction; resolves to the queue id from the 250, or throws. */
async function sendOne(port: number, n: number, to = `bob${n % 5}@hamburger.test`): Promise<string> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd(`RCPT TO:<${to}>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`Message-ID: <probe${n}@workers.test>\r\nSubject: probe ${n}\r\n\r\nhello ${n}\r\n.\r\n`);
    const r = await c.expect(/^250 /);
    await c.cmd('QUIT', /^221 /);
    return r.text;
  } finally {
    c.close();
  }
}

/** Waits until every id is in a Maildir; then checks none is there twice. */
async function expectDeliveredOnce(root: string, ids: readonly string[], timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let found = mailIds(root);
  while (Date.now() < deadline) {
    const have = new Set(found);
    if (ids.every((id) => have.has(id))) break;
    await new Promise((r) => setTimeout(r, 200));
    found = mailIds(root);
  }
  await new Promise((r) => setTimeout(r, 500)); // let a duplicate land before counting
  found = mailIds(root);
  const counts = new Map<string, number>();
  for (const id of found) counts.set(id, (counts.get(id) ?? 0) + 1);
  const missing = ids.filter((id) => !counts.has(id));
  assert.deepEqual(
    missing.slice(0, 10),
    [],
    `${missing.length} of ${ids.length} acknowledged messages missing`,
  );
  const twice = [...counts].filter(([, n]) => n > 1).map(([id]) => id);
  assert.deepEqual(twice, [], 'no message delivered twice');
}

describe('petrel start with several workers', () => {
  const procs: PetrelProcess[] = [];
  const dirs: string[] = [];
  after(() => {
    for (const p of procs) p.kill();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  async function start(setup: Setup): Promise<PetrelProcess> {
    dirs.push(setup.dir);
    const p = await PetrelProcess.start(setup.config, setup.dir, 30_000);
    procs.push(p);
    return p;
  }

  describe('two workers on one listening socket', () => {
    let setup: Setup;
    let server: PetrelProcess;
    let port: number;
    before(async () => {
      setup = project({ workers: 2, watchdog: '2s' });
      server = await start(setup);
      port = portOf(server);
    });

    it('starts a primary and two workers, and both serve the same port', async () => {
      const pids = pidsOf(server);
      assert.equal(pids.length, 2);
      assert.ok(!pids.includes(server.pid!), 'workers are processes of their own');
      for (const w of [0, 1]) await server.waitForLog((l) => l.msg === 'worker started' && l.worker === w);
      // Enough connections that the kernel hands some to each worker.
      const ids: string[] = [];
      for (let i = 0; i < 40; i++) ids.push(await sendOne(port, i));
      const by = new Set(server.logs.filter((l) => l.msg === 'message accepted').map((l) => l.worker));
      assert.deepEqual([...by].sort(), [0, 1], 'each worker accepted mail');
      // Each worker writes only its own part of the queue.
      assert.ok(existsSync(join(setup.dir, 'spool', 'queue', 'journal')));
      assert.ok(existsSync(join(setup.dir, 'spool', 'queue', 'part-1', 'journal')));
      await expectDeliveredOnce(
        join(setup.dir, 'mail'),
        Array.from({ length: 40 }, (_, i) => `probe${i}@workers.test`),
      );
    });

    it('petrel queue lists, shows and flushes across every worker’s part', async () => {
      const waiting: string[] = [];
      for (let i = 0; i < 30; i++) waiting.push(await sendOne(port, 500 + i, `w${i}@later.test`));
      const ids = waiting.map((t) => /queued as (\S+)/.exec(t)![1]!);
      const by = new Set(
        server.logs
          .filter((l) => l.msg === 'message accepted' && ids.includes(l.tx as string))
          .map((l) => l.worker),
      );
      assert.deepEqual([...by].sort(), [0, 1], 'both parts hold some');
      const r = await petrel(['queue', 'list', '--json', '--config', setup.config], setup.dir);
      assert.equal(r.code, 0, r.stderr);
      // `list --json` is ndjson: a message per line.
      const listed = (stdout: string): string[] =>
        stdout
          .split('\n')
          .filter(Boolean)
          .map((l) => (JSON.parse(l) as { id: string }).id);
      assert.deepEqual(listed(r.stdout).sort(), [...ids].sort());
      for (const id of [ids[0]!, ids.at(-1)!]) {
        const shown = await petrel(['queue', 'show', id, '--config', setup.config], setup.dir);
        assert.equal(shown.code, 0, shown.stderr);
        assert.match(shown.stdout, new RegExp(`^${id} `));
      }
      const flushed = await petrel(['queue', 'flush', '--json', '--config', setup.config], setup.dir);
      assert.equal((JSON.parse(flushed.stdout) as { done: number }).done, 30);
      // One message of each part, by id: the command finds the part that holds it.
      const parts = [0, 1].map(
        (w) =>
          server.logs.find(
            (l) => l.msg === 'message accepted' && l.worker === w && ids.includes(l.tx as string),
          )!.tx as string,
      );
      for (const id of parts) {
        const d = await petrel(['queue', 'delete', id, '--config', setup.config], setup.dir);
        assert.equal(d.code, 0, d.stderr);
        assert.match(d.stdout, new RegExp(`^Deleted ${id}`));
      }
      const left = await petrel(['queue', 'list', '--json', '--config', setup.config], setup.dir);
      const rest = listed(left.stdout);
      assert.deepEqual(rest.sort(), ids.filter((id) => !parts.includes(id)).sort());
    });

    it('replaces a worker that is killed with -9, while the other keeps serving and the port stays open', async () => {
      const [victim] = pidsOf(server);
      const from = server.logs.length;
      process.kill(victim!, 'SIGKILL');
      // Clients keep coming during the restart: none is refused.
      const sent: Promise<string>[] = [];
      for (let i = 100; i < 120; i++) sent.push(sendOne(port, i));
      const results = await Promise.allSettled(sent);
      assert.deepEqual(
        results
          .filter((r) => r.status === 'rejected')
          .map((r) => String((r as PromiseRejectedResult).reason)),
        [],
      );
      const exited = await server.waitForLog((l) => l.msg === 'worker exited; restarting it', 10_000, from);
      assert.equal(exited.pid, victim);
      assert.equal(exited.signal, 'SIGKILL');
      const again = await server.waitForLog(
        (l) => l.msg === 'worker started' && l.worker === exited.worker && l.pid !== victim,
        15_000,
        from,
      );
      assert.ok(again);
      await expectDeliveredOnce(
        join(setup.dir, 'mail'),
        Array.from({ length: 20 }, (_, i) => `probe${100 + i}@workers.test`),
      );
    });

    it('replaces a worker whose event loop a plugin blocks, naming the plugin and hook, while clients are served', async () => {
      const from = server.logs.length;
      const stuck = await SmtpClient.connect(port);
      await stuck.expect(/^220 /);
      await stuck.ehlo();
      await stuck.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      stuck.write('RCPT TO:<spin@hamburger.test>\r\n');
      // The other worker serves new clients meanwhile.
      for (let i = 200; i < 210; i++) await sendOne(port, i);
      const killed = await server.waitForLog(
        (l) => l.level === 50 && typeof l.msg === 'string' && /replacing it$/.test(l.msg),
        20_000,
        from,
      );
      assert.equal(killed.plugin, 'rules');
      assert.equal(killed.hook, 'rcpt');
      assert.match(killed.msg!, /worker blocked in plugin rules \(hook rcpt\)/);
      await stuck.closed(10_000);
      await server.waitForLog((l) => l.msg === 'worker started' && l.worker === killed.worker, 15_000, from);
      for (let i = 210; i < 220; i++) await sendOne(port, i);
    });

    it('limits connections per client address across workers, not per worker', async () => {
      const from = server.logs.length;
      setup.write({
        workers: 2,
        watchdog: '2s',
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0, limits: { maxConnectionsPerIp: 3 } }],
      });
      server.signal('SIGHUP');
      await server.waitForLog((l) => l.msg === 'config reloaded' && l.worker === undefined, 15_000, from);
      const clients: SmtpClient[] = [];
      const greetings: string[] = [];
      for (let i = 0; i < 8; i++) {
        const c = await SmtpClient.connect(port);
        clients.push(c);
        greetings.push((await c.reply()).raw);
      }
      assert.equal(greetings.filter((g) => g.startsWith('220 ')).length, 3, greetings.join(''));
      assert.equal(greetings.filter((g) => /^421 .*Too many connections/.test(g)).length, 5);
      for (const c of clients) c.close();
      setup.write({ workers: 2, watchdog: '2s' });
      const again = server.logs.length;
      server.signal('SIGHUP');
      await server.waitForLog((l) => l.msg === 'config reloaded' && l.worker === undefined, 15_000, again);
    });

    it('applies a reload to every worker, or to none when one worker cannot set it up', async () => {
      let from = server.logs.length;
      setup.write({ workers: 2, watchdog: '2s' }, { failSetup: true });
      server.signal('SIGHUP');
      const refused = await server.waitForLog(
        (l) => l.msg === 'reload refused; keeping the running config' && l.worker === undefined,
        15_000,
        from,
      );
      assert.match(String(refused.err), /this setup always fails/);
      // Still the old rules everywhere.
      for (let i = 300; i < 306; i++) await sendOne(port, i);

      from = server.logs.length;
      setup.write({ workers: 2, watchdog: '2s', smtp: { banner: 'ESMTP reloaded' } });
      server.signal('SIGHUP');
      await server.waitForLog((l) => l.msg === 'config reloaded' && l.worker === undefined, 15_000, from);
      for (const w of [0, 1])
        await server.waitForLog((l: LogLine) => l.msg === 'config reloaded' && l.worker === w, 10_000, from);
      for (let i = 0; i < 12; i++) {
        const c = await SmtpClient.connect(port);
        await c.expect(/^220 mx\.workers\.test ESMTP reloaded/);
        c.close();
      }
    });

    it('SIGTERM stops every worker, then the primary', async () => {
      const pids = pidsOf(server).concat(
        server.logs.filter((l) => l.msg === 'worker started' && l.pid).map((l) => l.pid as number),
      );
      server.signal('SIGTERM');
      const exit = await server.waitForExit(40_000);
      assert.equal(exit.code, 0);
      for (const pid of pids) {
        assert.throws(() => process.kill(pid, 0), /ESRCH/, `worker ${pid} is gone`);
      }
    });
  });

  describe('one worker', () => {
    let setup: Setup;
    let server: PetrelProcess;
    let port: number;
    before(async () => {
      setup = project({ workers: 1, timeouts: { shutdown: '1s' } });
      server = await start(setup);
      port = portOf(server);
    });

    it('a client that connects while the only worker is replaced waits and is served, not refused', async () => {
      const [victim] = pidsOf(server);
      const from = server.logs.length;
      process.kill(victim!, 'SIGKILL');
      await server.waitForLog((l) => l.msg === 'worker exited; restarting it', 10_000, from);
      // No worker listens now: the primary's socket holds the connection in its backlog.
      const id = await sendOne(port, 700);
      assert.match(id, /queued as /);
      const again = server.logs.slice(from).find((l) => l.msg === 'worker started' && l.pid !== undefined);
      assert.ok(again && again.pid !== victim, 'a new worker served it');
    });

    it('a worker that throws an uncaught exception logs it, exits 70 and is replaced; the server goes on', async () => {
      const from = server.logs.length;
      const c = await SmtpClient.connect(port);
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      c.write('RCPT TO:<crash@hamburger.test>\r\n');
      const fatal = await server.waitForLog((l) => l.msg === 'uncaught exception', 10_000, from);
      assert.equal(fatal.level, 60);
      assert.match(JSON.stringify(fatal.err), /bug in a timer/);
      // It stops as on SIGTERM: the open session gets timeouts.shutdown to finish.
      const exited = await server.waitForLog((l) => l.msg === 'worker exited; restarting it', 20_000, from);
      assert.equal(exited.code, 70);
      c.close();
      await server.waitForLog((l) => l.msg === 'worker started' && l.pid !== exited.pid, 15_000, from);
      await sendOne(port, 701);
      assert.equal(server.exit, null, 'the primary still runs');
    });
  });

  it('after kill -9 of one worker under load, every message that got a 250 is delivered exactly once', async () => {
    const setup = project({ workers: 2 });
    const server = await start(setup);
    const port = server.logs.length ? portOf(server) : 0;
    assert.ok(port > 0);
    const acked: string[] = [];
    const total = 3000;
    const killAt = 800;
    let next = 0;
    let killed = false;
    const client = async (w: number): Promise<void> => {
      while (next < total) {
        let c: SmtpClient | null = null;
        try {
          c = await SmtpClient.connect(port);
          await c.expect(/^220 /);
          await c.ehlo();
          while (next < total) {
            const n = next++;
            const id = `m${n}.w${w}@load.test`;
            c.write(`MAIL FROM:<alice@crepes.test>\r\nRCPT TO:<bob${n % 7}@hamburger.test>\r\nDATA\r\n`);
            await c.expect(/^250 /);
            await c.expect(/^250 /);
            await c.expect(/^354 /);
            c.write(`Message-ID: <${id}>\r\nSubject: load ${n}\r\n\r\nbody of ${n}\r\n.\r\n`);
            const r = await c.reply();
            if (r.code === 250) acked.push(id);
            if (acked.length >= killAt && !killed) {
              killed = true;
              process.kill(pidsOf(server)[1]!, 'SIGKILL');
            }
          }
        } catch {
          // This client's worker died under it: connect again, as a real client would.
        } finally {
          c?.close();
        }
      }
    };
    await Promise.all(Array.from({ length: 8 }, (_, w) => client(w)));
    assert.ok(killed, 'a worker was killed mid-load');
    assert.ok(acked.length > killAt);
    await expectDeliveredOnce(join(setup.dir, 'mail'), acked, 90_000);
    server.signal('SIGTERM');
    await server.waitForExit(40_000);
  });
});
