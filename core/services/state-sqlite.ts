import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import type { Logger } from 'pino';
import { GroupCommit } from './group-commit.js';
import { RATE_BUCKETS, StateError, type StateStore } from './state.js';

/*
 * The embedded State backend: one SQLite file (node:sqlite, no native addon) that every worker
 * process opens. WAL mode lets readers and the one writer proceed together; a busy timeout makes a
 * worker wait for another's write instead of failing. Every write runs in a `BEGIN IMMEDIATE`
 * transaction, which takes the write lock before reading, so two processes can never both read
 * the old value (a deferred transaction could, and would then fail to commit).
 *
 * Writes are committed in groups: those of one turn of the event loop share one transaction
 * (group-commit.ts), each still atomic under the write lock and none answered before its commit.
 * Reads (`get`, `countEvents`, `addToRate` by 0) do not wait: each runs at once, on what was
 * committed.
 *
 * Tables (schema version 2, in `PRAGMA user_version`; 2 added state_rates):
 *   state_values (key PRIMARY KEY, value TEXT, expires_at ms)      — get/set/increment/CAS
 *   state_events (key, id, at ms, expires_at ms; PRIMARY KEY (key, id)) — sliding windows
 *   state_rates (key, bucket start ms, n, expires_at ms; PRIMARY KEY (key, bucket)) — rate counters
 * A row whose expires_at has passed is treated as absent by every query and deleted by the sweep.
 * A rate counter is at most RATE_BUCKETS + 1 rows: each operation upserts one and sums the rest,
 * a range of the primary key.
 */

const SCHEMA_VERSION = 2;
/**
 * How long an operation waits for another process's write lock. node:sqlite is synchronous, so
 * this is time the worker's event loop stands still: writes here take microseconds, and the bound
 * stays far below the watchdog (`watchdog`, 10 s by default). SQLite's wait is not a queue (the
 * waiter retries, every 100 ms at most), so a process that wrote without pause could keep another
 * out past it; a worker's writes come between sessions' other work and leave the lock free.
 */
const BUSY_TIMEOUT_MS = 2000;
const SWEEP_INTERVAL_MS = 60_000;
/** Rows deleted per statement when sweeping, so one sweep never holds the lock for long. */
const SWEEP_BATCH = 1000;

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

type Row = Record<string, unknown>;

export class SqliteState implements StateStore {
  private readonly db: DatabaseSync;
  private readonly now: () => number;
  private readonly log: Logger | undefined;
  private readonly sweeper: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly batch: GroupCommit;
  private readonly q: Record<
    | 'begin'
    | 'commit'
    | 'rollback'
    | 'getValue'
    | 'putValue'
    | 'setValueKeepTtl'
    | 'deleteValue'
    | 'deleteEvents'
    | 'putEvent'
    | 'countEvents'
    | 'deleteEvent'
    | 'putRate'
    | 'sumRate'
    | 'deleteRates'
    | 'sweepValues'
    | 'sweepEvents'
    | 'sweepRates',
    StatementSync
  >;

  constructor(opts: SqliteStateOptions) {
    this.now = opts.now ?? Date.now;
    this.log = opts.log;
    if (opts.path !== ':memory:') mkdirSync(dirname(opts.path), { recursive: true, mode: 0o700 });
    this.db = new DatabaseSync(opts.path, { timeout: opts.busyTimeoutMs ?? BUSY_TIMEOUT_MS });
    try {
      // WAL: readers do not block the writer nor it them. NORMAL: a commit is not fsynced (only
      // checkpoints are); safe against a crashed process, may lose the last writes on power loss.
      this.db.exec('PRAGMA journal_mode = WAL');
      this.db.exec('PRAGMA synchronous = NORMAL');
      this.migrate();
      const p = (sql: string): StatementSync => this.db.prepare(sql);
      this.q = {
        begin: p('BEGIN IMMEDIATE'),
        commit: p('COMMIT'),
        rollback: p('ROLLBACK'),
        getValue: p('SELECT value FROM state_values WHERE key = ? AND expires_at > ?'),
        putValue: p(
          `INSERT INTO state_values (key, value, expires_at) VALUES (?, ?, ?)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at`,
        ),
        setValueKeepTtl: p('UPDATE state_values SET value = ? WHERE key = ?'),
        deleteValue: p('DELETE FROM state_values WHERE key = ? RETURNING expires_at'),
        deleteEvents: p('DELETE FROM state_events WHERE key = ? RETURNING expires_at'),
        putEvent: p(
          `INSERT INTO state_events (key, id, at, expires_at) VALUES (?, ?, ?, ?)
           ON CONFLICT (key, id) DO UPDATE SET at = excluded.at, expires_at = excluded.expires_at`,
        ),
        countEvents: p('SELECT count(*) AS n FROM state_events WHERE key = ? AND at > ? AND expires_at > ?'),
        deleteEvent: p('DELETE FROM state_events WHERE key = ? AND id = ? RETURNING expires_at'),
        putRate: p(
          `INSERT INTO state_rates (key, bucket, n, expires_at) VALUES (?, ?, ?, ?)
           ON CONFLICT (key, bucket) DO UPDATE SET n = n + excluded.n,
             expires_at = max(expires_at, excluded.expires_at)`,
        ),
        sumRate: p('SELECT total(n) AS n FROM state_rates WHERE key = ? AND bucket > ?'),
        deleteRates: p('DELETE FROM state_rates WHERE key = ? RETURNING expires_at'),
        sweepValues: p(
          `DELETE FROM state_values WHERE key IN
             (SELECT key FROM state_values WHERE expires_at <= ? LIMIT ${SWEEP_BATCH})`,
        ),
        sweepEvents: p(
          `DELETE FROM state_events WHERE (key, id) IN
             (SELECT key, id FROM state_events WHERE expires_at <= ? LIMIT ${SWEEP_BATCH})`,
        ),
        sweepRates: p(
          `DELETE FROM state_rates WHERE (key, bucket) IN
             (SELECT key, bucket FROM state_rates WHERE expires_at <= ? LIMIT ${SWEEP_BATCH})`,
        ),
      };
    } catch (err) {
      this.db.close();
      throw err;
    }
    this.batch = new GroupCommit({
      begin: () => this.q.begin.run(),
      commit: () => this.q.commit.run(),
      rollback: () => this.q.rollback.run(),
      inTransaction: () => this.db.isTransaction,
    });
    // A store in memory belongs to one test and is dropped with it; a timer would keep it alive.
    if (opts.path !== ':memory:') {
      this.sweeper = setInterval(() => void this.sweep(), SWEEP_INTERVAL_MS);
      this.sweeper.unref();
    }
  }

  get(key: string): Promise<string | null> {
    return this.op('get', key, () => {
      const row = this.q.getValue.get(key, this.now()) as Row | undefined;
      return row ? String(row.value) : null;
    });
  }

  set(key: string, value: string, opts: { ttlMs: number }): Promise<void> {
    return this.write('set', key, () => {
      this.q.putValue.run(key, value, this.expiry(opts.ttlMs));
    });
  }

  delete(key: string): Promise<boolean> {
    return this.write('delete', key, () => {
      const t = this.now();
      const rows = [
        ...this.q.deleteValue.all(key),
        ...this.q.deleteEvents.all(key),
        ...this.q.deleteRates.all(key),
      ];
      return rows.some((r) => Number(r.expires_at) > t);
    });
  }

  increment(key: string, opts: { ttlMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    return this.write('increment', key, () => {
      if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
      const row = this.q.getValue.get(key, this.now()) as Row | undefined;
      if (!row) {
        this.q.putValue.run(key, String(by), this.expiry(opts.ttlMs));
        return by;
      }
      const text = String(row.value);
      const next = Number(text) + by;
      if (!/^-?\d+$/.test(text) || !Number.isSafeInteger(next))
        throw new TypeError('the value is not an integer');
      this.q.setValueKeepTtl.run(String(next), key);
      return next;
    });
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
    return this.write('compareAndSet', key, () => {
      const row = this.q.getValue.get(key, this.now()) as Row | undefined;
      if ((row ? String(row.value) : null) !== expected) return false;
      if (next === null) this.q.deleteValue.all(key);
      else this.q.putValue.run(key, next, this.expiry(opts?.ttlMs));
      return true;
    });
  }

  addEvent(key: string, id: string, opts: { windowMs: number }): Promise<number> {
    return this.write('addEvent', key, () => {
      const t = this.now();
      this.q.putEvent.run(key, id, t, this.expiry(opts.windowMs));
      return this.count(key, opts.windowMs, t);
    });
  }

  removeEvent(key: string, id: string): Promise<boolean> {
    return this.write('removeEvent', key, () => {
      const t = this.now();
      return this.q.deleteEvent.all(key, id).some((r) => Number(r.expires_at) > t);
    });
  }

  countEvents(key: string, opts: { windowMs: number }): Promise<number> {
    return this.op('countEvents', key, () => this.count(key, opts.windowMs, this.now()));
  }

  addToRate(key: string, opts: { windowMs: number; by?: number }): Promise<number> {
    const by = opts.by ?? 1;
    const apply = (): number => {
      if (!Number.isSafeInteger(by)) throw new TypeError(`expected an integer to add, got ${by}`);
      this.expiry(opts.windowMs);
      const { width, bucket, oldest } = rateBuckets(this.now(), opts.windowMs);
      if (by !== 0) this.q.putRate.run(key, bucket, by, bucket + width + Math.ceil(opts.windowMs));
      return Math.max(0, Number((this.q.sumRate.get(key, oldest) as Row).n));
    };
    return by === 0 ? this.op('addToRate', key, apply) : this.write('addToRate', key, apply);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // What was asked before the close is written (or rejected) first.
    this.batch.drain();
    this.closed = true;
    clearInterval(this.sweeper);
    this.db.close();
  }

  /**
   * Deletes expired rows, a batch per statement, yielding to the event loop between batches.
   * Every worker sweeps; deleting what another already deleted costs nothing.
   */
  async sweep(): Promise<void> {
    try {
      for (const stmt of [this.q.sweepValues, this.q.sweepEvents, this.q.sweepRates]) {
        while (!this.closed && Number(stmt.run(this.now()).changes) === SWEEP_BATCH) {
          await new Promise((r) => setImmediate(r));
        }
      }
    } catch (err) {
      // Nothing is wrong with what the store answers: expired rows read as absent. Try again later.
      if (!this.closed) this.log?.warn({ err }, 'state: sweeping expired keys failed');
    }
  }

  private count(key: string, windowMs: number, t: number): number {
    return Number((this.q.countEvents.get(key, t - windowMs, t) as Row).n);
  }

  private expiry(ms: number | undefined): number {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0)
      throw new TypeError(`expected a lifetime in ms greater than 0, got ${ms}`);
    return this.now() + Math.ceil(ms);
  }

  /**
   * Queues a write for this turn's transaction (group-commit.ts): `fn` runs under the write lock,
   * so nothing another process writes can come in between its reads and its writes. It must throw
   * (a TypeError) before it writes anything, or not at all.
   */
  private write<T>(name: string, key: string, fn: () => T): Promise<T> {
    if (this.closed) return Promise.reject(new StateError(`state ${name} "${key}": the store is closed`));
    return this.batch.run(fn).catch((err: unknown) => {
      throw new StateError(`state ${name} "${key}": ${(err as Error).message}`, { cause: err });
    });
  }

  /** One operation: synchronous underneath, a promise outside, any failure a StateError. */
  private async op<T>(name: string, key: string, fn: () => T): Promise<T> {
    if (this.closed) throw new StateError(`state ${name} "${key}": the store is closed`);
    try {
      return fn();
    } catch (err) {
      throw new StateError(`state ${name} "${key}": ${(err as Error).message}`, { cause: err });
    }
  }

  private migrate(): void {
    const version = Number((this.db.prepare('PRAGMA user_version').get() as Row).user_version);
    if (version === SCHEMA_VERSION) return;
    if (version > SCHEMA_VERSION)
      throw new Error(`the file was written by a newer Petrel (state schema ${version})`);
    this.db.exec('BEGIN IMMEDIATE');
    try {
      this.db.exec(`
        CREATE TABLE IF NOT EXISTS state_values (
          key TEXT NOT NULL PRIMARY KEY,
          value TEXT NOT NULL,
          expires_at INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS state_values_expiry ON state_values (expires_at);
        CREATE TABLE IF NOT EXISTS state_events (
          key TEXT NOT NULL,
          id TEXT NOT NULL,
          at INTEGER NOT NULL,
          expires_at INTEGER NOT NULL,
          PRIMARY KEY (key, id)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS state_events_expiry ON state_events (expires_at);
        CREATE TABLE IF NOT EXISTS state_rates (
          key TEXT NOT NULL,
          bucket INTEGER NOT NULL,
          n INTEGER NOT NULL,
          expires_at INTEGER NOT NULL,
          PRIMARY KEY (key, bucket)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS state_rates_expiry ON state_rates (expires_at);
        PRAGMA user_version = ${SCHEMA_VERSION};
      `);
      this.db.exec('COMMIT');
    } catch (err) {
      if (this.db.isTransaction) this.db.exec('ROLLBACK');
      throw err;
    }
  }
}

/**
 * The sub-buckets of a rate counter at time `t` (state.ts, "Windows or rates"): their width, the
 * start of the current one, and the start after which a sub-bucket still overlaps the window
 * (one that ends at or before `t - windowMs` counts no more).
 */
export function rateBuckets(t: number, windowMs: number): { width: number; bucket: number; oldest: number } {
  const width = Math.max(1, Math.ceil(windowMs / RATE_BUCKETS));
  const bucket = t - (((t % width) + width) % width);
  return { width, bucket, oldest: t - Math.ceil(windowMs) - width };
}
