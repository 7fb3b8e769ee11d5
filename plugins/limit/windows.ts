import type { StateStore } from '../../core/index.js';

/**
 * The counts behind every limit, in the State service, so that every worker and every machine
 * sharing the store count together. Each is a sliding window of events (`addEvent`): one event
 * per connection, message or recipient, under `limit:<what>:<key>`.
 *
 * An event is counted first and checked after: two workers cannot both slip under the limit
 * between a check and a count. An event over the limit is taken back out at once, so a refused
 * attempt does not count: a client that keeps trying is let in again as soon as its earlier,
 * accepted events leave the window.
 */
export class Windows {
  constructor(private readonly state: StateStore) {}

  /**
   * Counts event `id` under `key` if the window has room for it: resolves to the count with it
   * (`allowed`), or to the count that refused it, the event already removed.
   */
  async take(key: string, id: string, opts: { max: number; windowMs: number }): Promise<Taken> {
    const count = await this.state.addEvent(key, id, { windowMs: opts.windowMs });
    if (count <= opts.max) return { allowed: true, count };
    await this.state.removeEvent(key, id);
    return { allowed: false, count };
  }

  /** Moves event `id` to now: a connection still open renews its lease. */
  async renew(key: string, id: string, windowMs: number): Promise<void> {
    await this.state.addEvent(key, id, { windowMs });
  }

  /** Removes event `id` (a connection that closed). */
  async release(key: string, id: string): Promise<void> {
    await this.state.removeEvent(key, id);
  }
}

export interface Taken {
  readonly allowed: boolean;
  /** Events in the window, this one included. */
  readonly count: number;
}
