/**
 * The queue benchmark (`npm run bench:queue`): what an outage costs. Petrel relays to a smarthost
 * that is down; smtp-source fills its queue with N deferred 1 KB messages; then it is restarted,
 * the smarthost comes back (an smtp-sink on the port that refused), the queue is flushed, and new
 * mail arrives while the queue drains.
 *
 * Petrel runs as a child process (the real CLI, one worker) with bench/queue-plugin.ts (accepts
 * every recipient, counts outcomes quietly), the built-in `queue` (retry `1h...`, so a deferred
 * message stays deferred until the flush) and the built-in `outbound` with the smarthost. It
 * prints:
 *
 * - the fill: how the queue was filled and how fast (accepted and deferred once);
 * - RSS of Petrel's processes (primary and worker) before and after, and per deferred message;
 *   the worker's V8 heap in use per deferred message (the control socket's `status`);
 * - after a clean restart: the time from spawning `petrel start` to the first `220` greeting, and
 *   to the first `status` answer of the queue's control socket that says the whole journal is
 *   indexed (with the queue's own figure for reading the journal), and RSS then;
 * - the drain: from the `flush` request until every message (the old ones and those sent during
 *   the drain) is delivered at the sink, as messages per second, beside smtp-sink's own rate
 *   (smtp-source straight into a second smtp-sink, same sessions, same run);
 * - the accept rate of new mail while the queue drains;
 * - the relay rate of the same Petrel, measured first with its queue empty and the smarthost up
 *   (new mail accepted and passed on to a sink, first accept to last delivery), and the drain rate
 *   as a share of it. That relay is also the warm-up: the memory per deferred message is counted
 *   from the empty server after it, so that what V8 grows once under any load is not counted as
 *   the queue's.
 *
 * Environment: BENCH_SCALE multiplies N (default 100,000; BENCH_SCALE=10 is the million);
 * BENCH_DIR is the folder for the queue (default: the system's temporary folder, unless that is in
 * memory, then var/ in the repository). Figures are written to var/bench-queue-results.json.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { request } from '../plugins/queue/cli.js';
import { CONTROL_SOCKET, type ControlResponse, type QueueStatus } from '../plugins/queue/control.js';
import {
  backgroundLoad,
  BenchError,
  CLI,
  queueCounts,
  type QueueCounts,
  describeMachine,
  freePort,
  HOST,
  KB,
  log,
  machineLine,
  peerPrograms,
  queueBase,
  requireBuilt,
  ROOT,
  runMain,
  runSource,
  scale,
  serverRssKiB,
  sleep,
  startPetrel,
  startSink,
  stop,
  workerPids,
  writeResults,
  type Server,
} from './harness.js';
import { gcSocketPath } from './queue-plugin.js';

const PLUGIN = join(ROOT, 'dist', 'bench', 'queue-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-queue-results.json');

/** Deferred messages at BENCH_SCALE=1. */
const BASE_COUNT = 100_000;
const SIZE = 1 * KB;
/** smtp-source sessions, each sending its messages over one connection (`-d`). */
const SESSIONS = 20;
/** New messages sent during the drain, as a share of N. */
const DURING_DRAIN = 0.1;

/** Polls the counts until `done` holds, or fails after `timeoutMs` saying what was counted. */
async function until(
  server: Server,
  what: string,
  done: (c: QueueCounts) => boolean,
  timeoutMs: number,
): Promise<QueueCounts> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const c = await queueCounts(server);
    if (done(c)) return c;
    if (Date.now() > deadline)
      throw new BenchError(`${what}: not within ${timeoutMs / 1000} s (counted ${JSON.stringify(c)})`);
    if (server.child.exitCode !== null) throw new BenchError(`${what}: Petrel exited`);
    await sleep(50);
  }
}

/** The queue part's `status` over its control socket, or null while nothing answers there. */
async function status(queueDir: string): Promise<(QueueStatus & { ok: true }) | null> {
  try {
    const r: ControlResponse = await request(join(queueDir, CONTROL_SOCKET), { op: 'status' }, 60_000);
    if (!r.ok) throw new BenchError(`status: ${r.message}`);
    if (r.op !== 'status') throw new BenchError(`status answered as ${r.op}`);
    return r;
  } catch (err) {
    if (err instanceof BenchError) throw err;
    return null;
  }
}

/**
 * The worker's V8 heap in use after a full garbage collection, in bytes (the bench plugin's gc
 * socket; Petrel runs with `--expose-gc`), then the RSS of all of Petrel's processes in KiB.
 */
async function collected(
  server: Server,
): Promise<{ heap: number; heapTotal: number; buffers: number; newSpace: number; rssKiB: number }> {
  const [pid] = workerPids(server);
  const line = await new Promise<string>((resolve, reject) => {
    const socket = connect(gcSocketPath(server.dir!, pid!));
    let got = '';
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => (got += d));
    socket.once('error', reject);
    socket.once('end', () => resolve(got));
  });
  const [heap = 0, heapTotal = 0, buffers = 0, newSpace = 0] = line.split(' ').map(Number);
  if (!(heap > 0)) throw new BenchError(`the gc socket answered "${line.trim()}"`);
  return { heap, heapTotal, buffers, newSpace, rssKiB: serverRssKiB(server) };
}

/** smtp-source against `port`, checked: every message counted by smtp-source. Returns seconds. */
async function send(source: string, port: number, messages: number, timeoutMs: number): Promise<number> {
  const r = await runSource(source, port, SIZE, messages, SESSIONS, timeoutMs, ['-d']);
  if (r.signal) throw new BenchError(`smtp-source was killed (${r.signal})`);
  if (r.code !== 0) throw new BenchError(`smtp-source exited with ${r.code}: ${r.stderr}`);
  if (r.counted !== messages)
    throw new BenchError(`smtp-source counted ${r.counted} of ${messages} messages`);
  return r.seconds;
}

const since = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e9;
const mib = (kib: number): string => `${(kib / 1024).toFixed(0)} MiB`;
const mb = (bytes: number): string => `${(bytes / 1024 / 1024).toFixed(0)} MiB`;

async function main(): Promise<number> {
  const factor = scale();
  const n = Math.max(100, Math.round(BASE_COUNT * factor));
  const extra = Math.max(SESSIONS, Math.round(n * DURING_DRAIN));
  const { source, sink } = peerPrograms();
  requireBuilt([CLI, PLUGIN], 'npm run build --silent && node dist/bench/queue.js');
  const machine = describeMachine();
  const out = process.stdout;
  const dir = mkdtempSync(join(queueBase(), 'petrel-queue-'));
  const own = join(dir, 'petrel');
  const queueDir = join(own, 'queue');
  // Generous bounds that grow with N; the figures are what count, not these.
  const slow = 120_000 + n * 20;
  const servers: Server[] = [];
  try {
    const idle = await backgroundLoad();
    out.write(machineLine(machine, idle));
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    // The smarthost's port, with nothing on it yet: every connection is refused.
    const destPort = await freePort();
    const plugins = [
      { name: PLUGIN },
      { name: 'queue', config: { dir: queueDir, retry: '1h...' } },
      { name: 'outbound', config: { smarthost: { host: HOST, port: destPort, tls: 'opportunistic' } } },
    ];
    const gcArgs = ['--expose-gc'];
    let petrel = await startPetrel(own, plugins, 1, gcArgs);
    servers.push(petrel);
    log(
      `petrel on ${HOST}:${petrel.port} (worker ${workerPids(petrel).join(', ')}), smarthost ${HOST}:${destPort} down`,
    );
    await queueCounts(petrel); // the worker is up
    const rssFresh = serverRssKiB(petrel);
    const fresh = await collected(petrel);

    // The relay rate, for the drain's target, and a warm-up: with the smarthost up for a while,
    // the same Petrel takes `extra` new messages and passes them on (first accept to last
    // delivery). The empty queue's memory is measured after it, on a server that has worked (V8
    // grows its young generation under load, once, whatever the queue holds).
    const warm = await startSink(sink, destPort);
    log(`relaying ${extra} messages to a sink on the smarthost's port…`);
    const relayStart = process.hrtime.bigint();
    await send(source, petrel.port, extra, slow);
    await until(petrel, 'every relayed message delivered', (c) => c.delivered >= extra, slow);
    const relaySeconds = since(relayStart);
    await stop(warm.child);
    log(`smarthost ${HOST}:${destPort} down again`);
    const rssEmpty = serverRssKiB(petrel);
    const empty = await collected(petrel);

    // The fill: every message accepted, then tried once and deferred.
    log(`filling the queue with ${n} messages…`);
    const fillStart = process.hrtime.bigint();
    const acceptSeconds = await send(source, petrel.port, n, slow);
    const filled = await until(petrel, 'every message deferred once', (c) => c.deferred >= n, slow);
    const fillSeconds = since(fillStart);
    if (filled.queued !== n + extra || filled.delivered !== extra || filled.failed)
      throw new BenchError(
        `the fill counted ${JSON.stringify(filled)}; expected ${n} more queued and deferred after ${extra} relayed`,
      );
    const full = await status(queueDir);
    const rssFull = serverRssKiB(petrel);
    const fullGc = await collected(petrel);
    if (full?.messages !== n) throw new BenchError(`the queue holds ${full?.messages} of ${n} messages`);

    // A clean restart with the queue full.
    log('restarting…');
    await stop(petrel.child);
    servers.length = 0;
    const restart = process.hrtime.bigint();
    petrel = await startPetrel(own, plugins, 1, gcArgs, {}, slow);
    servers.push(petrel);
    const greetSeconds = since(restart);
    let indexed = await status(queueDir);
    while (!indexed?.indexed) {
      await sleep(20);
      indexed = await status(queueDir);
    }
    const indexedSeconds = since(restart);
    if (indexed.messages !== n)
      throw new BenchError(`after the restart the queue holds ${indexed.messages} of ${n} messages`);
    await queueCounts(petrel);
    const rssRestarted = serverRssKiB(petrel);
    const restartedGc = await collected(petrel);

    // smtp-sink alone, for the drain rate's yardstick.
    const alone = await startSink(sink);
    servers.push(alone);
    const sinkSeconds = await send(source, alone.port, extra, slow);

    // The smarthost comes back; the queue is flushed; new mail comes in meanwhile.
    const dest = await startSink(sink, destPort);
    servers.push(dest);
    log(`smarthost back on ${HOST}:${destPort}; flushing ${n} messages, sending ${extra} more…`);
    const drainStart = process.hrtime.bigint();
    const flushed = await request(join(queueDir, CONTROL_SOCKET), { op: 'flush' }, slow);
    if (!flushed.ok || flushed.op !== 'flush' || !('bulk' in flushed) || flushed.done !== n)
      throw new BenchError(`the flush answered ${JSON.stringify(flushed).slice(0, 300)}`);
    const duringSeconds = await send(source, petrel.port, extra, slow);
    const drained = await until(petrel, 'every message delivered', (c) => c.delivered >= n + extra, slow);
    const drainSeconds = since(drainStart);
    if (drained.failed) throw new BenchError(`${drained.failed} recipient(s) failed during the drain`);
    const left = await status(queueDir);

    const fig = {
      messages: n,
      size: SIZE,
      sessions: SESSIONS,
      fillSeconds,
      acceptPerSecond: n / acceptSeconds,
      rssFreshKiB: rssFresh,
      heapFresh: fresh.heap,
      newSpaceFresh: fresh.newSpace,
      newSpaceEmpty: empty.newSpace,
      newSpaceRestarted: restartedGc.newSpace,
      rssEmptyKiB: rssEmpty,
      rssFullKiB: rssFull,
      rssPerMessageBytes: ((rssFull - rssEmpty) * 1024) / n,
      heapPerMessageBytes: (fullGc.heap - empty.heap) / n,
      heapTotalPerMessageBytes: (fullGc.heapTotal - empty.heapTotal) / n,
      buffersPerMessageBytes: (fullGc.buffers - empty.buffers) / n,
      rssAfterGcPerMessageBytes: ((fullGc.rssKiB - empty.rssKiB) * 1024) / n,
      greetSeconds,
      indexedSeconds,
      journalReadSeconds: indexed.indexSeconds,
      rssRestartedKiB: rssRestarted,
      rssPerMessageAfterRestartBytes: ((rssRestarted - rssEmpty) * 1024) / n,
      heapPerMessageAfterRestartBytes: (restartedGc.heap - empty.heap) / n,
      heapTotalPerMessageAfterRestartBytes: (restartedGc.heapTotal - empty.heapTotal) / n,
      buffersPerMessageAfterRestartBytes: (restartedGc.buffers - empty.buffers) / n,
      rssAfterGcPerMessageAfterRestartBytes: ((restartedGc.rssKiB - empty.rssKiB) * 1024) / n,
      drainSeconds,
      drainPerSecond: (n + extra) / drainSeconds,
      sinkPerSecond: extra / sinkSeconds,
      drainToSink: (n + extra) / drainSeconds / (extra / sinkSeconds),
      acceptDuringDrainPerSecond: extra / duringSeconds,
      relayPerSecond: extra / relaySeconds,
      drainToRelay: (n + extra) / drainSeconds / (extra / relaySeconds),
      leftInQueue: left?.messages ?? null,
    };
    const f1 = (x: number): string => x.toFixed(1);
    const f2 = (x: number): string => x.toFixed(2);
    const b = (x: number): string => `${x.toFixed(0)} B`;
    out.write(
      `\nQueue through an outage (scale ${factor}): ${n} messages of ${SIZE / KB} KB, one recipient each, ` +
        `filled by smtp-source with ${SESSIONS} sessions, many messages per connection (-d), while the ` +
        `smarthost refused connections; retry 1h, so each was tried once and deferred.\n\n` +
        `  fill: ${f1(fig.fillSeconds)} s to the last deferral (${f1(fig.acceptPerSecond)} msg/s accepted)\n` +
        `  relay (the warm-up): ${extra} messages at ${f1(fig.relayPerSecond)} msg/s, first accept to last delivery\n` +
        `  RSS: ${mib(rssFresh)} fresh, ${mib(rssEmpty)} empty after the warm-up (V8's young generation ` +
        `${mb(fresh.newSpace)} fresh, ${mb(empty.newSpace)} after it, ${mb(restartedGc.newSpace)} after the restart), ` +
        `${mib(rssFull)} with the queue full, ${mib(rssRestarted)} after a restart\n` +
        `  per deferred message, with the queue full: ${b(fig.rssPerMessageBytes)} RSS; after a full GC ` +
        `${b(fig.rssAfterGcPerMessageBytes)} RSS, ${b(fig.heapPerMessageBytes)} V8 heap in use ` +
        `(${b(fig.heapTotalPerMessageBytes)} kept by V8), ${b(fig.buffersPerMessageBytes)} Buffers\n` +
        `  per deferred message, after a restart: ${b(fig.rssPerMessageAfterRestartBytes)} RSS; after a full GC ` +
        `${b(fig.rssAfterGcPerMessageAfterRestartBytes)} RSS, ${b(fig.heapPerMessageAfterRestartBytes)} V8 heap in use ` +
        `(${b(fig.heapTotalPerMessageAfterRestartBytes)} kept by V8), ${b(fig.buffersPerMessageAfterRestartBytes)} Buffers\n` +
        `  restart: first greeting after ${f2(greetSeconds)} s, whole queue indexed after ${f2(indexedSeconds)} s ` +
        `(reading the journal: ${f2(fig.journalReadSeconds)} s)\n` +
        `  drain: ${n + extra} messages delivered in ${f1(drainSeconds)} s = ${f1(fig.drainPerSecond)} msg/s; ` +
        `smtp-sink alone ${f1(fig.sinkPerSecond)} msg/s (ratio ${f2(fig.drainToSink)}); ` +
        `drain/relay ${f2(fig.drainToRelay)}\n` +
        `  accept rate during the drain: ${f1(fig.acceptDuringDrainPerSecond)} msg/s ` +
        `(${extra} messages, ${SESSIONS} sessions)\n`,
    );
    const complaints = servers.flatMap((s) => s.complaints);
    if (complaints.length)
      out.write(
        `\nPetrel and the sinks said (${complaints.length} lines):\n  ${complaints.slice(0, 5).join('\n  ')}\n`,
      );
    writeResults(RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      backgroundLoad: idle,
      ...fig,
    });
    out.write(`\nFigures written to ${RESULTS}\n`);
    return 0;
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench:queue');
