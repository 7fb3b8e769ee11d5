/**
 * Connections per destination (a recipient domain, or the smarthost): at most
 * `maxConnections` open at once, idle ones kept for `idleTimeout` to carry the next message, and
 * a destination that cannot be reached `backoffAfter` times in a row held back for `backoffTime`.
 *
 * A delivery holds one slot from `acquire` until it hands its connection back (`release`) or
 * gives the slot up (`freeSlot`). An idle connection keeps its slot; the pool frees it when the
 * connection closes or its idle time runs out.
 */
import type { SmtpConnection } from './connection.js';

export interface PoolLimits {
  readonly maxConnections: number;
  readonly maxMessages: number;
  readonly idleTimeout: number;
  readonly backoffAfter: number;
  readonly backoffTime: number;
  readonly quitTimeout: number;
}

interface Idle {
  readonly conn: SmtpConnection;
  readonly timer: NodeJS.Timeout;
  readonly stopWatching: () => void;
}

interface Waiter {
  grant(lease: Lease): void;
  fail(err: Error): void;
}

/** What `acquire` gives: a slot, with an idle connection to use first when one was free. */
export interface Lease {
  readonly conn: SmtpConnection | null;
}

export class BusyError extends Error {
  override readonly name = 'BusyError';
}

export class Destination {
  /** Slots taken: connections open or being opened. */
  private open = 0;
  private readonly idle: Idle[] = [];
  private readonly waiters: Waiter[] = [];
  private failures = 0;
  private heldUntil = 0;
  private lastFailure = '';
  private closing = false;

  constructor(
    readonly key: string,
    private readonly limits: PoolLimits,
    private readonly now: () => number = Date.now,
  ) {}

  /** Connections open (idle ones included) and being opened. */
  get size(): number {
    return this.open;
  }

  /** Nothing open, nobody waiting, nothing remembered: the pool may forget this destination. */
  get unused(): boolean {
    return this.open === 0 && this.waiters.length === 0 && this.failures === 0;
  }

  get idleCount(): number {
    return this.idle.length;
  }

  /** When the destination is backed off: until when, and the failure that caused it. */
  backoff(): { until: Date; reason: string } | null {
    if (this.failures < this.limits.backoffAfter || this.now() >= this.heldUntil) return null;
    return { until: new Date(this.heldUntil), reason: this.lastFailure };
  }

  /** An attempt could not reach any of the destination's hosts. */
  unreachable(reason: string): void {
    this.failures++;
    this.lastFailure = reason;
    // Once past the threshold every further failure (the probe after a hold) holds it again.
    if (this.failures >= this.limits.backoffAfter) this.heldUntil = this.now() + this.limits.backoffTime;
  }

  reached(): void {
    this.failures = 0;
    this.heldUntil = 0;
  }

  /**
   * A slot for one delivery: with the most recently used idle connection if there is one, else a
   * free slot; when every slot is in use, waits (at most `timeoutMs`, or until `signal` aborts)
   * for a delivery to hand one back.
   */
  acquire(signal: AbortSignal, timeoutMs: number): Promise<Lease> {
    if (this.closing) return Promise.reject(new BusyError('shutting down'));
    const idle = this.idle.pop();
    if (idle) {
      clearTimeout(idle.timer);
      idle.stopWatching();
      return Promise.resolve({ conn: idle.conn });
    }
    if (this.open < this.limits.maxConnections) {
      this.open++;
      return Promise.resolve({ conn: null });
    }
    return new Promise((resolve, reject) => {
      const settle = (): void => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
      };
      const waiter: Waiter = {
        grant: (lease) => {
          settle();
          resolve(lease);
        },
        fail: (err) => {
          settle();
          reject(err);
        },
      };
      const giveUp = (err: Error): void => waiter.fail(err);
      const onAbort = (): void => giveUp(signal.reason as Error);
      const timer = setTimeout(
        () =>
          giveUp(
            new BusyError(
              `all ${this.limits.maxConnections} connections to ${this.key} stayed busy for ${timeoutMs} ms`,
            ),
          ),
        timeoutMs,
      );
      signal.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }

  /** Gives up a slot that has no connection (every attempt failed, or the connection was closed). */
  freeSlot(): void {
    const next = this.waiters[0];
    if (next) next.grant({ conn: null });
    else this.open--;
  }

  /**
   * Hands a used connection back with its slot: to a waiting delivery, or kept idle, when it can
   * carry more; otherwise it is closed (QUIT) and the slot freed.
   */
  release(conn: SmtpConnection, reusable: boolean): void {
    conn.unbind();
    if (!reusable || this.closing || conn.closed || conn.messages >= this.limits.maxMessages) {
      void conn.quit(this.limits.quitTimeout);
      this.freeSlot();
      return;
    }
    const next = this.waiters[0];
    if (next) return next.grant({ conn });
    const entry: Idle = {
      conn,
      timer: setTimeout(() => this.retire(entry, true), this.limits.idleTimeout),
      // The server may close an idle connection (its own timeout): forget it at once.
      stopWatching: conn.onClose(() => this.retire(entry, false)),
    };
    entry.timer.unref();
    this.idle.push(entry);
  }

  private retire(entry: Idle, quit: boolean): void {
    const i = this.idle.indexOf(entry);
    if (i < 0) return;
    this.idle.splice(i, 1);
    clearTimeout(entry.timer);
    entry.stopWatching();
    if (quit) void entry.conn.quit(this.limits.quitTimeout);
    else entry.conn.destroy();
    this.freeSlot();
  }

  /** Closes idle connections (QUIT, bounded) and refuses new deliveries; busy ones close when released. */
  async close(): Promise<void> {
    this.closing = true;
    const idle = this.idle.splice(0);
    for (const w of [...this.waiters]) w.fail(new BusyError('shutting down'));
    await Promise.all(
      idle.map(async (e) => {
        clearTimeout(e.timer);
        e.stopWatching();
        await e.conn.quit(this.limits.quitTimeout);
      }),
    );
  }
}

/** Destinations remembered before unused ones are forgotten. */
const SWEEP_AT = 1000;

export class Pool {
  private readonly destinations = new Map<string, Destination>();
  private closed = false;

  constructor(private readonly limits: PoolLimits) {}

  get(key: string): Destination {
    let d = this.destinations.get(key);
    if (!d) {
      if (this.destinations.size >= SWEEP_AT) {
        for (const [k, v] of this.destinations) if (v.unused) this.destinations.delete(k);
      }
      d = new Destination(key, this.limits);
      if (this.closed) void d.close();
      this.destinations.set(key, d);
    }
    return d;
  }

  /** Every destination (for tests and administration). */
  all(): Destination[] {
    return [...this.destinations.values()];
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.destinations.values()].map((d) => d.close()));
  }
}
