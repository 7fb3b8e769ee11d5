/**
 * The queue benchmark's plugin, listed before the built-in `queue` and `outbound` plugins: it
 * accepts every recipient at `rcpt` (so any client may send to any domain) and counts what the
 * queue reports about each one, as the relay benchmark's plugin does, but quietly: while the
 * smarthost is down every recipient is deferred, and a log line each would be the benchmark's
 * own load.
 *
 * It tells the counts since the worker started on its count socket (see bench/count-socket.ts):
 * `<queued> <delivered> <deferred> <failed>`, where `queued` counts transactions that ended with
 * the queue's `250` and the others count recipients.
 */
import { accept, definePlugin } from '../core/index.js';
import { serveCounts } from './count-socket.js';

export default definePlugin({
  name: 'bench-queue',
  setup: async ({ baseDir, onClose }) => {
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
      deferred: async () => {
        deferred++;
      },
      failed: async () => {
        failed++;
      },
    };
  },
});
