import { isIPv4, isIPv6 } from 'node:net';

export interface ThrottleOptions {
  /** Failures from one client within the window that lock it out. */
  readonly maxFailures: number;
  readonly windowMs: number;
  readonly lockoutMs: number;
  /** Clients tracked at most; the oldest entries go first when full. */
  readonly maxClients?: number;
}

interface Entry {
  /** When each failure (or attempt still being checked) happened, oldest first. */
  stamps: number[];
  lockedUntil: number;
}

/**
 * The client key failures are counted under: the IPv4 address, or the /64 of an IPv6 address
 * (one host usually has a whole /64, and could otherwise step through it).
 */
export function clientKey(address: string): string {
  const plain = address.replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(plain);
  if (mapped) return mapped[1]!;
  if (isIPv4(plain) || !isIPv6(plain)) return plain;
  const [head = '', tail] = plain.split('::');
  const groups = (s: string): string[] =>
    s === '' ? [] : s.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g]));
  const left = groups(head);
  const right = tail === undefined ? [] : groups(tail);
  const full = [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return `${full
    .slice(0, 4)
    .map((g) => parseInt(g, 16).toString(16))
    .join(':')}::/64`;
}

/**
 * Counts failed AUTH attempts per client across connections, and locks a client out once it
 * has failed `maxFailures` times within the window. An attempt counts as a failure from the
 * moment it starts until it succeeds, so parallel connections cannot each get a guess in before
 * the first failure is recorded.
 */
export class AuthThrottle {
  private readonly clients = new Map<string, Entry>();

  constructor(
    private readonly opts: ThrottleOptions,
    private readonly now: () => number,
  ) {}

  /** Milliseconds the client is still locked out for; 0 when it may try. */
  lockedFor(key: string): number {
    const e = this.entry(key, false);
    if (!e) return 0;
    const t = this.now();
    if (e.lockedUntil > t) return e.lockedUntil - t;
    // Attempts still being checked already fill the allowance: wait for their outcome.
    return e.stamps.length >= this.opts.maxFailures ? 1 : 0;
  }

  /**
   * Starts an attempt (counted as a failure until `succeeded`). Returns a handle, or null when
   * the client is locked out and must not even be checked.
   */
  begin(key: string): number | null {
    if (this.lockedFor(key) > 0) return null;
    const e = this.entry(key, true)!;
    const t = this.now();
    e.stamps.push(t);
    return t;
  }

  /** The attempt failed: keeps it counted, and starts a lockout when the limit is reached. */
  failed(key: string): { failures: number; locked: boolean } {
    const e = this.entry(key, true)!;
    const locked = e.stamps.length >= this.opts.maxFailures;
    if (locked && e.lockedUntil <= this.now()) e.lockedUntil = this.now() + this.opts.lockoutMs;
    return { failures: e.stamps.length, locked };
  }

  /** The attempt succeeded: it no longer counts. Earlier failures still do, until they expire. */
  succeeded(key: string, handle: number): void {
    const e = this.entry(key, false);
    if (!e) return;
    const i = e.stamps.lastIndexOf(handle);
    if (i >= 0) e.stamps.splice(i, 1);
  }

  /** Forgets clients with nothing left to remember. */
  sweep(): void {
    for (const key of [...this.clients.keys()]) this.entry(key, false);
  }

  get size(): number {
    return this.clients.size;
  }

  private entry(key: string, create: boolean): Entry | undefined {
    const t = this.now();
    let e = this.clients.get(key);
    if (e) {
      if (e.lockedUntil > 0 && e.lockedUntil <= t) {
        // A lockout that ended starts the client afresh.
        e.lockedUntil = 0;
        e.stamps = [];
      }
      const since = t - this.opts.windowMs;
      while (e.stamps.length && e.stamps[0]! <= since) e.stamps.shift();
      if (e.stamps.length === 0 && e.lockedUntil <= t && !create) {
        this.clients.delete(key);
        return undefined;
      }
    }
    if (!e && create) {
      const max = this.opts.maxClients ?? 100_000;
      if (this.clients.size >= max) {
        const oldest = this.clients.keys().next().value;
        if (oldest !== undefined) this.clients.delete(oldest);
      }
      e = { stamps: [], lockedUntil: 0 };
      this.clients.set(key, e);
    }
    return e;
  }
}
