import type { StateStore } from '../../core/index.js';

/**
 * The counts behind every limit, in the State service, so that every worker and every machine
 * sharing the store count together, under `limit:<what>:<key>`:
 *
 * - a rate ("at most N per time": connections, messages, recipients) is a rate counter
 *   (`addToRate`): its cost does not grow with the rate, and it never counts less than the
 *   exact sliding window (an event may count up to 1/20 of the window longer: state.ts);
 * - open connections are held shares (`hold`): each worker holds the connections it has open,
 *   adds one when a connection is let in and gives it back when it closes; the count is every
 *   worker's share summed. A worker that dies without giving its connections back (killed, its
 *   machine lost) stops counting once the lease has passed; while it lives, the store renews it.
 *
 * An event is counted first and checked after: two workers cannot both slip under the limit
 * between a check and a count. An event over the limit is taken back out at once, so a refused
 * attempt does not count: a client that keeps trying is let in again as soon as its earlier,
 * accepted events leave the window (or, for connections, close).
 */
export class Windows {
  constructor(private readonly state: StateStore) {}

  /** Counts one event under `key` if the rate has room for it (see `Taken`). */
  async take(key: string, opts: { max: number; windowMs: number }): Promise<Taken> {
    const count = await this.state.addToRate(key, { windowMs: opts.windowMs });
    if (count <= opts.max) return { allowed: true, count };
    await this.giveBack(key, opts.windowMs);
    return { allowed: false, count };
  }

  /** Takes back an event `take` counted (a later limit refused the command). */
  async giveBack(key: string, windowMs: number): Promise<void> {
    await this.state.addToRate(key, { windowMs, by: -1 });
  }

  /** Counts one more open connection under `key` if there is room for it (see `Taken`). */
  async open(key: string, opts: { max: number; lease: number }): Promise<Taken> {
    const count = await this.state.hold(key, { leaseMs: opts.lease });
    if (count <= opts.max) return { allowed: true, count };
    await this.close(key, opts.lease);
    return { allowed: false, count };
  }

  /** Gives back a connection `open` counted (it closed, or a later limit refused it). */
  async close(key: string, lease: number): Promise<void> {
    await this.state.hold(key, { leaseMs: lease, by: -1 });
  }
}

export interface Taken {
  /** Counted: the count, this event included, is within the limit. Otherwise already taken back. */
  readonly allowed: boolean;
  /** Events counted, this one included. */
  readonly count: number;
}
