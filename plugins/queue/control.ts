import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { chmod, lstat, mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { SocketReader, writeDrained } from '../../core/index.js';
import type { MessageSummary, RecipientSummary } from './api.js';
import type { FinishedMessage, TraceQuery } from './history-store.js';

/**
 * What the control socket needs of a queue part. The engine provides it; this module does not
 * know the engine, so the two depend on each other in one direction only (engine → control).
 */
export interface ControlTarget {
  list(): Promise<MessageSummary[]>;
  get(id: string): Promise<MessageSummary | null>;
  /** The message's header section as stored, cut at a limit. */
  headers(id: string): Promise<string>;
  flushMessages(target: { id?: string; domain?: string }): Promise<{ flushed: string[]; held: string[] }>;
  hold(id: string, held: boolean): Promise<MessageSummary | null>;
  end(id: string, how: 'delete' | 'bounce'): Promise<MessageSummary | null>;
  /** The queued messages that match, with their histories (for `petrel trace`). */
  find(query: TraceQuery): Promise<MessageSummary[]>;
  /** The finished messages' stories that match, from history.sqlite (for the web console). */
  finished(query: TraceQuery): FinishedMessage[];
  /** How big the part is and how its opening went, without listing its messages. */
  status(): QueueStatus;
}

/** A queue part at a glance (the `status` request): counts, not messages, so it stays cheap at any size. */
export interface QueueStatus {
  /** Messages not yet final. */
  readonly messages: number;
  /** Their recipients not yet final. */
  readonly recipients: number;
  /** Messages with a delivery attempt in progress. */
  readonly attempting: number;
  /** True once every journal record has been read (the queue knows every message it holds). */
  readonly indexed: boolean;
  /** Seconds the journal took to read at the last start. */
  readonly indexSeconds: number;
  /** Messages the journal held at the last start. */
  readonly indexedMessages: number;
  /** Messages held loaded (the active window). */
  readonly loaded: number;
  /** Messages due now and waiting for a delivery slot. */
  readonly ready: number;
  /** The serving process's memory, in bytes (`process.memoryUsage()`). */
  readonly memory: { readonly rss: number; readonly heapUsed: number };
}

/** The control socket's name inside the queue folder. */
export const CONTROL_SOCKET = 'control.sock';

export const CONTROL_OPS = [
  'list',
  'show',
  'flush',
  'delete',
  'bounce',
  'hold',
  'release',
  'find',
  'finished',
  'status',
] as const;
export type ControlOp = (typeof CONTROL_OPS)[number];

/** One request: a line of JSON. `show`, `delete`, `bounce`, `hold`, `release` need `id`. */
export interface ControlRequest {
  readonly op: ControlOp;
  readonly id?: string;
  /** `flush` only: the messages with a recipient in this domain. */
  readonly domain?: string;
  /**
   * `find` and `finished`: what to look for. `finished` searches the stories of finished
   * messages (history.sqlite, shared by every part: any one part's answer is the whole answer).
   */
  readonly query?: TraceQuery;
}

/** A RecipientSummary as it travels: dates are ISO strings. */
export type WireRecipient = Omit<RecipientSummary, 'nextAttemptAt' | 'lastAttemptAt'> & {
  readonly nextAttemptAt: string | null;
  readonly lastAttemptAt: string | null;
};

/** A MessageSummary as it travels: dates are ISO strings. */
export type WireMessage = Omit<MessageSummary, 'receivedAt' | 'recipients'> & {
  readonly receivedAt: string;
  readonly recipients: readonly WireRecipient[];
};

/** One response: a line of JSON. `now` is the server's clock, for "in 12m" that does not drift. */
export type ControlResponse =
  | {
      readonly ok: true;
      readonly op: 'list' | 'find';
      readonly now: string;
      readonly messages: WireMessage[];
    }
  | {
      readonly ok: true;
      readonly op: 'finished';
      readonly now: string;
      /** Newest first, at most `query.limit`; empty when the history store is unavailable. */
      readonly messages: FinishedMessage[];
    }
  | {
      readonly ok: true;
      readonly op: 'show';
      readonly now: string;
      readonly message: WireMessage;
      /** The message's header section (cut at 16 KiB). */
      readonly headers: string;
    }
  | {
      readonly ok: true;
      readonly op: 'flush';
      readonly now: string;
      /** Messages made due now. */
      readonly flushed: string[];
      /** Matching messages left alone because they are held. */
      readonly held: string[];
    }
  | {
      readonly ok: true;
      readonly op: 'delete' | 'bounce' | 'hold' | 'release';
      readonly now: string;
      readonly message: WireMessage;
    }
  | ({ readonly ok: true; readonly op: 'status'; readonly now: string } & QueueStatus)
  | {
      readonly ok: false;
      readonly error: 'not-found' | 'held' | 'bad-request' | 'failed';
      readonly message: string;
    };

/** Longest request line accepted. */
const MAX_LINE = 16 * 1024;
/** A connection that sends no whole request for this long is closed. */
const IDLE_MS = 10 * 60_000;
/** A client that does not take a response within this long is cut off. */
const WRITE_MS = 60_000;

export function wire(m: MessageSummary): WireMessage {
  return JSON.parse(JSON.stringify(m)) as WireMessage;
}

/** Reads a request, or says what is wrong with it. */
export function parseRequest(line: string): ControlRequest | string {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return 'expected a line of JSON';
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'expected a JSON object';
  const { op, id, domain, query } = v as Record<string, unknown>;
  if (typeof op !== 'string' || !(CONTROL_OPS as readonly string[]).includes(op))
    return `expected "op" to be one of ${CONTROL_OPS.join(', ')}`;
  if (id !== undefined && (typeof id !== 'string' || id === '')) return 'expected "id" to be a string';
  if (domain !== undefined && (typeof domain !== 'string' || domain === ''))
    return 'expected "domain" to be a string';
  if (op === 'find' || op === 'finished') {
    const q = parseQuery(query, op);
    return typeof q === 'string' ? q : { op, query: q };
  }
  if (query !== undefined) return '"query" is only for "find" and "finished"';
  if (op !== 'list' && op !== 'flush' && op !== 'status' && id === undefined) return `"${op}" needs an "id"`;
  if (domain !== undefined && op !== 'flush') return '"domain" is only for "flush"';
  if (op === 'flush' && id !== undefined && domain !== undefined)
    return 'flush takes "id" or "domain", not both';
  return {
    op: op as ControlOp,
    ...(id === undefined ? {} : { id }),
    ...(domain === undefined ? {} : { domain }),
  };
}

/** Reads a `find` request's query, or says what is wrong with it. */
function parseQuery(v: unknown, op: 'find' | 'finished'): TraceQuery | string {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return `"${op}" needs a "query" object`;
  const q = v as Record<string, unknown>;
  const out: Record<string, string | number> = {};
  for (const k of ['id', 'messageId', 'to', 'from'] as const) {
    if (q[k] === undefined) continue;
    if (typeof q[k] !== 'string') return `expected "query.${k}" to be a string`;
    out[k] = q[k];
  }
  if (q.since !== undefined) {
    if (typeof q.since !== 'number' || !Number.isFinite(q.since))
      return 'expected "query.since" to be epoch ms';
    out.since = q.since;
  }
  if (typeof q.limit !== 'number' || !Number.isInteger(q.limit) || q.limit < 1 || q.limit > 10_000)
    return 'expected "query.limit" to be an integer from 1 to 10000';
  out.limit = q.limit;
  return out as unknown as TraceQuery;
}

/**
 * The queue's control socket, `<queue dir>/control.sock`, for `petrel queue`: owner-only
 * (mode 0600, in a 0700 folder), newline-delimited JSON, one response per request, in order.
 * Requests are taken one at a time, and the next is read only once the socket has taken the
 * response (back-pressure): a client that sends requests and never reads the answers stops being
 * read, holds at most one response in memory, and is cut off after `WRITE_MS`.
 */
export class ControlServer {
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    readonly path: string,
  ) {}

  /**
   * Before the queue opens its folder: fails when a server already answers on the folder's
   * socket (two processes must never share a journal), and removes a socket left by a crash.
   */
  static async claim(dir: string): Promise<void> {
    const path = join(dir, CONTROL_SOCKET);
    const found = await lstat(path).catch(() => null);
    if (!found) return;
    if (found.isSocket() && (await answers(path))) {
      throw new Error(
        `the queue folder ${dir} is in use by another running Petrel (it answers on ${path}); stop that one first`,
      );
    }
    await rm(path, { force: true });
  }

  static async listen(dir: string, engine: ControlTarget, log: Logger): Promise<ControlServer> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const path = join(dir, CONTROL_SOCKET);
    await rm(path, { force: true });
    const server = createServer();
    const control = new ControlServer(server, path);
    server.on('connection', (socket) => control.serve(socket, engine, log));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // The socket is bound at once: with this umask it is never more open than 0600.
      let previous: number | null = null;
      try {
        previous = process.umask(0o177);
      } catch {
        // worker threads cannot change the umask; the chmod below still applies
      }
      try {
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      } finally {
        if (previous !== null) process.umask(previous);
      }
    });
    server.on('error', (err) => log.error({ err, path }, 'queue control socket error'));
    await chmod(path, 0o600);
    return control;
  }

  private serve(socket: Socket, engine: ControlTarget, log: Logger): void {
    this.sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => this.sockets.delete(socket));
    const reader = new SocketReader();
    reader.attach(socket);
    void this.converse(socket, reader, engine, log)
      .then(
        () => socket.end(), // let the last response leave
        () => socket.destroy(), // idle past IDLE_MS, or not reading its responses
      )
      .finally(() => reader.detach());
  }

  /** One request at a time: read a line, answer it, wait until the socket took the answer. */
  private async converse(
    socket: Socket,
    reader: SocketReader,
    engine: ControlTarget,
    log: Logger,
  ): Promise<void> {
    const respond = (r: ControlResponse): Promise<'ok' | 'closed' | 'timeout'> =>
      writeDrained(socket, `${JSON.stringify(r)}\n`, WRITE_MS);
    for (;;) {
      const got = await reader.readLine(MAX_LINE, Date.now() + IDLE_MS);
      if (got === null) return;
      if (got.overlong) {
        await respond({ ok: false, error: 'bad-request', message: 'request line too long' });
        return;
      }
      const line = got.line.toString('utf8').trim();
      if (!line) continue;
      const req = parseRequest(line);
      let response: ControlResponse;
      if (typeof req === 'string') response = { ok: false, error: 'bad-request', message: req };
      else {
        try {
          response = await handle(engine, req);
        } catch (err) {
          log.error({ err, op: req.op, queueId: req.id }, 'queue control request failed');
          response = { ok: false, error: 'failed', message: (err as Error).message };
        }
      }
      const sent = await respond(response);
      if (sent === 'closed') return;
      if (sent === 'timeout') {
        log.warn({ ms: WRITE_MS }, 'queue control client did not read its responses; cutting it off');
        throw new Error('client not reading');
      }
    }
  }

  /** Stops answering and removes the socket file. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
    await rm(this.path, { force: true });
  }
}

async function handle(engine: ControlTarget, req: ControlRequest): Promise<ControlResponse> {
  const now = new Date().toISOString();
  const missing = (id: string): ControlResponse => ({
    ok: false,
    error: 'not-found',
    message: `no message ${id} in the queue (delivered, failed or removed already?)`,
  });
  switch (req.op) {
    case 'list':
      return { ok: true, op: 'list', now, messages: (await engine.list()).map(wire) };
    case 'status':
      return { ok: true, op: 'status', now, ...engine.status() };
    case 'find':
      return { ok: true, op: 'find', now, messages: (await engine.find(req.query!)).map(wire) };
    case 'finished':
      return { ok: true, op: 'finished', now, messages: engine.finished(req.query!) };
    case 'show': {
      const m = await engine.get(req.id!);
      if (!m) return missing(req.id!);
      return { ok: true, op: 'show', now, message: wire(m), headers: await engine.headers(req.id!) };
    }
    case 'flush': {
      if (req.id && !(await engine.get(req.id))) return missing(req.id);
      const { flushed, held } = await engine.flushMessages(req);
      if (req.id && held.length)
        return {
          ok: false,
          error: 'held',
          message: `${req.id} is held; release it first (petrel queue release ${req.id})`,
        };
      return { ok: true, op: 'flush', now, flushed, held };
    }
    case 'hold':
    case 'release': {
      const m = await engine.hold(req.id!, req.op === 'hold');
      return m ? { ok: true, op: req.op, now, message: wire(m) } : missing(req.id!);
    }
    case 'delete':
    case 'bounce': {
      const m = await engine.end(req.id!, req.op);
      return m ? { ok: true, op: req.op, now, message: wire(m) } : missing(req.id!);
    }
  }
}

/** True when something accepts a connection on the socket within a second. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    const done = (v: boolean): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => done(false), 1000);
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}
