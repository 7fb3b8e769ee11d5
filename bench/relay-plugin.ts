/**
 * The relay benchmark's plugin, listed before the built-in `queue` and `outbound` plugins: it
 * accepts every recipient at `rcpt` (in place of the `relay` plugin, so any client may send to any
 * domain) and counts what happens to each recipient behind the queue, where `outbound` delivers it
 * to its smarthost. It routes and delivers nothing itself.
 *
 * The command `XBENCHRELAY` reports the counts since the server started:
 * `250 2.0.0 <queued> <delivered> <deferred> <failed>`, where `queued` counts transactions that
 * ended with the queue's `250` and the others count recipients.
 */
import { accept, definePlugin, proceed } from '../core/index.js';

/** The command that reports the counts since the server started. */
export const RELAY_COUNT_COMMAND = 'XBENCHRELAY';

export default definePlugin({
  name: 'bench-relay',
  setup: ({ log }) => {
    let queued = 0;
    let delivered = 0;
    let deferred = 0;
    let failed = 0;
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
      unrecognized_command: async ({ verb }) =>
        verb === RELAY_COUNT_COMMAND
          ? accept({ code: 250, enhanced: '2.0.0', text: `${queued} ${delivered} ${deferred} ${failed}` })
          : proceed(),
    };
  },
});
