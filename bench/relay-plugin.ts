/**
 * The relay benchmark's plugin, listed before the built-in `queue` and `outbound` plugins: it
 * accepts every recipient at `rcpt` (in place of the `relay` plugin, so any client may send to any
 * domain) and counts what happens to each recipient behind the queue, where `outbound` delivers it
 * to its smarthost. It routes and delivers nothing itself.
 *
 * It tells the counts since the worker started on its count socket (see bench/count-socket.ts):
 * `<queued> <delivered> <deferred> <failed>`, where `queued` counts transactions that ended with
 * the queue's `250` and the others count recipients.
 */
import { accept, definePlugin } from '../core/index.js';
import { serveCounts } from './count-socket.js';

export default definePlugin({
  name: 'bench-relay',
  setup: async ({ log, baseDir, onClose }) => {
    let queued = 0;
    let delivered = 0;
    let deferred = 0;
    let failed = 0;
    await serveCounts(baseDir, () => [queued, delivered, deferred, failed], onClose);
    return {
      rcpt: async () => accept(),
      reset: async ({ outcome }) => {
        if (outcome === 'queued') queued++;
      },
      delivered: async () => {
        delivered++;
      },
      deferred: async ({ result }) => {
        deferred++;
        log.warn({ result }, 'bench: recipient deferred');
      },
      failed: async ({ result }) => {
        failed++;
        log.warn({ result }, 'bench: recipient failed');
      },
    };
  },
});
