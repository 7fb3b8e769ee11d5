/**
 * Readiness checks: what `/readyz` asks besides the core's own (listening, State reachable).
 * Plugins get it with `resolve(Tokens.Health)` and add what their part of serving mail needs
 * (the queue: its parts are open).
 *
 * The contract: `add(name, check)` returns the function that removes the check (hand it to
 * `onClose`, so a retired plugin set stops being asked). A check returns null when fine, or one
 * short line saying what is wrong; it is asked at each `/readyz` request, so it is cheap and
 * answers within a second or two (a check that throws counts as its message). One per process,
 * shared by every config generation.
 */
export type ReadinessCheck = () => string | null | Promise<string | null>;

export class HealthChecks {
  private readonly checks = new Map<ReadinessCheck, string>();

  add(name: string, check: ReadinessCheck): () => void {
    this.checks.set(check, name);
    return () => {
      this.checks.delete(check);
    };
  }

  /** Every check's problem, as `name: problem`; empty when all are fine. */
  async problems(): Promise<string[]> {
    const out = await Promise.all(
      [...this.checks].map(async ([check, name]) => {
        try {
          const p = await check();
          return p === null ? null : `${name}: ${p}`;
        } catch (err) {
          return `${name}: ${(err as Error).message}`;
        }
      }),
    );
    return out.filter((p): p is string => p !== null);
  }
}
