/**
 * Group commit for the embedded State store (state-sqlite.ts): a commit is a write to the WAL
 * file and costs far more than the statements in it (measured here: ~100 µs against ~10 µs), and a
 * busy server issues many writes at once (each session's limits, greylisting, caches). So the
 * writes issued during one turn of the event loop are queued and run, in order, in one
 * transaction at the end of it (`setImmediate`) — or, when the last commit is less than
 * COMMIT_SPACING_MS old, once it is that old, so that under load a batch gathers several turns.
 * Each write's promise settles after that commit: none is answered before it is committed.
 *
 * A write checks its arguments and what it reads before it writes anything, so one that refuses
 * (throws a TypeError) fails alone and the others of its batch commit; any other error is the
 * store's (busy, disk full): the whole batch is rolled back and every write in it rejects.
 */

/** Writes per transaction at most, so one batch never holds the write lock for long. */
const WRITE_BATCH = 500;
/**
 * The least time between the end of one commit and the start of the next (measured in the
 * defence bench: one turn gathered about 5 writes, spacing them 1 ms about 16). A write issued
 * when the last commit is older than this waits for no timer.
 */
const COMMIT_SPACING_MS = 1;

/** The store's transaction statements. `begin` takes the write lock (`BEGIN IMMEDIATE`). */
export interface Transactions {
  begin(): void;
  commit(): void;
  rollback(): void;
  inTransaction(): boolean;
}

interface PendingWrite {
  readonly fn: () => unknown;
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: unknown) => void;
}

export class GroupCommit {
  private pending: PendingWrite[] = [];
  /** When the last batch was committed (performance.now()), for COMMIT_SPACING_MS. */
  private committedAt = -Infinity;

  constructor(private readonly tx: Transactions) {}

  /** Queues `fn` for the next batch; resolves with what it returned once that is committed. */
  run<T>(fn: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ fn, resolve: resolve as (value: unknown) => void, reject });
      if (this.pending.length === 1) this.schedule();
    });
  }

  /** Runs every queued write now (the store is about to close). */
  drain(): void {
    while (this.pending.length) this.flush();
  }

  /** At the end of this turn, or once COMMIT_SPACING_MS has passed since the last commit. */
  private schedule(): void {
    const wait = this.committedAt + COMMIT_SPACING_MS - performance.now();
    if (wait <= 0) setImmediate(() => this.flush());
    else setTimeout(() => this.flush(), wait);
  }

  /** Runs the queued writes, WRITE_BATCH at most per transaction, and settles their promises. */
  private flush(): void {
    const batch = this.pending.splice(0, WRITE_BATCH);
    if (this.pending.length) setImmediate(() => this.flush());
    if (!batch.length) return;
    const results: Array<{ ok: true; value: unknown } | { ok: false; err: unknown }> = [];
    try {
      this.tx.begin();
      for (const w of batch) {
        try {
          results.push({ ok: true, value: w.fn() });
        } catch (err) {
          // The write refused before writing: only it fails. Anything else is the store's.
          if (!(err instanceof TypeError)) throw err;
          results.push({ ok: false, err });
        }
      }
      this.tx.commit();
      this.committedAt = performance.now();
    } catch (err) {
      try {
        if (this.tx.inTransaction()) this.tx.rollback();
      } catch {
        // Nothing was committed either way; the failure reported is the first one.
      }
      for (const w of batch) w.reject(err);
      return;
    }
    batch.forEach((w, i) => {
      const r = results[i]!;
      if (r.ok) w.resolve(r.value);
      else w.reject(r.err);
    });
  }
}
