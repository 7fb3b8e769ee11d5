/**
 * The State service: small facts with a lifetime that every worker of a server shares —
 * counters for limits, lockouts, greylisting entries, caches. Plugins get it with
 * `resolve(Tokens.State)`.
 *
 * The contract, for every backend (the embedded `node:sqlite` one in state-sqlite.ts, Redis in
 * state-redis.ts; test/unit/state.test.ts runs the same contract tests against both):
 *
 * - **Keys** are strings that the caller namespaces with its own name first
 *   (`users:auth:failures:<client>`, `greylist:<triplet>`). A key holds one of: a value (`get`,
 *   `set`, `increment`, `compareAndSet`), a window of events (`addEvent`, `removeEvent`,
 *   `countEvents`), a rate counter (`addToRate`) or held shares (`hold`); `delete` removes any of
 *   them.
 * - **Windows or rates.** A window of events is exact: it knows each event by its id, so an
 *   event can be moved or removed, and the count is exactly the events of the last `windowMs`.
 *   It costs one stored event per event, and adding or counting reads every event in the
 *   window: a cost that grows with the rate. Use it where the events are few or must be told
 *   apart (connections open now, a lockout's attempts, distinct greylist triplets). A rate
 *   counter costs the same whatever the rate: it splits the window into `RATE_BUCKETS`
 *   sub-buckets of `windowMs / RATE_BUCKETS` (rounded up to whole ms), aligned on the store's
 *   clock, keeps one number per sub-bucket, and each operation reads at most `RATE_BUCKETS + 1`
 *   of them. Its count is every event of the last `windowMs` plus, at most, those of one
 *   sub-bucket before it: it never counts less than an exact window would, and an event stops
 *   counting at most `windowMs / RATE_BUCKETS` (5 %) after it would leave an exact one. Use it
 *   for "at most N per time" over many events (messages, recipients, connections per client).
 * - **Held shares** (`hold`) count what is in use now, such as a client's open connections: each
 *   store (each worker process opens its own) holds its own share of the key, changes only that
 *   share, and reads the sum of every store's. A share lives while its store is open: the store
 *   renews its shares in use (every third of their `leaseMs`) and gives them up when it closes.
 *   A store that ends without closing (a killed worker, a lost machine) stops counting once
 *   `leaseMs` has passed since its last renewal, so a crash never leaves a count high for good,
 *   as a counter incremented and decremented (`increment`) would. A key stores one number per
 *   store holding it, and each `hold` reads every one of them: the cost grows with the number of
 *   workers and machines, not with what they count. Use it for "at most N at once".
 * - **Everything expires.** Every write gives a lifetime (`ttlMs`, `windowMs`); there are no
 *   keys that live for ever, so what an attacker can make the store hold is bounded by time.
 *   A key reads as absent from the moment it expires; its storage is reclaimed later.
 * - **Each operation is atomic** across every process that opens the same store: all workers of
 *   one server share `<spool.dir>/state.sqlite`, or every server configured with one Redis.
 *   Two workers incrementing one key at once get two different results and neither increment is
 *   lost; of two racing `compareAndSet` calls with the same expectation, one succeeds.
 *   Operations are not grouped into transactions: a caller that needs several to agree orders
 *   them so that every interleaving is safe (the AUTH lockout in plugins/users/auth-throttle.ts
 *   counts an attempt first and checks the limit after).
 * - **Time** is the store's: lifetimes and windows are measured on one clock for every process
 *   (sqlite: the machine's clock; Redis: the server's).
 * - **Values** are strings; `increment` keeps a decimal integer under its key.
 * - **Durability:** what is stored survives a restart and a reload, but the last writes before a
 *   power loss may be lost (Redis: as far as its own persistence settings keep it). Nothing that
 *   must never be lost belongs here (that is the queue).
 * - **Failure:** any operation may reject with a `StateError` — the store cannot be opened or
 *   written (disk full, permissions), another process held it longer than the busy timeout,
 *   Redis cannot be reached or did not answer in time, or the store was closed. The caller must
 *   handle it and decide whether its feature fails closed or open.
 *   A hook that lets it propagate gives the client the generic `451 4.3.0` and logs plugin and
 *   hook: that is failing closed, and it is what the AUTH lockout does, because a lockout that
 *   lets guesses through whenever its counts cannot be read is no lockout at all, and an attacker
 *   could bring that about (by filling the disk, say). Legitimate users get a temporary failure
 *   and retry.
 */
export interface StateStore {
  /** The value under `key`, or null when there is none (or it expired). */
  get(key: string): Promise<string | null>;
  /** Stores `value` under `key` for `ttlMs`, replacing any value and its lifetime. */
  set(key: string, value: string, opts: { ttlMs: number }): Promise<void>;
  /** Removes the value or window under `key`; true when there was one. */
  delete(key: string): Promise<boolean>;
  /**
   * Adds `by` (default 1) to the integer under `key` and returns the result. An absent key starts
   * from 0 and lives `ttlMs` from now; later increments do not extend that lifetime, so a counter
   * counts within a fixed window and then starts again. Rejects when the value is not an integer.
   */
  increment(key: string, opts: { ttlMs: number; by?: number }): Promise<number>;
  /**
   * Replaces the value under `key` with `next` only if it is `expected` now (null: absent), and
   * says whether it did. `next` null deletes it. `compareAndSet(k, null, v, …)` is "set if absent".
   */
  compareAndSet(
    key: string,
    expected: string | null,
    next: string,
    opts: { ttlMs: number },
  ): Promise<boolean>;
  compareAndSet(key: string, expected: string | null, next: null): Promise<boolean>;
  /**
   * Records an event `id` under `key` now, kept for `windowMs`, and returns how many events under
   * the key fall within the last `windowMs` (this one included). The same id again moves the
   * event to now rather than adding a second one.
   */
  addEvent(key: string, id: string, opts: { windowMs: number }): Promise<number>;
  /** Removes the event `id` from under `key`; true when it was there. */
  removeEvent(key: string, id: string): Promise<boolean>;
  /** How many events under `key` fall within the last `windowMs`. */
  countEvents(key: string, opts: { windowMs: number }): Promise<number>;
  /**
   * Adds `by` (default 1) events at the current time to the rate counter under `key` and returns
   * its count over the last `windowMs` (those included; see "Windows or rates" for the accuracy).
   * `by` is an integer: 0 only reads the count; a negative `by` takes events back (a refused
   * attempt that was counted first), from the current sub-bucket, and the count never reads
   * below 0. A key is meant to be used with one `windowMs`; with another, its sub-buckets
   * already stored still count by their start time. The key lives until its newest sub-bucket
   * has left the window.
   */
  addToRate(key: string, opts: { windowMs: number; by?: number }): Promise<number>;
  /**
   * Adds `by` (an integer, default 1; negative gives back) to this store's share under `key` and
   * returns every live share of the key summed, this one included (see "Held shares"). A share
   * never goes below 0: giving back more than is held leaves 0. `by` 0 only reads (and renews).
   * Every `hold` on a key renews this store's share for `leaseMs` from now; a key is meant to be
   * used with one `leaseMs`.
   */
  hold(key: string, opts: { leaseMs: number; by?: number }): Promise<number>;
  /**
   * Closes the store: gives up its held shares (as far as the store can still be written), then
   * later operations reject. The server calls it when it stops.
   */
  close(): Promise<void>;
}

/** How many sub-buckets a rate counter splits its window into (see "Windows or rates"). */
export const RATE_BUCKETS = 20;

/** An operation of the State service failed; `cause` has the backend's error. */
export class StateError extends Error {
  override readonly name = 'StateError';
}
