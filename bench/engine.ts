/**
 * The engine benchmark (`npm run bench`): how fast Petrel takes mail compared with Postfix's
 * smtp-sink on the same machine in the same run, and what an idle connection costs.
 *
 * Petrel runs as a child process (the real CLI) with one plugin that accepts and discards every
 * message (bench/discard-plugin.ts). Postfix's smtp-source is the client for both servers, with a
 * new connection per message. smtp-sink, a minimal C server that throws mail away, is the upper
 * bound. Figures are printed and written to var/bench-results.json.
 *
 * Environment: BENCH_SCALE multiplies the message counts (default 1; e.g. 0.1 for a quick look).
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { COUNT_COMMAND } from './discard-plugin.js';
import {
  ask,
  backgroundLoad,
  BenchError,
  CLI,
  describeMachine,
  HOST,
  KB,
  log,
  machineLine,
  openGreeted,
  peerPrograms,
  ratioOf,
  requireBuilt,
  ROOT,
  runMain,
  sample,
  scale,
  sleep,
  startPetrel,
  startSink,
  stop,
  table,
  type Probe,
  type Server,
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
  readonly connections: number;
  readonly rssBeforeKiB: number;
  readonly rssAfterKiB: number;
  readonly totalKiB: number;
  readonly perConnectionKiB: number;
}

/** Resident set size of a process, in KiB. */
function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new BenchError(`no VmRSS for process ${pid}`);
  return Number(m[1]);
}

/** Starts Petrel with the discard plugin; its config and spool go in `dir` (created). */
function startDiscardPetrel(dir: string): Promise<Server> {
  return startPetrel(dir, [PLUGIN]);
}

/** Asks the discard plugin how many messages Petrel has accepted so far. */
async function acceptedCount(port: number): Promise<number> {
  const reply = await ask(port, COUNT_COMMAND);
  const m = /^250 2\.0\.0 (\d+)$/.exec(reply);
  if (!m) throw new BenchError(`${COUNT_COMMAND} got "${reply}"; is the discard plugin loaded?`);
  return Number(m[1]);
}

/** Checks that the discard plugin accepted exactly the messages of the run. */
function countProbe(port: number): Probe {
  let before = 0;
  return {
    async start() {
      before = await acceptedCount(port);
    },
    async finish(messages) {
      const accepted = (await acceptedCount(port)) - before;
      return {
        problems: accepted === messages ? [] : [`Petrel accepted ${accepted} of ${messages} messages`],
      };
    },
  };
}

/**
 * Opens `connections` connections to a Petrel of its own (so that garbage left by other traffic
 * cannot hide the growth), waits for every greeting, and compares the RSS before and after.
 */
async function idleMemory(dir: string, connections: number): Promise<MemoryResult> {
  const server = await startDiscardPetrel(dir);
  const pid = server.child.pid!;
  const sockets: Socket[] = [];
  try {
    // Let the first sessions load and compile their code paths, so the baseline includes that.
    const warm = await Promise.all(Array.from({ length: 20 }, () => openGreeted(server.port)));
    for (const s of warm) s.destroy();
    await sleep(1000);
    const rssBeforeKiB = rssKiB(pid);
    const batch = 100;
    for (let i = 0; i < connections; i += batch) {
      const n = Math.min(batch, connections - i);
      sockets.push(...(await Promise.all(Array.from({ length: n }, () => openGreeted(server.port)))));
    }
    await sleep(1000);
    const rssAfterKiB = rssKiB(pid);
    const totalKiB = rssAfterKiB - rssBeforeKiB;
    if (server.complaints.length) throw new BenchError(`Petrel said:\n${server.complaints.join('\n')}`);
    return { connections, rssBeforeKiB, rssAfterKiB, totalKiB, perConnectionKiB: totalKiB / connections };
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

    log(`idle connections: opening ${IDLE_CONNECTIONS} to a fresh Petrel…`);
    const memory = await idleMemory(join(dir, 'idle'), IDLE_CONNECTIONS);

    const petrel = await startDiscardPetrel(join(dir, 'throughput'));
    servers.push(petrel);
    const smtpSink = await startSink(sink);
    servers.push(smtpSink);
    log(`Petrel on ${HOST}:${petrel.port} (pid ${petrel.child.pid}), smtp-sink on ${HOST}:${smtpSink.port}`);
    const probeOf = (server: Server): Probe | undefined =>
      server === petrel ? countProbe(petrel.port) : undefined;

    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size] ?? 1000) * factor));

    const runs = await runMatrix({
      servers: [petrel, smtpSink],
      sizes: SIZES,
      sessions: SESSIONS,
      rounds: ROUNDS,
      warmupMessages: Math.max(10, Math.round(count(1 * KB, 10) / 5)),
      count,
      measure: (server, size, sessions, messages) =>
        sample(source, server, size, sessions, messages, probeOf(server)),
    });

    const ratio = ratioOf(runs, 1 * KB, 50);
    out.write(
      `\nThroughput (smtp-source, one connection per message, scale ${factor}, median of ${ROUNDS} rounds):\n\n` +
        `${table(runs)}\n\n`,
    );
    out.write(
      `Petrel/smtp-sink at 50 sessions, 1 KB: ${ratio === null ? 'n/a' : ratio.toFixed(2)} ` +
        `(target ≥ ${TARGET_RATIO}: ${ratio === null ? 'not measured' : ratio >= TARGET_RATIO ? 'met' : 'NOT met'})\n\n`,
    );
    out.write(
      `Idle connections: ${memory.connections} greeted connections added ${memory.totalKiB} KiB to Petrel's RSS ` +
        `(${memory.rssBeforeKiB} → ${memory.rssAfterKiB} KiB), ${memory.perConnectionKiB.toFixed(1)} KiB per connection\n`,
    );

    return finishRuns(out, RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      runs,
      ratio50x1KB: ratio,
      targetRatio: TARGET_RATIO,
      idleConnections: memory,
    });
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench');
