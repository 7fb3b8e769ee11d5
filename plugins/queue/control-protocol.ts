import type { MessageSummary, RecipientSummary } from './api.js';
import type { FinishedMessage, TraceQuery } from './history-store.js';
import type { QueueShape } from './qshape.js';
import { MESSAGE_STATES, selectsAll, type MessageBrief, type Selection } from './select.js';

/*
 * The queue's control protocol (control.sock, see the README's "The control socket"): what a
 * part must provide, what is asked and what is answered. The server is control.ts, the answers
 * control-answer.ts; `petrel queue` (cli.ts) and the web console (core/http/console) are clients.
 */

export type { MessageBrief, Selection } from './select.js';

/**
 * What the control socket needs of a queue part. The engine provides it; this module does not
 * know the engine, so the two depend on each other in one direction only (engine → control).
 * The walks (`select`) come from the part's index alone, so that listing or acting on a million
 * messages never needs them all in memory at once; full summaries are read per batch.
 */
export interface ControlTarget {
  /**
   * The matching messages in batches (at most `batch`, default 1000), in arrival order, from the
   * index alone; yields to the event loop between batches. A message added or finished during
   * the walk may or may not appear.
   */
  select(sel: Selection, batch?: number): AsyncIterable<readonly MessageBrief[]>;
  /** Full summaries (as `list` gives) of these messages; ids no longer queued are left out. May read the disk. */
  summaries(ids: readonly string[]): Promise<MessageSummary[]>;
  /** One message with its history (origin, attempts kept, reports), or null. */
  get(id: string): Promise<MessageSummary | null>;
  /** The message's header section as stored, cut at a limit. */
  headers(id: string): Promise<string>;
  /** Makes the matching messages' deferred recipients due now; held ones are left alone (and named). */
  flushMessages(sel: Selection): Promise<{ flushed: string[]; held: string[] }>;
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
  'summary',
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

/** The actions that take a selection as well as an id. */
export const BULK_OPS = ['flush', 'delete', 'bounce', 'hold', 'release'] as const;
export type BulkOp = (typeof BULK_OPS)[number];

/**
 * One request: a line of JSON. `show` needs `id`; `delete`, `bounce`, `hold` and `release` need
 * `id`, or `select` (for `delete` and `bounce` a non-empty one) or `all: true`.
 */
export interface ControlRequest {
  readonly op: ControlOp;
  readonly id?: string;
  /**
   * `list`, `summary` and the actions: which messages (ages in ms). `flush` without `id` or
   * `select` flushes every message.
   */
  readonly select?: Selection;
  /** `delete`, `bounce`, `hold`, `release`: every message (a selection-less delete is refused without it). */
  readonly all?: boolean;
  /** `list`: at most this many messages (the walk goes on to count `matched`). */
  readonly limit?: number;
  /** `list`: briefs (what the index knows, no disk read) instead of full summaries. */
  readonly brief?: boolean;
  /** `summary`: rows by recipient domain (default) or by sender domain. */
  readonly by?: 'recipient' | 'sender';
  /** `summary`: at most this many rows (default 50). */
  readonly top?: number;
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

/** A MessageBrief as it travels (`list` with `brief`): dates are ISO strings. */
export type WireBrief = Omit<MessageBrief, 'receivedAt' | 'nextAttemptAt'> & {
  readonly receivedAt: string;
  readonly nextAttemptAt: string | null;
};

/** What a bulk action did, so far (`more: true`) or in the end. */
export interface BulkCounts {
  /** Messages the selection matched so far. */
  readonly matched: number;
  /** Messages acted on: flushed, held, released, deleted or returned. */
  readonly done: number;
  /** `flush` only: matching messages left alone because they are held. */
  readonly held: number;
  /** Matching messages that were gone (finished) by their turn. */
  readonly notFound: number;
  /** Messages the action failed on (logged at error level); a failure ends the walk. */
  readonly failed: number;
  /** The first ids acted on (at most 100). */
  readonly ids: readonly string[];
  /** `flush` only: the first ids left alone because they are held (at most 100). */
  readonly heldIds: readonly string[];
  /** The first failure's error, when there was one. */
  readonly error?: string;
}

/**
 * One response: a line of JSON. `now` is the server's clock, for "in 12m" that does not drift.
 * `list` and the bulk actions stream: lines with `more: true`, then one with `more: false`; a
 * line with `ok: false` also ends the answer.
 */
export type ControlResponse =
  | {
      readonly ok: true;
      readonly op: 'list';
      readonly now: string;
      /** This batch: summaries, or briefs when the request asked for `brief`. */
      readonly messages: WireMessage[] | WireBrief[];
      readonly more: true;
    }
  | {
      readonly ok: true;
      readonly op: 'list';
      readonly now: string;
      readonly messages: WireMessage[] | WireBrief[];
      readonly more: false;
      /** Messages the selection matched (beyond `limit` too). */
      readonly matched: number;
      /** Messages sent. */
      readonly shown: number;
    }
  | {
      readonly ok: true;
      readonly op: 'find';
      readonly now: string;
      readonly messages: WireMessage[];
    }
  | ({ readonly ok: true; readonly op: 'summary'; readonly now: string } & QueueShape)
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
  | ({
      readonly ok: true;
      /** A `flush` (by id too), or an action with a `select` or `all`. */
      readonly op: BulkOp;
      readonly bulk: true;
      readonly now: string;
      readonly more: boolean;
    } & BulkCounts)
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

export function wire(m: MessageSummary): WireMessage {
  return JSON.parse(JSON.stringify(m)) as WireMessage;
}

export function wireBrief(b: MessageBrief): WireBrief {
  return {
    ...b,
    receivedAt: new Date(b.receivedAt).toISOString(),
    nextAttemptAt: b.nextAttemptAt === null ? null : new Date(b.nextAttemptAt).toISOString(),
  };
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

/** Reads a request, or says what is wrong with it. */
export function parseRequest(line: string): ControlRequest | string {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return 'expected a line of JSON';
  }
  if (!isObject(v)) return 'expected a JSON object';
  const { op, id, domain, query, select, all, limit, brief, by, top } = v;
  if (typeof op !== 'string' || !(CONTROL_OPS as readonly string[]).includes(op))
    return `expected "op" to be one of ${CONTROL_OPS.join(', ')}`;
  if (id !== undefined && (typeof id !== 'string' || id === '')) return 'expected "id" to be a string';
  if (op === 'find' || op === 'finished') {
    const q = parseQuery(query, op);
    return typeof q === 'string' ? q : { op, query: q };
  }
  if (query !== undefined) return '"query" is only for "find" and "finished"';
  const only = (name: string, value: unknown, ops: readonly string[]): string | null =>
    value !== undefined && !ops.includes(op)
      ? `"${name}" is only for ${ops.map((o) => `"${o}"`).join(', ')}`
      : null;
  const misplaced =
    only('domain', domain, ['flush']) ??
    only('select', select, ['list', 'summary', ...BULK_OPS]) ??
    only('all', all, BULK_OPS) ??
    only('limit', limit, ['list']) ??
    only('brief', brief, ['list']) ??
    only('by', by, ['summary']) ??
    only('top', top, ['summary']);
  if (misplaced) return misplaced;
  // `{"op":"flush","domain":"D"}` is the older form of `{"op":"flush","select":{"domain":"D"}}`.
  if (domain !== undefined && (typeof domain !== 'string' || domain === ''))
    return 'expected "domain" to be a string';
  if (domain !== undefined && select !== undefined) return 'flush takes "domain" or "select", not both';
  const sel = parseSelection(domain !== undefined ? { domain } : select);
  if (typeof sel === 'string') return sel;
  if (all !== undefined && typeof all !== 'boolean') return 'expected "all" to be true or false';
  if (limit !== undefined && (typeof limit !== 'number' || !Number.isInteger(limit) || limit < 1))
    return 'expected "limit" to be a whole number above 0';
  if (brief !== undefined && typeof brief !== 'boolean') return 'expected "brief" to be true or false';
  if (by !== undefined && by !== 'recipient' && by !== 'sender')
    return 'expected "by" to be "recipient" or "sender"';
  if (top !== undefined && (typeof top !== 'number' || !Number.isInteger(top) || top < 1 || top > 10_000))
    return 'expected "top" to be an integer from 1 to 10000';
  const many = sel !== undefined || all === true;
  if (id !== undefined && many) return `"${op}" takes "id" or a selection, not both`;
  if (op === 'show' && id === undefined) return '"show" needs an "id"';
  if (op === 'hold' || op === 'release' || op === 'delete' || op === 'bounce') {
    if (id === undefined && !many) return `"${op}" needs an "id", a "select" or "all": true`;
    // Safety: a typo must not empty the queue; every message is asked for in so many words.
    if ((op === 'delete' || op === 'bounce') && id === undefined && all !== true && selectsAll(sel ?? {}))
      return `refusing to ${op} every message: give a non-empty "select", or "all": true`;
  }
  return {
    op: op as ControlOp,
    ...(id === undefined ? {} : { id: id as string }),
    ...(sel === undefined ? {} : { select: sel }),
    ...(all === undefined ? {} : { all }),
    ...(limit === undefined ? {} : { limit }),
    ...(brief === undefined ? {} : { brief }),
    ...(by === undefined ? {} : { by }),
    ...(top === undefined ? {} : { top }),
  };
}

/** Reads a selection, or says what is wrong with it. */
function parseSelection(v: unknown): Selection | undefined | string {
  if (v === undefined) return undefined;
  if (!isObject(v)) return 'expected "select" to be an object';
  const out: Record<string, string | number> = {};
  for (const [k, value] of Object.entries(v)) {
    switch (k) {
      case 'id':
      case 'domain':
      case 'sender':
        if (typeof value !== 'string' || value === '') return `expected "select.${k}" to be a string`;
        out[k] = value;
        break;
      case 'state':
        if (!(MESSAGE_STATES as readonly unknown[]).includes(value))
          return `expected "select.state" to be one of ${MESSAGE_STATES.join(', ')}`;
        out[k] = value as string;
        break;
      case 'olderThan':
      case 'newerThan':
        if (typeof value !== 'number' || !Number.isFinite(value) || value < 0)
          return `expected "select.${k}" to be milliseconds`;
        out[k] = value;
        break;
      default:
        return `unknown "select.${k}" (id, state, domain, sender, olderThan, newerThan)`;
    }
  }
  return out as Selection;
}

/** Reads a `find` request's query, or says what is wrong with it. */
function parseQuery(v: unknown, op: 'find' | 'finished'): TraceQuery | string {
  if (!isObject(v)) return `"${op}" needs a "query" object`;
  const q = v;
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
