/**
 * One list queried for one name: through this process's copy of the cache, the State cache, then
 * the core resolver, within a deadline. Every failure becomes a result (`error`), never a throw
 * and never a listing.
 */
import type { DnsResolver, StateStore } from '../../core/index.js';
import type { ListResult } from './api.js';
import { classify } from './codes.js';
import type { DnsblConfig } from './config.js';

/** A DNS answer: the A records, empty for NXDOMAIN or NODATA; or why there is none. */
type Answer = { readonly codes: readonly string[]; readonly cached: boolean } | { readonly error: string };

export interface ListSpec {
  readonly list: string;
  readonly zone: string;
  readonly kind: 'block' | 'allow';
  readonly codes?: Readonly<Record<string, string>>;
  readonly refused: readonly string[];
}

export interface Lookups {
  /**
   * Queries `query` (already under the list's zone) and classifies the answer. `deadline` is
   * asked for only when the answer is not in this process's copy of the cache (one timer per
   * step, and none at all when every answer is at hand).
   */
  query(spec: ListSpec, subject: string, query: string, deadline: () => Promise<void>): Promise<ListResult>;
}

interface Logger {
  warn(obj: object, msg: string): void;
}

/** Cache keys are namespaced with the plugin's name (state.ts: keys). */
const cacheKey = (query: string): string => `dnsbl:a:${query}`;

/**
 * Answers this process keeps besides the State cache, so that a client that connects again costs
 * no State read either. Bounded: past this many, the oldest is dropped.
 */
const MEMORY_ENTRIES = 10_000;

/** What the State cache holds under a query: the codes, and until when (ms since the epoch). */
interface Cached {
  readonly codes: readonly string[];
  readonly until: number;
}

/**
 * This process's copy of cached answers, each kept until the State entry it copies expires (the
 * `until` stored with it), never longer: workers and instances still see the same answers for the
 * same time. A Map keeps insertion order, so the first entry is the oldest.
 */
class MemoryCache {
  private readonly entries = new Map<string, Cached>();

  get(query: string, now: number): Cached | null {
    const hit = this.entries.get(query);
    if (!hit) return null;
    if (hit.until > now) return hit;
    this.entries.delete(query);
    return null;
  }

  put(query: string, entry: Cached, now: number): void {
    if (entry.until <= now) return;
    this.entries.delete(query);
    if (this.entries.size >= MEMORY_ENTRIES) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(query, entry);
  }
}

export function lookups(
  dns: DnsResolver,
  state: StateStore,
  cache: DnsblConfig['cache'],
  log: Logger,
): Lookups {
  const memory = new MemoryCache();

  async function fromCache(query: string): Promise<Answer | null> {
    const now = Date.now();
    try {
      const hit = await state.get(cacheKey(query));
      if (hit === null) return null;
      const parsed = JSON.parse(hit) as Cached | string[];
      // A bare list of codes (as earlier versions stored) says not until when: not copied.
      if (Array.isArray(parsed)) return { codes: parsed, cached: true };
      memory.put(query, parsed, now);
      return { codes: parsed.codes, cached: true };
    } catch (err) {
      // A cache that cannot be read costs a DNS query, nothing more.
      log.warn({ query, err: String(err) }, 'dnsbl: state cache not readable, querying DNS');
      return null;
    }
  }

  async function remember(query: string, codes: readonly string[], ttlMs: number): Promise<void> {
    if (ttlMs <= 0) return;
    const now = Date.now();
    const entry: Cached = { codes, until: now + ttlMs };
    try {
      await state.set(cacheKey(query), JSON.stringify(entry), { ttlMs });
      memory.put(query, entry, now);
    } catch (err) {
      log.warn({ query, err: String(err) }, 'dnsbl: answer not cached, state not writable');
    }
  }

  async function fromDns(query: string): Promise<Answer> {
    try {
      const records = await dns.resolve4(query, { ttl: true });
      const ttl = Math.min(...records.map((r) => r.ttl)) * 1000;
      const codes = [...new Set(records.map((r) => r.address))].sort();
      await remember(query, codes, Math.min(Math.max(ttl, cache.minTtl), cache.maxTtl));
      return { codes, cached: false };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // NXDOMAIN and NODATA: not listed (RFC 5782 §2.1).
      if (code === 'ENOTFOUND' || code === 'ENODATA') {
        await remember(query, [], Math.min(cache.negativeTtl, cache.maxTtl));
        return { codes: [], cached: false };
      }
      return { error: code ?? String(err) };
    }
  }

  return {
    async query(spec, subject, query, deadline) {
      const mine = memory.get(query, Date.now());
      const answer: Answer = mine
        ? { codes: mine.codes, cached: true }
        : await Promise.race([
            (async () => (await fromCache(query)) ?? fromDns(query))(),
            deadline().then(() => ({ error: 'timeout' })),
          ]);
      const base = { list: spec.list, zone: spec.zone, kind: spec.kind, subject };
      if ('error' in answer) {
        log.warn({ ...base, query, error: answer.error }, 'dnsbl: lookup failed, not treated as listed');
        return { ...base, status: 'error', codes: [], reasons: [], cached: false };
      }
      const c = classify(answer.codes, spec);
      if (c.status === 'refused')
        log.warn(
          { ...base, query, code: c.decisive.join(' ') },
          'dnsbl: the list refuses our queries; not treated as listed',
        );
      return { ...base, status: c.status, codes: answer.codes, reasons: c.reasons, cached: answer.cached };
    },
  };
}
