/**
 * How the bench plugins tell the benchmark what they counted. Every worker process of Petrel has
 * its own instance of a plugin and so its own counts, and an SMTP connection reaches whichever
 * worker the kernel hands it to (one after another, often the same one), so the counts are not
 * asked over SMTP. Instead each instance listens on a Unix socket of its own beside the config,
 * `count-<pid>.sock`, and answers every connection with one line, its counts separated by spaces,
 * and closes it. The benchmark finds the workers' pids in /proc and asks each (countEveryWorker in
 * bench/harness.ts) — as `petrel queue` reaches each worker's part of the queue by its own socket.
 *
 * One plugin set at a time: a reload would start a second instance on the same path and fail.
 */
import { createServer } from 'node:net';
import { join } from 'node:path';

/** The socket the bench plugin in process `pid` answers on, for a Petrel whose config is in `dir`. */
export function countSocketPath(dir: string, pid: number): string {
  return join(dir, `count-${pid}.sock`);
}

/** Listens on this process's count socket until the plugin set closes. */
export async function serveCounts(
  dir: string,
  counts: () => readonly number[],
  onClose: (fn: () => Promise<void>) => void,
): Promise<void> {
  const server = createServer((socket) => {
    socket.on('error', () => undefined); // the bench hung up early: nothing to answer
    socket.end(`${counts().join(' ')}\n`);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(countSocketPath(dir, process.pid), () => resolve());
  });
  // Closing the server removes the socket file.
  onClose(() => new Promise<void>((resolve) => server.close(() => resolve())));
}
