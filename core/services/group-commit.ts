/**
 * Group commit for the embedded State store (state-sqlite.ts): a commit is a write to the WAL
 * file and costs far more than the statements in it (measured here: ~100 µs against ~10 µs), and a
 * busy server issues many writes at once (each session's limits, greylisting, caches). So the
 * writes issued during one turn of the event loop are queued and run, in order, in one
 * transaction at the end of it (`setImmediate`) — or, when the last commit is more recent than the
 * current spacing, once it is that old, so that under load a batch gathers several turns. Each
 * write's promise settles after that commit: none is answered before it is committed.
 *
 * The spacing follows the event loop's load (`Spacing`): none while the loop has time to spare,
 * so a lone session's writes wait for nothing but the end of the turn, growing up to
 * MAX_SPACING_MS while the loop is busy, so that the commits' cost is shared by many writes.
 *
 * A write checks its arguments and what it reads before it writes anything, so one that refuses
 * (throws a TypeError) fails alone and the others of its batch commit; any other error is the
 * store's (busy, disk full): the whole batch is rolled back and every write in it rejects.
 */

/** Writes per transaction at most, so one batch never holds the write lock for long. */
const WRITE_BATCH = 500;
/**
 * The most time between the end of one commit and the start of the next, once the loop is busy.
 * Measured in the defence bench (50 sessions, about 5 writes a message): one turn gathers about 5
 * writes, 1 ms about 16, and the commits cost the event loop a third of what the store cost it; at
 * 4 ms they cost less than half of that, for at most 4 ms more per write. 8 ms saved little more.
 */
const MAX_SPACING_MS = 4;
/** The least spacing other than none: from none, a busy loop starts here and doubles. */
const MIN_SPACING_MS = 0.25;
/** How often the spacing is reconsidered: the loop's utilization over this much time, at least. */
const ADJUST_EVERY_MS = 20;
/**
 * Above BUSY the loop has no time to spare: the spacing doubles. Below IDLE it has, and writes
 * should not wait for a timer while it idles: the spacing halves (once per ADJUST_EVERY_MS that
 * passed, so after a quiet spell it is none). In between it stays.
 */
const BUSY = 0.9;
const IDLE = 0.75;

/**
 * The spacing between commits: none while the event loop has time to spare, up to
 * MAX_SPACING_MS while it is busy. Measured in the defence bench (one worker, 1 KB): a fixed
 * 4 ms held a lone session to 90 messages a second against the plain engine's 1,284, since each
 * of its four writes a message waited for it; no spacing at all cost a third of the rate at 50
 * sessions, where the loop was busy and every turn committed a handful of writes.
 */
export class Spacing implements CommitSpacing {
  private ms = 0;
  private since: number;

  /**
   * `busy(now)` says what share of the time since its last call the loop was busy (by default
   * the event loop's utilization, `performance.eventLoopUtilization`); `start` is when that is
   * counted from.
   */
  constructor(
    private readonly busy: (now: number) => number = loopUtilization(),
    start = performance.now(),
  ) {
    this.since = start;
  }

  /** The current spacing, in milliseconds; reconsidered when ADJUST_EVERY_MS has passed. */
  current(now: number): number {
    const elapsed = now - this.since;
    if (elapsed < ADJUST_EVERY_MS) return this.ms;
    const used = this.busy(now);
    this.since = now;
    if (used > BUSY) this.ms = Math.min(MAX_SPACING_MS, Math.max(MIN_SPACING_MS, this.ms * 2));
    else if (used < IDLE) {
      this.ms /= 2 ** Math.floor(elapsed / ADJUST_EVERY_MS);
      if (this.ms < MIN_SPACING_MS) this.ms = 0;
    }
    return this.ms;
  }
}

/** The event loop's utilization since the last call (the first: since this was made). */
function loopUtilization(): () => number {
  let last = performance.eventLoopUtilization();
  return () => {
    const used = performance.eventLoopUtilization(last).utilization;
    last = performance.eventLoopUtilization();
    return used;
  };
}

/** How long after one commit the next may start, asked each time a batch is due. */
export interface CommitSpacing {
  current(now: number): number;
}

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
  /** When the last batch was committed (performance.now()), for the spacing. */
  private committedAt = -Infinity;

  constructor(
    private readonly commit: (ops: readonly Op[]) => readonly BatchResult[],
    private readonly spacing: CommitSpacing = new Spacing(),
  ) {}

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

  /** At the end of this turn, or once the spacing has passed since the last commit. */
  private schedule(): void {
    const now = performance.now();
    const wait = this.committedAt + this.spacing.current(now) - now;
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
