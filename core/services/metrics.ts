import { monitorEventLoopDelay } from 'node:perf_hooks';

/**
 * The Metrics service: counters, gauges and histograms, one registry per process, exported in the
 * Prometheus text format by the `http` listener (see core/http/). The core counts through it and
 * so does any plugin: `resolve(Tokens.Metrics)`.
 *
 * The contract:
 * - **Declare once, count cheaply.** `counter()`, `gauge()` and `histogram()` declare a metric
 *   family (at setup, not per event) and return it; declaring the same name again with the same
 *   type and label names returns the same family (a reloaded plugin keeps counting where it was);
 *   with another type or other labels it throws. `family.labels(...values)` returns the cell for
 *   those label values, made once and kept: bind the cells you use at setup and the hot path is a
 *   number added to a field, with no label string built and nothing allocated.
 * - **Bounded labels.** A label value comes from a small set (a hook name, a plugin name, a reply
 *   class). Never put an address, a message id or other client-chosen text in a label: every
 *   distinct value is a series kept for the life of the process. A family refuses new label
 *   values past `maxSeries` (default 1000) and counts them under the value `other` instead.
 * - **Sampled values** (a queue's depth, memory) are set by a function registered with
 *   `onCollect(fn)`, run before each export; it returns the function that unregisters it (give it
 *   to `onClose` so a reloaded plugin does not sample twice). Before the collectors run, every
 *   gauge a collector set is reset to 0, so a state that emptied reads 0 rather than its last value.
 * - **Names** follow Prometheus: `snake_case`, a unit suffix (`_seconds`, `_bytes`), `_total` on
 *   counters. Built-in metrics start with `petrel_`; a plugin's should start with its own prefix.
 * - **Across workers** every family is summed by label set (see core/http/observability.ts); a
 *   value that is per process (memory) carries a `worker` label so that it stays apart.
 */
export class MetricsRegistry {
  private readonly families = new Map<string, MetricFamily>();
  private readonly collectors = new Set<() => void>();
  private readonly sampled = new Set<GaugeFamily>();
  private loop: ReturnType<typeof monitorEventLoopDelay> | null = null;

  counter(def: MetricDefinition): CounterFamily {
    return this.declare(def, 'counter', () => new CounterFamily(def));
  }

  gauge(def: MetricDefinition): GaugeFamily {
    return this.declare(def, 'gauge', () => new GaugeFamily(def));
  }

  /** `buckets`: upper bounds, ascending, in the metric's unit (default: latencies in seconds). */
  histogram(def: MetricDefinition & { readonly buckets?: readonly number[] }): HistogramFamily {
    return this.declare(def, 'histogram', () => new HistogramFamily(def, def.buckets ?? LATENCY_BUCKETS));
  }

  /**
   * Runs `fn` before each export, to set sampled gauges; returns the function that unregisters it.
   * Gauges set by collectors are reset to 0 before they run.
   */
  onCollect(fn: () => void, samples: readonly GaugeFamily[] = []): () => void {
    this.collectors.add(fn);
    for (const g of samples) this.sampled.add(g);
    return () => {
      this.collectors.delete(fn);
    };
  }

  /**
   * This process's own figures, labelled `worker`: resident memory, V8 heap, and the event loop's
   * delay (mean, 99th percentile and maximum since the last export). Called once by the server.
   */
  trackProcess(worker: string): void {
    if (this.loop) return;
    const memory = this.gauge({
      name: 'petrel_process_memory_bytes',
      help: 'Memory of a Petrel process by kind (rss, heap_used, heap_total, external)',
      labelNames: ['worker', 'kind'],
    });
    const lag = this.gauge({
      name: 'petrel_event_loop_lag_seconds',
      help: 'Event loop delay of a Petrel process since the previous scrape (mean, p99, max)',
      labelNames: ['worker', 'stat'],
    });
    const cells = {
      rss: memory.labels(worker, 'rss'),
      heapUsed: memory.labels(worker, 'heap_used'),
      heapTotal: memory.labels(worker, 'heap_total'),
      external: memory.labels(worker, 'external'),
      mean: lag.labels(worker, 'mean'),
      p99: lag.labels(worker, 'p99'),
      max: lag.labels(worker, 'max'),
    };
    const loop = (this.loop = monitorEventLoopDelay({ resolution: 20 }));
    loop.enable();
    this.onCollect(() => {
      const m = process.memoryUsage();
      cells.rss.set(m.rss);
      cells.heapUsed.set(m.heapUsed);
      cells.heapTotal.set(m.heapTotal);
      cells.external.set(m.external);
      // Nanoseconds; a histogram with no sample yet reads NaN.
      const s = (ns: number): number => (Number.isFinite(ns) ? ns / 1e9 : 0);
      cells.mean.set(s(loop.mean));
      cells.p99.set(s(loop.percentile(99)));
      cells.max.set(s(loop.max));
      loop.reset();
    });
  }

  /** Stops what `trackProcess` started (the server calls it when it stops). */
  close(): void {
    this.loop?.disable();
  }

  /** Every family's current values, in the JSON form prom-client aggregates (for one scrape). */
  collect(): MetricFamilyJson[] {
    for (const g of this.sampled) g.zero();
    for (const fn of this.collectors) {
      try {
        fn();
      } catch {
        // A collector that throws leaves its gauges at 0; the scrape still answers.
      }
    }
    return [...this.families.values()].map((f) => f.toJson());
  }

  /** The current value of a counter or gauge cell (tests, and the console's live counters). */
  value(name: string, ...labelValues: string[]): number {
    const f = this.families.get(name);
    if (!f || f instanceof HistogramFamily) return 0;
    return (f.peek(labelValues) as { value: number } | undefined)?.value ?? 0;
  }

  private declare<F extends MetricFamily>(def: MetricDefinition, type: MetricKind, make: () => F): F {
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(def.name))
      throw new Error(`metric name "${def.name}" is not valid`);
    const known = this.families.get(def.name);
    if (known) {
      const same = known.type === type && known.labelNames.join(',') === (def.labelNames ?? []).join(',');
      if (!same)
        throw new Error(
          `metric ${def.name} is already declared as a ${known.type} with labels [${known.labelNames.join(', ')}]`,
        );
      return known as F;
    }
    const f = make();
    this.families.set(def.name, f);
    return f;
  }
}

export interface MetricDefinition {
  /** Prometheus name: `petrel_…` for the core, the plugin's own prefix for a plugin. */
  readonly name: string;
  /** One line for `# HELP`. */
  readonly help: string;
  readonly labelNames?: readonly string[];
  /** Distinct label sets kept before new ones are counted under `other` (default 1000). */
  readonly maxSeries?: number;
}

type MetricKind = 'counter' | 'gauge' | 'histogram';

/** One metric family as prom-client's `getMetricsAsJSON()` gives it (what `aggregate` reads). */
export interface MetricFamilyJson {
  readonly name: string;
  readonly help: string;
  readonly type: MetricKind;
  readonly aggregator: 'sum';
  readonly values: { value: number; labels: Record<string, string | number>; metricName?: string }[];
}

/** Seconds: from 1 ms (a hook that answers from memory) to a minute (a slow remote scanner). */
export const LATENCY_BUCKETS: readonly number[] = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
];

abstract class MetricFamily<Cell = unknown> {
  abstract readonly type: MetricKind;
  readonly name: string;
  readonly help: string;
  readonly labelNames: readonly string[];
  private readonly maxSeries: number;
  protected readonly cells = new Map<string, { labels: Record<string, string>; cell: Cell }>();

  constructor(def: MetricDefinition) {
    this.name = def.name;
    this.help = def.help;
    this.labelNames = def.labelNames ?? [];
    this.maxSeries = def.maxSeries ?? 1000;
  }

  protected abstract make(): Cell;

  /** The cell for these label values (one per label name, in order), made on first use and kept. */
  labels(...values: string[]): Cell {
    if (values.length !== this.labelNames.length)
      throw new Error(
        `metric ${this.name} takes ${this.labelNames.length} label values, got ${values.length}`,
      );
    const key = values.join('\u0000');
    const known = this.cells.get(key);
    if (known) return known.cell;
    if (this.cells.size >= this.maxSeries) {
      const other = this.labelNames.map(() => 'other');
      if (values.every((v) => v === 'other')) return this.add(key, other);
      return this.labels(...other);
    }
    return this.add(key, values);
  }

  /** The cell for these values if it exists (never makes one). */
  peek(values: readonly string[]): Cell | undefined {
    return this.cells.get(values.join('\u0000'))?.cell;
  }

  private add(key: string, values: readonly string[]): Cell {
    const labels: Record<string, string> = {};
    this.labelNames.forEach((n, i) => (labels[n] = values[i]!));
    const cell = this.make();
    this.cells.set(key, { labels, cell });
    return cell;
  }

  abstract toJson(): MetricFamilyJson;
}

export class CounterCell {
  value = 0;
  inc(by = 1): void {
    this.value += by;
  }
}

export class CounterFamily extends MetricFamily<CounterCell> {
  readonly type = 'counter';
  protected make(): CounterCell {
    return new CounterCell();
  }
  toJson(): MetricFamilyJson {
    const values = [...this.cells.values()].map(({ labels, cell }) => ({ value: cell.value, labels }));
    return { name: this.name, help: this.help, type: 'counter', aggregator: 'sum', values };
  }
}

export class GaugeCell {
  value = 0;
  set(v: number): void {
    this.value = v;
  }
  inc(by = 1): void {
    this.value += by;
  }
  dec(by = 1): void {
    this.value -= by;
  }
}

export class GaugeFamily extends MetricFamily<GaugeCell> {
  readonly type = 'gauge';
  protected make(): GaugeCell {
    return new GaugeCell();
  }
  /** Sets every cell to 0 (before the collectors sample again). */
  zero(): void {
    for (const { cell } of this.cells.values()) cell.value = 0;
  }
  toJson(): MetricFamilyJson {
    const values = [...this.cells.values()].map(({ labels, cell }) => ({ value: cell.value, labels }));
    return { name: this.name, help: this.help, type: 'gauge', aggregator: 'sum', values };
  }
}

export class HistogramCell {
  /** Observations per bucket (not cumulative); the last is +Inf. */
  readonly counts: number[];
  sum = 0;
  count = 0;
  constructor(private readonly bounds: readonly number[]) {
    this.counts = new Array<number>(bounds.length + 1).fill(0);
  }
  observe(v: number): void {
    const b = this.bounds;
    let i = 0;
    while (i < b.length && v > b[i]!) i++;
    this.counts[i]!++;
    this.sum += v;
    this.count++;
  }
}

export class HistogramFamily extends MetricFamily<HistogramCell> {
  readonly type = 'histogram';
  constructor(
    def: MetricDefinition,
    private readonly bounds: readonly number[],
  ) {
    super(def);
    if (def.labelNames?.includes('le')) throw new Error(`metric ${def.name}: "le" is reserved for buckets`);
  }
  protected make(): HistogramCell {
    return new HistogramCell(this.bounds);
  }
  toJson(): MetricFamilyJson {
    const values: MetricFamilyJson['values'] = [];
    for (const { labels, cell } of this.cells.values()) {
      let acc = 0;
      this.bounds.forEach((le, i) => {
        acc += cell.counts[i]!;
        values.push({ value: acc, labels: { ...labels, le }, metricName: `${this.name}_bucket` });
      });
      values.push({
        value: cell.count,
        labels: { ...labels, le: '+Inf' },
        metricName: `${this.name}_bucket`,
      });
      values.push({ value: cell.sum, labels, metricName: `${this.name}_sum` });
      values.push({ value: cell.count, labels, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: 'histogram', aggregator: 'sum', values };
  }
}
