import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { HttpListenerConfig } from '../config/schema.js';

/**
 * A route's handler: Node's own request and response, and the parsed URL (path and query).
 *
 * The contract, for the core's routes and for any added later (the web console):
 * - The handler ends the response (`res.end(...)`) on every path, or returns a promise that
 *   settles after it did. A throw or a rejection is logged with the route, and the client gets
 *   `500` with a generic body if nothing was sent yet; the detail never goes to the client.
 * - Authentication is the route's own: the listener trusts nothing and adds nothing. The
 *   listener is bound to the configured address only (default 127.0.0.1).
 * - A handler that reads a request body bounds it itself (the server bounds headers and time:
 *   16 KiB of headers, the headers within 10 s, the whole request within 30 s).
 * - `GET` routes also answer `HEAD` (Node sends the headers without the body).
 */
export type HttpHandler = (req: IncomingMessage, res: ServerResponse, url: URL) => void | Promise<void>;

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

/**
 * The `http` listener and its routes: the seam through which the core serves `/metrics`,
 * `/healthz` and `/readyz`, and later features (a web console) add their pages.
 *
 * Routes are added with `route(method, path, handler)` before or after `listen`. A path is exact
 * (`/metrics`), or a prefix ending in `/*` (`/console/*` matches `/console/` and everything
 * under it); an exact route wins over a prefix, a longer prefix over a shorter. Adding a method
 * and path that is already routed throws: two features never share a path by accident.
 * Unknown paths get `404`, a known path with another method `405` with `Allow`.
 */
export class HttpServer {
  private readonly exact = new Map<string, Map<string, HttpHandler>>();
  private readonly prefixes: { prefix: string; methods: Map<string, HttpHandler> }[] = [];
  private server: Server | null = null;

  constructor(private readonly log: Logger) {}

  route(method: HttpMethod, path: string, handler: HttpHandler): void {
    if (!path.startsWith('/')) throw new Error(`an HTTP route's path starts with "/": ${path}`);
    let methods: Map<string, HttpHandler>;
    if (path.endsWith('/*')) {
      const prefix = path.slice(0, -1);
      let entry = this.prefixes.find((p) => p.prefix === prefix);
      if (!entry) {
        entry = { prefix, methods: new Map() };
        this.prefixes.push(entry);
        this.prefixes.sort((a, b) => b.prefix.length - a.prefix.length);
      }
      methods = entry.methods;
    } else {
      methods = this.exact.get(path) ?? new Map<string, HttpHandler>();
      this.exact.set(path, methods);
    }
    if (methods.has(method)) throw new Error(`HTTP route ${method} ${path} is already taken`);
    methods.set(method, handler);
  }

  /** Listens on the listener's address and port; resolves with what it bound. */
  async listen(config: HttpListenerConfig): Promise<{ address: string; port: number }> {
    const server = createServer(
      { maxHeaderSize: 16 * 1024, requestTimeout: 30_000, headersTimeout: 10_000, keepAliveTimeout: 5_000 },
      (req, res) => void this.dispatch(req, res),
    );
    server.maxConnections = 64;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: config.address, port: config.port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.log.error({ err, listener: 'http' }, 'listener error'));
    this.server = server;
    const a = server.address() as AddressInfo;
    this.log.info({ listener: config.name, kind: 'http', address: a.address, port: a.port }, 'listening');
    return { address: a.address, port: a.port };
  }

  /** Stops listening and closes its connections (a scrape in progress is cut short). */
  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }

  private async dispatch(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://petrel.invalid');
    } catch {
      return text(res, 400, 'bad request\n');
    }
    const methods =
      this.exact.get(url.pathname) ?? this.prefixes.find((p) => url.pathname.startsWith(p.prefix))?.methods;
    if (!methods) return text(res, 404, 'not found\n');
    const method = req.method === 'HEAD' ? 'GET' : (req.method ?? 'GET');
    const handler = methods.get(method);
    if (!handler) {
      res.setHeader('Allow', [...methods.keys(), ...(methods.has('GET') ? ['HEAD'] : [])].join(', '));
      return text(res, 405, 'method not allowed\n');
    }
    try {
      await handler(req, res, url);
    } catch (err) {
      this.log.error({ err, method: req.method, path: url.pathname }, 'HTTP route failed');
      if (!res.headersSent) text(res, 500, 'internal error\n');
      else res.destroy();
    }
  }
}

/** Answers with a short plain-text body. */
export function text(res: ServerResponse, status: number, body: string): void {
  res.writeHead(status, {
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    'Cache-Control': 'no-store',
  });
  res.end(body);
}
