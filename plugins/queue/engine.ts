import type { Logger } from 'pino';
import type {
  Address,
  DeliveryRecipient,
  PluginHooks,
  RecipientReply,
  RecipientResult,
  Route,
} from '../../core/index.js';
import type { RetrySchedule } from './schedule.js';
import { DueHeap } from './due-heap.js';
import { ReadyQueue } from './ready.js';
import {
  QueueStore,
  type Entry,
  type RecipientState,
  type StoredEnvelope,
  type WindowLimits,
} from './store.js';
import type { MessageSummary } from './api.js';
import { ControlServer, wire, type ControlTarget, type QueueStatus } from './control.js';
import { matcher, selectsAll, type MessageBrief, type Selection } from './select.js';
import { lockPart } from './lock.js';
import { expansionOf } from './expand.js';
import type { QueueMetrics } from './metrics.js';
import { outcomeOf, type AttemptLimits, type AttemptRecord } from './history.js';
import { bareMessageId, HistoryStore, type FinishedMessage, type TraceQuery } from './history-store.js';

export interface EngineOptions {
  log: Logger;
  schedule: RetrySchedule;
  lifetime: number;
  concurrency: number;
  segmentSize: number;
  /** Octets of new messages kept in memory for their first attempt. */
  memoryCache: number;
  /** Envelopes held parsed at most (the active window); absent: the store's defaults. */
  activeWindow?: WindowLimits;
  hooks: PluginHooks;
  /** Where attempts and journal syncs are counted (absent: not counted). */
  metrics?: QueueMetrics;
  /** Message histories: attempts kept per recipient, and the store of finished messages' stories. */
  history: {
    readonly attempts: AttemptLimits;
    readonly path: string;
    readonly retention: number;
    readonly maxMessages: number;
  };
}

const COMPACT_EVERY = 60_000;
/** Long walks over the queue (a million messages) let the event loop run every this many. */
const YIELD_EVERY = 10_000;
/** A message whose records do not read back is tried again after this long. */
const UNREADABLE_RETRY = 30 * 60_000;
/** Messages read from disk at once for administration. */
const SUMMARY_READS = 16;
const MAX_TIMER = 60_000;
/** Back-off between tries to record an attempt's outcome: doubling from the first to the last. */
const RECORD_RETRY_FIRST = 500;
const RECORD_RETRY_MAX = 30_000;

function replyText(text: string | readonly string[]): string {
  return typeof text === 'string' ? text : text.join(' ');
}

/**
 * One queue directory's store and scheduler. A config reload sets the plugin up again while the
 * old set still serves sessions: both share this engine (by directory), and deliveries run
 * through the hooks of the newest plugin set. It closes when the last user releases it.
 */
export class QueueEngine implements ControlTarget {
  private static readonly open = new Map<string, { engine: QueueEngine; users: number }>();

  private readonly ready = new ReadyQueue();
  /** Messages with a delivery attempt in progress. */
  private readonly attempting = new Set<string>();
  private active = 0;
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Infinity;
  /** An `arm` is scheduled for the next turn of the event loop. */
  private arming = false;
  private due = new DueHeap();
  private compactor: NodeJS.Timeout | null = null;
  private closing = false;
  /** False until the plugin set that delivers is complete (a transport may come after the queue). */
  private started = false;
  private idle: (() => void) | null = null;
  /** Administrative changes waiting for a message's delivery attempt to end, per message id. */
  private readonly waiting = new Map<string, (() => void)[]>();
  /** Administrative changes in progress (closing waits for them). */
  private readonly changes = new Set<Promise<unknown>>();
  private control: ControlServer | null = null;
  /** Gives the part's lock back (after the store is closed). */
  private releaseLock: () => Promise<void> = async () => undefined;
  /** Messages whose last attempt's outcome is not on disk yet, with the error that stops it. */
  private readonly unrecorded = new Map<string, string>();
  /**
   * The reports (DSNs) queued here, by the id of the message they report on. An id leaves when
   * either message finishes (a finished report is found in the history store), so this holds no
   * more than the queue does.
   */
  private readonly reports = new Map<string, Set<string>>();
  /** Back-off waits in progress, woken early when the queue closes. */
  private readonly sleepers = new Set<() => void>();

  private constructor(
    readonly store: QueueStore,
    private opts: EngineOptions,
    /** Null when the history store could not be opened: mail flows, histories end with the queue. */
    private readonly history: HistoryStore | null,
  ) {}

  static async acquire(dir: string, opts: EngineOptions): Promise<QueueEngine> {
    const known = QueueEngine.open.get(dir);
    if (known) {
      known.users++;
      // The newest plugin set delivers, once it is complete; a reload that fails never takes over.
      void opts.hooks.ready.then(() => {
        known.engine.opts = opts;
      });
      return known.engine;
    }
    // One process per queue part: a lock file, then the control socket's own check (which also
    // removes a stale socket).
    const unlock = await lockPart(dir);
    const store = new QueueStore(
      dir,
      opts.segmentSize,
      opts.log,
      opts.memoryCache,
      opts.metrics?.synced,
      opts.history.attempts,
      opts.activeWindow,
    );
    let history: HistoryStore | null = null;
    let engine: QueueEngine | null = null;
    try {
      await ControlServer.claim(dir);
      try {
        history = HistoryStore.acquire({ ...opts.history, log: opts.log });
      } catch (err) {
        // A full disk or a broken file must not stop the mail: the queue's own records go on.
        opts.log.error(
          { err, path: opts.history.path },
          'message history unavailable until the next start: finished messages are not kept for petrel trace',
        );
      }
      engine = new QueueEngine(store, opts, history);
      const opened = engine;
      await store.open((finished) => opened.recovered(finished));
    } catch (err) {
      if (history) HistoryStore.release(history);
      await unlock();
      throw err;
    }
    engine.releaseLock = unlock;
    QueueEngine.open.set(dir, { engine, users: 1 });
    try {
      engine.control = await ControlServer.listen(dir, engine, opts.log);
    } catch (err) {
      // Mail still flows; only `petrel queue` cannot reach this server.
      opts.log.error({ err, dir }, 'queue control socket unavailable; petrel queue cannot reach this server');
    }
    opts.log.info({ dir, recoveredFromCrash: store.recoveredFromCrash }, 'queue opened; reading its journal');
    const indexed = engine;
    store.indexed.then(
      () => void indexed.onIndexed(),
      (err: unknown) => {
        if (indexed.closing) return;
        opts.log.error({ err, dir }, 'queue journal could not be read; its messages wait for the next start');
      },
    );
    engine.compactor = setInterval(() => {
      engine.store.compact().catch((err: unknown) => opts.log.error({ err }, 'queue compaction failed'));
    }, COMPACT_EVERY);
    engine.compactor.unref();
    void opts.hooks.ready.then(() => {
      engine.started = true;
      engine.pump();
    });
    return engine;
  }

  /**
   * The journal is read: every message it held is known. Each is put on the timetable (due ones
   * are tried at once), and reports are indexed. Until now only mail accepted since the start was
   * delivered.
   */
  private async onIndexed(): Promise<void> {
    const { store } = this;
    let messages = 0;
    let walked = 0;
    for (const entry of store.entries.values()) {
      // A million of them: the event loop runs between every few thousand.
      if (++walked % YIELD_EVERY === 0) await new Promise((resolve) => setImmediate(resolve));
      if (this.closing) return;
      if (!entry.recovered || store.entries.get(entry.id) !== entry) continue;
      messages++;
      this.noteReport(entry);
      this.schedule(entry);
    }
    this.opts.log.info(
      { dir: store.dir, messages, indexSeconds: store.indexing.seconds },
      'queue journal read; every message it held is scheduled',
    );
    this.arm();
    this.pump();
  }

  /** The open engine of a queue folder, if any (for administration and tests). */
  static get(dir: string): QueueEngine | undefined {
    return QueueEngine.open.get(dir)?.engine;
  }

  static async release(engine: QueueEngine): Promise<void> {
    const known = QueueEngine.open.get(engine.store.dir);
    if (!known || known.engine !== engine) return;
    if (--known.users > 0) return;
    QueueEngine.open.delete(engine.store.dir);
    await engine.close();
  }

  /** Stores a message durably and schedules its first attempt now. */
  async accept(env: StoredEnvelope, body: { inline: Buffer[] } | { file: string }): Promise<void> {
    const entry = await this.store.add(env, body);
    this.noteReport(entry);
    this.ready.add(entry);
    this.pump();
  }

  // --- administration: the control socket's and the Queue service's view of the index --------
  //
  // Everything administration reads of the queue goes through this block: a brief per message
  // (`brief`, from its index entry alone), walks over them (`select`), and full summaries of some
  // (`summaries`, `get`, `find`, `list`), which read from disk the messages not loaded.

  /** What the index knows of a message (see MessageBrief): no disk read. */
  private brief(e: Entry): MessageBrief {
    const domains = new Set<string>();
    let waiting = 0;
    let next = Infinity;
    let deferred = false;
    e.rcpts.forEach((r, i) => {
      if (r.status !== 'pending' && r.status !== 'deferred') return;
      waiting++;
      domains.add(e.domains[i]!);
      if (r.nextAttemptAt < next) next = r.nextAttemptAt;
      if (r.attempts > 0) deferred = true;
    });
    return {
      id: e.id,
      sender: e.sender,
      receivedAt: e.receivedAt,
      size: e.size,
      held: e.held,
      attempting: this.attempting.has(e.id),
      domains: [...domains],
      waiting,
      nextAttemptAt: next === Infinity ? null : next,
      deferred,
    };
  }

  /** The matching messages' briefs, in batches, in arrival order (ControlTarget.select). */
  async *select(sel: Selection, batch = 1000): AsyncGenerator<readonly MessageBrief[]> {
    const matches = matcher(sel, Date.now());
    if (sel.id !== undefined) {
      const e = this.store.entries.get(sel.id);
      const b = e ? this.brief(e) : null;
      if (b && matches(b)) yield [b];
      return;
    }
    let out: MessageBrief[] = [];
    let scanned = 0;
    // The map's own iterator: entries added during the walk come at its end, finished ones are
    // skipped, and none is visited twice.
    for (const e of this.store.entries.values()) {
      const b = this.brief(e);
      if (matches(b)) out.push(b);
      if (out.length >= batch) {
        yield out;
        out = [];
      }
      // A walk that matches little still lets the event loop (SMTP sessions, attempts) run.
      if (++scanned % 10_000 === 0) await new Promise((resolve) => setImmediate(resolve));
    }
    if (out.length) yield out;
  }

  /** Whether a message is in this part (from the index: no disk read). */
  has(id: string): boolean {
    return this.store.entries.has(id);
  }

  /**
   * Every message not yet final, oldest first (the Queue service's `list`): reads from disk each
   * one not loaded. With a large queue, `select` and `summaries` in batches are the way.
   */
  async list(): Promise<MessageSummary[]> {
    const all = await this.summaries([...this.store.entries.keys()]);
    return all.sort((a, b) => a.receivedAt.getTime() - b.receivedAt.getTime());
  }

  /**
   * Summaries of these messages, in the order given (ControlTarget.summaries); a message that is
   * gone, or whose records cannot be read (logged), is left out. Messages not loaded are read
   * from the journal, a few at a time, and do not stay loaded on account of this.
   */
  async summaries(ids: readonly string[], detail = false): Promise<MessageSummary[]> {
    const out: (MessageSummary | null)[] = new Array<MessageSummary | null>(ids.length).fill(null);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < ids.length) {
        const k = next++;
        const entry = this.store.entries.get(ids[k]!);
        if (!entry) continue;
        try {
          out[k] = await this.store.use(entry, (e) => this.summary(e, detail));
        } catch (err) {
          this.opts.log.error(
            { err, queueId: entry.id },
            'queue: a message could not be read for administration',
          );
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(SUMMARY_READS, ids.length) }, worker));
    return out.filter((m): m is MessageSummary => m !== null);
  }

  /** One message with its history, or null. */
  async get(id: string): Promise<MessageSummary | null> {
    const [m] = await this.summaries([id], true);
    return m ? this.withReports(m) : null;
  }

  /**
   * The queued messages that match (for `petrel trace`), with their histories, oldest first. The
   * index narrows by id, sender and arrival; the rest is read from disk.
   */
  async find(query: TraceQuery): Promise<MessageSummary[]> {
    const messageId = query.messageId === undefined ? undefined : bareMessageId(query.messageId);
    const lower = (s: string | undefined): string | undefined => s?.toLowerCase();
    const to = lower(query.to);
    const from = query.from === undefined ? undefined : query.from === '<>' ? '' : query.from.toLowerCase();
    const candidates: string[] = [];
    for (const e of this.store.entries.values()) {
      if (query.id !== undefined && e.id !== query.id) continue;
      if (from !== undefined && e.sender.toLowerCase() !== from) continue;
      if (query.since !== undefined && e.receivedAt < query.since) continue;
      candidates.push(e.id);
    }
    const found: MessageSummary[] = [];
    for (let i = 0; i < candidates.length; i += 1000) {
      const batch = await this.summaries(candidates.slice(i, i + 1000), true);
      for (const m of batch) {
        if (messageId !== undefined && bareMessageId(m.origin?.messageId ?? '') !== messageId) continue;
        if (
          to !== undefined &&
          !m.recipients.some((r) => r.address.toLowerCase() === to || lower(r.expandedFrom) === to)
        )
          continue;
        found.push(this.withReports(m));
      }
    }
    return found.sort((a, b) => a.receivedAt.getTime() - b.receivedAt.getTime()).slice(-query.limit);
  }

  /**
   * Makes deferred recipients due now: one message, those with a recipient in a domain, or all.
   * Held messages are left alone. Resolves to how many messages were made due (the Queue
   * service's `flush`), once the journal is read: a message it holds may be due.
   */
  async flush(target: string | { id?: string; domain?: string } = {}): Promise<number> {
    return (await this.flushMessages(typeof target === 'string' ? { id: target } : target)).flushed.length;
  }

  /** `flush` for the matching messages, saying which were made due and which are held. */
  async flushMessages(sel: Selection): Promise<{ flushed: string[]; held: string[] }> {
    await this.store.indexed;
    const flushed: string[] = [];
    const held: string[] = [];
    const now = Date.now();
    const matches = matcher(sel, now);
    // By id alone (a bulk flush goes message by message) or every message: no brief to build.
    const any = selectsAll({ ...sel, id: undefined });
    const one = sel.id === undefined ? undefined : this.store.entries.get(sel.id);
    // Every message made due: the timetable is all out of date, and is started again (those not
    // flushed now — held, or in an attempt — are put back on it when released or tried).
    if (sel.id === undefined && any) this.due = new DueHeap();
    let walked = 0;
    for (const e of one ? [one] : sel.id === undefined ? this.store.entries.values() : []) {
      if (++walked % YIELD_EVERY === 0) await new Promise((resolve) => setImmediate(resolve));
      if (this.store.entries.get(e.id) !== e) continue;
      if (!any && !matches(this.brief(e))) continue;
      if (e.held) {
        held.push(e.id);
        continue;
      }
      this.store.makeDue(e, now);
      if (!e.busy) this.ready.add(e);
      flushed.push(e.id);
    }
    this.pump();
    return { flushed, held };
  }

  // --- end of administration -------------------------------------------------------------------

  /** False once the part is closing (for the readiness check). */
  get isOpen(): boolean {
    return !this.closing;
  }

  /** Finished messages' stories that match, newest first (empty without a history store). */
  finished(query: TraceQuery): FinishedMessage[] {
    return this.history?.find(query) ?? [];
  }

  status(): QueueStatus {
    let recipients = 0;
    for (const e of this.store.entries.values())
      for (const r of e.rcpts) if (r.status === 'pending' || r.status === 'deferred') recipients++;
    const { rss, heapUsed } = process.memoryUsage();
    return {
      messages: this.store.entries.size,
      recipients,
      attempting: this.attempting.size,
      indexed: this.store.isIndexed,
      indexSeconds: this.store.indexing.seconds,
      indexedMessages: this.store.indexing.messages,
      loaded: this.store.window.size,
      ready: this.ready.size,
      memory: { rss, heapUsed },
    };
  }

  /** A message's header section as stored (up to `limit` characters), for `petrel queue show`. */
  async headers(id: string, limit = 16_384): Promise<string> {
    const entry = this.store.entries.get(id);
    if (!entry) return '';
    return this.store
      .use(entry, async () => {
        let text = '';
        const stream = this.store.view(entry).stream();
        try {
          for await (const chunk of stream) {
            text += (chunk as Buffer).toString('latin1');
            const end = text.indexOf('\r\n\r\n');
            if (end >= 0) return Buffer.from(text.slice(0, end + 2), 'latin1').toString('utf8');
            if (text.length >= limit) break;
          }
        } finally {
          stream.destroy();
        }
        return Buffer.from(text.slice(0, limit), 'latin1').toString('utf8');
      })
      .catch(() => ''); // finished and removed meanwhile
  }

  /**
   * Holds a message (no attempts until it is released) or releases it, durably. An attempt in
   * progress is not interrupted. Null when no message has this id.
   */
  async hold(id: string, held: boolean): Promise<MessageSummary | null> {
    await this.store.indexed;
    const entry = this.store.entries.get(id);
    if (!entry) return null;
    this.check();
    if (entry.held !== held) {
      await this.tracked(this.store.setHeld(entry, held));
      // A held message may wait for days: it does not keep memory from newer ones.
      if (held) this.store.dropMemory(entry);
      this.opts.log.info({ queueId: id }, held ? 'message held by the administrator' : 'message released');
    }
    if (!held && this.store.entries.get(id) === entry && !entry.busy) {
      this.ready.add(entry);
      this.pump();
    }
    return (await this.summaries([id]))[0] ?? null;
  }

  /**
   * Ends a message now: every recipient not yet final fails, durably, and the `failed` hooks run.
   * `delete` drops it silently (reason `deleted`: a bounce plugin sends nothing); `bounce` fails
   * it as refused, so that the sender is told. Waits for a delivery attempt in progress to end.
   * Returns the message as it ended, or null when no message has this id.
   */
  async end(id: string, how: 'delete' | 'bounce'): Promise<MessageSummary | null> {
    this.check();
    await this.store.indexed;
    return this.tracked(
      this.exclusive(id, async (entry) => {
        await this.store.load(entry);
        const { hooks, log } = this.opts;
        const message = this.store.view(entry);
        const notices: (() => Promise<void>)[] = [];
        const states = new Map<number, RecipientState>();
        const attempts = new Map<number, AttemptRecord>();
        const now = Date.now();
        entry.rcpts.forEach((st, i) => {
          if (st.status === 'delivered' || st.status === 'failed') return;
          const recipient = this.recipient(entry, i);
          const last = st.lastReply;
          const why = last ? `; last error: ${last.code} ${last.enhanced} ${replyText(last.text)}` : '';
          const reply: RecipientReply =
            how === 'delete'
              ? { code: 550, enhanced: '5.0.0', text: `Deleted by the administrator${why}` }
              : { code: 550, enhanced: '5.0.0', text: `Returned by the administrator${why}` };
          states.set(i, { ...st, status: 'failed', lastReply: reply, maybeDelivered: false });
          attempts.set(i, {
            t: now,
            status: 'failed',
            reply,
            kind: how === 'delete' ? 'deleted' : 'returned',
          });
          const result: RecipientResult = { recipient: recipient.address.address, status: 'failed', reply };
          const route = st.route ?? null;
          const reason = how === 'delete' ? 'deleted' : 'refused';
          notices.push(() => hooks.notify('failed', { message, recipient, route, result, reason }));
        });
        // Not recorded (it throws): the message stays as it was, as the disk has it.
        const final = await this.store.update(entry, states, attempts);
        const summary = this.summary(entry);
        log.info(
          { queueId: id, recipients: states.size },
          how === 'delete' ? 'message deleted by the administrator' : 'message returned by the administrator',
        );
        for (const n of notices) await n();
        if (final) this.finish(entry);
        return summary;
      }),
    );
  }

  /** Refuses changes once the queue is closing. */
  private check(): void {
    if (this.closing) throw new Error('the queue is shutting down');
  }

  private tracked<T>(p: Promise<T>): Promise<T> {
    this.changes.add(p);
    const done = (): void => void this.changes.delete(p);
    p.then(done, done);
    return p;
  }

  /**
   * Runs `fn` on a message while no delivery attempt is in progress and none can start: it
   * waits for an attempt to end, then takes the message over (null when it is gone by then).
   */
  private async exclusive<T>(id: string, fn: (entry: Entry) => Promise<T>): Promise<T | null> {
    const entry = this.store.entries.get(id);
    if (!entry) return null;
    if (entry.busy) {
      // The attempt (or change) in progress hands the message over when it ends.
      await new Promise<void>((resolve) => {
        const queue = this.waiting.get(id) ?? [];
        queue.push(resolve);
        this.waiting.set(id, queue);
      });
    } else {
      this.store.setBusy(entry, true);
    }
    try {
      if (this.store.entries.get(id) !== entry) return null;
      return await fn(entry);
    } finally {
      this.unlock(entry);
      if (this.store.entries.get(id) === entry) this.ready.add(entry);
      this.pump();
    }
  }

  /** Ends a message's busy time, or hands it to the next administrative change waiting for it. */
  private unlock(entry: Entry): void {
    const queue = this.waiting.get(entry.id);
    const next = queue?.shift();
    if (queue && queue.length === 0) this.waiting.delete(entry.id);
    if (next) next();
    else this.store.setBusy(entry, false);
  }

  /**
   * A summary of one message for administration; `detail` adds its history (origin, attempts kept,
   * the reports sent about it).
   */
  summary(entry: Entry, detail = false): MessageSummary {
    return {
      id: entry.id,
      sender: entry.sender,
      receivedAt: new Date(entry.receivedAt),
      size: entry.size,
      held: entry.held,
      ...(entry.held && entry.env.hold ? { heldReason: entry.env.hold.reason } : {}),
      attempting: this.attempting.has(entry.id),
      ...(this.unrecorded.has(entry.id) ? { unrecorded: this.unrecorded.get(entry.id)! } : {}),
      recipients: entry.rcpts.map((r, i) => ({
        address: entry.env.recipients[i]!.address.address,
        ...expansionOf(entry.env.recipients[i]!),
        status: r.status,
        attempts: r.attempts,
        transport: r.route?.transport ?? null,
        nextAttemptAt: r.status === 'pending' || r.status === 'deferred' ? new Date(r.nextAttemptAt) : null,
        lastReply: r.lastReply ?? null,
        lastAttemptAt: r.lastAttemptAt ? new Date(r.lastAttemptAt) : null,
        ...(r.postponed ? { postponed: r.postponed } : {}),
        ...(detail ? { history: r.history, omitted: r.omitted } : {}),
      })),
      ...(detail && entry.env.origin ? { origin: entry.env.origin } : {}),
      ...(detail ? { reports: [...(this.reports.get(entry.id) ?? [])] } : {}),
    };
  }

  /** Indexes a message that reports on another (a DSN). */
  private noteReport(entry: Entry): void {
    const about = entry.reportFor;
    if (!about) return;
    const known = this.reports.get(about) ?? new Set<string>();
    known.add(entry.id);
    this.reports.set(about, known);
  }

  /** Drops a finished message from the report index, as a report and as a message reported on. */
  private forgetReports(entry: Entry): void {
    this.reports.delete(entry.id);
    const about = entry.reportFor;
    const known = about ? this.reports.get(about) : undefined;
    if (!about || !known) return;
    known.delete(entry.id);
    if (known.size === 0) this.reports.delete(about);
  }

  /** For `show` and `find`: the reports about a message, queued here or finished. */
  private withReports(summary: MessageSummary): MessageSummary {
    let done: string[] = [];
    const id = summary.id;
    try {
      done = this.history?.reportsOn(id) ?? [];
    } catch (err) {
      this.opts.log.error({ err, queueId: id }, 'message history: could not read the reports on a message');
    }
    return { ...summary, reports: [...new Set([...done, ...(summary.reports ?? [])])] };
  }

  /** A finished message's story, for the history store. */
  private story(entry: Entry, finishedAt: number): FinishedMessage {
    const { unrecorded: _unrecorded, ...rest } = wire(this.summary(entry, true));
    return {
      ...rest,
      attempting: false,
      held: false,
      finishedAt: new Date(finishedAt).toISOString(),
      outcome: outcomeOf(entry.rcpts),
    };
  }

  /**
   * Hands a message that just finished to the history store, and removes its files once the
   * story is committed (until then its journal records are what a restart would rebuild the story
   * from). Off the delivery path: the caller does not wait. A story that cannot be stored is
   * logged, and the files go anyway: the spool must not grow because the history cannot.
   */
  private finish(entry: Entry): void {
    const id = entry.id;
    const story = this.history?.add(this.story(entry, Date.now())) ?? Promise.resolve();
    this.forgetReports(entry);
    const done = story
      .catch((err: unknown) =>
        this.opts.log.error(
          { err, queueId: id },
          'message history: could not store the story of a finished message',
        ),
      )
      .then(() => this.store.discard(entry))
      .catch((err: unknown) =>
        this.opts.log.error({ err, queueId: id }, 'queue: removing a finished message failed'),
      );
    void this.tracked(done);
  }

  /**
   * At open: messages the journal shows finished. Their stories are stored again (the same id
   * replaces the same story), since a crash may have come before the first write was committed.
   */
  private async recovered(entries: readonly Entry[]): Promise<void> {
    const last = (e: Entry): number =>
      Math.max(e.receivedAt, ...e.rcpts.map((r) => r.history.at(-1)?.t ?? r.lastAttemptAt ?? 0));
    const { history } = this;
    if (!history) return;
    const stored = Promise.allSettled(entries.map((e) => history.add(this.story(e, last(e)))));
    history.flush();
    const failed = (await stored).filter((r) => r.status === 'rejected');
    if (failed.length)
      this.opts.log.error(
        { err: failed[0]!.reason as Error, messages: failed.length },
        'message history: could not store the stories of messages that finished before this start',
      );
  }

  private pump(): void {
    while (this.started && !this.closing && this.active < this.opts.concurrency && this.ready.size) {
      const entry = this.ready.take()!;
      const { id } = entry;
      if (this.store.entries.get(id) !== entry || entry.busy || entry.held) continue;
      this.active++;
      this.store.setBusy(entry, true);
      this.attempting.add(id);
      void this.attempt(entry).finally(() => {
        // Later attempts (hours apart, if any) read the message from disk.
        this.store.dropMemory(entry);
        this.attempting.delete(id);
        this.unlock(entry);
        this.schedule(entry);
        this.active--;
        if (this.closing && this.active === 0) this.idle?.();
        this.arm();
        this.pump();
      });
    }
    this.arm();
  }

  /** Puts a message on the timetable after an attempt (or a recovery that found it not yet due). */
  private schedule(entry: Entry): void {
    const at = entry.nextDue();
    if (at !== Infinity && this.store.entries.get(entry.id) === entry) this.due.push(at, entry.id);
  }

  /**
   * Sets one timer for the earliest due message. The heap may hold stale items (a message
   * finished, flushed or rescheduled since): they are dropped when they reach the top, so no
   * call scans the whole queue.
   */
  private arm(): void {
    if (this.closing) return;
    for (let popped = 0; ; popped++) {
      const head = this.due.peek();
      if (!head) break;
      // Many stale items (a domain flushed in bulk): dropped a slice at a time, the event loop
      // running between slices.
      if (popped === YIELD_EVERY) {
        if (!this.arming) {
          this.arming = true;
          setImmediate(() => {
            this.arming = false;
            this.arm();
          });
        }
        return;
      }
      const entry = this.store.entries.get(head.id);
      if (entry && !entry.held && !entry.busy && !this.ready.has(entry) && entry.nextDue() === head.at) break;
      this.due.pop();
    }
    const head = this.due.peek();
    if (!head) {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
      return;
    }
    if (this.timer && this.timerAt <= head.at) return;
    if (this.timer) clearTimeout(this.timer);
    this.timerAt = head.at;
    this.timer = setTimeout(
      () => {
        this.timer = null;
        const now = Date.now();
        for (let top = this.due.peek(); top && top.at <= now; top = this.due.peek()) {
          this.due.pop();
          const entry = this.store.entries.get(top.id);
          if (entry && !entry.held && !entry.busy && entry.nextDue() <= now) this.ready.add(entry);
        }
        this.pump();
      },
      Math.max(0, Math.min(head.at - Date.now(), MAX_TIMER)),
    );
    this.timer.unref();
  }

  private recipient(entry: Entry, i: number): DeliveryRecipient {
    const r = entry.rcpts[i]!;
    const env = entry.env.recipients[i]!;
    return {
      address: env.address,
      params: env.params,
      sender: env.sender !== undefined ? env.sender : entry.env.sender,
      ...(env.expandedFrom ? { expandedFrom: env.expandedFrom } : {}),
      attempts: r.attempts,
      ...(r.lastReply ? { lastReply: r.lastReply } : {}),
      maybeDelivered: r.maybeDelivered,
    };
  }

  private async attempt(entry: Entry): Promise<void> {
    const { hooks, log, schedule, lifetime } = this.opts;
    const now = Date.now();
    const due = entry.rcpts
      .map((r, i) => ({ r, i }))
      .filter(({ r }) => (r.status === 'pending' || r.status === 'deferred') && r.nextAttemptAt <= now)
      .map(({ i }) => i);
    // Not due (flushed and tried meanwhile, say): its records are not even read.
    if (due.length === 0) return;
    try {
      await this.store.load(entry);
    } catch (err) {
      // Records that do not read back (damage since they were written): the message stays, and
      // is tried again later, when the next start's recovery has set the damage aside.
      log.error(
        { err, queueId: entry.id, retryInMs: UNREADABLE_RETRY },
        'queue: a message due for delivery could not be read back from the journal; not tried now',
      );
      for (const i of due) entry.rcpts[i]!.nextAttemptAt = Date.now() + UNREADABLE_RETRY;
      return;
    }
    const message = this.store.view(entry);
    const results = new Map<number, { result: RecipientResult; route: Route | null }>();
    const groups = new Map<string, { route: Route; sender: Address | null; indices: number[] }>();
    for (const i of due) {
      const recipient = this.recipient(entry, i);
      const { verdict, plugin } = await hooks.route({ message, recipient });
      const address = recipient.address.address;
      if (verdict.kind === 'route') {
        // One delivery is one envelope: recipients with another sender (a forwarded copy's SRS
        // address) go in a transaction of their own.
        const { sender } = recipient;
        const key = `${verdict.route.transport}\u0000${verdict.route.key}\u0000${sender?.address ?? ''}`;
        const g = groups.get(key) ?? { route: verdict.route, sender, indices: [] };
        g.indices.push(i);
        groups.set(key, g);
      } else if (verdict.kind === 'deny') {
        results.set(i, {
          result: { recipient: address, status: 'failed', reply: verdict.reply },
          route: null,
        });
      } else if (verdict.kind === 'defer' || verdict.kind === 'disconnect') {
        const reply = verdict.reply ?? { code: 451, enhanced: '4.3.0', text: 'Try again later' };
        results.set(i, { result: { recipient: address, status: 'deferred', reply }, route: null });
      } else {
        log.error({ queueId: entry.id, rcpt: address, plugin }, 'no plugin routes this recipient; deferred');
        const reply = { code: 451, enhanced: '4.3.0', text: 'No route to this recipient yet' };
        results.set(i, { result: { recipient: address, status: 'deferred', reply }, route: null });
      }
    }
    for (const { route, sender, indices } of groups.values()) {
      const recipients = indices.map((i) => this.recipient(entry, i));
      const outcome = await hooks.deliver({ message, route, sender, recipients });
      if (outcome.postponed) {
        const expired = this.postponed(entry, indices, route, outcome.postponed, outcome.plugin);
        expired.forEach((result, k) => results.set(indices[k]!, { result, route }));
      } else outcome.results.forEach((result, k) => results.set(indices[k]!, { result, route }));
    }
    // Only postponements: nothing to record, and nobody to tell.
    if (results.size === 0) return;

    const finished = Date.now();
    const notices: (() => Promise<void>)[] = [];
    const states = new Map<number, RecipientState>();
    const attempts = new Map<number, AttemptRecord>();
    for (const [i, { result, route }] of results) {
      // A copy: the entry changes only once the outcome is recorded (`store.update`).
      const st: RecipientState = { ...entry.rcpts[i]! };
      states.set(i, st);
      const recipient = this.recipient(entry, i);
      // The outcome ends any postponement.
      st.postponed = undefined;
      st.attempts++;
      st.lastAttemptAt = finished;
      st.lastReply = result.reply;
      if (route) st.route = route;
      st.maybeDelivered = false;
      this.opts.metrics?.attempt(result.status, recipient.address.domain);
      if (result.status === 'delivered') {
        st.status = 'delivered';
        notices.push(() => hooks.notify('delivered', { message, recipient, route, result }));
      } else if (result.status === 'failed') {
        st.status = 'failed';
        notices.push(() => hooks.notify('failed', { message, recipient, route, result, reason: 'refused' }));
      } else {
        const delay = schedule.delay(st.attempts);
        // ±10% so that a batch deferred together does not come back as a thundering herd.
        const next = delay === null ? Infinity : finished + Math.round(delay * (0.9 + Math.random() * 0.2));
        if (next - entry.receivedAt > lifetime) {
          st.status = 'failed';
          const days = Math.round((finished - entry.receivedAt) / 3_600_000) / 24;
          // The queue gives up, not the peer: the reply is ours, so it carries no `remote`
          // (which would make a bounce report it as the peer's), and its text names the peer.
          const { code, enhanced, text, remote } = result.reply;
          const from = remote ? `${remote} said: ` : '';
          const expired: RecipientResult = {
            recipient: result.recipient,
            status: 'failed',
            reply: {
              code,
              enhanced: '4.4.7',
              text: `Message expired after ${days} days in the queue; last error: ${from}${code} ${enhanced} ${replyText(text)}`,
            },
          };
          st.lastReply = expired.reply;
          notices.push(() =>
            hooks.notify('failed', { message, recipient, route, result: expired, reason: 'expired' }),
          );
        } else {
          st.status = 'deferred';
          st.nextAttemptAt = next;
          const nextAttemptAt = new Date(next);
          notices.push(() => hooks.notify('deferred', { message, recipient, route, result, nextAttemptAt }));
        }
      }
      attempts.set(i, {
        t: finished,
        n: st.attempts,
        status: st.status,
        ...(route ? { transport: route.transport, route: route.key } : {}),
        reply: result.reply,
        ...(result.status === 'deferred' && st.status === 'failed' ? { kind: 'expired' as const } : {}),
      });
      log.info(
        {
          queueId: entry.id,
          rcpt: result.recipient,
          status: st.status,
          transport: route?.transport,
          reply: `${result.reply.code} ${result.reply.enhanced} ${String(result.reply.text)}`,
          attempts: st.attempts,
        },
        'delivery attempt',
      );
    }
    const final = await this.record(entry, states, attempts);
    // Not recorded before shutdown: the next start tries these recipients again, and tells them then.
    if (final === null) return;
    for (const n of notices) await n();
    // The files go only after this: the hooks above (a bounce quoting the message) may read it.
    if (final) this.finish(entry);
  }

  /**
   * A delivery a plugin postponed (`postpone()`, see `Postponement` in the hook catalogue): its
   * recipients wait until then without an attempt, a record or a notice, and one line is logged.
   * The lifetime still holds: a postponement never takes a recipient past it, and one asked for
   * once it has run out returns a deferral for each recipient, which the caller expires as
   * usual. Returns those deferrals (none while the lifetime lasts).
   */
  private postponed(
    entry: Entry,
    indices: readonly number[],
    route: Route,
    postponement: { readonly until: Date; readonly reason: string },
    plugin: string,
  ): RecipientResult[] {
    const { log, lifetime } = this.opts;
    const { reason } = postponement;
    const now = Date.now();
    const end = entry.receivedAt + lifetime;
    const rcpts = indices.map((i) => entry.env.recipients[i]!.address.address);
    if (now >= end) {
      // RFC 3463 §3.5: X.4.5 is "mail system congestion", which a rate held back is.
      const reply = { code: 451, enhanced: '4.4.5', text: `Postponed: ${reason}` };
      return rcpts.map((recipient) => ({ recipient, status: 'deferred' as const, reply }));
    }
    const until = Math.min(Math.max(postponement.until.getTime(), now), end);
    this.store.postpone(entry, indices, until, { reason, by: plugin });
    log.info(
      {
        queueId: entry.id,
        rcpts,
        transport: route.transport,
        // (`plugin` is this logger's own: the queue.)
        postponedBy: plugin,
        reason,
        nextAttemptAt: new Date(until).toISOString(),
      },
      'delivery postponed',
    );
    return [];
  }

  /**
   * Records an attempt's outcome. While the State record cannot be written (a full disk, an I/O
   * error) it retries with a back-off rather than give up: the deliveries happened, and trying
   * them again would duplicate them. Until then the message keeps its recorded state (never
   * "delivered" before the disk says so), stays busy, and `list` says why (`unrecorded`).
   * Resolves like `store.update`, or null when the queue closes first.
   */
  private async record(
    entry: Entry,
    states: ReadonlyMap<number, RecipientState>,
    attempts: ReadonlyMap<number, AttemptRecord>,
  ): Promise<boolean | null> {
    const { log } = this.opts;
    const id = entry.id;
    for (let tries = 1, delay = RECORD_RETRY_FIRST; ; tries++) {
      try {
        const final = await this.store.update(entry, states, attempts);
        if (this.unrecorded.delete(id))
          log.warn({ queueId: id, tries }, 'delivery state recorded after earlier failures');
        return final;
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        this.unrecorded.set(id, e.code ? `${e.code}: ${e.message}` : e.message);
        if (this.closing) {
          log.error(
            { err, queueId: id, tries },
            'could not record delivery state before shutdown; the next start tries these recipients again',
          );
          return null;
        }
        log.error({ err, queueId: id, tries, retryInMs: delay }, 'could not record delivery state; retrying');
        await this.pause(delay);
        delay = Math.min(delay * 2, RECORD_RETRY_MAX);
      }
    }
  }

  /** Waits `ms`, or less when the queue starts closing. */
  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.sleepers.add(wake);
    });
  }

  private async close(): Promise<void> {
    this.closing = true;
    for (const wake of [...this.sleepers]) wake();
    await this.control?.close();
    if (this.timer) clearTimeout(this.timer);
    if (this.compactor) clearInterval(this.compactor);
    const bound = (p: Promise<unknown>): Promise<unknown> =>
      Promise.race([p, new Promise((resolve) => setTimeout(resolve, 30_000).unref())]);
    if (this.active > 0) {
      await bound(
        new Promise<void>((resolve) => {
          this.idle = resolve;
        }),
      );
    }
    // Stories waiting for their commit are committed now, so the removals waiting on them can run.
    this.history?.flush();
    await bound(Promise.allSettled([...this.changes]));
    // An outcome not on disk: no clean-stop mark, so the next start treats those recipients as
    // maybe delivered (and the transports can spot a duplicate).
    if (this.unrecorded.size)
      this.opts.log.error(
        { queueIds: [...this.unrecorded.keys()] },
        'queue closed with delivery outcomes not recorded; the next start treats them as after a crash',
      );
    await this.store.close(this.unrecorded.size === 0);
    if (this.history) HistoryStore.release(this.history);
    await this.releaseLock();
  }
}
