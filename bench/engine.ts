/**
 * The engine benchmark (`npm run bench`): how fast Petrel takes mail compared with Postfix's
 * smtp-sink on the same machine in the same run, with one worker process and with two, and what
 * an idle connection costs.
 *
 * Petrel runs as a child process (the real CLI: a primary and its workers) with one plugin that
 * accepts and discards every message (bench/discard-plugin.ts). Postfix's smtp-source is the
 * client for every server, with a new connection per message. smtp-sink, a minimal C server that
 * throws mail away, is the upper bound. Figures are printed and written to var/bench-results.json.
 *
 * Environment: BENCH_SCALE multiplies the message counts (default 1; e.g. 0.1 for a quick look).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  backgroundLoad,
  BenchError,
  CLI,
  busiestShare,
  countEveryWorker,
  describeMachine,
  HOST,
  KB,
  log,
  machineLine,
  openGreeted,
  peerPrograms,
  processColumns,
  ratioLine,
  ratiosOf,
  requireBuilt,
  ROOT,
  runMain,
  sample,
  scale,
  serverRssKiB,
  sleep,
  startPetrel,
  startSink,
  stop,
  sumOf,
  table,
  WORKER_COUNTS,
  workerPids,
  type Probe,
  type Server,
  type WorkerCounts,
  runMatrix,
  finishRuns,
} from './harness.js';

const PLUGIN = join(ROOT, 'dist', 'bench', 'discard-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-results.json');

const SIZES = [1 * KB, 100 * KB] as const;
const SESSIONS = [1, 10, 50] as const;
/** Messages per run at BENCH_SCALE=1, by payload size. */
const BASE_COUNT: Record<number, number> = { [1 * KB]: 5000, [100 * KB]: 1000 };
/** Each cell is measured this many times, the two servers taking turns; the median counts. */
const ROUNDS = 5;
const IDLE_CONNECTIONS = 1000;
/** The goal: at 50 sessions and 1 KB, at least half of smtp-sink's rate. */
const TARGET_RATIO = 0.5;

interface MemoryResult {
  readonly workers: number;
  readonly connections: number;
  readonly rssBeforeKiB: number;
  readonly rssAfterKiB: number;
  readonly totalKiB: number;
  readonly perConnectionKiB: number;
}

/** Starts Petrel with the discard plugin; its config and spool go in `dir` (created). */
function startDiscardPetrel(dir: string, workers: number): Promise<Server> {
  return startPetrel(dir, [PLUGIN], workers);
}

/**
 * Checks that the discard plugins of all workers together accepted exactly the messages of the
 * run, and keeps the share the busiest worker took.
 */
function countProbe(server: Server): Probe {
  let before: WorkerCounts = new Map();
  return {
    async start() {
      before = await countEveryWorker(server, 1);
    },
    async finish(messages) {
      const after = await countEveryWorker(server, 1);
      const accepted = sumOf(after, 0) - sumOf(before, 0);
      const busiestWorker = busiestShare(before, after, 0);
      const figures: Record<string, number> = busiestWorker === undefined ? {} : { busiestWorker };
      return {
        problems:
          accepted === messages ? [] : [`${server.target} accepted ${accepted} of ${messages} messages`],
        figures,
      };
    },
  };
}

/**
 * Opens `connections` connections to a Petrel of its own (so that garbage left by other traffic
 * cannot hide the growth), waits for every greeting, and compares the RSS of the whole server
 * (primary and workers) before and after.
 */
async function idleMemory(dir: string, workers: number, connections: number): Promise<MemoryResult> {
  const server = await startDiscardPetrel(dir, workers);
  const sockets: Socket[] = [];
  try {
    // Let the first sessions load and compile their code paths, so the baseline includes that.
    const warm = await Promise.all(Array.from({ length: 20 * workers }, () => openGreeted(server.port)));
    for (const s of warm) s.destroy();
    await sleep(1000);
    const rssBeforeKiB = serverRssKiB(server);
    const batch = 100;
    for (let i = 0; i < connections; i += batch) {
      const n = Math.min(batch, connections - i);
      sockets.push(...(await Promise.all(Array.from({ length: n }, () => openGreeted(server.port)))));
    }
    await sleep(1000);
    const rssAfterKiB = serverRssKiB(server);
    const totalKiB = rssAfterKiB - rssBeforeKiB;
    if (server.complaints.length) throw new BenchError(`Petrel said:\n${server.complaints.join('\n')}`);
    return {
      workers,
      connections,
      rssBeforeKiB,
      rssAfterKiB,
      totalKiB,
      perConnectionKiB: totalKiB / connections,
    };
  } finally {
    for (const s of sockets) s.destroy();
    await stop(server.child);
  }
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  const factor = scale();
  const { source, sink } = peerPrograms();
  requireBuilt([CLI, PLUGIN], 'npm run bench');

  const machine = describeMachine();
  const out = process.stdout;
  const dir = mkdtempSync(join(tmpdir(), 'petrel-bench-'));
  const servers: Server[] = [];
  try {
    const idle = await backgroundLoad();
    out.write(machineLine(machine, idle));
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    const memory: MemoryResult[] = [];
    for (const workers of WORKER_COUNTS) {
      log(`idle connections: opening ${IDLE_CONNECTIONS} to a fresh Petrel with ${workers} worker(s)…`);
      memory.push(await idleMemory(join(dir, `idle-${workers}`), workers, IDLE_CONNECTIONS));
    }

    for (const workers of WORKER_COUNTS) {
      const petrel = await startDiscardPetrel(join(dir, `throughput-${workers}`), workers);
      servers.push(petrel);
      log(
        `${petrel.target} on ${HOST}:${petrel.port} (primary ${petrel.child.pid}, ` +
          `workers ${workerPids(petrel).join(', ')})`,
      );
    }
    const smtpSink = await startSink(sink);
    servers.push(smtpSink);
    log(`smtp-sink on ${HOST}:${smtpSink.port}`);
    const probeOf = (server: Server): Probe | undefined =>
      server === smtpSink ? undefined : countProbe(server);

    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size] ?? 1000) * factor));

    const runs = await runMatrix({
      servers,
      sizes: SIZES,
      sessions: SESSIONS,
      rounds: ROUNDS,
      warmupMessages: Math.max(10, Math.round(count(1 * KB, 10) / 5)),
      count,
      measure: (server, size, sessions, messages) =>
        sample(source, server, size, sessions, messages, probeOf(server)),
    });

    const ratios = ratiosOf(runs, 1 * KB, 50);
    out.write(
      `\nThroughput (smtp-source, one connection per message, scale ${factor}, median of ${ROUNDS} rounds; ` +
        `petrel×n: n worker processes):\n\n${table(runs, processColumns())}\n\n`,
    );
    out.write(`${ratioLine('Petrel/smtp-sink at 50 sessions, 1 KB', ratios, TARGET_RATIO)}\n`);
    for (const m of memory) {
      out.write(
        `Idle connections, ${m.workers} worker${m.workers === 1 ? '' : 's'}: ${m.connections} greeted ` +
          `connections added ${m.totalKiB} KiB to the RSS of Petrel's processes (${m.rssBeforeKiB} → ${m.rssAfterKiB} KiB), ` +
          `${m.perConnectionKiB.toFixed(1)} KiB per connection\n`,
      );
    }

    return finishRuns(out, RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      runs,
      ratio50x1KB: ratios,
      targetRatio: TARGET_RATIO,
      idleConnections: memory,
    });
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench');
