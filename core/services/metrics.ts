import { injectable } from 'tsyringe';

/** Counters and gauges, cheap enough for the hot path; read with `snapshot()`. */
@injectable()
export class MetricsRegistry {
  private readonly counters = new Map<string, number>();
  private readonly gauges = new Map<string, number>();

  inc(name: string, by = 1): void {
    this.counters.set(name, (this.counters.get(name) ?? 0) + by);
  }

  set(name: string, value: number): void {
    this.gauges.set(name, value);
  }

  add(name: string, by: number): void {
    this.gauges.set(name, (this.gauges.get(name) ?? 0) + by);
  }

  get(name: string): number {
    return this.counters.get(name) ?? this.gauges.get(name) ?? 0;
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries([...this.counters, ...this.gauges].sort(([a], [b]) => a.localeCompare(b)));
  }
}
