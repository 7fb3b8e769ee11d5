import type { MetricFamilyJson } from '../../services/metrics.js';

/** The live figures the console shows, read from the summed metric families. */
export interface Figures {
  readonly at: number;
  readonly accepted: number;
  readonly delivered: number;
  readonly deferred: number;
  readonly failed: number;
  readonly connectionsOpen: number;
  /** Messages in the queue by state (queued, deferred, held, attempting). */
  readonly queue: Readonly<Record<string, number>>;
}

/** One point of the graph: messages per second over the interval that ended at `at`. */
export interface RatePoint {
  readonly at: number;
  readonly accepted: number;
  readonly delivered: number;
}

export const SAMPLE_MS = 5000;
/** Points kept: ten minutes. */
const POINTS = 120;
/** Sampling stops after this long without a console page (and starts again with the next one). */
const IDLE_MS = 15 * 60_000;

/** Sums a family's values whose labels match `where`. */
function sum(
  families: readonly MetricFamilyJson[],
  name: string,
  where: Record<string, string> = {},
): number {
  let n = 0;
  for (const f of families) {
    if (f.name !== name) continue;
    for (const v of f.values) {
      if (Object.entries(where).every(([k, want]) => String(v.labels[k]) === want)) n += v.value;
    }
  }
  return n;
}

/** The figures in one collection of every process's families. */
export function figures(processes: readonly (readonly MetricFamilyJson[])[], at: number): Figures {
  const all = processes.flat();
  const queue: Record<string, number> = {};
  for (const f of all) {
    if (f.name !== 'petrel_queue_messages') continue;
    for (const v of f.values) {
      const state = String(v.labels.state ?? 'queued');
      queue[state] = (queue[state] ?? 0) + v.value;
    }
  }
  return {
    at,
    accepted: sum(all, 'petrel_messages_accepted_total'),
    delivered: sum(all, 'petrel_delivery_attempts_total', { result: 'delivered' }),
    deferred: sum(all, 'petrel_delivery_attempts_total', { result: 'deferred' }),
    failed: sum(all, 'petrel_delivery_attempts_total', { result: 'failed' }),
    connectionsOpen: sum(all, 'petrel_connections_open'),
    queue,
  };
}

/**
 * Samples the counters every SAMPLE_MS while the console is in use, and keeps the rates of the
 * last POINTS intervals. A counter that went down (a worker restarted, its counts began again)
 * gives no point for that interval rather than a negative rate.
 */
export class RateSampler {
  private timer: NodeJS.Timeout | null = null;
  private last: Figures | null = null;
  private lastUse = 0;
  private readonly points: RatePoint[] = [];

  constructor(private readonly collect: () => Promise<MetricFamilyJson[][]>) {}

  /** A console page was viewed: sample (again) if not sampling. */
  touch(): void {
    this.lastUse = Date.now();
    if (this.timer) return;
    this.timer = setInterval(() => void this.sample(), SAMPLE_MS);
    this.timer.unref();
    void this.sample();
  }

  rates(): readonly RatePoint[] {
    return this.points;
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private async sample(): Promise<void> {
    if (Date.now() - this.lastUse > IDLE_MS) {
      this.close();
      this.last = null;
      return;
    }
    let now: Figures;
    try {
      now = figures(await this.collect(), Date.now());
    } catch {
      return;
    }
    const prev = this.last;
    this.last = now;
    if (!prev) return;
    const secs = (now.at - prev.at) / 1000;
    const accepted = now.accepted - prev.accepted;
    const delivered = now.delivered - prev.delivered;
    if (secs <= 0 || accepted < 0 || delivered < 0) return;
    this.points.push({ at: now.at, accepted: accepted / secs, delivered: delivered / secs });
    if (this.points.length > POINTS) this.points.splice(0, this.points.length - POINTS);
  }
}
