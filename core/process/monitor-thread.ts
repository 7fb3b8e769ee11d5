/**
 * The watchdog thread of a worker process: it watches the main thread's heartbeat (see
 * activity.ts) and, once the heartbeat has stood still for `reportAfterMs`, writes one JSON line
 * to the primary's report pipe saying for how long and, when known, in which plugin hook. It runs
 * on its own event loop, so it still works while the main thread is stuck. It never kills
 * anything itself: the primary decides, on its own heartbeat, and names the hook from this report.
 */
import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';

const { shared, reportAfterMs, fd } = workerData as {
  shared: SharedArrayBuffer;
  reportAfterMs: number;
  fd: number;
};
const marks = new Int32Array(shared);
const names: string[] = [];
parentPort!.on('message', (m: { index: number; name: string }) => {
  names[m.index] = m.name;
});

let lastBeat = Atomics.load(marks, 0);
let lastChange = Date.now();
let reported = false;

setInterval(
  () => {
    const beat = Atomics.load(marks, 0);
    const now = Date.now();
    if (beat !== lastBeat) {
      lastBeat = beat;
      lastChange = now;
      if (reported) {
        reported = false;
        report({ blockedMs: 0, recovered: true });
      }
      return;
    }
    if (reported || now - lastChange < reportAfterMs) return;
    reported = true;
    const running = Atomics.load(marks, 1);
    const [plugin, hook] = running > 0 ? (names[running - 1]?.split('\0') ?? []) : [];
    report({ blockedMs: now - lastChange, ...(plugin ? { plugin, hook } : {}) });
  },
  Math.max(50, Math.min(250, Math.floor(reportAfterMs / 4))),
);

function report(fields: object): void {
  try {
    writeSync(fd, `${JSON.stringify(fields)}\n`);
  } catch {
    // The primary is gone: nothing to tell.
  }
}
