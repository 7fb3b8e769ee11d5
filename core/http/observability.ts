import { timingSafeEqual, createHash } from 'node:crypto';
import type { MetricFamilyJson } from '../services/metrics.js';
import { text, type HttpServer } from './server.js';

/** What the health and metrics routes ask: the primary asks its workers; a lone Petrel itself. */
export interface Observed {
  /** Each process's metric families (one array per process); a process that did not answer is left out. */
  collect(): Promise<MetricFamilyJson[][]>;
  /** What keeps the server from serving mail (empty: ready), one short line each. */
  readiness(): Promise<string[]>;
}

/**
 * `/metrics`: every process's families summed by label set (prom-client's AggregatorRegistry),
 *   in the Prometheus text format; `401` without the bearer token when `metricsToken` is set.
 * `/healthz`: `200 ok` while the process answers at all.
 * `/readyz`: `200 ready`, or `503` and one line per problem (no SMTP listener serving, the queue
 *   not open, the State service unreachable).
 */
export function addObservabilityRoutes(
  http: HttpServer,
  observed: Observed,
  opts: { readonly metricsToken?: string | undefined } = {},
): void {
  const expected = opts.metricsToken ? digest(opts.metricsToken) : null;
  http.route('GET', '/metrics', async (req, res) => {
    if (expected) {
      const given = /^Bearer (.+)$/i.exec(req.headers.authorization ?? '')?.[1];
      if (!given || !timingSafeEqual(digest(given), expected)) {
        res.setHeader('WWW-Authenticate', 'Bearer realm="petrel metrics"');
        return text(res, 401, 'unauthorized\n');
      }
    }
    const body = await exposition(await observed.collect());
    res.writeHead(200, {
      'Content-Type': (await import('prom-client')).Registry.PROMETHEUS_CONTENT_TYPE,
      'Content-Length': Buffer.byteLength(body),
      'Cache-Control': 'no-store',
    });
    res.end(body);
  });
  http.route('GET', '/healthz', (_req, res) => text(res, 200, 'ok\n'));
  http.route('GET', '/readyz', async (_req, res) => {
    const problems = await observed.readiness();
    if (problems.length === 0) return text(res, 200, 'ready\n');
    text(res, 503, `not ready\n${problems.map((p) => `- ${p}\n`).join('')}`);
  });
}

/** The Prometheus text of several processes' families, summed by name and label set. */
export async function exposition(processes: MetricFamilyJson[][]): Promise<string> {
  // Loaded at the first scrape: a server without an http listener never needs it.
  const { AggregatorRegistry } = await import('prom-client');
  return AggregatorRegistry.aggregate(processes as never[]).metrics();
}

/** Compared as digests, so that the comparison takes the same time whatever the token's length. */
function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
