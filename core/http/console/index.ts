import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import type { HttpListenerConfig } from '../../config/schema.js';
import type { ControlSocket } from '../../services/control-sockets.js';
import type { MetricFamilyJson } from '../../services/metrics.js';
import type { OpenSession } from '../../smtp/server.js';
import type { HttpServer } from '../server.js';
import { ConsoleAuth, type ConsoleSession } from './auth.js';
import { href, STYLE } from './html.js';
import { loginPage, overviewPage, problemPage, sessionsPage } from './pages.js';
import { confirmPage, messagePage, queuePage, QUEUE_STATES } from './queue-pages.js';
import { QUEUE_ACTIONS, QueueClient, QueueUnavailable, type QueueAction } from './queue-client.js';
import { figures, RateSampler } from './rates.js';

/** What the console reads: the primary asks its workers; a lone Petrel answers itself. */
export interface ConsoleSource {
  /** Each process's metric families (as for `/metrics`). */
  collect(): Promise<MetricFamilyJson[][]>;
  /** Each worker's open SMTP sessions; null for a worker that did not answer. */
  sessions(): Promise<{ readonly worker: number; readonly sessions: OpenSession[] | null }[]>;
  /** The control sockets the plugins serve (the queue's parts). */
  controlSockets(): Promise<ControlSocket[]>;
}

export type ConsoleConfig = NonNullable<HttpListenerConfig['console']>;

/** Largest form body accepted (a login, an action): anything larger gets 413. */
const MAX_BODY = 4096;
/** Longest filter text or queue id taken from a URL. */
const MAX_PARAM = 320;

/**
 * Nothing is loaded from elsewhere, nothing runs as script, no inline style, no framing:
 * the pages are server-rendered HTML with one stylesheet of our own.
 */
const SECURITY_HEADERS = {
  'Content-Security-Policy':
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  'Cache-Control': 'no-store',
};

/**
 * The web console under `/console/` on the http listener (docs/operations.md, "Web console"):
 * an overview of the live counters with a rate graph, the queue (filter, each message's history,
 * flush / hold / release / delete / bounce after a confirmation), and the open SMTP sessions.
 * Authentication and CSRF rules are in auth.ts. The queue is reached through its control
 * sockets, as `petrel queue` reaches it. Returns what stops its sampling timer.
 */
export function addConsoleRoutes(
  http: HttpServer,
  source: ConsoleSource,
  config: ConsoleConfig,
  log: Logger,
): { close(): void } {
  const auth = new ConsoleAuth(config.token, config.sessionIdle, config.secureCookie);
  const queue = new QueueClient(() => source.controlSockets());
  const sampler = new RateSampler(() => source.collect());

  http.route('GET', '/console', (_req, res) => redirect(res, '/console/'));

  http.route('GET', '/console/*', async (req, res, url) => {
    const path = url.pathname.slice('/console/'.length);
    if (path === 'style.css') {
      return send(res, 200, STYLE, 'text/css; charset=utf-8');
    }
    if (path === 'login') return send(res, 200, loginPage(null));
    const s = auth.session(req);
    if (!s) return redirect(res, '/console/login');
    sampler.touch();
    const param = (name: string): string => (url.searchParams.get(name) ?? '').slice(0, MAX_PARAM);
    switch (path) {
      case '': {
        let f = null;
        try {
          f = figures(await source.collect(), Date.now());
        } catch (err) {
          log.warn({ err }, 'console: metrics could not be collected');
        }
        return send(res, 200, overviewPage(f, sampler.rates(), s.csrf));
      }
      case 'sessions':
        return send(res, 200, sessionsPage(await source.sessions(), s.csrf));
      case 'queue': {
        const state = (QUEUE_STATES as readonly string[]).includes(param('state')) ? param('state') : 'all';
        const pageNo = Number.parseInt(param('page'), 10);
        return withQueue(res, s, async () =>
          queuePage(
            await queue.list(),
            { state, to: param('to'), from: param('from'), page: Number.isFinite(pageNo) ? pageNo : 1 },
            s.csrf,
          ),
        );
      }
      case 'message': {
        const id = param('id');
        const done = param('done') as QueueAction;
        return withQueue(res, s, async () => {
          const m = id ? await queue.show(id) : null;
          if (!m)
            return [
              404,
              problemPage(
                'Not found',
                `No message ${id} in the queue or its history.`,
                s.csrf,
                href('queue'),
              ),
            ];
          return messagePage(m, s.csrf, QUEUE_ACTIONS.includes(done) ? done : null);
        });
      }
      case 'confirm': {
        const id = param('id');
        const action = param('action') as QueueAction;
        if (!QUEUE_ACTIONS.includes(action))
          return send(res, 400, problemPage('Bad request', 'Unknown action.', s.csrf));
        return withQueue(res, s, async () => {
          const m = id ? await queue.show(id) : null;
          if (!m || m.finishedAt !== undefined)
            return [404, problemPage('Not found', `No message ${id} in the queue.`, s.csrf, href('queue'))];
          return confirmPage(m, action, s.csrf);
        });
      }
      default:
        return send(res, 404, problemPage('Not found', 'No such page.', s.csrf, href('')));
    }
  });

  http.route('POST', '/console/*', async (req, res, url) => {
    const path = url.pathname.slice('/console/'.length);
    const form = await readForm(req, res);
    if (!form) return;
    if (path === 'login') {
      if (!auth.mayTry()) {
        log.warn('console: too many failed logins; refusing logins for the rest of the minute');
        return send(res, 429, loginPage('Too many failed logins: try again in a minute.'));
      }
      const s = auth.login(form.get('token') ?? '');
      if (!s) {
        log.warn({ client: req.socket.remoteAddress }, 'console: login refused (wrong token)');
        return send(res, 401, loginPage('Wrong token.'));
      }
      log.info({ client: req.socket.remoteAddress }, 'console: logged in');
      res.setHeader('Set-Cookie', auth.cookie(s));
      return redirect(res, '/console/');
    }
    const s = auth.session(req);
    if (!s) return send(res, 403, problemPage('Forbidden', 'Log in first.', undefined, '/console/login'));
    if (!auth.csrfOk(s, form.get('csrf') ?? undefined)) {
      log.warn(
        { client: req.socket.remoteAddress, path },
        'console: form refused (missing or wrong CSRF token)',
      );
      return send(
        res,
        403,
        problemPage(
          'Forbidden',
          'This form is stale or did not come from the console: reload the page and try again.',
          s.csrf,
        ),
      );
    }
    if (path === 'logout') {
      auth.logout(s);
      res.setHeader('Set-Cookie', auth.cookie(null));
      return redirect(res, '/console/login');
    }
    if (path !== 'action') return send(res, 404, problemPage('Not found', 'No such form.', s.csrf));
    const action = form.get('action') as QueueAction;
    const id = (form.get('id') ?? '').slice(0, MAX_PARAM);
    if (!QUEUE_ACTIONS.includes(action) || !id || form.get('confirm') !== 'yes')
      return send(
        res,
        400,
        problemPage('Bad request', 'An action, a message and a confirmation are needed.', s.csrf),
      );
    return withQueue(res, s, async () => {
      const refused = await queue.act(action, id);
      log.info({ action, queueId: id, refused }, 'console: queue action');
      if (refused !== null)
        return [409, problemPage(`Could not ${action} ${id}`, refused, s.csrf, href('message', { id }))];
      redirect(res, href('message', { id, done: action }));
      return null;
    });
  });

  return { close: () => sampler.close() };
}

/** Renders what `build` makes of the queue, or a 503 page when the queue cannot be asked. */
async function withQueue(
  res: ServerResponse,
  s: ConsoleSession,
  build: () => Promise<string | [number, string] | null>,
): Promise<void> {
  let out;
  try {
    out = await build();
  } catch (err) {
    if (!(err instanceof QueueUnavailable)) throw err;
    return send(res, 503, problemPage('Queue unavailable', err.message, s.csrf));
  }
  if (out === null) return;
  if (typeof out === 'string') return send(res, 200, out);
  send(res, out[0], out[1]);
}

/** The urlencoded form of a POST, at most MAX_BODY bytes; null after answering 413 or 415. */
async function readForm(req: IncomingMessage, res: ServerResponse): Promise<URLSearchParams | null> {
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  if (type !== 'application/x-www-form-urlencoded') {
    res.setHeader('Connection', 'close');
    send(res, 415, 'expected a form (application/x-www-form-urlencoded)\n', 'text/plain; charset=utf-8');
    return null;
  }
  const body = await new Promise<Buffer | null>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size <= MAX_BODY) return void chunks.push(chunk);
      // The rest is read and dropped (within the server's 30 s request deadline), so the client
      // reads the answer instead of a reset; the connection is closed after it.
      req.off('data', onData);
      req.resume();
      resolve(null);
    };
    req.on('data', onData);
    req.once('end', () => resolve(Buffer.concat(chunks)));
    req.once('error', reject);
  });
  if (!body) {
    res.setHeader('Connection', 'close');
    send(res, 413, `a form is at most ${MAX_BODY} bytes\n`, 'text/plain; charset=utf-8');
    return null;
  }
  return new URLSearchParams(body.toString('utf8'));
}

function send(res: ServerResponse, status: number, body: string, type = 'text/html; charset=utf-8'): void {
  res.writeHead(status, {
    ...SECURITY_HEADERS,
    'Content-Type': type,
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

/** 303: the browser GETs `to` (after a POST, a reload does not repeat the action). */
function redirect(res: ServerResponse, to: string): void {
  res.writeHead(303, { ...SECURITY_HEADERS, Location: to, 'Content-Length': 0 });
  res.end();
}
