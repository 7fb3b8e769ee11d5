import type { Logger } from 'pino';
import {
  wire,
  wireBrief,
  type BulkCounts,
  type BulkOp,
  type ControlRequest,
  type ControlResponse,
  type ControlTarget,
} from './control-protocol.js';
import { ShapeTally } from './qshape.js';
import type { MessageBrief, Selection } from './select.js';

/*
 * The control socket's answers (control-protocol.ts says what they are). `list` and the bulk
 * actions walk the part's index batch by batch and send a line per batch, each only once the
 * client has taken the one before (`send` waits for that): however many messages match, the
 * server holds one batch of them, never the whole list.
 */

/**
 * Sends one line of an answer; resolves false when the client is gone (the answer stops there).
 * It throws when the client does not take the line in time.
 */
export type Send = (r: ControlResponse) => Promise<boolean>;

/** Messages per `list` line: summaries (which may each read the disk), briefs (from memory). */
const SUMMARY_BATCH = 200;
const BRIEF_BATCH = 1000;
/** Messages per walk step of a bulk action, and how many of them are changed at once. */
const BULK_BATCH = 1000;
const BULK_PARALLEL = 64;
/** Ids named in a bulk answer. */
const BULK_IDS = 100;
/** `summary` rows when the request does not say. */
const SUMMARY_ROWS = 50;

export async function answer(
  engine: ControlTarget,
  req: ControlRequest,
  send: Send,
  log: Logger,
): Promise<void> {
  const now = (): string => new Date().toISOString();
  const missing = (id: string): ControlResponse => ({
    ok: false,
    error: 'not-found',
    message: `no message ${id} in the queue (delivered, failed or removed already?)`,
  });
  switch (req.op) {
    case 'list':
      return list(engine, req, send);
    case 'summary': {
      const tally = new ShapeTally(req.by ?? 'recipient', Date.now());
      for await (const batch of engine.select(req.select ?? {}, BRIEF_BATCH))
        for (const b of batch) tally.add(b);
      await send({ ok: true, op: 'summary', now: now(), ...tally.result(req.top ?? SUMMARY_ROWS) });
      return;
    }
    case 'status':
      await send({ ok: true, op: 'status', now: now(), ...engine.status() });
      return;
    case 'find':
      await send({ ok: true, op: 'find', now: now(), messages: (await engine.find(req.query!)).map(wire) });
      return;
    case 'finished':
      await send({ ok: true, op: 'finished', now: now(), messages: engine.finished(req.query!) });
      return;
    case 'show': {
      const m = await engine.get(req.id!);
      await send(
        m
          ? { ok: true, op: 'show', now: now(), message: wire(m), headers: await engine.headers(req.id!) }
          : missing(req.id!),
      );
      return;
    }
    case 'flush':
      if (req.id) {
        const { flushed, held } = await engine.flushMessages({ id: req.id });
        if (held.length) {
          await send({
            ok: false,
            error: 'held',
            message: `${req.id} is held; release it first (petrel queue release ${req.id})`,
          });
        } else if (!flushed.length) await send(missing(req.id));
        else await send({ ok: true, op: 'flush', bulk: true, now: now(), more: false, ...one(req.id) });
        return;
      }
      return bulk(engine, 'flush', req.select ?? {}, send, log);
    case 'hold':
    case 'release':
    case 'delete':
    case 'bounce': {
      if (req.id === undefined) return bulk(engine, req.op, req.select ?? {}, send, log);
      const m =
        req.op === 'hold' || req.op === 'release'
          ? await engine.hold(req.id, req.op === 'hold')
          : await engine.end(req.id, req.op);
      await send(m ? { ok: true, op: req.op, now: now(), message: wire(m) } : missing(req.id));
      return;
    }
  }
}

/** The counts of an action done on one message. */
function one(id: string): BulkCounts {
  return { matched: 1, done: 1, held: 0, notFound: 0, failed: 0, ids: [id], heldIds: [] };
}

/** `list`: a line per batch of the walk, summaries read per batch; the last line has the totals. */
async function list(engine: ControlTarget, req: ControlRequest, send: Send): Promise<void> {
  const limit = req.limit ?? Infinity;
  let matched = 0;
  let shown = 0;
  for await (const batch of engine.select(req.select ?? {}, req.brief ? BRIEF_BATCH : SUMMARY_BATCH)) {
    matched += batch.length;
    // Past the limit the walk goes on, from the index alone, to count what matches.
    const take = batch.slice(0, Math.max(0, limit - shown));
    if (take.length === 0) continue;
    const messages = req.brief
      ? take.map(wireBrief)
      : (await engine.summaries(take.map((b) => b.id))).map(wire);
    shown += messages.length;
    const sent = await send({ ok: true, op: 'list', now: new Date().toISOString(), messages, more: true });
    if (!sent) return;
  }
  await send({
    ok: true,
    op: 'list',
    now: new Date().toISOString(),
    messages: [],
    more: false,
    matched,
    shown,
  });
}

/**
 * An action on every message a selection matches: the walk takes a batch, changes up to
 * BULK_PARALLEL of its messages at once (hold and delete are journal writes, grouped by the
 * journal's commits), reports its counts, and takes the next. A failure ends the walk after its
 * batch, with the error: a write that failed once (a full disk) would fail for the rest too.
 */
async function bulk(
  engine: ControlTarget,
  op: BulkOp,
  selection: Selection,
  send: Send,
  log: Logger,
): Promise<void> {
  // A release means the held ones: the others need no release.
  const sel: Selection =
    op === 'release' && selection.state === undefined ? { ...selection, state: 'held' } : selection;
  const c = { matched: 0, done: 0, held: 0, notFound: 0, failed: 0 };
  const ids: string[] = [];
  const heldIds: string[] = [];
  let error: string | undefined;
  const act = async (b: MessageBrief): Promise<void> => {
    try {
      if (op === 'flush') {
        const { flushed, held } = await engine.flushMessages({ id: b.id });
        if (held.length) {
          c.held++;
          if (heldIds.length < BULK_IDS) heldIds.push(b.id);
          return;
        }
        if (!flushed.length) return void c.notFound++;
      } else {
        const m =
          op === 'hold' || op === 'release'
            ? await engine.hold(b.id, op === 'hold')
            : await engine.end(b.id, op);
        if (!m) return void c.notFound++;
      }
      c.done++;
      if (ids.length < BULK_IDS) ids.push(b.id);
    } catch (err) {
      c.failed++;
      error ??= (err as Error).message;
      log.error({ err, op, queueId: b.id }, 'queue control: a bulk action failed on a message');
    }
  };
  const counts = (): BulkCounts => ({ ...c, ids, heldIds, ...(error === undefined ? {} : { error }) });
  for await (const batch of engine.select(sel, BULK_BATCH)) {
    c.matched += batch.length;
    await inParallel(batch, BULK_PARALLEL, act);
    if (c.failed) break;
    const sent = await send({
      ok: true,
      op,
      bulk: true,
      now: new Date().toISOString(),
      more: true,
      ...counts(),
    });
    if (!sent) return;
  }
  if (c.done || c.failed) log.info({ op, selection: sel, ...c }, 'queue control: bulk action done');
  await send({ ok: true, op, bulk: true, now: new Date().toISOString(), more: false, ...counts() });
}

/** Runs `fn` on every item, at most `n` at a time. */
async function inParallel<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
}
