import { getHeapSpaceStatistics } from 'node:v8';
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
 *
 * On a second socket, `gc-<pid>.sock` beside it, it runs a full garbage collection when asked
 * (Petrel started with `--expose-gc`) and answers `<heap used> <heap total> <array buffers>
 * <young generation>` in bytes after it: the heap the live objects take, without the garbage a
 * moment's figure includes; the heap V8 keeps for them; the memory of Buffers, outside the heap;
 * and the size of V8's young generation (new space), which it grows under load and keeps.
 */
import { createServer } from 'node:net';
import { join } from 'node:path';
import { accept, definePlugin } from '../core/index.js';
import { serveCounts } from './count-socket.js';

/** The socket the plugin in process `pid` collects garbage on, for a Petrel whose config is in `dir`. */
export function gcSocketPath(dir: string, pid: number): string {
  return join(dir, `gc-${pid}.sock`);
}

async function serveGc(dir: string, onClose: (fn: () => Promise<void>) => void): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc;
  const server = createServer((socket) => {
    socket.on('error', () => undefined);
    gc?.();
    const { heapUsed, heapTotal, arrayBuffers } = process.memoryUsage();
    const young = getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0;
    socket.end(`${gc ? heapUsed : -1} ${heapTotal} ${arrayBuffers} ${young}\n`);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(gcSocketPath(dir, process.pid), () => resolve());
  });
  onClose(() => new Promise<void>((resolve) => server.close(() => resolve())));
}

export default definePlugin({
  name: 'bench-queue',
  setup: async ({ baseDir, onClose }) => {
    let queued = 0;
    let delivered = 0;
    let deferred = 0;
    let failed = 0;
    await serveCounts(baseDir, () => [queued, delivered, deferred, failed], onClose);
    await serveGc(baseDir, onClose);
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
