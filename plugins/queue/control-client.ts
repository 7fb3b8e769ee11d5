import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { CommandError } from '../../core/index.js';
import {
  CONTROL_SOCKET,
  type BulkCounts,
  type ControlRequest,
  type ControlResponse,
  type QueueStatus,
  type WireBrief,
  type WireMessage,
} from './control-protocol.js';
import { existingParts, partDir } from './parts.js';
import { mergeShapes, type QueueShape } from './qshape.js';

/*
 * `petrel queue`'s side of the control socket: one request per connection, its answer read line
 * by line with back-pressure (a line is read only once the one before was taken), and the
 * answers of every part of the queue merged as if they came from one queue.
 */

/** Longest answer line taken (a batch of summaries is far below it). */
const MAX_ANSWER_LINE = 64 * 1024 * 1024;

const HINT = 'Start it with `petrel start` (`npm start` in the project), or pass the --config it runs with.';

/**
 * One request's answer, line by line. Each line must come within `timeoutMs` of asking for it:
 * a long answer (a list of a million messages) takes as long as it takes, a server that stops
 * answering does not.
 */
export class AnswerStream {
  private readonly socket: Socket;
  private readonly lines: string[] = [];
  private partial = '';
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(
    readonly path: string,
    req: ControlRequest,
    private readonly timeoutMs: number,
  ) {
    const socket = createConnection(path);
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.once('connect', () => socket.write(`${JSON.stringify(req)}\n`));
    socket.on('data', (chunk: string) => {
      this.partial += chunk;
      let nl = this.partial.indexOf('\n');
      while (nl >= 0) {
        this.lines.push(this.partial.slice(0, nl));
        this.partial = this.partial.slice(nl + 1);
        nl = this.partial.indexOf('\n');
      }
      if (this.partial.length > MAX_ANSWER_LINE)
        this.fail(
          new CommandError(`the server sent an answer line longer than ${MAX_ANSWER_LINE} bytes`, 70),
        );
      // Not one more line is read until this one is taken.
      if (this.lines.length) socket.pause();
      this.poke();
    });
    socket.once('end', () =>
      this.fail(new CommandError('the server closed the connection without an answer (is it stopping?)', 69)),
    );
    socket.once('error', (err: NodeJS.ErrnoException) => this.fail(connectError(err, path)));
  }

  /** The next line of the answer. */
  async next(): Promise<ControlResponse> {
    const deadline = Date.now() + this.timeoutMs;
    while (!this.lines.length) {
      if (this.failure) throw this.failure;
      this.socket.resume();
      const left = deadline - Date.now();
      if (left <= 0) {
        this.close();
        throw new CommandError(
          `the server did not answer within ${Math.round(this.timeoutMs / 1000)} s on ${this.path}`,
          75,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
    const line = this.lines.shift()!;
    try {
      return JSON.parse(line) as ControlResponse;
    } catch {
      this.close();
      throw new CommandError(`the server sent an answer that is not JSON: ${line.slice(0, 200)}`, 70);
    }
  }

  /** The answer's last line (for a streamed answer, its totals). */
  async last(): Promise<ControlResponse> {
    for (;;) {
      const r = await this.next();
      if (!streams(r)) {
        this.close();
        return r;
      }
    }
  }

  close(): void {
    this.socket.destroy();
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.socket.destroy();
    this.poke();
  }

  private poke(): void {
    this.wake?.();
  }
}

/** True when more lines of the same answer follow this one. */
export function streams(r: ControlResponse): boolean {
  return r.ok && 'more' in r && r.more;
}

function connectError(err: NodeJS.ErrnoException, path: string): CommandError {
  switch (err.code) {
    case 'ENOENT':
      return new CommandError(
        `no Petrel server is running for this queue: there is no control socket at ${path}.\n${HINT}`,
        69,
      );
    case 'ECONNREFUSED':
      return new CommandError(
        `no Petrel server is running for this queue: nothing answers on ${path} (left by a server that stopped abruptly).\n${HINT}`,
        69,
      );
    case 'EACCES':
    case 'EPERM':
      return new CommandError(
        `permission denied on ${path}: run petrel queue as the user the server runs as, or as root`,
        77,
      );
    default:
      return new CommandError(`cannot reach the server on ${path}: ${err.message}`, 69);
  }
}

/** Sends one request over the control socket and reads its answer (of a streamed one, the last line). */
export function request(
  socketPath: string,
  req: ControlRequest,
  timeoutMs: number,
): Promise<ControlResponse> {
  return new AnswerStream(socketPath, req, timeoutMs).last();
}

/**
 * The first line of each part's answer. Parts where no server answers are passed over, unless
 * none answers at all.
 */
async function openParts(
  dir: string,
  req: ControlRequest,
  timeoutMs: number,
): Promise<{ stream: AnswerStream; first: ControlResponse }[]> {
  const parts = await existingParts(dir);
  const streams = parts.map((k) => new AnswerStream(join(partDir(dir, k), CONTROL_SOCKET), req, timeoutMs));
  const settled = await Promise.allSettled(streams.map((s) => s.next()));
  const open: { stream: AnswerStream; first: ControlResponse }[] = [];
  let unreachable: unknown = null;
  let other: unknown = null;
  settled.forEach((r, i) => {
    if (r.status === 'fulfilled') open.push({ stream: streams[i]!, first: r.value });
    else if (r.reason instanceof CommandError && r.reason.code === 69) unreachable ??= r.reason;
    else other ??= r.reason;
  });
  if (other) {
    for (const s of streams) s.close();
    throw other;
  }
  if (open.length === 0) throw unreachable;
  return open;
}

/** Each answering part's `status` (parts where no server answers are passed over, unless none answers). */
export async function statusAllParts(
  dir: string,
  timeoutMs: number,
): Promise<{ part: number; status: QueueStatus }[]> {
  const parts = await existingParts(dir);
  const settled = await Promise.allSettled(
    parts.map((k) => request(join(partDir(dir, k), CONTROL_SOCKET), { op: 'status' }, timeoutMs)),
  );
  const out: { part: number; status: QueueStatus }[] = [];
  let unreachable: unknown = null;
  settled.forEach((r, i) => {
    if (r.status === 'rejected') {
      if (r.reason instanceof CommandError && r.reason.code === 69) unreachable ??= r.reason;
      else throw r.reason;
      return;
    }
    const a = r.value;
    if (!a.ok) throw new CommandError(a.message, 70);
    if (a.op === 'status') out.push({ part: parts[i]!, status: a });
  });
  if (out.length === 0 && unreachable) throw unreachable;
  return out;
}

/**
 * Sends a request to every part of the queue (one per worker, see plugins/queue/parts.ts) and
 * merges the answers as if they came from one queue: `find` lists are joined (oldest first),
 * shapes and bulk counts add up, and a request about one message gets the answer of the part
 * that holds it. For `list`, see `listAllParts`.
 */
export async function requestAllParts(
  dir: string,
  req: ControlRequest,
  timeoutMs: number,
): Promise<ControlResponse> {
  const opened = await openParts(dir, req, timeoutMs);
  const answers = await Promise.all(
    opened.map(({ stream, first }) => (streams(first) ? stream.last() : (stream.close(), first))),
  );
  const good = answers.filter((a) => a.ok);
  const first = good[0];
  if (!first) return answers.find((a) => !a.ok && a.error !== 'not-found') ?? answers[0]!;
  if (first.op === 'find') {
    const messages = good.flatMap((a) => (a.ok && a.op === 'find' ? a.messages : []));
    messages.sort((a, b) => Date.parse(a.receivedAt) - Date.parse(b.receivedAt));
    return { ...first, messages };
  }
  if (first.op === 'summary') {
    const shapes = good.flatMap((a) => (a.ok && a.op === 'summary' ? [a as QueueShape] : []));
    return { ...first, ...mergeShapes(shapes, req.top ?? first.rows.length) };
  }
  if ('bulk' in first) {
    // A failure in one part is the answer's failure; every part's counts add up.
    const failed = answers.find((a) => !a.ok && a.error !== 'not-found');
    if (failed) return failed;
    const counts = good.flatMap((a) => (a.ok && 'bulk' in a ? [a as BulkCounts] : []));
    return { ...first, ...addCounts(counts) };
  }
  return first;
}

function addCounts(all: readonly BulkCounts[]): BulkCounts {
  const sum = (k: 'matched' | 'done' | 'held' | 'notFound' | 'failed'): number =>
    all.reduce((n, c) => n + c[k], 0);
  const error = all.find((c) => c.error !== undefined)?.error;
  return {
    matched: sum('matched'),
    done: sum('done'),
    held: sum('held'),
    notFound: sum('notFound'),
    failed: sum('failed'),
    ids: all.flatMap((c) => c.ids).slice(0, 100),
    heldIds: all.flatMap((c) => c.heldIds).slice(0, 100),
    ...(error === undefined ? {} : { error }),
  };
}

export type Listed = WireMessage | WireBrief;

/**
 * `list` over every part: each part streams its messages oldest first, and the streams are
 * merged by arrival time as they come, holding at most a batch per part. `onBatch` gets the
 * merged messages a few at a time (up to `limit`, when given); the result has the totals.
 */
export async function listAllParts(
  dir: string,
  req: ControlRequest & { readonly op: 'list' },
  timeoutMs: number,
  onBatch: (messages: readonly Listed[], now: Date) => Promise<void>,
): Promise<{ matched: number; shown: number; now: Date }> {
  const opened = await openParts(dir, req, timeoutMs);
  interface Part {
    readonly stream: AnswerStream;
    batch: readonly Listed[];
    at: number;
    done: boolean;
  }
  let matched = 0;
  let now = new Date();
  const take = (part: Part, r: ControlResponse): void => {
    if (!r.ok) {
      for (const o of opened) o.stream.close();
      throw new CommandError(r.message, r.error === 'not-found' || r.error === 'held' ? 1 : 70);
    }
    if (r.op !== 'list')
      throw new CommandError('the server answered another question than the one asked', 70);
    now = new Date(r.now);
    part.batch = r.messages;
    part.at = 0;
    if (!r.more) {
      part.done = true;
      matched += r.matched;
      part.stream.close();
    }
  };
  const parts: Part[] = opened.map(({ stream, first }) => {
    const p: Part = { stream, batch: [], at: 0, done: false };
    take(p, first);
    return p;
  });
  const limit = req.limit ?? Infinity;
  let shown = 0;
  let out: Listed[] = [];
  const flush = async (): Promise<void> => {
    if (out.length) await onBatch(out, now);
    out = [];
  };
  try {
    for (;;) {
      // Every part that has more has a message at hand, or is asked for its next line.
      for (const p of parts) {
        while (p.at >= p.batch.length && !p.done) {
          await flush();
          take(p, await p.stream.next());
        }
      }
      let pick: Part | null = null;
      for (const p of parts) {
        if (p.at >= p.batch.length) continue;
        if (!pick || Date.parse(p.batch[p.at]!.receivedAt) < Date.parse(pick.batch[pick.at]!.receivedAt))
          pick = p;
      }
      if (!pick) break;
      const m = pick.batch[pick.at++]!;
      // Past the limit, the rest is read only for the totals (each part sent at most `limit`).
      if (shown < limit) {
        out.push(m);
        shown++;
        if (out.length >= 100) await flush();
      }
    }
    await flush();
  } finally {
    // Also when the caller stops early (its output closed): no part keeps a connection open.
    for (const p of parts) p.stream.close();
  }
  return { matched, shown, now };
}
