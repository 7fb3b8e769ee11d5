/**
 * bounce — delivery status notifications (RFC 3464, requested per RFC 3461). When a recipient
 * fails for good, is still undelivered after `delayWarning`, or (on request) is delivered, the
 * original sender gets a `multipart/report`, submitted with the null sender `<>` through the
 * queue like any other message. See README.md.
 */
import {
  definePlugin,
  Tokens,
  duration,
  type DeliveryRecipient,
  type QueuedMessageView,
  type RecipientResult,
  type Route,
  makeAddress,
  type Address,
  newId,
} from '../../core/index.js';
import { isAbsolute, join, resolve } from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { Queue, type QueueService } from '../queue/api.js';
import { buildReport, readOriginal, type Action, type ReportRecipient, type Returned } from './report.js';
import { WarnedLog } from './warned.js';

export const bounceConfig = z
  .object({
    /**
     * Send one "still trying" warning per recipient once a message has waited this long
     * (RFC 3461 NOTIFY permitting). `false` or `0` turns warnings off.
     */
    delayWarning: z.union([z.literal(false), duration]).default(4 * 3_600_000),
    /** Recipients of one message that fail (or are delayed, or delivered) within this window share one report. */
    batchWindow: duration.default(200),
    /** Largest original returned whole; above it only its header is returned. */
    returnLimit: z
      .number()
      .int()
      .nonnegative()
      .default(10 * 1024 * 1024),
    /** A failed message from `<>` is never bounced; with this, a copy of the report goes to the postmaster. */
    copyPostmaster: z.boolean().default(false),
    /** Transports whose deliveries are reported as `relayed` (the next hop may not send reports of its own). */
    relayedTransports: z.array(z.string().min(1)).default(['outbound']),
    /** Where the record of sent delay warnings is kept; default `<spool.dir>/bounce`. */
    dir: z.string().min(1).optional(),
  })
  .strict();

export type BounceConfig = z.output<typeof bounceConfig>;

/** One recipient's news, as a hook reported it. */
interface Item {
  readonly recipient: DeliveryRecipient;
  readonly route: Route | null;
  readonly result: RecipientResult;
  readonly action: Action;
  readonly reason?: 'refused' | 'expired';
  readonly at: Date;
  readonly nextAttemptAt?: Date;
}

/** Recipients of one message waiting to share one report. */
interface Batch {
  readonly kind: 'failed' | 'delayed' | 'delivered';
  readonly message: QueuedMessageView;
  readonly items: Item[];
  /** What goes back of the original, read while the hook that opened the batch runs. */
  readonly returned: Promise<Returned>;
  timer: NodeJS.Timeout | null;
}

const STATUS = /^[245]\.\d{1,3}\.\d{1,3}$/;

/** NOTIFY (RFC 3461 §4.1): absent means FAILURE and DELAY at the MTA's discretion; NEVER means none. */
function wants(recipient: DeliveryRecipient, what: 'SUCCESS' | 'FAILURE' | 'DELAY'): boolean {
  const notify = recipient.params.notify;
  if (!notify) return what !== 'SUCCESS';
  return notify.includes(what);
}

export default definePlugin({
  name: 'bounce',
  config: bounceConfig,
  async setup({ config, log, hostname, resolve: resolveService, baseDir, hooks, onClose }) {
    const core = resolveService(Tokens.Config);
    const dir = config.dir
      ? isAbsolute(config.dir)
        ? config.dir
        : resolve(baseDir, config.dir)
      : join(core.spool.dir, 'bounce');
    const postmaster = makeAddress('postmaster', core.localDomains[0] ?? hostname);
    const delayWarning = config.delayWarning === false ? 0 : config.delayWarning;
    const relayed = new Set(config.relayedTransports);
    const warned =
      delayWarning > 0 ? await WarnedLog.open(dir, (err, what) => log.warn({ err }, what)) : null;

    // The queue may be listed before or after this plugin: resolve it on first use.
    let queue: QueueService | null = null;
    const getQueue = (): QueueService => (queue ??= resolveService(Queue));
    void hooks.ready.then(async () => {
      try {
        getQueue();
      } catch {
        log.error('the bounce plugin needs the queue plugin in the same config; no reports can be sent');
        return;
      }
      if (warned) await warned.prune((id) => getQueue().get(id) !== null);
    });

    /** Reads what a report returns of the original; an unreadable original is reported without. */
    const returnedPart = async (kind: Batch['kind'], message: QueuedMessageView): Promise<Returned> => {
      // RFC 3461 §4.3: RET applies to failure reports; the others (and postmaster copies) carry the header only.
      const headersOnly = kind !== 'failed' || message.sender === null || message.mailParams.ret === 'HDRS';
      try {
        return await readOriginal(message.stream(), { headersOnly, limit: config.returnLimit });
      } catch (err) {
        log.warn(
          { err, queueId: message.id },
          'the original message could not be read; reporting without it',
        );
        return { kind: 'none', why: 'unavailable' };
      }
    };

    const pending = new Map<string, Batch>();
    const sending = new Set<Promise<void>>();
    let closed = false;

    const flush = (key: string): Promise<void> => {
      const batch = pending.get(key);
      if (!batch) return Promise.resolve();
      pending.delete(key);
      if (batch.timer) clearTimeout(batch.timer);
      const p = send(batch, { log, hostname, postmaster, getQueue })
        .catch((err: unknown) =>
          log.error({ err, queueId: batch.message.id }, 'could not queue a delivery report; it is lost'),
        )
        .finally(() => sending.delete(p));
      sending.add(p);
      return p;
    };

    /** Adds a recipient to its message's report; the report goes once the batch window closes. */
    const add = async (kind: Batch['kind'], message: QueuedMessageView, item: Item): Promise<void> => {
      const key = `${kind}\u0000${message.id}`;
      let batch = pending.get(key);
      if (!batch) {
        batch = { kind, message, items: [], returned: returnedPart(kind, message), timer: null };
        pending.set(key, batch);
      }
      batch.items.push(item);
      // The queue may free a final message's storage once its hooks have run: read it now.
      await batch.returned;
      // Once closing (or without a window), nothing waits: the report is queued before the hook returns.
      if (closed || config.batchWindow === 0) return flush(key);
      if (!batch.timer) {
        batch.timer = setTimeout(() => void flush(key), config.batchWindow);
        batch.timer.unref();
      }
    };

    onClose(async () => {
      closed = true;
      await Promise.all([...pending.keys()].map((k) => flush(k)));
      await Promise.all([...sending]);
    });

    return {
      async failed({ message, recipient, route, result, reason }) {
        if (reason === 'deleted') return;
        const rcpt = recipient.address.address;
        if (message.sender === null) {
          log.info(
            {
              queueId: message.id,
              rcpt,
              reply: `${result.reply.code} ${result.reply.enhanced}`,
              copy: config.copyPostmaster,
            },
            'not bouncing a failed message from <>',
          );
          if (!config.copyPostmaster) return;
        } else if (!wants(recipient, 'FAILURE')) {
          log.info(
            { queueId: message.id, rcpt, notify: recipient.params.notify },
            'no failure report: NOTIFY',
          );
          return;
        }
        const status = STATUS.test(result.reply.enhanced) ? result.reply.enhanced : '5.0.0';
        await add('failed', message, {
          recipient,
          route,
          result: { ...result, reply: { ...result.reply, enhanced: status } },
          action: 'failed',
          reason,
          at: new Date(),
        });
      },

      async deferred({ message, recipient, route, result, nextAttemptAt }) {
        if (!warned || message.sender === null) return;
        const now = new Date();
        if (now.getTime() - message.receivedAt.getTime() < delayWarning) return;
        const rcpt = recipient.address.address;
        if (warned.has(message.id, rcpt) || !wants(recipient, 'DELAY')) return;
        await warned.add(message.id, rcpt);
        if (warned.added > 1000) void warned.prune((id) => getQueue().get(id) !== null);
        const status = STATUS.test(result.reply.enhanced) ? result.reply.enhanced : '4.0.0';
        await add('delayed', message, {
          recipient,
          route,
          result: { ...result, reply: { ...result.reply, enhanced: status } },
          action: 'delayed',
          at: now,
          nextAttemptAt,
        });
      },

      async delivered({ message, recipient, route, result }) {
        if (message.sender === null || !recipient.params.notify?.includes('SUCCESS')) return;
        // The next hop took the request over and reports itself (RFC 3461 §5.2.2).
        if (result.dsnPassedOn) return;
        const status = STATUS.test(result.reply.enhanced) ? result.reply.enhanced : '2.0.0';
        await add('delivered', message, {
          recipient,
          route,
          result: { ...result, reply: { ...result.reply, enhanced: status } },
          action: route && relayed.has(route.transport) ? 'relayed' : 'delivered',
          at: new Date(),
        });
      },
    };
  },
});

interface SendContext {
  readonly log: Logger;
  readonly hostname: string;
  readonly postmaster: Address;
  readonly getQueue: () => QueueService;
}

/** Builds one batch's report and hands it to the queue. */
async function send(batch: Batch, ctx: SendContext): Promise<void> {
  const { message } = batch;
  const audience = message.sender === null ? 'postmaster' : 'sender';
  const to = message.sender ?? ctx.postmaster;
  const returned = await batch.returned;
  // The queue says how long it keeps a message (RFC 3464 §2.3.9 Will-Retry-Until).
  const willRetryUntil = new Date(message.receivedAt.getTime() + ctx.getQueue().settings.lifetime);
  const recipients: ReportRecipient[] = batch.items.map((item) => ({
    address: item.recipient.address,
    ...(item.recipient.params.orcpt ? { orcpt: item.recipient.params.orcpt } : {}),
    action: item.action,
    status: item.result.reply.enhanced,
    reply: item.result.reply,
    ...(item.reason ? { reason: item.reason } : {}),
    lastAttemptAt: item.at,
    ...(item.nextAttemptAt ? { nextAttemptAt: item.nextAttemptAt } : {}),
    ...(item.action === 'delayed' && willRetryUntil ? { willRetryUntil } : {}),
  }));
  const report = buildReport({
    hostname: ctx.hostname,
    audience,
    to,
    queueId: message.id,
    ...(message.mailParams.envid !== undefined ? { envid: message.mailParams.envid } : {}),
    arrivalDate: message.receivedAt,
    smtputf8: message.mailParams.smtputf8,
    recipients,
    returned,
    date: new Date(),
    messageId: `${newId()}.report`,
  });
  const id = await ctx.getQueue().submit({
    sender: null,
    recipients: [{ address: to }],
    content: report.content,
    reportFor: message.id,
    mailParams: {
      smtputf8: report.smtputf8,
      ...(report.eightBit ? { body: '8BITMIME' as const } : {}),
    },
  });
  ctx.log.info(
    {
      queueId: message.id,
      report: id,
      to: to.address,
      action: recipients[0]?.action,
      rcpts: recipients.map((r) => r.address.address),
      returned: returned.kind,
    },
    audience === 'postmaster' ? 'postmaster copy of a failure queued' : 'delivery report queued',
  );
}
