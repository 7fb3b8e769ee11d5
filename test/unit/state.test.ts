import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep, setImmediate as tick } from 'node:timers/promises';
import { createClient } from 'redis';
import { RedisState } from '../../core/services/state-redis.js';
import { SqliteState } from '../../core/services/state-sqlite.js';
import { RATE_BUCKETS, StateError, type StateStore } from '../../core/services/state.js';
import { redisMissing, startRedis, type RedisPeer } from '../harness/redis.js';

const STATE_MODULE = new URL('../../core/services/state-sqlite.js', import.meta.url).href;

/** A back end under test: how to open a store on its one shared storage, as each worker does. */
interface Backend {
  readonly name: string;
  readonly skip: string | false;
  setup(): Promise<void>;
  teardown(): Promise<void>;
  open(clock: () => number): StateStore;
  /**
   * What a child process runs to open a store on the same storage with the real clock: the
   * module to import and the statement that makes `s` from it.
   */
  child(): { module: string; open: string };
}

const REDIS_MODULE = new URL('../../core/services/state-redis.js', import.meta.url).href;

/**
 * The contract of state.ts, the same tests for every back end. The stores' clock is the test's,
 * moved by hand; it starts at the real time so that what a back end stores with its own expiry
 * (Redis) is not reclaimed before the test's clock says so.
 */
function contract(backend: Backend): void {
  describe(`State service contract: ${backend.name}`, { skip: backend.skip }, () => {
    const base = Date.now();
    let now: number;
    const clock = (): number => now;
    const open: StateStore[] = [];
    /** A store on the shared storage, as another worker process would open it. */
    const store = (): StateStore => {
      const s = backend.open(clock);
      open.push(s);
      return s;
    };
    before(() => backend.setup());
    after(async () => {
      for (const s of open) await s.close();
      await backend.teardown();
    });

    it('keeps a value for its lifetime, then reads it as absent', async () => {
      now = base + 1_000_000;
      const a = store();
      await a.set('test:ttl', 'hello', { ttlMs: 1000 });
      now += 999;
      assert.equal(await a.get('test:ttl'), 'hello');
      now += 1;
      assert.equal(await a.get('test:ttl'), null, 'expired at its lifetime');
      assert.equal(await a.delete('test:ttl'), false, 'an expired key is not there to delete');
      await a.set('test:ttl', 'again', { ttlMs: 1000 });
      assert.equal(await a.delete('test:ttl'), true);
      assert.equal(await a.get('test:ttl'), null);
    });

    it('shares values between two stores opened on one file, as two workers do', async () => {
      now = base + 2_000_000;
      const a = store();
      const b = store();
      await a.set('test:shared', 'from a', { ttlMs: 60_000 });
      assert.equal(await b.get('test:shared'), 'from a');
      assert.equal(await b.delete('test:shared'), true);
      assert.equal(await a.get('test:shared'), null);
    });

    it('increments atomically from two stores, within a window fixed at the first increment', async () => {
      now = base + 3_000_000;
      const a = store();
      const b = store();
      const results = await Promise.all(
        Array.from({ length: 50 }, (_, i) => (i % 2 ? a : b).increment('test:count', { ttlMs: 10_000 })),
      );
      assert.deepEqual(
        results.sort((x, y) => x - y),
        Array.from({ length: 50 }, (_, i) => i + 1),
        'each increment saw its own result',
      );
      assert.equal(await a.increment('test:count', { ttlMs: 10_000, by: 5 }), 55);
      now += 9_999;
      assert.equal(
        await b.increment('test:count', { ttlMs: 10_000 }),
        56,
        'later increments keep the lifetime',
      );
      now += 1;
      assert.equal(await b.increment('test:count', { ttlMs: 10_000 }), 1, 'then it starts again');
      await a.set('test:text', 'abc', { ttlMs: 10_000 });
      await assert.rejects(a.increment('test:text', { ttlMs: 10_000 }), (err: unknown) => {
        assert.ok(err instanceof StateError);
        assert.match(err.message, /state increment "test:text": the value is not an integer/);
        return true;
      });
      assert.equal(await a.get('test:text'), 'abc', 'and leaves it alone');
    });

    it('compare-and-set: one of two racing stores wins; a wrong expectation changes nothing', async () => {
      now = base + 4_000_000;
      const a = store();
      const b = store();
      const won = await Promise.all([
        a.compareAndSet('test:lock', null, 'a', { ttlMs: 5000 }),
        b.compareAndSet('test:lock', null, 'b', { ttlMs: 5000 }),
      ]);
      // Which one wins depends on the back end's ordering (two connections to Redis race).
      assert.equal(won.filter(Boolean).length, 1, 'exactly one wins');
      const [winner, loser] = won[0] ? ['a', 'b'] : ['b', 'a'];
      assert.equal(await b.get('test:lock'), winner);
      assert.equal(await b.compareAndSet('test:lock', loser, null), false);
      assert.equal(await b.compareAndSet('test:lock', winner, 'c', { ttlMs: 5000 }), true);
      assert.equal(await a.get('test:lock'), 'c');
      assert.equal(await a.compareAndSet('test:lock', 'c', null), true, 'null deletes');
      assert.equal(await a.get('test:lock'), null);
      await a.set('test:lock', 'old', { ttlMs: 100 });
      now += 100;
      assert.equal(
        await a.compareAndSet('test:lock', null, 'new', { ttlMs: 100 }),
        true,
        'expired is absent',
      );
    });

    it('counts events in a sliding window, and removes one by its id', async () => {
      now = base + 5_000_000;
      const a = store();
      const b = store();
      const window = { windowMs: 1000 };
      assert.equal(await a.addEvent('test:window', 'e1', window), 1);
      now += 400;
      assert.equal(await b.addEvent('test:window', 'e2', window), 2);
      assert.equal(await a.addEvent('test:window', 'e3', window), 3);
      assert.equal(await a.addEvent('test:window', 'e3', window), 3, 'the same id is one event');
      now += 600;
      assert.equal(await b.countEvents('test:window', window), 2, 'e1 left the window');
      assert.equal(await b.removeEvent('test:window', 'e2'), true);
      assert.equal(await b.removeEvent('test:window', 'e2'), false);
      assert.equal(await a.countEvents('test:window', window), 1);
      assert.equal(await a.countEvents('test:window', { windowMs: 100 }), 0, 'a shorter window counts less');
      assert.equal(await a.delete('test:window'), true, 'delete removes a window');
      assert.equal(await a.countEvents('test:window', window), 0);
    });

    it('counts a rate from two stores: every event of the window, at most one sub-bucket more', async () => {
      const windowMs = 2000;
      const width = windowMs / RATE_BUCKETS;
      // At the start of a sub-bucket, so the test knows which sub-bucket each event is in.
      now = Math.ceil((base + 7_000_000) / width) * width;
      const first = now;
      const a = store();
      const b = store();
      const results = await Promise.all(
        Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).addToRate('test:rate', { windowMs })),
      );
      assert.deepEqual(
        results.sort((x, y) => x - y),
        Array.from({ length: 20 }, (_, i) => i + 1),
        'atomic: no two adds see the same count',
      );
      now += 1000;
      assert.equal(await b.addToRate('test:rate', { windowMs, by: 5 }), 25);
      assert.equal(await a.addToRate('test:rate', { windowMs, by: 0 }), 25, 'by 0 only reads');
      now = first + windowMs;
      assert.equal(
        await a.addToRate('test:rate', { windowMs, by: 0 }),
        25,
        "the first events' sub-bucket still overlaps the window",
      );
      now = first + windowMs + width - 1;
      assert.equal(await a.addToRate('test:rate', { windowMs, by: 0 }), 25, 'at most one sub-bucket more');
      now = first + windowMs + width;
      assert.equal(await b.addToRate('test:rate', { windowMs, by: 0 }), 5, 'the first 20 left the window');
      now = first + 1000 + windowMs + width;
      assert.equal(await b.addToRate('test:rate', { windowMs, by: 0 }), 0, 'all of them left it');
    });

    it('takes events back from a rate, never counting below 0; delete removes a rate', async () => {
      now = base + 8_000_000;
      const a = store();
      const b = store();
      const rate = { windowMs: 60_000 };
      assert.equal(await a.addToRate('test:rate-back', rate), 1);
      assert.equal(await b.addToRate('test:rate-back', rate), 2);
      assert.equal(
        await b.addToRate('test:rate-back', { ...rate, by: -1 }),
        1,
        'a refused attempt taken back',
      );
      assert.equal(await a.addToRate('test:rate-back', { ...rate, by: -5 }), 0, 'never below 0');
      await assert.rejects(a.addToRate('test:rate-back', { ...rate, by: 1.5 }), StateError);
      await assert.rejects(a.addToRate('test:rate-back', { windowMs: 0 }), StateError);
      assert.equal(await a.addToRate('test:rate-none', { ...rate, by: 0 }), 0, 'an absent rate counts 0');
      await a.addToRate('test:rate-del', rate);
      assert.equal(await b.delete('test:rate-del'), true, 'delete removes a rate');
      assert.equal(await a.addToRate('test:rate-del', { ...rate, by: 0 }), 0);
      now += rate.windowMs * 2;
      await a.addToRate('test:rate-old', { windowMs: 1000 });
      now += 2000;
      assert.equal(await b.delete('test:rate-old'), false, 'a rate whose events all left is not there');
    });

    it("holds a share per store and reads every store's, never below 0; close gives its share up", async () => {
      now = base + 9_000_000;
      const a = store();
      const b = store();
      const lease = { leaseMs: 60_000 };
      const results = await Promise.all(
        Array.from({ length: 10 }, (_, i) => (i % 2 ? a : b).hold('test:held', lease)),
      );
      assert.deepEqual(
        results.sort((x, y) => x - y),
        Array.from({ length: 10 }, (_, i) => i + 1),
        'atomic: no two holds see the same sum',
      );
      assert.equal(await a.hold('test:held', { ...lease, by: -2 }), 8);
      assert.equal(
        await a.hold('test:held', { ...lease, by: -9 }),
        5,
        'a store gives back only its own share',
      );
      assert.equal(await b.hold('test:held', { ...lease, by: 0 }), 5, 'by 0 only reads');
      await assert.rejects(a.hold('test:held', { ...lease, by: 0.5 }), StateError);
      await assert.rejects(a.hold('test:held', { leaseMs: 0 }), StateError);
      assert.equal(await a.hold('test:held-none', { ...lease, by: 0 }), 0, 'an absent key holds 0');
      const c = store();
      assert.equal(await c.hold('test:held', { ...lease, by: 3 }), 8);
      await c.close();
      assert.equal(await a.hold('test:held', { ...lease, by: 0 }), 5, "a closed store's share is given up");
      assert.equal(await a.delete('test:held'), true, 'delete removes every share');
      assert.equal(await b.hold('test:held', { ...lease, by: 0 }), 0);
    });

    it('renews a share in use while its store is open; a share not renewed ends with its lease', async () => {
      now = base + 10_000_000;
      const a = store();
      const b = store();
      const leaseMs = 1000;
      assert.equal(await a.hold('test:renewed', { leaseMs }), 1);
      now += 600;
      // a looks at its shares every 250 ms and renews those past a third of their lease.
      await sleep(400);
      now += 600;
      assert.equal(await b.hold('test:renewed', { leaseMs, by: 0 }), 1, 'renewed before its lease ended');
      await sleep(400);
      now += 900;
      assert.equal(await b.hold('test:renewed', { leaseMs, by: 0 }), 1, 'and again');
      await a.hold('test:renewed', { leaseMs, by: -1 });
      now += 5000;
      assert.equal(await b.hold('test:renewed', { leaseMs, by: 0 }), 0, 'a share given back is not renewed');
    });

    it('stops counting the share of a store whose process was killed, once its lease ends', async () => {
      const a = backend.open(Date.now);
      open.push(a);
      const { module, open: opener } = backend.child();
      const child = spawn(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `const m = await import(${JSON.stringify(module)});
           const s = ${opener};
           await s.hold('test:killed', { leaseMs: 1000, by: 2 });
           process.stdout.write('held\\n');
           setInterval(() => {}, 1000);`,
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let stderr = '';
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      await new Promise<void>((resolve, reject) => {
        child.stdout.once('data', () => resolve());
        child.once('exit', (code) => reject(new Error(`child exited with ${code}: ${stderr}`)));
      });
      assert.equal(await a.hold('test:killed', { leaseMs: 1000 }), 3);
      // Renewed while it lives.
      await sleep(1200);
      assert.equal(await a.hold('test:killed', { leaseMs: 1000, by: 0 }), 3, 'the living process renews');
      child.kill('SIGKILL');
      await new Promise((resolve) => child.once('exit', resolve));
      await sleep(1100);
      assert.equal(
        await a.hold('test:killed', { leaseMs: 1000, by: 0 }),
        1,
        "only this store's share is left",
      );
    });
  });
}

let sqliteDir: string;
contract({
  name: 'sqlite',
  skip: false,
  setup: async () => {
    sqliteDir = mkdtempSync(join(tmpdir(), 'petrel-state-'));
  },
  teardown: async () => rmSync(sqliteDir, { recursive: true, force: true }),
  open: (now) => new SqliteState({ path: join(sqliteDir, 'state.sqlite'), now }),
  child: () => ({
    module: STATE_MODULE,
    open: `new m.SqliteState({ path: ${JSON.stringify(join(sqliteDir, 'state.sqlite'))} })`,
  }),
});

let contractRedis: RedisPeer | undefined;
contract({
  name: 'redis',
  skip: redisMissing,
  setup: async () => {
    contractRedis = await startRedis();
  },
  teardown: async () => contractRedis?.stop(),
  open: (now) => new RedisState({ url: contractRedis!.url, prefix: 'test:', now }),
  child: () => ({
    module: REDIS_MODULE,
    open: `new m.RedisState({ url: ${JSON.stringify(contractRedis!.url)}, prefix: 'test:' })`,
  }),
});

describe('State service: the sqlite store', () => {
  let dir: string;
  let now: number;
  const open: SqliteState[] = [];
  /** A store on the given file. */
  const store = (path: string): SqliteState => {
    const s = new SqliteState({ path, now: () => now });
    open.push(s);
    return s;
  };

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-state-'));
  });
  after(async () => {
    for (const s of open) await s.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('sweeps expired keys and events away', async () => {
    now = 6_000_000;
    const path = join(dir, 'sweep.sqlite');
    const a = store(path);
    for (let i = 0; i < 2500; i++) await a.set(`test:sweep:${i}`, 'x', { ttlMs: 10 });
    await a.addEvent('test:sweep-window', 'e', { windowMs: 10 });
    await a.addToRate('test:sweep-rate', { windowMs: 10 });
    await a.set('test:keep', 'x', { ttlMs: 60_000 });
    now += 10;
    await a.sweep();
    const { DatabaseSync } = await import('node:sqlite');
    const db = new DatabaseSync(path, { readOnly: true });
    try {
      const rows = (sql: string): number => Number((db.prepare(sql).get() as { n: number }).n);
      assert.equal(rows('SELECT count(*) AS n FROM state_values'), 1, 'only the live key is left');
      assert.equal(rows('SELECT count(*) AS n FROM state_events'), 0);
      assert.equal(
        rows('SELECT count(*) AS n FROM state_rates'),
        1,
        'a rate lives its window and one sub-bucket',
      );
      now += 1;
      await a.sweep();
      assert.equal(rows('SELECT count(*) AS n FROM state_rates'), 0);
    } finally {
      db.close();
    }
  });

  it('commits the writes of one turn together; one that refuses fails alone', async () => {
    now = 7_000_000;
    const a = store(join(dir, 'batch.sqlite'));
    await a.set('test:text', 'not a number', { ttlMs: 60_000 });
    const [counted, refused, stored] = await Promise.allSettled([
      a.increment('test:n', { ttlMs: 60_000 }),
      a.increment('test:text', { ttlMs: 60_000 }),
      a.set('test:v', 'v', { ttlMs: 60_000 }),
    ]);
    assert.deepEqual(counted, { status: 'fulfilled', value: 1 });
    assert.ok(refused.status === 'rejected' && refused.reason instanceof StateError);
    assert.match(String((refused as PromiseRejectedResult).reason), /not an integer/);
    assert.equal(stored.status, 'fulfilled');
    assert.equal(await a.get('test:n'), '1');
    assert.equal(await a.get('test:v'), 'v');
  });

  it('answers rate counts of one key in one batch as if each ran alone, across sub-buckets and deletes', async () => {
    now = 7_200_000;
    const a = store(join(dir, 'runs.sqlite'));
    const minute = { windowMs: 60_000 };
    const batch = [
      a.addToRate('test:run', minute),
      a.addToRate('test:run', { ...minute, by: 2 }),
      a.addToRate('test:other', minute),
      a.addToRate('test:run', { ...minute, by: -5 }),
      a.addToRate('test:run', minute),
      a.delete('test:run'),
      a.addToRate('test:run', minute),
    ];
    // The next sub-bucket (60 s / 20): a count of its own, still in the same batch.
    now += 3000;
    batch.push(a.addToRate('test:run', minute), a.addToRate('test:run', { ...minute, by: 3 }));
    assert.deepEqual(await Promise.all(batch), [1, 3, 1, 0, 0, true, 1, 2, 5]);
    assert.equal(await a.addToRate('test:run', { ...minute, by: 0 }), 5);
    assert.equal(await a.addToRate('test:other', { ...minute, by: 0 }), 1);
    // Once the first sub-bucket has left the window, only the second counts.
    now += 60_000;
    assert.equal(await a.addToRate('test:run', { ...minute, by: 0 }), 4);
  });

  it("answers one store's holds of one key in one batch as if each ran alone, with other stores' shares", async () => {
    now = 7_400_000;
    const path = join(dir, 'hold-runs.sqlite');
    const a = store(path);
    const b = store(path);
    const lease = { leaseMs: 60_000 };
    assert.equal(await b.hold('test:hold-run', { ...lease, by: 4 }), 4);
    // Connections opening and closing: one batch of a's writes.
    const batch = [
      a.hold('test:hold-run', lease),
      a.hold('test:hold-run', lease),
      a.hold('test:hold-run', { ...lease, by: -1 }),
      a.hold('test:hold-other', lease),
      a.hold('test:hold-run', { ...lease, by: -7 }),
      a.hold('test:hold-run', lease),
      a.delete('test:hold-other'),
      a.hold('test:hold-other', { ...lease, by: 0 }),
    ];
    assert.deepEqual(await Promise.all(batch), [5, 6, 5, 1, 4, 5, true, 0]);
    assert.equal(await b.hold('test:hold-run', { ...lease, by: 0 }), 5, "a's share is 1, b's 4");
  });

  it('rejects every write of a batch and keeps none when the file stays locked', async () => {
    now = 7_500_000;
    const path = join(dir, 'locked.sqlite');
    const a = new SqliteState({ path, now: () => now, busyTimeoutMs: 50 });
    open.push(a);
    await a.set('test:before', 'x', { ttlMs: 60_000 });
    const { DatabaseSync } = await import('node:sqlite');
    const other = new DatabaseSync(path);
    other.exec('BEGIN IMMEDIATE');
    const results = await Promise.allSettled([
      a.addToRate('test:rate', { windowMs: 60_000 }),
      a.set('test:during', 'y', { ttlMs: 60_000 }),
    ]);
    other.exec('ROLLBACK');
    other.close();
    for (const r of results) assert.ok(r.status === 'rejected' && r.reason instanceof StateError);
    assert.equal(await a.get('test:during'), null, 'nothing of the batch was kept');
    assert.equal(await a.addToRate('test:rate', { windowMs: 60_000 }), 1, 'works again once free');
  });

  it('writes what was asked before close', async () => {
    now = 8_000_000;
    const path = join(dir, 'close.sqlite');
    const a = new SqliteState({ path, now: () => now });
    const written = a.set('test:last', 'kept', { ttlMs: 60_000 });
    await a.close();
    await written;
    assert.equal(await store(path).get('test:last'), 'kept');
  });

  it('rejects with a StateError once closed', async () => {
    const a = new SqliteState({ path: join(dir, 'closed.sqlite') });
    await a.close();
    await assert.rejects(a.get('test:x'), StateError);
  });

  it('stays atomic while another process writes to the same file at the same time', async () => {
    const path = join(dir, 'processes.sqlite');
    const CHILD_OPS = 3000;
    // Both processes write without pause, which no worker does; SQLite's lock is not a queue, so
    // one could keep the other waiting past the 2 s default. What is tested here is atomicity.
    const busyTimeoutMs = 60_000;
    // The other process: opens the file, waits for "go", then increments and adds events.
    const script = join(dir, 'child.mjs');
    writeFileSync(
      script,
      `import { SqliteState } from ${JSON.stringify(STATE_MODULE)};
       const s = new SqliteState({ path: ${JSON.stringify(path)}, busyTimeoutMs: ${busyTimeoutMs} });
       process.stdout.write('ready\\n');
       process.stdin.once('data', async () => {
         for (let i = 0; i < ${CHILD_OPS}; i++) {
           await s.increment('test:proc', { ttlMs: 600000 });
           await s.addEvent('test:proc-window', 'child-' + i, { windowMs: 600000 });
         }
         await s.close();
         process.exit(0);
       });`,
    );
    const child = spawn(process.execPath, [script], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    await new Promise<void>((resolve, reject) => {
      child.stdout.once('data', () => resolve());
      child.once('exit', (code) =>
        reject(new Error(`child exited with ${code} before it was ready: ${stderr}`)),
      );
    });

    const a = new SqliteState({ path, busyTimeoutMs });
    open.push(a);
    child.stdin.write('go\n');
    let done = false;
    void exited.then(() => (done = true));
    const seen: number[] = [];
    // Keep writing until the other process has finished, yielding so its exit is noticed.
    for (let i = 0; !done; i++) {
      seen.push(await a.increment('test:proc', { ttlMs: 600_000 }));
      await a.addEvent('test:proc-window', `parent-${i}`, { windowMs: 600_000 });
      await tick();
    }
    assert.equal(await exited, 0, stderr);
    const total = await a.increment('test:proc', { ttlMs: 600_000, by: 0 });
    assert.equal(total, CHILD_OPS + seen.length, 'no increment of either process was lost');
    assert.equal(await a.countEvents('test:proc-window', { windowMs: 600_000 }), CHILD_OPS + seen.length);
    const gaps = seen.filter((v, i) => i > 0 && v !== seen[i - 1]! + 1).length;
    assert.ok(gaps > 0, 'the two processes really wrote in between each other');
  });
});

describe('State service: the Redis store', { skip: redisMissing }, () => {
  let redis: RedisPeer;
  const open: StateStore[] = [];
  const store = (opts: Partial<ConstructorParameters<typeof RedisState>[0]> = {}): RedisState => {
    const s = new RedisState({ url: redis.url, ...opts });
    open.push(s);
    return s;
  };
  /** A plain client, to look at what the store wrote. */
  const raw = async <T>(fn: (c: ReturnType<typeof createClient>) => Promise<T>): Promise<T> => {
    const c = createClient({ url: redis.url });
    await c.connect();
    try {
      return await fn(c);
    } finally {
      c.destroy();
    }
  };
  /** Retries `op` until it resolves: the store has reconnected. */
  const whenBack = async <T>(op: () => Promise<T>): Promise<T> => {
    for (let i = 0; ; i++) {
      try {
        return await op();
      } catch (err) {
        if (i === 200) throw err;
        await sleep(50);
      }
    }
  };

  before(async () => {
    redis = await startRedis();
  });
  after(async () => {
    for (const s of open) await s.close();
    await redis.stop();
  });

  it("measures lifetimes on Redis's clock, and lets Redis reclaim what expired", async () => {
    const a = store();
    await a.set('test:clock', 'v', { ttlMs: 60_000 });
    await a.addEvent('test:clock-window', 'e1', { windowMs: 60_000 });
    for (const key of ['petrel:k:test:clock', 'petrel:k:test:clock-window', 'petrel:e:test:clock-window']) {
      const ttl = await raw((c) => c.pTTL(key));
      assert.ok(ttl > 0 && ttl <= 60_000, `${key} expires in Redis too (PTTL ${ttl})`);
    }
    await a.set('test:short', 'v', { ttlMs: 20 });
    await sleep(50);
    assert.equal(await a.get('test:short'), null);
    assert.equal(await raw((c) => c.exists('petrel:k:test:short')), 0, 'and Redis dropped the key');
  });

  it('keeps each prefix to itself, so servers can share one Redis', async () => {
    const a = store({ prefix: 'one:' });
    const b = store({ prefix: 'two:' });
    await a.set('test:prefix', 'a', { ttlMs: 60_000 });
    assert.equal(await b.get('test:prefix'), null);
    assert.deepEqual(await raw((c) => c.keys('*test:prefix')), ['one:k:test:prefix']);
  });

  it('rejects with a StateError while Redis is down, and works again once it is back', async () => {
    const a = store();
    await a.set('test:outage', 'before', { ttlMs: 60_000 });
    await redis.stop();
    await assert.rejects(a.get('test:outage'), (err: unknown) => {
      assert.ok(err instanceof StateError);
      assert.match(err.message, /^state get "test:outage": /);
      return true;
    });
    await assert.rejects(a.increment('test:outage-count', { ttlMs: 60_000 }), StateError);
    await redis.start();
    await whenBack(() => a.set('test:outage', 'after', { ttlMs: 60_000 }));
    assert.equal(await a.get('test:outage'), 'after');
    assert.equal(
      await a.get('test:outage-count'),
      null,
      'an operation that failed while Redis was down is not applied once it is back',
    );
  });

  it('rejects with a StateError when Redis does not answer within the timeout', async () => {
    const a = store({ timeoutMs: 200 });
    await a.set('test:frozen', 'v', { ttlMs: 60_000 });
    redis.pause();
    try {
      await assert.rejects(
        a.get('test:frozen'),
        /state get "test:frozen": the Redis server did not answer within 200 ms/,
      );
    } finally {
      redis.resume();
    }
    assert.equal(await whenBack(() => a.get('test:frozen')), 'v');
  });

  it('starts without Redis: operations reject until it can be reached', async () => {
    const a = new RedisState({ url: 'redis://127.0.0.1:1', timeoutMs: 200 });
    open.push(a);
    await assert.rejects(a.get('test:none'), /state get "test:none": the Redis server is unreachable/);
  });

  it('rejects with a StateError once closed', async () => {
    const a = new RedisState({ url: redis.url });
    await a.close();
    await assert.rejects(a.get('test:x'), /state get "test:x": the store is closed/);
  });
});
