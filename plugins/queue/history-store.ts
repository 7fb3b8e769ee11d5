import { existsSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import type { Logger } from 'pino';
import type { Outcome } from './history.js';
import type { WireMessage } from './control.js';

/*
 * The history of finished messages: one SQLite file (node:sqlite) in the queue folder,
 * `history.sqlite`, that every worker writes and `petrel trace` reads, even with the server
 * stopped. Not the State service: its contract is keys with lifetimes, and a trace needs to find
 * a message by Message-ID, sender or recipient; and a queue is this machine's own (each instance
 * keeps its own, the Postfix model), so its history is too, next to the journal it comes from.
 *
 * Writes stay off the delivery path: `add` queues a story and a timer commits what is queued in
 * one transaction every FLUSH_MS. WAL lets readers and one writer proceed together; a busy
 * timeout makes a worker wait for another's commit (`BEGIN IMMEDIATE` takes the write lock
 * first). Commits are not fsynced (`synchronous = NORMAL`): a crashed process loses nothing, a
 * power cut may lose the last commits. The queue removes a finished message's journal records
 * only once its story is committed, and a start re-reads the stories of messages the journal
 * still shows finished, so a crash between the two loses no history.
 *
 * Bounded: a story is kept `retention` after the message finished, and at most `maxMessages`
 * stories (those stored before the last `maxMessages` go, the oldest first); a sweep deletes them
 * at open and every minute, one batch per transaction with the event loop running between.
 * Stories waiting for their commit are at most MAX_PENDING; more are refused (and logged) rather
 * than held in memory while the disk is stuck.
 *
 * Tables (schema version 1, in `PRAGMA user_version`):
 *   messages (id PRIMARY KEY, message_id, sender, received_at ms, finished_at ms, outcome,
 *             report_for, story JSON)
 *   recipients (address, id; PRIMARY KEY (address, id))  — for `--to`
 */

/** The history store's file in the queue folder. */
export const HISTORY_FILE = 'history.sqlite';

const SCHEMA_VERSION = 1;
/** How long a flush waits for another worker's write lock (the event loop stands still meanwhile). */
const BUSY_TIMEOUT_MS = 2000;
const FLUSH_MS = 200;
const SWEEP_MS = 60_000;
/** Stories per transaction, and rows deleted per sweep statement. */
const BATCH = 500;
const MAX_PENDING = 10_000;

/** A finished message's story: its summary as it ended, with when and how. */
export type FinishedMessage = WireMessage & {
  readonly finishedAt: string;
  readonly outcome: Outcome;
};

/** What `petrel trace` looks for; all given criteria must match. */
export interface TraceQuery {
  /** A queue id. */
  readonly id?: string;
  /** A Message-ID, with or without its angle brackets. */
  readonly messageId?: string;
  /** A recipient address (as accepted or as delivered to), any case. */
  readonly to?: string;
  /** The envelope sender, any case; `<>` or the empty string for the null sender. */
  readonly from?: string;
  /** Epoch ms: only messages received since. */
  readonly since?: number;
  /** At most this many, newest first. */
  readonly limit: number;
}

export interface HistoryOptions {
  readonly path: string;
  /** How long a finished message's story is kept, in ms. */
  readonly retention: number;
  /** Stories kept at most. */
  readonly maxMessages: number;
  readonly log?: Logger;
  /** The store's clock, in ms since the epoch (tests move it). */
  readonly now?: () => number;
}

interface Pending {
  readonly story: FinishedMessage;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

/** A Message-ID without its angle brackets and surrounding space, for matching. */
export function bareMessageId(id: string): string {
  return id.trim().replace(/^<(.*)>$/, '$1');
}

export class HistoryStore {
  private static readonly open = new Map<string, { store: HistoryStore; users: number }>();

  private readonly db: DatabaseSync;
  private readonly q: Record<
    | 'begin'
    | 'commit'
    | 'rollback'
    | 'put'
    | 'clearRcpts'
    | 'putRcpt'
    | 'pruneRcpts'
    | 'prune'
    | 'lastRow'
    | 'pruneRcptsBefore'
    | 'pruneBefore',
    StatementSync
  >;
  private pending: Pending[] = [];
  private flushTimer: NodeJS.Timeout | null = null;
  private readonly sweeper: NodeJS.Timeout | null = null;
  private readonly now: () => number;
  private closed = false;
  private sweeping = false;

  private constructor(private readonly opts: HistoryOptions & { readonly reader?: boolean }) {
    this.now = opts.now ?? Date.now;
    if (!opts.reader) mkdirSync(dirname(opts.path), { recursive: true, mode: 0o700 });
    // A reader (petrel trace, perhaps as root) changes nothing: no schema, no journal mode.
    this.db = new DatabaseSync(opts.path, { timeout: BUSY_TIMEOUT_MS, readOnly: opts.reader === true });
    try {
      if (!opts.reader) {
        this.db.exec('PRAGMA journal_mode = WAL');
        this.db.exec('PRAGMA synchronous = NORMAL');
      }
      this.migrate();
      const p = (sql: string): StatementSync => this.db.prepare(sql);
      this.q = {
        begin: p('BEGIN IMMEDIATE'),
        commit: p('COMMIT'),
        rollback: p('ROLLBACK'),
        put: p(
          `INSERT OR REPLACE INTO messages
             (id, message_id, sender, received_at, finished_at, outcome, report_for, story)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
        ),
        clearRcpts: p('DELETE FROM recipients WHERE id = ?'),
        putRcpt: p('INSERT OR IGNORE INTO recipients (address, id) VALUES (?, ?)'),
        pruneRcpts: p(
          `DELETE FROM recipients WHERE id IN
             (SELECT id FROM messages WHERE finished_at < ? ORDER BY finished_at LIMIT ${BATCH})`,
        ),
        prune: p(
          `DELETE FROM messages WHERE id IN
             (SELECT id FROM messages WHERE finished_at < ? ORDER BY finished_at LIMIT ${BATCH})`,
        ),
        // The stories stored before the last `maxMessages` (rowids grow with each story stored):
        // found through the rowid index, never by counting a million rows.
        lastRow: p('SELECT max(rowid) AS n FROM messages'),
        pruneRcptsBefore: p(
          `DELETE FROM recipients WHERE id IN
             (SELECT id FROM messages WHERE rowid <= ? ORDER BY rowid LIMIT ${BATCH})`,
        ),
        pruneBefore: p(
          `DELETE FROM messages WHERE rowid IN
             (SELECT rowid FROM messages WHERE rowid <= ? ORDER BY rowid LIMIT ${BATCH})`,
        ),
      };
    } catch (err) {
      this.db.close();
      throw err;
    }
    if (!opts.reader) {
      this.sweeper = setInterval(() => this.sweepLogged(), SWEEP_MS);
      this.sweeper.unref();
      this.sweepLogged();
    }
  }

  /** The store at `path`, shared by every queue part of this process; `release` when done. */
  static acquire(opts: HistoryOptions): HistoryStore {
    const known = HistoryStore.open.get(opts.path);
    if (known) {
      known.users++;
      return known.store;
    }
    const store = new HistoryStore(opts);
    HistoryStore.open.set(opts.path, { store, users: 1 });
    return store;
  }

  static release(store: HistoryStore): void {
    const known = HistoryStore.open.get(store.opts.path);
    if (!known || known.store !== store) return;
    if (--known.users > 0) return;
    HistoryStore.open.delete(store.opts.path);
    store.close();
  }

  /** Opens the store to read it (for `petrel trace`), or null when there is none yet. */
  static reader(path: string): HistoryStore | null {
    if (!existsSync(path)) return null;
    return new HistoryStore({ path, retention: Infinity, maxMessages: Infinity, reader: true });
  }

  private migrate(): void {
    const version = Number(
      (this.db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version,
    );
    if (version === SCHEMA_VERSION) return;
    if (version > SCHEMA_VERSION)
      throw new Error(
        `${this.opts.path} was written by a newer Petrel (schema ${version}; this one reads ${SCHEMA_VERSION})`,
      );
    if (this.opts.reader) throw new Error(`${this.opts.path} is not a message history (no schema yet)`);
    this.db.exec(`
      BEGIN IMMEDIATE;
      CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        message_id TEXT,
        sender TEXT NOT NULL COLLATE NOCASE,
        received_at INTEGER NOT NULL,
        finished_at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        report_for TEXT,
        story TEXT NOT NULL
      );
      CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished_at);
      CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id);
      CREATE INDEX IF NOT EXISTS messages_sender ON messages (sender);
      CREATE INDEX IF NOT EXISTS messages_report_for ON messages (report_for);
      CREATE TABLE IF NOT EXISTS recipients (
        address TEXT NOT NULL COLLATE NOCASE,
        id TEXT NOT NULL,
        PRIMARY KEY (address, id)
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS recipients_id ON recipients (id);
      PRAGMA user_version = ${SCHEMA_VERSION};
      COMMIT;
    `);
    // The new tables go into the database file now, not at the close: a close on a full disk
    // must not need room the queue's own files had.
    this.db.exec('PRAGMA wal_checkpoint(TRUNCATE)');
  }

  /**
   * Queues a finished message's story; resolves once it is committed (with others, within
   * FLUSH_MS), rejects when it cannot be (the backlog is full, the store cannot be written).
   */
  add(story: FinishedMessage): Promise<void> {
    if (this.closed) return Promise.reject(new Error('the history store is closed'));
    if (this.pending.length >= MAX_PENDING)
      return Promise.reject(new Error(`the history store is ${MAX_PENDING} stories behind`));
    return new Promise((resolve, reject) => {
      this.pending.push({ story, resolve, reject });
      this.flushTimer ??= setTimeout(() => {
        this.flushTimer = null;
        this.flush();
      }, FLUSH_MS);
    });
  }

  /** Commits every queued story now, in transactions of BATCH. */
  flush(): void {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = null;
    while (this.pending.length) {
      const batch = this.pending.splice(0, BATCH);
      try {
        this.q.begin.run();
        try {
          for (const { story } of batch) this.put(story);
          this.q.commit.run();
        } catch (err) {
          this.rollback();
          throw err;
        }
      } catch (err) {
        for (const p of batch) p.reject(err as Error);
        continue;
      }
      for (const p of batch) p.resolve();
    }
  }

  private put(s: FinishedMessage): void {
    const messageId = s.origin?.messageId ? bareMessageId(s.origin.messageId) : null;
    this.q.put.run(
      s.id,
      messageId,
      s.sender,
      Date.parse(s.receivedAt),
      Date.parse(s.finishedAt),
      s.outcome,
      s.origin?.reportFor ?? null,
      JSON.stringify(s),
    );
    this.q.clearRcpts.run(s.id);
    for (const r of s.recipients) {
      this.q.putRcpt.run(r.address, s.id);
      if (r.expandedFrom) this.q.putRcpt.run(r.expandedFrom, s.id);
    }
  }

  /**
   * Deletes stories past the retention, then those stored before the last `maxMessages` (the
   * oldest first), at most `batches` transactions of `BATCH` rows each. Returns how many went.
   */
  sweep(batches = Infinity): number {
    const cutoff = this.now() - this.opts.retention;
    const last = Number((this.q.lastRow.get() as { n: number | null } | undefined)?.n ?? 0);
    const beyond = Number.isFinite(this.opts.maxMessages) ? last - this.opts.maxMessages : 0;
    let removed = 0;
    for (let done = 0; done < batches; done++) {
      this.q.begin.run();
      let n: number;
      try {
        this.q.pruneRcpts.run(cutoff);
        n = Number(this.q.prune.run(cutoff).changes);
        if (n < BATCH && beyond > 0) {
          this.q.pruneRcptsBefore.run(beyond);
          n += Number(this.q.pruneBefore.run(beyond).changes);
        }
        this.q.commit.run();
      } catch (err) {
        this.rollback();
        throw err;
      }
      removed += n;
      if (n < BATCH) return removed;
    }
    return removed;
  }

  /** Ends a failed transaction (SQLite may have rolled it back itself already, after a full disk). */
  private rollback(): void {
    if (this.db.isTransaction) this.q.rollback.run();
  }

  /**
   * The periodic sweep: one transaction at a time, the event loop running between them, so that a
   * sweep of a hundred thousand stories never holds up the mail.
   */
  private sweepLogged(): void {
    if (this.closed || this.opts.reader || this.sweeping) return;
    this.sweeping = true;
    const step = (): void => {
      if (this.closed) {
        this.sweeping = false;
        return;
      }
      try {
        if (this.sweep(1) >= BATCH) {
          setImmediate(step);
          return;
        }
      } catch (err) {
        this.opts.log?.error({ err, path: this.opts.path }, 'message history: sweeping old entries failed');
      }
      this.sweeping = false;
    };
    step();
  }

  /** Finished messages that match, newest first. */
  find(query: TraceQuery): FinishedMessage[] {
    const where: string[] = [];
    const args: (string | number)[] = [];
    if (query.id !== undefined) {
      where.push('m.id = ?');
      args.push(query.id);
    }
    if (query.messageId !== undefined) {
      where.push('m.message_id = ?');
      args.push(bareMessageId(query.messageId));
    }
    if (query.from !== undefined) {
      where.push('m.sender = ?');
      args.push(query.from === '<>' ? '' : query.from);
    }
    if (query.to !== undefined) {
      where.push('m.id IN (SELECT id FROM recipients WHERE address = ?)');
      args.push(query.to);
    }
    if (query.since !== undefined) {
      where.push('m.received_at >= ?');
      args.push(query.since);
    }
    const sql = `SELECT story FROM messages m ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
                 ORDER BY m.received_at DESC LIMIT ?`;
    const rows = this.db.prepare(sql).all(...args, query.limit) as { story: string }[];
    return rows.map((r) => JSON.parse(r.story) as FinishedMessage);
  }

  /** The queue ids of the finished messages that report on `id` (its DSNs). */
  reportsOn(id: string): string[] {
    const rows = this.db.prepare('SELECT id FROM messages WHERE report_for = ? ORDER BY received_at').all(id);
    return rows.map((r) => String(r.id));
  }

  /** Commits what is queued, and closes. */
  close(): void {
    if (this.closed) return;
    if (!this.opts.reader) this.flush();
    this.closed = true;
    if (this.sweeper) clearInterval(this.sweeper);
    this.db.close();
  }
}
