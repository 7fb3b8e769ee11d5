/**
 * The durable benchmark's plugin, listed before the built-in `queue` plugin: it accepts every
 * recipient at `rcpt`, and behind the queue it is the route and the transport for everything, so
 * that each message goes the queue's whole way: stored and fsynced, routed, delivered, its state
 * recorded, and its journal space freed.
 *
 * The transport, `discard`, reports every recipient delivered without looking at the message.
 * With `readBack: true` it first reads the stored message back from the queue, as a real
 * transport would, and checks that it has the size the queue recorded. THIS LOSES MAIL ON
 * PURPOSE: it must never be listed in a real config.
 *
 * So that the benchmark can check that the queue really took what the client says it sent, the
 * plugin counts transactions that ended `queued` (the queue's `250`, given only after fsync),
 * recipients delivered, and anything else (deferred, failed, a size mismatch). It tells them on
 * its count socket (see bench/count-socket.ts): `<queued> <delivered> <other>`, since the worker
 * started; each worker counts what went through its own part of the queue.
 */
import { accept, definePlugin, routeTo, z } from '../core/index.js';
import { serveCounts } from './count-socket.js';

/** The transport name the plugin routes every recipient to. */
const TRANSPORT = 'discard';

export default definePlugin({
  name: 'bench-durable',
  config: z.object({ readBack: z.boolean().default(false) }).strict(),
  setup: async ({ config, log, baseDir, onClose }) => {
    let queued = 0;
    let delivered = 0;
    let other = 0;
    await serveCounts(baseDir, () => [queued, delivered, other], onClose);
    return {
      rcpt: async () => accept(),
      reset: async ({ outcome }) => {
        if (outcome === 'queued') queued++;
      },
      route: async () => routeTo(TRANSPORT),
      deliver: async ({ route, recipients, message }) => {
        if (route.transport !== TRANSPORT) return { kind: 'proceed' };
        let size = message.size;
        if (config.readBack) {
          size = 0;
          for await (const chunk of message.stream()) size += (chunk as Buffer).length;
        }
        if (size !== message.size) {
          other += recipients.length;
          log.error(
            { queueId: message.id, size, expected: message.size },
            'stored message has the wrong size',
          );
          return {
            kind: 'results',
            results: recipients.map((r) => ({
              recipient: r.address.address,
              status: 'failed',
              reply: { code: 554, enhanced: '5.3.0', text: 'stored message has the wrong size' },
            })),
          };
        }
        return {
          kind: 'results',
          results: recipients.map((r) => ({
            recipient: r.address.address,
            status: 'delivered',
            reply: { code: 250, enhanced: '2.0.0', text: 'discarded' },
          })),
        };
      },
      delivered: async () => {
        delivered++;
      },
      deferred: async () => {
        other++;
      },
      failed: async () => {
        other++;
      },
    };
  },
});
