/**
 * A retry schedule such as `5m, 10m, 30m...`: the delay before each retry in turn; a trailing
 * `...` repeats the last delay until the queue lifetime runs out.
 */
export interface RetrySchedule {
  readonly delays: readonly number[];
  readonly repeatLast: boolean;
  /** Delay before retry number `attempt` (1 = the first retry). Null when the schedule ran out. */
  delay(attempt: number): number | null;
}

export function parseSchedule(text: string): RetrySchedule {
  const trimmed = text.trim();
  const repeatLast = trimmed.endsWith('...');
  const body = repeatLast ? trimmed.slice(0, -3) : trimmed;
  const delays = body
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const ms = parseDuration(s);
      if (ms <= 0) throw new RangeError(`retry delays must be positive, got "${s}"`);
      return ms;
    });
  if (delays.length === 0)
    throw new RangeError('a retry schedule needs at least one delay, like "5m, 10m, 30m..."');
  return {
    delays,
    repeatLast,
    delay(attempt) {
      if (attempt < 1) return 0;
      if (attempt <= delays.length) return delays[attempt - 1]!;
      return repeatLast ? delays[delays.length - 1]! : null;
    },
  };
}
import { parseDuration } from '../../core/index.js';
