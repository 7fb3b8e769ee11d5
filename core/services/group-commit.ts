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
 * so a lone session's writes wait for nothing but the end of the turn, and
 * MAX_SPACING_MS as soon as the loop is busy, so that the commits' cost is shared by many writes.
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
/** The least spacing other than none: halving below it gives none. */
const MIN_SPACING_MS = 0.25;
/**
 * Over each BUSY_CHECK_MS (at least), a loop busy more than BUSY of the time has no time to spare:
 * the spacing becomes MAX_SPACING_MS at once, so a burst gathers its writes from its start.
 */
const BUSY_CHECK_MS = 20;
const BUSY = 0.9;
/**
 * Over each IDLE_CHECK_MS (at least), a loop idle more than half of the time (busy under IDLE)
 * has time to spare, and writes should not wait for a timer while it idles: the spacing halves,
 * once per IDLE_CHECK_MS that passed, so after a quiet spell it is none. In between it stays: a
 * busy loop's spacing does not drift down on a short lull.
 */
const IDLE_CHECK_MS = 50;
const IDLE = 0.5;

/** How long after one commit the next may start, asked each time a batch is due. */
export interface CommitSpacing {
  current(now: number): number;
}

/** The event loop's time so far, busy and idle, in ms (as `performance.eventLoopUtilization()`). */
export type LoopTime = () => { readonly active: number; readonly idle: number };

interface Mark {
  readonly at: number;
  readonly active: number;
  readonly idle: number;
}

/** The share of the time between two marks the loop was busy (0 when none passed). */
function busyShare(from: Mark, to: Mark): number {
  const active = to.active - from.active;
  const total = active + to.idle - from.idle;
  return total > 0 ? active / total : 0;
}

/**
 * The spacing between commits: none while the event loop has time to spare, MAX_SPACING_MS while
 * it is busy. Measured in the defence bench (one worker, 1 KB, against the fixed 4 ms before, in
 * the same runs; docs/benchmarks.md): a lone session about 700 messages a second instead of 90,
 * since each of its four writes a message no longer waits out the spacing while the worker idles;
 * 10 sessions 1,183 instead of 840; 50 sessions, where the loop is busy, the same within the
 * noise. No spacing at all cost a third of the rate at 50 sessions, where every turn committed a
 * handful of writes.
 */
export class Spacing implements CommitSpacing {
  private ms = 0;
  private busyMark: Mark;
  private idleMark: Mark;

  /** `loop` tells the loop's time so far (by default the event loop's own); `now` is the start. */
  constructor(
    private readonly loop: LoopTime = () => performance.eventLoopUtilization(),
    now = performance.now(),
  ) {
    this.busyMark = this.idleMark = this.mark(now);
  }

  /** The current spacing, in milliseconds, reconsidered once BUSY_CHECK_MS has passed. */
  current(now: number): number {
    if (now - this.busyMark.at < BUSY_CHECK_MS) return this.ms;
    const mark = this.mark(now);
    const busy = busyShare(this.busyMark, mark) > BUSY;
    this.busyMark = mark;
    if (busy) {
      this.ms = MAX_SPACING_MS;
      this.idleMark = mark;
    } else if (now - this.idleMark.at >= IDLE_CHECK_MS) {
      if (busyShare(this.idleMark, mark) < IDLE) {
        this.ms /= 2 ** Math.floor((now - this.idleMark.at) / IDLE_CHECK_MS);
        if (this.ms < MIN_SPACING_MS) this.ms = 0;
      }
      this.idleMark = mark;
    }
    return this.ms;
  }

  private mark(at: number): Mark {
    const { active, idle } = this.loop();
    return { at, active, idle };
  }
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
