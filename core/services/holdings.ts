import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Logger } from 'pino';

/** The store's own `hold`, which the renewals and the giving up go through. */
type Hold = (key: string, opts: { leaseMs: number; by: number }) => Promise<number>;

/**
 * What one State store holds (state.ts, "Held shares"): its share of each key, as this process
 * asked for it, and when it last wrote each, so that the store renews the shares in use before
 * their lease ends and gives them up when it closes. Both back ends keep one.
 *
 * The shares are tracked as asked, in order, which is the order the store applies them. A write
 * that fails leaves this copy ahead of the store: renewing a share the store does not have costs
 * one write that changes nothing, and a share the store has and this copy does not is simply not
 * renewed, so it ends with its lease (the failure is logged by whoever asked for it).
 */
export class Holdings {
  /** This store's name in the shared storage: host, process and a random part. */
  readonly holder = `${hostname()}/${process.pid}/${randomBytes(4).toString('hex')}`;
  private readonly shares = new Map<string, { n: number; leaseMs: number; writtenAt: number }>();
  private timer: NodeJS.Timeout | undefined;

  /** `now` is the store's clock (tests move it); a renewal that fails is logged to `log`. */
  constructor(
    private readonly hold: Hold,
    private readonly now: () => number,
    private readonly log?: Logger,
  ) {}

  /** Notes a `hold` as it is asked for. */
  asked(key: string, by: number, leaseMs: number): void {
    const share = this.shares.get(key);
    const n = Math.max(0, (share?.n ?? 0) + by);
    if (n === 0) {
      // The timer stops at its next look if nothing is held by then (not at once: a client
      // connecting and leaving over and over would start and stop it each time).
      if (share) this.shares.delete(key);
      return;
    }
    if (share) {
      share.n = n;
      share.leaseMs = leaseMs;
      share.writtenAt = this.now();
      return;
    }
    this.shares.set(key, { n, leaseMs, writtenAt: this.now() });
    if (!this.timer) {
      this.timer = setInterval(() => this.renewDue(), RENEW_CHECK_MS);
      this.timer.unref();
    }
  }

  /**
   * Gives up every share in use and stops renewing: the store is closing. The writes are asked
   * for at once, in this turn; one that fails leaves its share to end with its lease.
   */
  giveUp(): Promise<void> {
    this.stop();
    const held = [...this.shares];
    return Promise.all(
      held.map(([key, s]) => this.hold(key, { leaseMs: s.leaseMs, by: -s.n }).catch(() => undefined)),
    ).then(() => undefined);
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private renewDue(): void {
    if (this.shares.size === 0) return this.stop();
    const now = this.now();
    for (const [key, s] of this.shares) {
      if (now - s.writtenAt < s.leaseMs / 3) continue;
      s.writtenAt = now;
      this.hold(key, { leaseMs: s.leaseMs, by: 0 }).catch((err: unknown) =>
        this.log?.warn({ key, err }, 'state: a held share was not renewed'),
      );
    }
  }
}

/**
 * How often the shares in use are looked at. A lease is at least 1 s where Petrel uses one, so a
 * share is renewed after at most a third of it plus this: well before it ends.
 */
const RENEW_CHECK_MS = 250;
