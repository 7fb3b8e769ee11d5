import type { Entry } from './store.js';

/** A first-in, first-out line that does not copy itself on every take. */
class Line<T> {
  private items: (T | undefined)[] = [];
  private head = 0;

  get size(): number {
    return this.items.length - this.head;
  }

  push(item: T): void {
    this.items.push(item);
  }

  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const item = this.items[this.head];
    this.items[this.head++] = undefined;
    // Taken items are dropped now and then, not on every take.
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }
}

/** Lines by destination, taken from in turn. */
class Lanes {
  private readonly lanes = new Map<string, Line<Entry>>();
  /** Destinations with entries waiting, in the order of their next turn. */
  private readonly turns = new Line<string>();

  push(e: Entry, destination: string): void {
    let lane = this.lanes.get(destination);
    if (!lane) {
      lane = new Line();
      this.lanes.set(destination, lane);
      this.turns.push(destination);
    }
    lane.push(e);
  }

  shift(): Entry | undefined {
    const destination = this.turns.shift();
    if (destination === undefined) return undefined;
    const lane = this.lanes.get(destination)!;
    const e = lane.shift()!;
    if (lane.size > 0) this.turns.push(destination);
    else this.lanes.delete(destination);
    return e;
  }

  /** Destinations with entries waiting. */
  get destinations(): number {
    return this.lanes.size;
  }
}

/**
 * The messages due now, waiting for a delivery slot (the queue's `concurrency`). Contract:
 * - **By destination, in turn.** Each message waits in the line of its destination (the domain of
 *   its first recipient not yet final), and the lines are served round-robin, one message each,
 *   as Postfix's queue manager does: a destination with a large backlog (a flush after an outage)
 *   gets one slot in every round, not all of them, and the others are not starved.
 * - **New mail alternates with retries.** Messages never tried yet have lines of their own, and a
 *   take alternates between new mail and retries when both wait: a backlog of retries does not
 *   hold up new mail, and new mail does not hold up the backlog.
 * - Each message is in it once (`add` of one already waiting does nothing). An entry taken may
 *   have finished or been held since it was added: the taker checks.
 */
export class ReadyQueue {
  private readonly fresh = new Lanes();
  private readonly retries = new Lanes();
  private readonly members = new Set<Entry>();
  private freshTurn = true;

  get size(): number {
    return this.members.size;
  }

  has(e: Entry): boolean {
    return this.members.has(e);
  }

  add(e: Entry): void {
    if (this.members.has(e)) return;
    this.members.add(e);
    let destination = '';
    let tried = false;
    e.rcpts.forEach((r, i) => {
      if (r.status !== 'pending' && r.status !== 'deferred') return;
      if (!destination) destination = e.domains[i] ?? '';
      if (r.attempts > 0) tried = true;
    });
    (tried ? this.retries : this.fresh).push(e, destination);
  }

  take(): Entry | undefined {
    const first = this.freshTurn ? this.fresh : this.retries;
    const second = this.freshTurn ? this.retries : this.fresh;
    this.freshTurn = !this.freshTurn;
    const e = first.shift() ?? second.shift();
    if (e) this.members.delete(e);
    return e;
  }

  /** Destinations with messages waiting (for `status`). */
  get destinations(): number {
    return this.fresh.destinations + this.retries.destinations;
  }
}
