import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import { accept, definePlugin, routeTo, type PetrelConfigInput } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import { address } from '../../core/testing/index.js';
import { QueueEngine } from './engine.js';
import { Queue } from './api.js';
import { QueueStore } from './store.js';

/**
 * The queue at a size where it matters (kept small enough for CI): a stop while the journal is
 * being read, messages outside the active window, the order in which due messages are served,
 * and compaction that follows the churn.
 */

/** A transport that delivers (in the order asked) once its destination is open, and defers before. */
function gated(isOpen: (domain: string) => boolean, delivered: string[]) {
  return definePlugin({
    name: 'test-gated',
    setup: () => ({
      rcpt: async () => accept(),
      route: async () => routeTo('gated'),
      deliver: async ({ message, recipients }) => ({
        kind: 'results',
        results: recipients.map((r) => {
          if (!isOpen(r.address.domain))
            return {
              recipient: r.address.address,
              status: 'deferred' as const,
              reply: { code: 451, enhanced: '4.4.1', text: 'not now' },
            };
          delivered.push(`${message.id} ${r.address.address}`);
          return {
            recipient: r.address.address,
            status: 'delivered' as const,
            reply: { code: 250, enhanced: '2.0.0', text: 'ok' },
          };
        }),
      }),
    }),
  });
}

async function start(dir: string, plugin: ReturnType<typeof definePlugin>, queue: Record<string, unknown>) {
  const config: PetrelConfigInput = {
    hostname: 'mx.test',
    listeners: [{ kind: 'smtp', port: 0 }],
    spool: { dir: join(dir, 'spool') },
    plugins: [plugin.name, { name: 'queue', config: queue }],
  };
  return Petrel.start({ config, plugins: [plugin], logger: pino({ level: 'silent' }) });
}

async function until(check: () => boolean | Promise<boolean>, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function content(i: number): Buffer {
  return Buffer.from(`Subject: message ${i}\r\nMessage-ID: <${i}@scale.test>\r\n\r\nbody ${i}\r\n`);
}

describe('the queue at scale', () => {
  it('loses and duplicates nothing when it stops in the middle of reading its journal', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-scale-'));
    const queueDir = join(dir, 'spool', 'queue');
    const delivered: string[] = [];
    let open = false;
    const plugin = gated(() => open, delivered);
    // Small segments: the journal is many files, read one at a time.
    const settings = { retry: '1h...', segmentSize: 65_536 };
    const count = 1200;
    let app = await start(dir, plugin, settings);
    try {
      const queue = resolveToken(app.generation.container, Queue);
      const ids: string[] = [];
      for (let i = 0; i < count; i++)
        ids.push(
          await queue.submit({
            sender: address('alice@crepes.test'),
            recipients: [{ address: address(`bob${i % 7}@far${i % 3}.test`) }],
            content: content(i),
          }),
        );
      const engine = QueueEngine.get(queueDir)!;
      await until(
        () => [...engine.store.entries.values()].every((e) => e.rcpts[0]!.attempts === 1),
        'every message tried once',
      );
      await app.stop(1000);
      const segments = readdirSync(join(queueDir, 'journal')).length;
      assert.ok(segments > 10, `the journal is ${segments} segments`);

      // A start that stops while it reads: after the first segments, before the last.
      const log = { warn: () => undefined, error: () => undefined };
      const store = new QueueStore(queueDir, 65_536, log);
      await store.open();
      await new Promise((r) => setImmediate(r));
      await store.close();
      assert.equal(store.isIndexed, false, 'the stop came before the journal was wholly read');
      assert.ok(store.entries.size < count, `${store.entries.size} messages known at the stop`);

      open = true;
      app = await start(dir, plugin, settings);
      const again = resolveToken(app.generation.container, Queue);
      assert.equal(await again.flush(), count, 'every message is there again, deferred');
      await until(() => delivered.length >= count, 'every message delivered');
      await until(async () => (await again.list()).length === 0, 'the queue emptied');
      assert.equal(delivered.length, count, 'none delivered twice');
      assert.deepEqual(new Set(delivered.map((d) => d.split(' ')[0])), new Set(ids));
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('tries deferred messages outside the active window on time, and loads only a window of them', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-scale-'));
    const queueDir = join(dir, 'spool', 'queue');
    const delivered: string[] = [];
    let open = false;
    const window = { messages: 5, bytes: 1 << 20 };
    const settings = { retry: '2s...', activeWindow: window };
    const app = await start(
      dir,
      gated(() => open, delivered),
      settings,
    );
    try {
      const queue = resolveToken(app.generation.container, Queue);
      const count = 60;
      for (let i = 0; i < count; i++)
        await queue.submit({
          sender: address('alice@crepes.test'),
          recipients: [{ address: address(`bob@far${i % 4}.test`) }],
          content: content(i),
        });
      const engine = QueueEngine.get(queueDir)!;
      await until(
        () => [...engine.store.entries.values()].every((e) => e.rcpts[0]!.attempts === 1),
        'every message tried once',
      );
      const loaded = [...engine.store.entries.values()].filter((e) => e.isLoaded).length;
      assert.ok(loaded <= window.messages, `${loaded} messages loaded`);
      // No flush: the retry schedule alone brings every one back, and each loads to be delivered.
      open = true;
      await until(() => delivered.length === count, 'every message delivered on its schedule');
      assert.ok(engine.status().loaded <= window.messages);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('serves due messages by destination in turn, and new mail alternates with a backlog of retries', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-scale-'));
    const queueDir = join(dir, 'spool', 'queue');
    const delivered: string[] = [];
    const opened = new Set<string>();
    // One delivery at a time: the order of deliveries is the order the queue chose.
    const app = await start(
      dir,
      gated((d) => opened.has(d), delivered),
      { retry: '1h...', concurrency: 1 },
    );
    try {
      const queue = resolveToken(app.generation.container, Queue);
      const submit = (to: string, i: number): Promise<string> =>
        queue.submit({
          sender: address('alice@crepes.test'),
          recipients: [{ address: address(to) }],
          content: content(i),
        });
      // A backlog for big.test (an outage), and a few for small.test.
      for (let i = 0; i < 60; i++) await submit(`user${i}@big.test`, i);
      for (let i = 0; i < 4; i++) await submit(`user${i}@small.test`, 100 + i);
      const engine = QueueEngine.get(queueDir)!;
      await until(
        () => [...engine.store.entries.values()].every((e) => e.rcpts[0]!.attempts === 1),
        'every message tried once',
      );
      opened.add('big.test');
      opened.add('small.test');
      opened.add('new.test');
      assert.equal(await queue.flush(), 64);
      // New mail during the drain.
      await submit('someone@new.test', 200);
      await until(() => delivered.length === 65, 'every message delivered');
      const order = delivered.map((d) => d.split('@')[1]);
      const small = order.flatMap((d, k) => (d === 'small.test' ? [k] : []));
      // In turn: small.test's four go in the first rounds, not after big.test's sixty.
      assert.ok(small.at(-1)! < 10, `small.test delivered at ${small.join(', ')}`);
      assert.ok(order.indexOf('new.test') < 5, `new mail delivered at ${order.indexOf('new.test')}`);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('compacts the segments that are mostly dead and leaves those mostly live', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-scale-'));
    try {
      const log = { warn: () => undefined, error: () => undefined };
      const store = new QueueStore(dir, 65_536, log);
      await store.open();
      await store.indexed;
      const env = (id: string) => ({
        id,
        sender: null,
        mailParams: { smtputf8: false },
        recipients: [{ address: address('bob@far.test'), params: {} }],
        receivedAt: Date.now(),
        size: 1500,
      });
      const segmentsOf = (): number[] =>
        readdirSync(join(dir, 'journal'))
          .map((f) => Number(f.slice(0, 8)))
          .sort((a, b) => a - b);
      const add = (id: string, octets: number) =>
        store.add(env(id), { inline: [Buffer.alloc(octets, 0x61)] });
      // Thirty messages, then one that starts a new segment; twenty-six of the thirty finish
      // (their State records go into the second segment).
      const first = [];
      for (let i = 0; i < 30; i++) first.push(await add(`a${i}`, 1500));
      await add('pad1', 30_000);
      for (const e of first.slice(4)) {
        await store.update(e, new Map([[0, { ...e.rcpts[0]!, status: 'delivered' as const }]]));
        await store.discard(e);
      }
      // The first two segments are mostly dead; the next ones, all live.
      await add('pad2', 60_000);
      const dead = segmentsOf().slice(0, -1);
      for (let i = 0; i < 30; i++) await add(`b${i}`, 1500);
      await add('pad3', 30_000);
      const live = segmentsOf()
        .filter((s) => !dead.includes(s))
        .slice(0, -1);
      assert.deepEqual([dead.length, live.length], [2, 2], `segments ${segmentsOf().join(', ')}`);
      await store.compact();
      const after = segmentsOf();
      assert.ok(
        dead.every((s) => !after.includes(s)),
        `the mostly dead segments are gone (${dead.join(', ')} → ${after.join(', ')})`,
      );
      assert.ok(
        live.every((s) => after.includes(s)),
        `the mostly live segments stay (${live.join(', ')} → ${after.join(', ')})`,
      );
      await store.close();

      // What was moved reads back whole, after a restart too.
      const again = new QueueStore(dir, 65_536, log);
      await again.open();
      await again.indexed;
      for (const [id, octets] of [
        ['a0', 1500],
        ['a3', 1500],
        ['pad1', 30_000],
        ['b29', 1500],
      ] as const) {
        await again.use(again.entries.get(id)!, async (e) => {
          const body: Buffer[] = [];
          for await (const c of again.view(e).stream()) body.push(c as Buffer);
          assert.equal(Buffer.concat(body).length, octets);
        });
      }
      assert.equal([...again.entries.keys()].filter((id) => id.startsWith('a')).length, 4);
      await again.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
