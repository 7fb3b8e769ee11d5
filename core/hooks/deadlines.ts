/**
 * The deadlines of hook calls in flight, with one timer per timeout length rather than one per
 * call: a busy server makes several hook calls per SMTP command, and arming and clearing a timer
 * for each cost more than the rest of the call's bookkeeping.
 *
 * Calls with the same timeout expire in the order they started, so each length keeps its calls
 * in a list, oldest first, and one timer for the oldest. A call that ends is unlinked at once; the
 * timer is not moved for it (when it fires early it finds nothing due and is armed again for the
 * oldest call left), so it fires at most once per timeout length more than it needs to. When the
 * last call of a list ends, its timer is cleared: nothing is kept waiting for calls not made.
 *
 * Promised: `expire` runs once, no earlier than `ms` after `add`, unless `end` came first;
 * `end` says which came first.
 */
export interface Deadline {
  readonly at: number;
  readonly expire: () => void;
  prev: Deadline | null;
  next: Deadline | null;
  /** Still in its list: neither ended nor expired. */
  live: boolean;
}

class Line {
  head: Deadline | null = null;
  tail: Deadline | null = null;
  timer: NodeJS.Timeout | undefined;

  push(d: Deadline): void {
    d.prev = this.tail;
    if (this.tail) this.tail.next = d;
    else this.head = d;
    this.tail = d;
    if (!this.timer) this.arm(d.at);
  }

  unlink(d: Deadline): void {
    d.live = false;
    if (d.prev) d.prev.next = d.next;
    else this.head = d.next;
    if (d.next) d.next.prev = d.prev;
    else this.tail = d.prev;
    d.prev = d.next = null;
    if (this.head === null && this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
  }

  private arm(at: number): void {
    this.timer = setTimeout(() => this.fire(), Math.max(1, at - performance.now()));
  }

  private fire(): void {
    this.timer = undefined;
    const now = performance.now();
    while (this.head && this.head.at <= now) {
      const d = this.head;
      this.unlink(d);
      d.expire();
    }
    if (this.head && !this.timer) this.arm(this.head.at);
  }
}

export class Deadlines {
  private readonly lines = new Map<number, Line>();

  /** Calls `expire` once `ms` have passed, unless `end` is called first. */
  add(ms: number, expire: () => void): Deadline {
    let line = this.lines.get(ms);
    if (!line) this.lines.set(ms, (line = new Line()));
    const d: Deadline = { at: performance.now() + ms, expire, prev: null, next: null, live: true };
    line.push(d);
    return d;
  }

  /** Ends `d`: true when it had not expired (its `expire` will not run), false when it had. */
  end(d: Deadline, ms: number): boolean {
    if (!d.live) return false;
    this.lines.get(ms)!.unlink(d);
    return true;
  }
}
