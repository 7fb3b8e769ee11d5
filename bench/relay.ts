/**
 * The relay benchmark (`node dist/bench/relay.js` after a build): how fast Petrel passes mail on,
 * smtp-source → Petrel → smtp-sink, with one worker process and with two, compared with
 * smtp-source → smtp-sink alone in the same run.
 *
 * Petrel runs as a child process (the real CLI: a primary and its workers) with
 * bench/relay-plugin.ts, which accepts every recipient and counts what the queue reports about
 * each one; the built-in `queue` (every `250` after fdatasync, on a real disk); and the built-in
 * `outbound` with a smarthost: an smtp-sink of its own on another port. The relay rate is
 * messages divided by the time from starting smtp-source until the plugin has counted every
 * message delivered to that sink. Every run must deliver every message, with none deferred or
 * failed.
 *
 * A third Petrel, one worker, relays the same way with the `dkim` plugin signing every message
 * with an RSA-2048 key (`petrel+dkim`); its rate is compared with the one-worker Petrel's, in
 * the same run: at 50 sessions and 1 KB it should keep at least three quarters of it.
 *
 * Figures are written to var/bench-relay-results.json. Environment: BENCH_SCALE multiplies the
 * message counts (default 1); BENCH_DIR is the folder for the queue (default: the system's
 * temporary folder, unless that is in memory, then var/ in the repository); BENCH_PROFILE=1 has
 * each of Petrel's processes write a CPU profile into var/profiles/. BENCH_ONLY=dkim runs only
 * the two rows the DKIM ratio compares (`petrel` and `petrel+dkim`, 1 KB at 50 sessions), and
 * BENCH_DKIM_THREADS and BENCH_DKIM_NICE set the dkim plugin's `signingThreads` and
 * `signingNice` for `petrel+dkim`.
 */
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  backgroundLoad,
  CLI,
  busiestShare,
  queueCounts,
  type QueueCounts,
  describeMachine,
  HOST,
  KB,
  log,
  machineLine,
  peerPrograms,
  processColumns,
  queueBase,
  ratioLine,
  ratiosOf,
  requireBuilt,
  ROOT,
  runMain,
  sample,
  scale,
  serverCpuSeconds,
  sleep,
  startPetrel,
  startSink,
  stop,
  table,
  WORKER_COUNTS,
  workerPids,
  type Probe,
  type Run,
  type Sample,
  type Server,
  runMatrix,
  finishRuns,
} from './harness.js';

const PLUGIN = join(ROOT, 'dist', 'bench', 'relay-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-relay-results.json');
const PROFILES = join(ROOT, 'var', 'profiles');

const SIZES = [1 * KB, 100 * KB] as const;
const SESSIONS = [10, 50] as const;

/** BENCH_ONLY=dkim: only the two rows the DKIM ratio compares (see the header). */
function only(): 'all' | 'dkim' {
  const raw = process.env.BENCH_ONLY;
  if (raw === undefined || raw === '') return 'all';
  if (raw === 'dkim') return raw;
  throw new Error(`BENCH_ONLY must be "dkim" or unset, got "${raw}"`);
}
/** Messages per run at BENCH_SCALE=1: a few seconds each at relay rates, so the run stays short. */
const BASE_COUNT: Record<number, Record<number, number>> = {
  [1 * KB]: { 10: 2000, 50: 3000 },
  [100 * KB]: { 10: 500, 50: 800 },
};
/** Each cell is measured this many times, the targets taking turns; the median counts. */
const ROUNDS = 3;
/** The goal: at 50 sessions and 1 KB, at least a quarter of smtp-sink's direct rate. */
const TARGET_RATIO = 0.25;
/** The goal for signing: at 50 sessions and 1 KB, at least this share of the rate without it. */
const DKIM_TARGET_RATIO = 0.75;
/** How long Petrel may take to deliver a run's messages after the client is done. */
const DRAIN_TIMEOUT_MS = 60_000;

/**
 * Starts the clock just before smtp-source starts and stops it when the plugin has counted every
 * message of the run delivered to the sink; checks that the queue took exactly the run's messages
 * and that none was deferred or failed.
 */
function relayProbe(petrel: Server): Probe {
  let before: QueueCounts = { queued: 0, delivered: 0, deferred: 0, failed: 0, byWorker: new Map() };
  let started = 0n;
  let cpuBefore = 0;
  return {
    async start() {
      before = await queueCounts(petrel);
      cpuBefore = serverCpuSeconds(petrel);
      started = process.hrtime.bigint();
    },
    async finish(messages, seconds) {
      const clientDone = Date.now();
      let now = await queueCounts(petrel);
      // Every recipient must have an outcome; the run fails unless all of them are deliveries.
      const unfinished = (c: QueueCounts): boolean =>
        c.delivered + c.deferred + c.failed - (before.delivered + before.deferred + before.failed) < messages;
      while (unfinished(now) && Date.now() - clientDone < DRAIN_TIMEOUT_MS) {
        await sleep(10);
        now = await queueCounts(petrel);
      }
      const relaySeconds = Number(process.hrtime.bigint() - started) / 1e9;
      const relayCpu = (serverCpuSeconds(petrel) - cpuBefore) / relaySeconds;
      const queued = now.queued - before.queued;
      const delivered = now.delivered - before.delivered;
      const deferred = now.deferred - before.deferred;
      const failed = now.failed - before.failed;
      const problems: string[] = [];
      if (queued !== messages) problems.push(`the queue took ${queued} of ${messages} messages`);
      if (delivered !== messages) {
        problems.push(
          `${delivered} of ${messages} messages delivered ${relaySeconds.toFixed(1)} s after the start`,
        );
      }
      if (deferred || failed) problems.push(`${deferred} recipient(s) deferred, ${failed} failed`);
      const busiestWorker = busiestShare(before.byWorker, now.byWorker, 0);
      return {
        problems,
        figures: {
          relaySeconds,
          relayCpu,
          acceptSeconds: seconds,
          drainSeconds: relaySeconds - seconds,
          ...(busiestWorker === undefined ? {} : { busiestWorker }),
        },
      };
    },
  };
}

/** The one-worker relay rate with DKIM signing over the rate without, at 50 sessions and 1 KB. */
function signingRatio(runs: readonly Run[]): number | null {
  const find = (target: string): Run | undefined =>
    runs.find((r) => r.target === target && r.size === 1 * KB && r.sessions === 50 && !r.failure);
  const signed = find('petrel+dkim');
  const plain = find('petrel');
  return signed && plain ? signed.perSecond / plain.perSecond : null;
}

/** One run; for Petrel the time and rate are those to the last delivery, not the last `250`. */
async function measure(
  source: string,
  server: Server,
  size: number,
  sessions: number,
  messages: number,
  probe: Probe | undefined,
): Promise<Sample> {
  const s = await sample(source, server, size, sessions, messages, probe);
  const seconds = s.figures.relaySeconds;
  if (seconds === undefined) return s;
  return { ...s, seconds, perSecond: messages / seconds, serverCpu: s.figures.relayCpu ?? s.serverCpu };
}

async function main(): Promise<number> {
  const factor = scale();
  const { source, sink } = peerPrograms();
  requireBuilt([CLI, PLUGIN], 'npm run build --silent && node dist/bench/relay.js');
  const machine = describeMachine();
  const out = process.stdout;
  const dir = mkdtempSync(join(queueBase(), 'petrel-relay-'));
  const servers: Server[] = [];
  try {
    const idle = await backgroundLoad();
    out.write(machineLine(machine, idle));
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    // The smtp-sink Petrel relays to, and the one smtp-source talks to directly.
    const relaySink = await startSink(sink);
    servers.push(relaySink);
    const smtpSink = await startSink(sink);
    servers.push(smtpSink);
    // BENCH_PROFILE=1: a V8 CPU profile of each of Petrel's processes, written when it stops
    // (open it in Chrome DevTools); the file names carry the process ids logged below.
    const profile = process.env.BENCH_PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${PROFILES}`] : [];
    const petrels: Server[] = [];
    const subset = only();
    for (const workers of subset === 'all' ? WORKER_COUNTS : [1]) {
      // Each Petrel has a folder (and so a queue) of its own; both relay to the same sink.
      const own = join(dir, `workers-${workers}`);
      const plugins = [
        { name: PLUGIN },
        { name: 'queue', config: { dir: join(own, 'queue'), retry: '1m...' } },
        {
          name: 'outbound',
          config: { smarthost: { host: HOST, port: relaySink.port, tls: 'opportunistic' } },
        },
      ];
      const petrel = await startPetrel(own, plugins, workers, profile);
      servers.push(petrel);
      petrels.push(petrel);
      log(
        `${petrel.target} on ${HOST}:${petrel.port} (primary ${petrel.child.pid}, workers ` +
          `${workerPids(petrel).join(', ')}, queue in ${own}) relaying to smtp-sink on ${HOST}:${relaySink.port}`,
      );
    }
    {
      // The same relay, one worker, with every message signed (RSA-2048) by the dkim plugin.
      // smtp-source writes `From: <from@bench.test>` and connects from HOST, a trusted network.
      const own = join(dir, 'dkim');
      const keyDir = join(own, 'keys');
      mkdirSync(join(keyDir, 'bench.test'), { recursive: true });
      const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
      writeFileSync(
        join(keyDir, 'bench.test', 'bench.pem'),
        privateKey.export({ type: 'pkcs8', format: 'pem' }),
        {
          mode: 0o600,
        },
      );
      const plugins = [
        { name: PLUGIN },
        { name: 'queue', config: { dir: join(own, 'queue'), retry: '1m...' } },
        // onError defer: a message that somehow went unsigned would fail the run (deferred), not count.
        {
          name: 'dkim',
          config: {
            keyDir,
            domains: { 'bench.test': ['bench'] },
            onError: 'defer',
            ...(process.env.BENCH_DKIM_THREADS
              ? { signingThreads: Number(process.env.BENCH_DKIM_THREADS) }
              : {}),
            ...(process.env.BENCH_DKIM_NICE ? { signingNice: Number(process.env.BENCH_DKIM_NICE) } : {}),
          },
        },
        {
          name: 'outbound',
          config: { smarthost: { host: HOST, port: relaySink.port, tls: 'opportunistic' } },
        },
      ];
      const started = await startPetrel(own, plugins, 1, profile);
      const petrel: Server = { ...started, target: 'petrel+dkim' };
      servers.push(petrel);
      petrels.push(petrel);
      log(`${petrel.target} on ${HOST}:${petrel.port} (primary ${petrel.child.pid}), signing with RSA-2048`);
    }
    log(`smtp-sink alone on ${HOST}:${smtpSink.port}`);
    const probeOf = (server: Server): Probe | undefined =>
      petrels.includes(server) ? relayProbe(server) : undefined;
    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size]?.[sessions] ?? 500) * factor));

    const runs = await runMatrix({
      servers: subset === 'all' ? [...petrels, smtpSink] : petrels,
      sizes: subset === 'all' ? SIZES : [1 * KB],
      sessions: subset === 'all' ? SESSIONS : [50],
      rounds: ROUNDS,
      warmupMessages: Math.max(10, Math.round(500 * factor)),
      count,
      measure: (server, size, sessions, messages) =>
        measure(source, server, size, sessions, messages, probeOf(server)),
    });

    const ratios = ratiosOf(runs, 1 * KB, 50);
    const figure = (r: Run, name: string): string =>
      r.figures[name] === undefined ? '' : r.figures[name].toFixed(2);
    out.write(
      `\nRelay throughput (smtp-source, one connection per message; Petrel: first message to last ` +
        `delivery at smtp-sink, queue fsynced; scale ${factor}, median of ${ROUNDS} rounds; ` +
        `petrel×n: n worker processes):\n\n` +
        `${table(runs, [
          { head: 'last 250 s', cell: (r) => figure(r, 'acceptSeconds') },
          { head: 'drain s', cell: (r) => figure(r, 'drainSeconds') },
          ...processColumns(),
        ])}\n\n`,
    );
    out.write(ratioLine('Petrel (relay)/smtp-sink (direct) at 50 sessions, 1 KB', ratios, TARGET_RATIO));
    const dkimRatio = signingRatio(runs);
    out.write(
      `Petrel with DKIM signing (RSA-2048)/without at 50 sessions, 1 KB: ` +
        `${dkimRatio == null ? 'n/a' : dkimRatio.toFixed(2)} ` +
        `(target ≥ ${DKIM_TARGET_RATIO}: ${dkimRatio == null ? 'not measured' : dkimRatio >= DKIM_TARGET_RATIO ? 'met' : 'NOT met'})\n`,
    );
    return finishRuns(out, RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      runs,
      ratio50x1KB: ratios,
      targetRatio: TARGET_RATIO,
      dkimRatio50x1KB: dkimRatio,
      dkimTargetRatio: DKIM_TARGET_RATIO,
    });
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench');
