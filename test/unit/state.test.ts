import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setImmediate as tick } from 'node:timers/promises';
import { SqliteState } from '../../core/services/state-sqlite.js';
import { StateError } from '../../core/services/state.js';

const STATE_MODULE = new URL('../../core/services/state-sqlite.js', import.meta.url).href;

describe('State service: the sqlite store', () => {
  let dir: string;
  let now: number;
  const clock = (): number => now;
  const open: SqliteState[] = [];
  /** A store on the shared file, as another worker process would open it. */
  const store = (path = join(dir, 'state.sqlite')): SqliteState => {
    const s = new SqliteState({ path, now: clock });
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

  it('keeps a value for its lifetime, then reads it as absent', async () => {
    now = 1_000_000;
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
    now = 2_000_000;
    const a = store();
    const b = store();
    await a.set('test:shared', 'from a', { ttlMs: 60_000 });
    assert.equal(await b.get('test:shared'), 'from a');
    assert.equal(await b.delete('test:shared'), true);
    assert.equal(await a.get('test:shared'), null);
  });

  it('increments atomically from two stores, within a window fixed at the first increment', async () => {
    now = 3_000_000;
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
    now = 4_000_000;
    const a = store();
    const b = store();
    const won = await Promise.all([
      a.compareAndSet('test:lock', null, 'a', { ttlMs: 5000 }),
      b.compareAndSet('test:lock', null, 'b', { ttlMs: 5000 }),
    ]);
    assert.deepEqual(won, [true, false]);
    assert.equal(await b.get('test:lock'), 'a');
    assert.equal(await b.compareAndSet('test:lock', 'b', null), false);
    assert.equal(await b.compareAndSet('test:lock', 'a', 'b', { ttlMs: 5000 }), true);
    assert.equal(await a.get('test:lock'), 'b');
    assert.equal(await a.compareAndSet('test:lock', 'b', null), true, 'null deletes');
    assert.equal(await a.get('test:lock'), null);
    await a.set('test:lock', 'old', { ttlMs: 100 });
    now += 100;
    assert.equal(await a.compareAndSet('test:lock', null, 'new', { ttlMs: 100 }), true, 'expired is absent');
  });

  it('counts events in a sliding window, and removes one by its id', async () => {
    now = 5_000_000;
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

  it('sweeps expired keys and events away', async () => {
    now = 6_000_000;
    const path = join(dir, 'sweep.sqlite');
    const a = store(path);
    for (let i = 0; i < 2500; i++) await a.set(`test:sweep:${i}`, 'x', { ttlMs: 10 });
    await a.addEvent('test:sweep-window', 'e', { windowMs: 10 });
    await a.set('test:keep', 'x', { ttlMs: 60_000 });
    now += 10;
    await a.sweep();
    const { DatabaseSync } = await import('node:sqlite');
    const db = new DatabaseSync(path, { readOnly: true });
    try {
      const rows = (sql: string): number => Number((db.prepare(sql).get() as { n: number }).n);
      assert.equal(rows('SELECT count(*) AS n FROM state_values'), 1, 'only the live key is left');
      assert.equal(rows('SELECT count(*) AS n FROM state_events'), 0);
    } finally {
      db.close();
    }
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
