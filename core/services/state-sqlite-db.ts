import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import type { BatchResult } from './group-commit.js';
import { RATE_BUCKETS } from './state.js';

/*
 * The embedded State store's file (state-sqlite.ts): how it is opened, its schema, its
 * statements, and each write as data (`WriteOp`), applied in batches (`applyBatch`). Writes are
 * data so that a batch can see them all before it runs them (rate counts of one key share their
 * statements, and so do held shares of one key: runs).
 *
 * Tables (schema version 3, in `PRAGMA user_version`; 2 added state_rates, 3 state_holds):
 *   state_values (key PRIMARY KEY, value TEXT, expires_at ms)      — get/set/increment/CAS
 *   state_events (key, id, at ms, expires_at ms; PRIMARY KEY (key, id)) — sliding windows
 *   state_rates (key, bucket start ms, n, expires_at ms; PRIMARY KEY (key, bucket)) — rate counters
 *   state_holds (key, holder, n, expires_at ms; PRIMARY KEY (key, holder)) — held shares, one row
 *     per store holding the key, none for a share of 0
 * A row whose expires_at has passed is treated as absent by every query and deleted by the sweep.
 * A rate counter is at most RATE_BUCKETS + 1 rows: each operation upserts one and sums the rest,
 * a range of the primary key.
 */

const SCHEMA_VERSION = 3;
/** Rows deleted per statement when sweeping, so one sweep never holds the lock for long. */
export const SWEEP_BATCH = 1000;

/**
 * A write, as data: what the store was asked, with the time it was asked (`t`, the store's clock)
 * and the lifetimes already turned into expiry times.
 */
export type WriteOp =
  | { readonly op: 'set'; readonly key: string; readonly value: string; readonly expiresAt: number }
  | { readonly op: 'delete'; readonly key: string; readonly t: number }
  | {
      readonly op: 'increment';
      readonly key: string;
      readonly by: number;
      readonly expiresAt: number;
      readonly t: number;
    }
  | {
      readonly op: 'compareAndSet';
      readonly key: string;
      readonly expected: string | null;
      readonly next: string | null;
      readonly expiresAt: number;
      readonly t: number;
    }
  | {
      readonly op: 'addEvent';
      readonly key: string;
      readonly id: string;
      readonly windowMs: number;
      readonly t: number;
    }
  | { readonly op: 'removeEvent'; readonly key: string; readonly id: string; readonly t: number }
  | {
      readonly op: 'addToRate';
      readonly key: string;
      readonly windowMs: number;
      readonly by: number;
      readonly t: number;
    }
  | {
      readonly op: 'hold';
      readonly key: string;
      readonly holder: string;
      readonly by: number;
      readonly leaseMs: number;
      readonly t: number;
    };

export type Statements = Record<
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
  | 'getHold'
  | 'putHold'
  | 'deleteHold'
  | 'sumHolds'
  | 'deleteHolds'
  | 'sweepValues'
  | 'sweepEvents'
  | 'sweepRates'
  | 'sweepHolds',
  StatementSync
>;

type Row = Record<string, unknown>;

/** Applies a run of writes (runs) that share their statements, answering each in `results`. */
type RunApplier = (
  q: Statements,
  ops: readonly WriteOp[],
  run: readonly number[],
  results: BatchResult[],
) => void;

/**
 * Opens (and creates, or migrates) the store's file. WAL: readers do not block the writer nor it
 * them. NORMAL: a commit is not fsynced (only checkpoints are); safe against a crashed process,
 * may lose the last writes on power loss. `busyTimeoutMs`: how long a statement waits for another
 * connection's write lock.
 */
export function openStateDb(path: string, busyTimeoutMs: number): { db: DatabaseSync; q: Statements } {
  if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  const db = new DatabaseSync(path, { timeout: busyTimeoutMs });
  try {
    db.exec('PRAGMA journal_mode = WAL');
    db.exec('PRAGMA synchronous = NORMAL');
    migrate(db);
    return { db, q: prepare(db) };
  } catch (err) {
    db.close();
    throw err;
  }
}

function prepare(db: DatabaseSync): Statements {
  const p = (sql: string): StatementSync => db.prepare(sql);
  return {
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
    getHold: p('SELECT n FROM state_holds WHERE key = ? AND holder = ? AND expires_at > ?'),
    putHold: p(
      `INSERT INTO state_holds (key, holder, n, expires_at) VALUES (?, ?, ?, ?)
       ON CONFLICT (key, holder) DO UPDATE SET n = excluded.n, expires_at = excluded.expires_at`,
    ),
    deleteHold: p('DELETE FROM state_holds WHERE key = ? AND holder = ?'),
    sumHolds: p('SELECT total(n) AS n FROM state_holds WHERE key = ? AND expires_at > ?'),
    deleteHolds: p('DELETE FROM state_holds WHERE key = ? RETURNING expires_at'),
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
    sweepHolds: p(
      `DELETE FROM state_holds WHERE (key, holder) IN
         (SELECT key, holder FROM state_holds WHERE expires_at <= ? LIMIT ${SWEEP_BATCH})`,
    ),
  };
}

/** The value under `key` at `t`, or null. */
export function readValue(q: Statements, key: string, t: number): string | null {
  const row = q.getValue.get(key, t) as Row | undefined;
  return row ? String(row.value) : null;
}

/** Events under `key` within `windowMs` before `t`. */
export function countEventsAt(q: Statements, key: string, windowMs: number, t: number): number {
  return Number((q.countEvents.get(key, t - windowMs, t) as Row).n);
}

/** A rate counter's count at `t` (state.ts, "Windows or rates"), never below 0. */
export function readRate(q: Statements, key: string, windowMs: number, t: number): number {
  return Math.max(0, Number((q.sumRate.get(key, rateBuckets(t, windowMs).oldest) as Row).n));
}

/** Every live share held under `key` at `t`, summed. */
function readHeld(q: Statements, key: string, t: number): number {
  return Number((q.sumHolds.get(key, t) as Row).n);
}

/** `holder`'s live share under `key` at `t` (0 when it holds none). */
function ownShare(q: Statements, key: string, holder: string, t: number): number {
  const row = q.getHold.get(key, holder, t) as Row | undefined;
  return row ? Number(row.n) : 0;
}

/** Writes `holder`'s share under `key`: a row until `expiresAt`, or none for 0. */
function writeShare(q: Statements, key: string, holder: string, n: number, expiresAt: number): void {
  if (n === 0) q.deleteHold.run(key, holder);
  else q.putHold.run(key, holder, n, expiresAt);
}

/**
 * Runs one write; the caller holds the write lock (`BEGIN IMMEDIATE`), so nothing another
 * connection writes comes in between its reads and its writes. It checks what it reads before it
 * writes anything and refuses with a TypeError, having written nothing; any other error is the
 * store's.
 */
export function applyWrite(q: Statements, w: WriteOp): unknown {
  switch (w.op) {
    case 'set':
      q.putValue.run(w.key, w.value, w.expiresAt);
      return undefined;
    case 'delete': {
      const rows = [
        ...q.deleteValue.all(w.key),
        ...q.deleteEvents.all(w.key),
        ...q.deleteRates.all(w.key),
        ...q.deleteHolds.all(w.key),
      ];
      return rows.some((r) => Number(r.expires_at) > w.t);
    }
    case 'increment': {
      const text = readValue(q, w.key, w.t);
      if (text === null) {
        q.putValue.run(w.key, String(w.by), w.expiresAt);
        return w.by;
      }
      const next = Number(text) + w.by;
      if (!/^-?\d+$/.test(text) || !Number.isSafeInteger(next))
        throw new TypeError('the value is not an integer');
      q.setValueKeepTtl.run(String(next), w.key);
      return next;
    }
    case 'compareAndSet': {
      if (readValue(q, w.key, w.t) !== w.expected) return false;
      if (w.next === null) q.deleteValue.all(w.key);
      else q.putValue.run(w.key, w.next, w.expiresAt);
      return true;
    }
    case 'addEvent':
      q.putEvent.run(w.key, w.id, w.t, w.t + Math.ceil(w.windowMs));
      return countEventsAt(q, w.key, w.windowMs, w.t);
    case 'removeEvent':
      return q.deleteEvent.all(w.key, w.id).some((r) => Number(r.expires_at) > w.t);
    case 'addToRate': {
      const { width, bucket } = rateBuckets(w.t, w.windowMs);
      q.putRate.run(w.key, bucket, w.by, bucket + width + Math.ceil(w.windowMs));
      return readRate(q, w.key, w.windowMs, w.t);
    }
    case 'hold': {
      const n = Math.max(0, ownShare(q, w.key, w.holder, w.t) + w.by);
      writeShare(q, w.key, w.holder, n, w.t + Math.ceil(w.leaseMs));
      return readHeld(q, w.key, w.t);
    }
  }
}

/**
 * Runs `ops` in one transaction and says how each went: what it returned, or the TypeError it
 * refused with (it alone fails). Any other error is the store's: the transaction is rolled back
 * and it is thrown, so every write of the batch fails. Rate counts of one key that follow each
 * other share their statements, and so do held shares of one key (runs), with the same answers.
 */
export function applyBatch(
  q: Statements,
  inTransaction: () => boolean,
  ops: readonly WriteOp[],
): BatchResult[] {
  const results: BatchResult[] = [];
  const shared = runs(ops);
  try {
    q.begin.run();
    ops.forEach((w, i) => {
      try {
        const run = shared.get(i);
        if (run === undefined) results[i] = { ok: true, value: applyWrite(q, w) };
        // A run's later members were answered with its first.
        else if (run.length > 0 && w.op === 'hold') applyHoldRun(q, ops, run, results);
        else if (run.length > 0) applyRateRun(q, ops, run, results);
      } catch (err) {
        if (!(err instanceof TypeError)) throw err;
        results[i] = { ok: false, err };
      }
    });
    q.commit.run();
    return results;
  } catch (err) {
    try {
      if (inTransaction()) q.rollback.run();
    } catch {
      // Nothing was committed either way; the failure reported is the first one.
    }
    throw err;
  }
}

/**
 * Writes of one batch that can share their statements, with the same answers as one after the
 * other: `addToRate` writes to one key in one sub-bucket that sum the same sub-buckets (a flood
 * from one client asks for many such at once), and `hold` writes of one store to one key
 * (connections opening and closing) — in both cases with no other write to that key between
 * them. Keyed by the index of a run's first write, whose entry lists the run's indexes; the
 * others' entries are empty. Runs of one write are left out.
 */
function runs(ops: readonly WriteOp[]): Map<number, number[]> {
  /** The run each key is in, while its writes so far in the batch can share. */
  const current = new Map<string, Run>();
  const found = new Map<number, number[]>();
  ops.forEach((w, i) => {
    if (w.op !== 'addToRate' && w.op !== 'hold') {
      current.delete(w.key);
      return;
    }
    const run = current.get(w.key);
    if (run && sameRun(run, w)) {
      run.members.push(i);
      found.set(i, []);
    } else {
      const members = [i];
      current.set(w.key, runOf(w, members));
      found.set(i, members);
    }
  });
  for (const [i, members] of found) if (members.length === 1) found.delete(i);
  return found;
}

/**
 * What the writes of one run share: a rate's window, sub-bucket and first sub-bucket counted
 * (sub-buckets start at multiples of the width: those counted are after `oldest`), or a hold's
 * store.
 */
type Run =
  | {
      readonly op: 'addToRate';
      readonly windowMs: number;
      readonly bucket: number;
      readonly first: number;
      readonly members: number[];
    }
  | { readonly op: 'hold'; readonly holder: string; readonly members: number[] };

function runOf(w: Extract<WriteOp, { op: 'addToRate' | 'hold' }>, members: number[]): Run {
  if (w.op === 'hold') return { op: 'hold', holder: w.holder, members };
  const { width, bucket, oldest } = rateBuckets(w.t, w.windowMs);
  return { op: 'addToRate', windowMs: w.windowMs, bucket, first: Math.floor(oldest / width), members };
}

function sameRun(run: Run, w: Extract<WriteOp, { op: 'addToRate' | 'hold' }>): boolean {
  if (run.op === 'hold') return w.op === 'hold' && run.holder === w.holder;
  if (w.op === 'hold' || run.windowMs !== w.windowMs) return false;
  const { width, bucket, oldest } = rateBuckets(w.t, w.windowMs);
  return run.bucket === bucket && run.first === Math.floor(oldest / width);
}

type AddToRate = Extract<WriteOp, { op: 'addToRate' }>;

/**
 * A run of rate counts (runs) in one upsert of their sum and one read: each is answered what
 * it would have read had they run one after the other, since nothing else wrote the key between
 * them and this connection holds the write lock.
 */
const applyRateRun: RunApplier = (q, ops, run, results) => {
  const first = ops[run[0]!] as AddToRate;
  const { width, bucket, oldest } = rateBuckets(first.t, first.windowMs);
  const total = run.reduce((n, i) => n + (ops[i] as AddToRate).by, 0);
  q.putRate.run(first.key, bucket, total, bucket + width + Math.ceil(first.windowMs));
  let count = Number((q.sumRate.get(first.key, oldest) as Row).n) - total;
  for (const i of run) {
    count += (ops[i] as AddToRate).by;
    results[i] = { ok: true, value: Math.max(0, count) };
  }
};

type Hold = Extract<WriteOp, { op: 'hold' }>;

/**
 * A run of one store's `hold` writes to one key (runs) in one read of its share, one write and
 * one sum: each is answered the sum as it stood after it, the other stores' shares being those
 * at the run's last time (they cannot change in between: this connection holds the write lock;
 * one may only expire, a few milliseconds early). The share is written with the last one's lease.
 */
const applyHoldRun: RunApplier = (q, ops, run, results) => {
  const first = ops[run[0]!] as Hold;
  const last = ops[run[run.length - 1]!] as Hold;
  let n = ownShare(q, first.key, first.holder, first.t);
  const after = run.map((i) => (n = Math.max(0, n + (ops[i] as Hold).by)));
  writeShare(q, first.key, first.holder, n, last.t + Math.ceil(last.leaseMs));
  const others = readHeld(q, first.key, last.t) - n;
  run.forEach((i, k) => (results[i] = { ok: true, value: others + after[k]! }));
};

/**
 * Deletes up to SWEEP_BATCH expired rows of each table at `t`; true when a table had that many
 * (more may be left: call again).
 */
export function sweepStep(q: Statements, t: number): boolean {
  let more = false;
  for (const stmt of [q.sweepValues, q.sweepEvents, q.sweepRates, q.sweepHolds]) {
    if (Number(stmt.run(t).changes) === SWEEP_BATCH) more = true;
  }
  return more;
}

function migrate(db: DatabaseSync): void {
  const version = Number((db.prepare('PRAGMA user_version').get() as Row).user_version);
  if (version === SCHEMA_VERSION) return;
  if (version > SCHEMA_VERSION)
    throw new Error(`the file was written by a newer Petrel (state schema ${version})`);
  db.exec('BEGIN IMMEDIATE');
  try {
    db.exec(`
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
      CREATE TABLE IF NOT EXISTS state_holds (
        key TEXT NOT NULL,
        holder TEXT NOT NULL,
        n INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (key, holder)
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS state_holds_expiry ON state_holds (expires_at);
      PRAGMA user_version = ${SCHEMA_VERSION};
    `);
    db.exec('COMMIT');
  } catch (err) {
    if (db.isTransaction) db.exec('ROLLBACK');
    throw err;
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
