import type { Logger } from 'pino';
import { postpone, proceed, type DeliverContext, type DeliveryOutcome } from '../../core/index.js';
import type { OutboundRate } from './config.js';
import type { Windows } from './windows.js';

/** `1m`, `30s`, `1500ms`: a rate's window as the config would write it. */
function durationText(ms: number): string {
  for (const [unit, size] of [
    ['d', 86_400_000],
    ['h', 3_600_000],
    ['m', 60_000],
    ['s', 1000],
  ] as const) {
    if (ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

/**
 * Outbound throttling: at most `max` deliveries within any `per` to the domains of one entry,
 * counted in the State service under `limit:outbound:<domains>` so that every worker and every
 * server sharing the store counts together.
 *
 * It answers the `deliver` hook before the transport does: a delivery with a recipient in a
 * throttled domain takes one event in that entry's window (one per delivery, i.e. one SMTP
 * transaction, however many recipients it carries). When the window is full the event is taken
 * back out and the delivery is postponed (`postpone()`): the queue keeps it without counting an
 * attempt and asks again at the time given. That time is one window later, less up to a quarter
 * at random, so a backlog held back together does not come back at the same instant. A delivery
 * let through counts whatever its outcome: the peer saw the transaction.
 */
export class OutboundThrottle {
  private readonly byDomain = new Map<string, OutboundRate>();

  constructor(
    rates: readonly OutboundRate[],
    private readonly windows: Windows,
    private readonly log: Logger,
  ) {
    for (const r of rates) for (const d of r.domains) this.byDomain.set(d, r);
  }

  get enabled(): boolean {
    return this.byDomain.size > 0;
  }

  async check(ctx: Pick<DeliverContext, 'message' | 'recipients'>): Promise<DeliveryOutcome> {
    const rates = new Set<OutboundRate>();
    for (const r of ctx.recipients) {
      const rate = this.byDomain.get(r.address.domainAscii.toLowerCase());
      if (rate) rates.add(rate);
    }
    const taken: { key: string; windowMs: number }[] = [];
    for (const rate of rates) {
      const key = `limit:outbound:${rate.domains.join(',')}`;
      let result;
      try {
        result = await this.windows.take(key, { max: rate.max, windowMs: rate.per });
      } catch (err) {
        // Fails open like every limit of this plugin (README): the peer's own limits still apply.
        this.log.error(
          { queueId: ctx.message.id, limit: 'outbound', counted: rate.domains.join(','), err },
          'limit not checked: the State store failed; letting it through',
        );
        continue;
      }
      if (result.allowed) {
        taken.push({ key, windowMs: rate.per });
        continue;
      }
      await Promise.all(taken.map((t) => this.windows.giveBack(t.key, t.windowMs).catch(() => undefined)));
      const wait = rate.per * (0.75 + Math.random() * 0.25);
      // The queue logs the postponement once, with this reason.
      return postpone(
        Date.now() + wait,
        `throttled: at most ${rate.max} per ${durationText(rate.per)} to ${rate.domains.join(', ')}`,
      );
    }
    return proceed();
  }
}
