import {
  accept,
  defer,
  definePlugin,
  deny,
  proceed,
  Tokens,
  formatHeaderField,
  parseDuration,
  newId,
} from '../../core/index.js';
import { QueueEngine } from './engine.js';
import { HoldOnAccept, Queue } from './api.js';
import { parseSchedule } from './schedule.js';
import { queueConfig } from './config.js';
import { partDir, partsOfSlot, queueDir } from './parts.js';
import { queueCommand } from './cli.js';
import type { StoredEnvelope } from './store.js';
import { expandRecipients } from './expand.js';
import { QueueMetrics } from './metrics.js';
import { originOf } from './origin.js';
import { join } from 'node:path';
import { traceCommand } from './trace-cli.js';
import { HISTORY_FILE } from './history-store.js';
import { CONTROL_SOCKET } from './control.js';

const STORAGE_ERRORS = new Set(['ENOSPC', 'EDQUOT', 'EIO', 'EROFS', 'EACCES', 'EPERM', 'EMFILE', 'ENFILE']);

export { queueConfig, type QueueConfig } from './config.js';

/**
 * The durable queue: the owner of the `queue` hook. A message gets `250` only once its octets
 * and envelope are on stable storage; then each recipient is routed (`route` hook) and delivered
 * (`deliver` hook), and temporary failures are retried on a schedule until the lifetime runs out.
 */
export default definePlugin({
  name: 'queue',
  config: queueConfig,
  commands: { queue: queueCommand, trace: traceCommand },
  async setup({ config, log, resolve: resolveService, baseDir, hooks, onClose, provide }) {
    const core = resolveService(Tokens.Config);
    const dir = queueDir(config.dir, baseDir, core.spool.dir);
    const worker = resolveService(Tokens.Worker);
    const schedule = parseSchedule(config.retry);
    const metrics = QueueMetrics.of(resolveService(Tokens.Metrics));
    const lifetime = parseDuration(config.lifetime);
    const options = {
      log,
      schedule,
      lifetime,
      concurrency: config.concurrency,
      segmentSize: config.segmentSize,
      memoryCache: config.memoryCache,
      activeWindow: config.activeWindow,
      hooks,
      metrics,
      history: {
        attempts: config.history.attempts,
        path: join(dir, HISTORY_FILE),
        retention: parseDuration(config.history.retention),
        maxMessages: config.history.maxMessages,
      },
    };
    // This worker's own part takes new mail; parts it adopted are delivered from (see parts.ts).
    const engines: QueueEngine[] = [];
    onClose(() => Promise.all(engines.map((e) => QueueEngine.release(e))).then(() => undefined));
    for (const part of await partsOfSlot(dir, worker.slot, worker.count)) {
      engines.push(await QueueEngine.acquire(partDir(dir, part), options));
    }
    const engine = engines[0]!;
    // The web console (served by the primary, which runs no plugin code) finds the parts here and
    // speaks the same control protocol as `petrel queue`.
    const sockets = resolveService(Tokens.ControlSockets);
    for (const e of engines) onClose(sockets.add({ kind: 'queue', path: join(e.store.dir, CONTROL_SOCKET) }));
    onClose(
      metrics.sample(function* () {
        for (const e of engines) yield* e.store.entries.values();
      }),
    );
    onClose(
      resolveService(Tokens.Health).add('queue', () =>
        engines.every((e) => e.isOpen) ? null : 'a queue part is closed',
      ),
    );
    /** The engine holding a message, if any. */
    const holding = (id: string): QueueEngine | undefined => engines.find((e) => e.has(id));
    provide(Queue, {
      settings: Object.freeze({ lifetime, retryDelays: schedule.delays, repeatLast: schedule.repeatLast }),
      async submit(message) {
        const id = newId();
        const mailParams = { smtputf8: false, ...message.mailParams };
        // A report to an alias or an SRS address goes where it stands for, as mail from a client does.
        const recipients = await expandRecipients(hooks, {
          sender: message.sender,
          mailParams,
          recipients: message.recipients.map((r) => ({ address: r.address, params: r.params ?? {} })),
        });
        await engine.accept(
          {
            id,
            sender: message.sender,
            mailParams,
            recipients,
            receivedAt: Date.now(),
            size: message.content.length,
            origin: { submitted: true, ...(message.reportFor ? { reportFor: message.reportFor } : {}) },
          },
          { inline: [message.content] },
        );
        log.info(
          { queueId: id, from: message.sender?.address ?? '<>', rcpts: message.recipients.length },
          'message submitted by a plugin',
        );
        return id;
      },
      list: async () =>
        (await Promise.all(engines.map((e) => e.list())))
          .flat()
          .sort((a, b) => a.receivedAt.getTime() - b.receivedAt.getTime()),
      get: async (id) => (await holding(id)?.get(id)) ?? null,
      flush: async (target) =>
        (await Promise.all(engines.map((e) => e.flush(target)))).reduce((a, b) => a + b, 0),
      hold: async (id) => (await holding(id)?.hold(id, true)) ?? null,
      release: async (id) => (await holding(id)?.hold(id, false)) ?? null,
      delete: async (id) => (await holding(id)?.end(id, 'delete')) ?? null,
      bounce: async (id) => (await holding(id)?.end(id, 'bounce')) ?? null,
    });

    return {
      async data_post({ message }) {
        const hops = message.headers.count('received');
        if (hops > config.maxReceived) {
          log.warn({ hops }, 'refused a message with too many Received fields (a mail loop?)');
          return deny(554, '5.4.6', 'Too many hops: routing loop detected');
        }
        return proceed();
      },

      async queue({ session, transaction, message }) {
        const added = message.addedHeaders.map((f) => formatHeaderField(f.name, f.value)).join('');
        let recipients;
        try {
          recipients = await expandRecipients(hooks, transaction);
        } catch {
          // Logged by the hook runner with the plugin's name; the client keeps its copy.
          return defer(451, '4.3.0', 'Temporary local problem, please try again later');
        }
        const hold = transaction.notes.get(HoldOnAccept);
        const env: StoredEnvelope = {
          id: transaction.id,
          sender: transaction.sender,
          mailParams: transaction.mailParams,
          recipients,
          receivedAt: Date.now(),
          size: message.storedSize,
          ...(message.size > config.inlineLimit ? { blob: { headers: added } } : {}),
          ...(hold ? { hold: { reason: hold.reasons.join('; ') } } : {}),
          origin: originOf(session, message),
        };
        try {
          if (env.blob) {
            await engine.accept(env, { file: await message.toFile() });
          } else {
            const chunks: Buffer[] = [];
            for await (const c of message.stream()) chunks.push(c as Buffer);
            await engine.accept(env, { inline: chunks });
          }
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code ?? '';
          if (STORAGE_ERRORS.has(code)) {
            log.error({ err, tx: transaction.id }, 'queue storage failed; message refused with 452');
            return defer(452, '4.3.1', 'Insufficient system storage');
          }
          throw err;
        }
        if (hold)
          log.info({ queueId: transaction.id, reason: env.hold!.reason }, 'message held at acceptance');
        return accept({ text: `Ok: queued as ${transaction.id}` });
      },
    };
  },
});
