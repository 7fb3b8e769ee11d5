import type { Logger } from 'pino';
import type { DeliveryRecipient, PluginHooks, RecipientResult, Route } from '../../core/index.js';
import type { RetrySchedule } from './schedule.js';
import { QueueStore, type Entry, type StoredEnvelope } from './store.js';
import type { MessageSummary } from './api.js';

export interface EngineOptions {
  log: Logger;
  schedule: RetrySchedule;
  lifetime: number;
  concurrency: number;
  segmentSize: number;
  hooks: PluginHooks;
}

const COMPACT_EVERY = 60_000;
const MAX_TIMER = 60_000;

/**
 * One queue directory's store and scheduler. A config reload sets the plugin up again while the
 * old set still serves sessions: both share this engine (by directory), and deliveries run
 * through the hooks of the newest plugin set. It closes when the last user releases it.
 */
export class QueueEngine {
  private static readonly open = new Map<string, { engine: QueueEngine; users: number }>();

  private readonly ready = new Set<string>();
  private active = 0;
  private timer: NodeJS.Timeout | null = null;
  private compactor: NodeJS.Timeout | null = null;
  private closing = false;
  /** False until the plugin set that delivers is complete (a transport may come after the queue). */
  private started = false;
  private idle: (() => void) | null = null;

  private constructor(
    readonly store: QueueStore,
    private opts: EngineOptions,
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
    const store = new QueueStore(dir, opts.segmentSize, opts.log);
    await store.open();
    const engine = new QueueEngine(store, opts);
    QueueEngine.open.set(dir, { engine, users: 1 });
    opts.log.info(
      { dir, messages: store.entries.size, recoveredFromCrash: store.recoveredFromCrash },
      'queue opened',
    );
    for (const id of store.entries.keys()) engine.ready.add(id);
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
    this.ready.add(entry.env.id);
    this.pump();
  }

  /** Makes deferred recipients due now: one message, those with a recipient in a domain, or all. */
  flush(target: string | { id?: string; domain?: string } = {}): number {
    const { id, domain } = typeof target === 'string' ? { id: target, domain: undefined } : target;
    let n = 0;
    for (const e of this.store.entries.values()) {
      if (id && e.env.id !== id) continue;
      if (domain && !e.env.recipients.some((r) => r.address.domain === domain.toLowerCase())) continue;
      for (const r of e.rcpts) if (r.status === 'deferred') r.nextAttemptAt = Date.now();
      this.ready.add(e.env.id);
      n++;
    }
    this.pump();
    return n;
  }

  /** A summary of one message for administration. */
  summary(entry: Entry): MessageSummary {
    return {
      id: entry.env.id,
      sender: entry.env.sender?.address ?? '',
      receivedAt: new Date(entry.env.receivedAt),
      size: entry.env.size,
      held: false,
      recipients: entry.rcpts.map((r, i) => ({
        address: entry.env.recipients[i]!.address.address,
        status: r.status,
        attempts: r.attempts,
        nextAttemptAt: r.status === 'pending' || r.status === 'deferred' ? new Date(r.nextAttemptAt) : null,
        lastReply: r.lastReply ?? null,
        lastAttemptAt: r.lastAttemptAt ? new Date(r.lastAttemptAt) : null,
      })),
    };
  }

  private pump(): void {
    while (this.started && !this.closing && this.active < this.opts.concurrency && this.ready.size) {
      const id = this.ready.values().next().value as string;
      this.ready.delete(id);
      const entry = this.store.entries.get(id);
      if (!entry || entry.busy) continue;
      this.active++;
      entry.busy = true;
      void this.attempt(entry).finally(() => {
        entry.busy = false;
        this.active--;
        if (this.closing && this.active === 0) this.idle?.();
        this.arm();
        this.pump();
      });
    }
    this.arm();
  }

  /** Sets one timer for the earliest deferred attempt. */
  private arm(): void {
    if (this.closing) return;
    let next = Infinity;
    for (const e of this.store.entries.values()) {
      if (e.busy || this.ready.has(e.env.id)) continue;
      for (const r of e.rcpts) {
        if ((r.status === 'pending' || r.status === 'deferred') && r.nextAttemptAt < next)
          next = r.nextAttemptAt;
      }
    }
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (next === Infinity) return;
    const wait = Math.max(0, Math.min(next - Date.now(), MAX_TIMER));
    this.timer = setTimeout(() => {
      this.timer = null;
      const now = Date.now();
      for (const e of this.store.entries.values()) {
        if (
          e.rcpts.some((r) => (r.status === 'pending' || r.status === 'deferred') && r.nextAttemptAt <= now)
        ) {
          this.ready.add(e.env.id);
        }
      }
      this.pump();
    }, wait);
    this.timer.unref();
  }

  private recipient(entry: Entry, i: number): DeliveryRecipient {
    const r = entry.rcpts[i]!;
    const env = entry.env.recipients[i]!;
    return {
      address: env.address,
      params: env.params,
      attempts: r.attempts,
      ...(r.lastReply ? { lastReply: r.lastReply } : {}),
      maybeDelivered: r.maybeDelivered,
    };
  }

  private async attempt(entry: Entry): Promise<void> {
    const { hooks, log, schedule, lifetime } = this.opts;
    const now = Date.now();
    const message = this.store.view(entry);
    const due = entry.rcpts
      .map((r, i) => ({ r, i }))
      .filter(({ r }) => (r.status === 'pending' || r.status === 'deferred') && r.nextAttemptAt <= now)
      .map(({ i }) => i);
    if (due.length === 0) return;
    const results = new Map<number, { result: RecipientResult; route: Route | null }>();
    const groups = new Map<string, { route: Route; indices: number[] }>();
    for (const i of due) {
      const recipient = this.recipient(entry, i);
      const { verdict, plugin } = await hooks.route({ message, recipient });
      const address = recipient.address.address;
      if (verdict.kind === 'route') {
        const key = `${verdict.route.transport}\u0000${verdict.route.key}`;
        const g = groups.get(key) ?? { route: verdict.route, indices: [] };
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
        log.error(
          { queueId: entry.env.id, rcpt: address, plugin },
          'no plugin routes this recipient; deferred',
        );
        const reply = { code: 451, enhanced: '4.3.0', text: 'No route to this recipient yet' };
        results.set(i, { result: { recipient: address, status: 'deferred', reply }, route: null });
      }
    }
    for (const { route, indices } of groups.values()) {
      const recipients = indices.map((i) => this.recipient(entry, i));
      const { results: rs } = await hooks.deliver({ message, route, recipients });
      rs.forEach((result, k) => results.set(indices[k]!, { result, route }));
    }

    const finished = Date.now();
    const notices: (() => Promise<void>)[] = [];
    for (const [i, { result, route }] of results) {
      const st = entry.rcpts[i]!;
      const recipient = this.recipient(entry, i);
      st.attempts++;
      st.lastAttemptAt = finished;
      st.lastReply = result.reply;
      if (route) st.route = route;
      st.maybeDelivered = false;
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
        if (next - entry.env.receivedAt > lifetime) {
          st.status = 'failed';
          const days = Math.round((finished - entry.env.receivedAt) / 3_600_000) / 24;
          const expired: RecipientResult = {
            recipient: result.recipient,
            status: 'failed',
            reply: {
              ...result.reply,
              enhanced: '4.4.7',
              text: `Message expired after ${days} days in the queue; last error: ${String(result.reply.text)}`,
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
      log.info(
        {
          queueId: entry.env.id,
          rcpt: result.recipient,
          status: st.status,
          transport: route?.transport,
          reply: `${result.reply.code} ${result.reply.enhanced} ${String(result.reply.text)}`,
          attempts: st.attempts,
        },
        'delivery attempt',
      );
    }
    try {
      await this.store.update(entry, [...results.keys()]);
    } catch (err) {
      // The outcome is known in memory; after a restart the recipient may be tried again (at least once).
      log.error({ err, queueId: entry.env.id }, 'could not record delivery state');
    }
    for (const n of notices) await n();
  }

  private async close(): Promise<void> {
    this.closing = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.compactor) clearInterval(this.compactor);
    if (this.active > 0) {
      await new Promise<void>((resolve) => {
        this.idle = resolve;
        setTimeout(resolve, 30_000).unref();
      });
    }
    await this.store.close();
  }
}
