import type { DatabaseSync } from 'node:sqlite';
import type { Logger } from 'pino';
import { GroupCommit } from './group-commit.js';
import { Holdings } from './holdings.js';
import {
  applyBatch,
  countEventsAt,
  openStateDb,
  readRate,
  readValue,
  sweepStep,
  type Statements,
  type WriteOp,
} from './state-sqlite-db.js';
import { StateError, type StateStore } from './state.js';

export { rateBuckets } from './state-sqlite-db.js';

/*
 * The embedded State backend: one SQLite file (node:sqlite, no native addon) that every worker
 * process opens (its schema, statements and writes: state-sqlite-db.ts). WAL mode lets readers and
 * the one writer proceed together; a busy timeout makes a worker wait for another's write instead
 * of failing. Every write runs in a `BEGIN IMMEDIATE` transaction, which takes the write lock
 * before reading, so two processes can never both read the old value (a deferred transaction
 * could, and would then fail to commit).
 *
 * Writes are committed in groups: those asked in one turn of the event loop (while it is busy:
 * within 4 ms) share one transaction (group-commit.ts), each still atomic under the write lock
 * and none answered before its commit; rate counts of one key in a group share one upsert and
 * one sum, and one store's held shares of one key one read, one write and one sum
 * (state-sqlite-db.ts, runs), answered as if run one after the other. Each write is stamped
 * with the time it was asked.
 * Reads (`get`, `countEvents`, `addToRate` by 0) do not wait: each runs at once, on what was
 * committed.
 *
 * Why on the event loop, when node:sqlite is synchronous: a thread owning the write connection
 * was tried, and measured in the defence bench on 2 shared cores it cost the event loop more than
 * the writes themselves — waking the thread and being woken by its answer, for each batch.
 */

/**
 * How long an operation waits for another process's write lock. node:sqlite is synchronous, so
 * this is time the worker's event loop stands still: writes here take microseconds, and the bound
 * stays far below the watchdog (`watchdog`, 10 s by default). SQLite's wait is not a queue (the
 * waiter retries, every 100 ms at most), so a process that wrote without pause could keep another
 * out past it; a worker's writes come between sessions' other work and leave the lock free.
 */
const BUSY_TIMEOUT_MS = 2000;
const SWEEP_INTERVAL_MS = 60_000;

export interface SqliteStateOptions {
  /** The database file (its folder is created); `:memory:` for a store private to this process. */
  readonly path: string;
  /** The store's clock, in ms since the epoch (tests move it). */
  readonly now?: () => number;
  /** Where a failed sweep is reported. */
  readonly log?: Logger;
  /** How long to wait for another process's write lock (default 2 s, see BUSY_TIMEOUT_MS). */
  readonly busyTimeoutMs?: number;
}

export class SqliteState implements StateStore {
  private readonly db: DatabaseSync;
  private readonly q: Statements;
  private readonly now: () => number;
  private readonly log: Logger | undefined;
  private readonly sweeper: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly batch: GroupCommit<WriteOp>;
  private readonly holdings: Holdings;

  constructor(opts: SqliteStateOptions) {
    this.now = opts.now ?? Date.now;
    this.log = opts.log;
    ({ db: this.db, q: this.q } = openStateDb(opts.path, opts.busyTimeoutMs ?? BUSY_TIMEOUT_MS));
    const q = this.q;
    this.batch = new GroupCommit<WriteOp>((ops) => applyBatch(q, () => this.db.isTransaction, ops));
    this.holdings = new Holdings((key, opts) => this.hold(key, opts), this.now, this.log);
    // A store in memory belongs to one test and is dropped with it; a timer would keep it alive.
    if (opts.path !== ':memory:') {
      this.sweeper = setInterval(() => void this.sweep(), SWEEP_INTERVAL_MS);
      this.sweeper.unref();
    }
  }

  get(key: string): Promise<string | null> {
    return this.read('get', key, () => readValue(this.q, key, this.now()));
  }

  set(key: string, value: string, opts: { ttlMs: number }): Promise<void> {
    return this.write('set', key, () => ({ op: 'set', key, value, expiresAt: this.expiry(opts.ttlMs) }));
  }

  delete(key: string): Promise<boolean> {
    return this.write('delete', key, () => ({ op: 'delete', key, t: this.now() }));
  }

  increment(key: string, opts: { ttlMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    return this.write('increment', key, () => ({
      op: 'increment',
      key,
      by: integer(by),
      expiresAt: this.expiry(opts.ttlMs),
      t: this.now(),
    }));
  }

  compareAndSet(
    key: string,
    expected: string | null,
    next: string,
    opts: { ttlMs: number },
  ): Promise<boolean>;
  compareAndSet(key: string, expected: string | null, next: null): Promise<boolean>;
  compareAndSet(
    key: string,
    expected: string | null,
    next: string | null,
    opts?: { ttlMs: number },
  ): Promise<boolean> {
    return this.write('compareAndSet', key, () => ({
      op: 'compareAndSet',
      key,
      expected,
      next,
      // Deleting needs no lifetime.
      expiresAt: next === null ? 0 : this.expiry(opts?.ttlMs),
      t: this.now(),
    }));
  }

  addEvent(key: string, id: string, opts: { windowMs: number }): Promise<number> {
    return this.write('addEvent', key, () => {
      this.expiry(opts.windowMs);
      return { op: 'addEvent', key, id, windowMs: opts.windowMs, t: this.now() };
    });
  }

  removeEvent(key: string, id: string): Promise<boolean> {
    return this.write('removeEvent', key, () => ({ op: 'removeEvent', key, id, t: this.now() }));
  }

  countEvents(key: string, opts: { windowMs: number }): Promise<number> {
    return this.read('countEvents', key, () => countEventsAt(this.q, key, opts.windowMs, this.now()));
  }

  addToRate(key: string, opts: { windowMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    if (by === 0)
      return this.read('addToRate', key, () => {
        this.expiry(opts.windowMs);
        return readRate(this.q, key, opts.windowMs, this.now());
      });
    return this.write('addToRate', key, () => {
      this.expiry(opts.windowMs);
      return { op: 'addToRate', key, windowMs: opts.windowMs, by: integer(by), t: this.now() };
    });
  }

  hold(key: string, opts: { leaseMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    return this.write('hold', key, () => {
      this.expiry(opts.leaseMs);
      const op: WriteOp = {
        op: 'hold',
        key,
        holder: this.holdings.holder,
        by: integer(by),
        leaseMs: opts.leaseMs,
        t: this.now(),
      };
      this.holdings.asked(key, by, opts.leaseMs);
      return op;
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // Its shares end with it: asked for now, written by the drain below.
    void this.holdings.giveUp();
    this.closed = true;
    clearInterval(this.sweeper);
    // What was asked before the close is written (or rejected) first.
    this.batch.drain();
    this.db.close();
  }

  /**
   * Deletes expired rows, a batch per statement, between other writes. Every worker sweeps;
   * deleting what another already deleted costs nothing.
   */
  async sweep(): Promise<void> {
    try {
      while (!this.closed && sweepStep(this.q, this.now())) await new Promise((r) => setImmediate(r));
    } catch (err) {
      // Nothing is wrong with what the store answers: expired rows read as absent. Try again later.
      if (!this.closed) this.log?.warn({ err }, 'state: sweeping expired keys failed');
    }
  }

  private expiry(ms: number | undefined): number {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0)
      throw new TypeError(`expected a lifetime in ms greater than 0, got ${ms}`);
    return this.now() + Math.ceil(ms);
  }

  /**
   * Queues a write for the next group commit (`describe` checks the arguments, throwing a
   * TypeError, and stamps the time): it runs under the write lock, so nothing another process
   * writes can come in between its reads and its writes.
   */
  private write<T>(name: string, key: string, describe: () => WriteOp): Promise<T> {
    const wrap = (err: unknown): StateError =>
      new StateError(`state ${name} "${key}": ${(err as Error).message}`, { cause: err });
    if (this.closed) return Promise.reject(new StateError(`state ${name} "${key}": the store is closed`));
    let op: WriteOp;
    try {
      op = describe();
    } catch (err) {
      return Promise.reject(wrap(err));
    }
    return this.batch.run(op, wrap) as Promise<T>;
  }

  /** A read: synchronous underneath, a promise outside, any failure a StateError. */
  private async read<T>(name: string, key: string, fn: () => T): Promise<T> {
    if (this.closed) throw new StateError(`state ${name} "${key}": the store is closed`);
    try {
      return fn();
    } catch (err) {
      throw new StateError(`state ${name} "${key}": ${(err as Error).message}`, { cause: err });
    }
  }
}

/** `by` for increment and addToRate: a safe integer, or a TypeError. */
function integer(by: number): number {
  if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
  return by;
}
