import type { CounterCell, GaugeCell, MetricsRegistry } from '../../core/index.js';
import type { Entry } from './store.js';

/** Upper bounds of the age bands in `petrel_queue_messages{age}`, in seconds, with their labels. */
const AGE_BANDS: readonly (readonly [number, string])[] = [
  [300, '5m'],
  [3600, '1h'],
  [21_600, '6h'],
  [86_400, '1d'],
  [Infinity, 'older'],
];
const STATES = ['queued', 'deferred', 'held', 'attempting'] as const;
type QueueState = (typeof STATES)[number];
type AttemptResult = 'delivered' | 'deferred' | 'failed';
/** Destination domains counted by name; the rest (a spammer's endless domains) as `other`. */
const MAX_DOMAINS = 200;

/**
 * The queue's metrics, through the core's Metrics service (the same public API any plugin uses):
 * delivery attempts by result and destination domain, the journal's fsync latency and batch size,
 * and, sampled at each scrape, the messages queued by state and age and the oldest one's age.
 * One per registry (per process), shared by every queue part and every config generation.
 */
export class QueueMetrics {
  private static readonly known = new WeakMap<MetricsRegistry, QueueMetrics>();

  static of(metrics: MetricsRegistry): QueueMetrics {
    let m = QueueMetrics.known.get(metrics);
    if (!m) QueueMetrics.known.set(metrics, (m = new QueueMetrics(metrics)));
    return m;
  }

  private readonly attempts;
  private readonly byDomain = new Map<string, Record<AttemptResult, CounterCell>>();
  private readonly fsyncCell;
  private readonly batchCell;
  readonly depth;
  readonly oldest;
  private readonly depthCells = new Map<string, GaugeCell>();
  private readonly oldestCells = new Map<QueueState, GaugeCell>();

  private constructor(private readonly metrics: MetricsRegistry) {
    this.attempts = metrics.counter({
      name: 'petrel_delivery_attempts_total',
      help: `Delivery attempts per recipient, by result and destination domain (past ${MAX_DOMAINS} domains: other)`,
      labelNames: ['result', 'domain'],
    });
    this.fsyncCell = metrics
      .histogram({
        name: 'petrel_journal_fsync_seconds',
        help: 'Time the queue journal took to write and fdatasync one batch',
        buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
      })
      .labels();
    this.batchCell = metrics
      .histogram({
        name: 'petrel_journal_batch_records',
        help: 'Records made durable by one journal fsync (group commit)',
        buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256],
      })
      .labels();
    this.depth = metrics.gauge({
      name: 'petrel_queue_messages',
      help: 'Messages in the queue, by state (queued, deferred, held, attempting) and age band',
      labelNames: ['state', 'age'],
    });
    this.oldest = metrics.gauge({
      name: 'petrel_queue_oldest_seconds',
      help: 'Age of the oldest message in the queue, by state',
      labelNames: ['state'],
    });
    for (const s of STATES) {
      for (const [, band] of AGE_BANDS) this.depthCells.set(`${s} ${band}`, this.depth.labels(s, band));
      this.oldestCells.set(s, this.oldest.labels(s));
    }
  }

  /** One recipient's attempt ended. */
  attempt(result: AttemptResult, domain: string): void {
    let cells = this.byDomain.get(domain);
    if (!cells) {
      const name = this.byDomain.size < MAX_DOMAINS ? domain : 'other';
      cells = this.byDomain.get(name) ?? {
        delivered: this.attempts.labels('delivered', name),
        deferred: this.attempts.labels('deferred', name),
        failed: this.attempts.labels('failed', name),
      };
      this.byDomain.set(name, cells);
    }
    cells[result].inc();
  }

  /** A journal batch of `records` was written and synced in `seconds`. */
  readonly synced = (seconds: number, records: number): void => {
    this.fsyncCell.observe(seconds);
    this.batchCell.observe(records);
  };

  /**
   * Samples the queue's entries at each scrape; returns the function that stops it. `entries`
   * gives every live entry of every part this process owns.
   */
  sample(entries: () => Iterable<Entry>): () => void {
    return this.metrics.onCollect(() => {
      const now = Date.now();
      const oldest = new Map<QueueState, number>();
      for (const e of entries()) {
        const state: QueueState = e.held
          ? 'held'
          : e.busy
            ? 'attempting'
            : e.rcpts.some((r) => r.attempts > 0)
              ? 'deferred'
              : 'queued';
        const age = Math.max(0, (now - e.receivedAt) / 1000);
        const band = AGE_BANDS.find(([max]) => age < max)![1];
        this.depthCells.get(`${state} ${band}`)!.inc();
        oldest.set(state, Math.max(oldest.get(state) ?? 0, age));
      }
      for (const [state, age] of oldest) this.oldestCells.get(state)!.set(age);
    }, [this.depth, this.oldest]);
  }
}
