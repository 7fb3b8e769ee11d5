import { randomUUID } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import type { StateStore } from '../../core/index.js';

export interface ThrottleOptions {
  /** Failures from one client within the window that lock it out. */
  readonly maxFailures: number;
  readonly windowMs: number;
  readonly lockoutMs: number;
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
 * Counts failed AUTH attempts per client across connections and across every worker (the counts
 * live in the State service), and locks a client out once it has failed `maxFailures` times
 * within the window. An attempt counts as a failure from the moment it starts until it succeeds,
 * so parallel connections cannot each get a guess in before the first failure is recorded.
 *
 * Under the client's key, the State service holds a window of attempts
 * (`users:auth:attempts:<client>`, one event per attempt that failed or is still being checked)
 * and, while it is locked out, a value (`users:auth:lockout:<client>`) that expires when the
 * lockout ends. Starting a lockout empties the window, so a client whose lockout ended starts
 * afresh. Several workers run these steps at once; the order of the steps makes every
 * interleaving safe (see `begin` and `failed`).
 *
 * A State failure rejects, and the auth hook lets it become `451 4.3.0`: the lockout fails
 * closed, since a limit that lets guesses through when it cannot count is no limit.
 */
export class AuthThrottle {
  constructor(
    private readonly state: StateStore,
    private readonly opts: ThrottleOptions,
  ) {}

  /**
   * Starts an attempt (counted as a failure until `succeeded`). Resolves to its id, or to null
   * when the client is locked out and must not even be checked.
   */
  async begin(client: string): Promise<string | null> {
    const k = keys(client);
    // Cheap refusal during a lockout: a hammering client costs a read, not a write.
    if ((await this.state.get(k.lockout)) !== null) return null;
    // Counted first, checked after: two workers cannot both slip under the limit between a check
    // and a count. The lockout is checked again because one may have started in between (a
    // failure elsewhere sets it, then empties the window this attempt may have just joined).
    const id = randomUUID();
    const attempts = await this.state.addEvent(k.attempts, id, { windowMs: this.opts.windowMs });
    if (attempts > this.opts.maxFailures || (await this.state.get(k.lockout)) !== null) {
      await this.state.removeEvent(k.attempts, id);
      return null;
    }
    return id;
  }

  /**
   * The attempt failed: it stays counted. When the count reaches the limit, a lockout starts —
   * once: `lockedOut` is true only for the failure that started it.
   */
  async failed(client: string): Promise<{ failures: number; lockedOut: boolean }> {
    const k = keys(client);
    const failures = await this.state.countEvents(k.attempts, { windowMs: this.opts.windowMs });
    if (failures < this.opts.maxFailures) return { failures, lockedOut: false };
    // "Set if absent": a lockout already running (another worker's) is not extended.
    const lockedOut = await this.state.compareAndSet(k.lockout, null, '1', { ttlMs: this.opts.lockoutMs });
    // Lock first, then forget the failures: an attempt that starts in between sees the lockout.
    if (lockedOut) await this.state.delete(k.attempts);
    return { failures, lockedOut };
  }

  /** The attempt succeeded: it no longer counts. Earlier failures still do, until they expire. */
  async succeeded(client: string, id: string): Promise<void> {
    await this.state.removeEvent(keys(client).attempts, id);
  }
}

function keys(client: string): { attempts: string; lockout: string } {
  return { attempts: `users:auth:attempts:${client}`, lockout: `users:auth:lockout:${client}` };
}
