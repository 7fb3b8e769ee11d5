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
 * The least time between the end of one commit and the start of the next. Measured in the
 * defence bench (50 sessions, about 5 writes a message): one turn gathers about 5 writes, 1 ms
 * about 16, and the commits cost the event loop a third of what the store cost it; at 4 ms they
 * cost less than half of that, for at most 4 ms more per write (a session's three or four writes
 * are nothing beside an SMTP round trip). 8 ms saved little more. A write issued when the last
 * commit is older than this waits for no timer.
 */
const COMMIT_SPACING_MS = 4;

/** How each write of a batch went: what it returned, or the TypeError it refused with. */
export type BatchResult = { ok: true; value: unknown } | { ok: false; err: TypeError };

interface PendingWrite<Op> {
  readonly op: Op;
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: unknown) => void;
  readonly fail: (err: unknown) => unknown;
}

/**
 * `commit` runs a batch of writes in one transaction and says how each went, or throws when the
 * store failed (having rolled back: every write of the batch then rejects).
 */
export class GroupCommit<Op> {
  private pending: PendingWrite<Op>[] = [];
  /** When the last batch was committed (performance.now()), for COMMIT_SPACING_MS. */
  private committedAt = -Infinity;

  constructor(private readonly commit: (ops: readonly Op[]) => readonly BatchResult[]) {}

  /**
   * Queues `op` for the next batch; resolves with what it returned once that is committed, or
   * rejects with `fail(err)` of what went wrong.
   */
  run(op: Op, fail: (err: unknown) => unknown = (err) => err): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.pending.push({ op, resolve, reject, fail });
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
    let results: readonly BatchResult[];
    try {
      results = this.commit(batch.map((w) => w.op));
      this.committedAt = performance.now();
    } catch (err) {
      for (const w of batch) w.reject(w.fail(err));
      return;
    }
    batch.forEach((w, i) => {
      const r = results[i]!;
      if (r.ok) w.resolve(r.value);
      else w.reject(w.fail(r.err));
    });
  }
}
