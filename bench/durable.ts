/**
 * The durable benchmark (`node dist/bench/durable.js` after a build): how fast Petrel takes mail
 * into its fsynced queue, with one worker process and with two, compared with Postfix's smtp-sink
 * on the same machine in the same run.
 *
 * Petrel runs as a child process (the real CLI: a primary and its workers, each worker with its
 * own part of the queue) with the built-in `queue` plugin, which answers `250` only once the
 * message is in its journal and fdatasync'd, and bench/durable-plugin.ts, which accepts every
 * recipient, routes everything to a transport that discards it, and counts what was queued and
 * delivered. So every message goes the queue's whole way: stored, synced,
 * routed, delivered, its state recorded, its space freed. Postfix's smtp-source is the client for
 * every server, with a new connection per message.
 *
 * Besides the rates it prints the fdatasync latency of the queue's filesystem and, when `perf`
 * can count system calls, how many fdatasyncs the server's workers made: messages per sync is
 * what group commit buys. Figures are written to var/bench-durable-results.json.
 *
 * Environment: BENCH_SCALE multiplies the message counts (default 1; e.g. 0.1 for a quick look);
 * BENCH_DIR is the folder for the queue (default: the system's temporary folder, unless that is
 * in memory, then var/ in the repository).
 *
 * Options: `--read-back` makes the transport read every stored message back from the queue
 * before discarding it, as a real transport would. `--profile`, instead of the benchmark, runs
 * Petrel alone (one worker) with `--cpu-prof` at 50 sessions with 1 KB messages and prints where
 * its worker's CPU time went (the profiles are kept in var/).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statfsSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import {
  backgroundLoad,
  BenchError,
  CLI,
  busiestShare,
  countEveryWorker,
  describeMachine,
  findProgram,
  HOST,
  KB,
  log,
  machineLine,
  median,
  peerPrograms,
  percent,
  processColumns,
  ratioLine,
  ratiosOf,
  requireBuilt,
  ROOT,
  runMain,
  sample,
  scale,
  sleep,
  startPetrel,
  startSink,
  stop,
  sumOf,
  table,
  WORKER_COUNTS,
  workerPids,
  type Column,
  type Probe,
  type Run,
  type Server,
  type WorkerCounts,
  runMatrix,
  finishRuns,
} from './harness.js';

const PLUGIN = join(ROOT, 'dist', 'bench', 'durable-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-durable-results.json');

const SIZES = [1 * KB, 100 * KB] as const;
const SESSIONS = [1, 10, 50] as const;
/**
 * Messages per run at BENCH_SCALE=1, by payload size and sessions: enough for a run of a few
 * seconds at the durable rates of a virtual machine's disk, so that the whole bench stays short.
 */
const BASE_COUNT: Record<number, Record<number, number>> = {
  [1 * KB]: { 1: 1000, 10: 3000, 50: 5000 },
  [100 * KB]: { 1: 500, 10: 1000, 50: 1500 },
};
/** Each cell is measured this many times, the servers taking turns; the median counts. */
const ROUNDS = 5;
/** The goal: at 50 sessions and 1 KB, at least 40% of smtp-sink's rate, every 250 fsynced. */
const TARGET_RATIO = 0.4;
/** Appends of 1 KB, each followed by fdatasync, to measure the disk's sync latency. */
const SYNC_PROBES = 300;
/** How long the queue may take to deliver the run's messages after the client is done. */
const DRAIN_TIMEOUT_MS = 60_000;

/** `--read-back`: the bench transport reads every stored message back before it discards it. */
const READ_BACK = process.argv.includes('--read-back');

/** Filesystem types by statfs magic number, for the report. */
const FS_TYPES: Record<number, string> = {
  0xef53: 'ext2/3/4',
  0x58465342: 'xfs',
  0x9123683e: 'btrfs',
  0x2fc12fc1: 'zfs',
  0x01021994: 'tmpfs',
  0x858458f6: 'ramfs',
  0x794c7630: 'overlayfs',
  0x6969: 'nfs',
};
const IN_MEMORY = new Set(['tmpfs', 'ramfs']);

function fsType(dir: string): string {
  const type = statfsSync(dir).type;
  return FS_TYPES[type] ?? `type 0x${type.toString(16)}`;
}

/** A folder for the queue on a filesystem with a disk under it. */
function queueBase(): string {
  const chosen = process.env.BENCH_DIR;
  if (chosen) {
    mkdirSync(chosen, { recursive: true });
    return chosen;
  }
  if (!IN_MEMORY.has(fsType(tmpdir()))) return tmpdir();
  const fallback = join(ROOT, 'var');
  mkdirSync(fallback, { recursive: true });
  return fallback;
}

// ---------------------------------------------------------------- the disk

interface SyncLatency {
  readonly probes: number;
  readonly medianMs: number;
  readonly p10Ms: number;
  readonly p90Ms: number;
  readonly maxMs: number;
}

/**
 * Appends 1 KB and fdatasyncs, `probes` times, in a file of its own in `dir`, the way the
 * journal appends a record: the file grows with each write.
 */
async function syncLatency(dir: string, probes: number): Promise<SyncLatency> {
  const file = join(dir, 'sync-probe');
  const fh = await open(file, 'wx', 0o600);
  const record = Buffer.alloc(KB, 0x61);
  const ms: number[] = [];
  try {
    for (let i = 0; i < probes; i++) {
      const started = process.hrtime.bigint();
      await fh.write(record, 0, record.length, i * record.length);
      await fh.datasync();
      ms.push(Number(process.hrtime.bigint() - started) / 1e6);
    }
  } finally {
    await fh.close();
    rmSync(file, { force: true });
  }
  ms.sort((a, b) => a - b);
  const at = (q: number): number => ms[Math.min(ms.length - 1, Math.floor(q * ms.length))]!;
  return { probes, medianMs: median(ms), p10Ms: at(0.1), p90Ms: at(0.9), maxMs: ms.at(-1)! };
}

// ---------------------------------------------------------------- counting syncs with perf

const SYNC_EVENTS = ['syscalls:sys_enter_fdatasync', 'syscalls:sys_enter_fsync'] as const;

/**
 * Counts the fdatasync and fsync calls of some processes (all their threads) with `perf stat`
 * (syscall tracepoints, counted in the kernel, so the processes are not slowed down). The events
 * are opened disabled and switched on and off through perf's control pipe, which acknowledges each
 * switch, so that a count covers exactly the time between `start()` and `stop()`.
 */
class SyncCounter {
  private readonly closed: Promise<void>;

  private constructor(
    private readonly child: ChildProcess,
    private readonly output: () => string,
  ) {
    this.closed = new Promise((r) => child.once('close', () => r()));
    // A perf that exits early breaks its pipes; control() then reports failure by its time-out.
    for (const fd of [3, 4]) (child.stdio[fd] as Readable | Writable).on('error', () => undefined);
  }

  /** Attaches to `pids`, or returns null when perf is missing or may not count (not root, say). */
  static async attach(perf: string, pids: readonly number[]): Promise<SyncCounter | null> {
    const args = ['stat', '-x,', '-D', '-1', '--control', 'fd:3,4', '-e', SYNC_EVENTS.join(',')];
    const child = spawn(perf, [...args, '-p', pids.join(',')], {
      stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const counter = new SyncCounter(child, () => stderr);
    const ok = await counter.control('enable');
    if (!ok) {
      child.kill('SIGKILL');
      await counter.closed;
      return null;
    }
    return counter;
  }

  /** Sends a command on perf's control pipe and waits for its `ack` (false: perf is gone). */
  private control(cmd: 'enable' | 'disable'): Promise<boolean> {
    const ctl = this.child.stdio[3] as Writable;
    const ack = this.child.stdio[4] as Readable;
    return new Promise((resolve) => {
      const timer = setTimeout(() => done(false), 5000);
      const onData = (d: Buffer): void => {
        if (d.toString('latin1').includes('ack')) done(true);
      };
      const done = (ok: boolean): void => {
        clearTimeout(timer);
        ack.off('data', onData);
        this.child.off('exit', onExit);
        resolve(ok);
      };
      const onExit = (): void => done(false);
      ack.on('data', onData);
      this.child.once('exit', onExit);
      ctl.write(`${cmd}\n`, () => undefined);
    });
  }

  /** Stops counting and returns the counts, or null when perf could not count. */
  async stop(): Promise<{ fdatasync: number; fsync: number } | null> {
    const ok = await this.control('disable');
    this.child.kill('SIGINT');
    await this.closed;
    if (!ok) return null;
    const count = (event: string): number | null => {
      const line = this.output()
        .split('\n')
        .find((l) => l.split(',')[2] === event);
      const value = line?.split(',')[0];
      // perf says "<not counted>" when the process never ran while counting: it made no calls.
      if (value === '<not counted>') return 0;
      const n = Number(value);
      return value && Number.isInteger(n) ? n : null;
    };
    const fdatasync = count(SYNC_EVENTS[0]);
    const fsync = count(SYNC_EVENTS[1]);
    return fdatasync === null || fsync === null ? null : { fdatasync, fsync };
  }
}

// ---------------------------------------------------------------- checks around a run

interface Counts {
  readonly queued: number;
  readonly delivered: number;
  readonly other: number;
  /** Each worker's counts, in the plugin's order. */
  readonly byWorker: WorkerCounts;
}

/** Asks the bench plugin in every worker what it has queued and delivered since it started, and adds up. */
async function counts(server: Server): Promise<Counts> {
  const byWorker = await countEveryWorker(server, 3);
  return { queued: sumOf(byWorker, 0), delivered: sumOf(byWorker, 1), other: sumOf(byWorker, 2), byWorker };
}

/**
 * Checks that the queue took (answered 250 after fsync) exactly the messages of the run and then
 * delivered every one, waiting for the deliveries still under way when the client finished; and
 * counts the workers' syncs from the start of the run to the last delivery.
 */
function durableProbe(server: Server, perf: string | null): Probe {
  let before: Counts = { queued: 0, delivered: 0, other: 0, byWorker: new Map() };
  let counter: SyncCounter | null = null;
  return {
    async start() {
      before = await counts(server);
      counter = perf ? await SyncCounter.attach(perf, workerPids(server)) : null;
    },
    async finish(messages, seconds) {
      const problems: string[] = [];
      const started = Date.now();
      let now = await counts(server);
      while (now.delivered - before.delivered < messages && now.other === before.other) {
        if (Date.now() - started > DRAIN_TIMEOUT_MS) break;
        await sleep(20);
        now = await counts(server);
      }
      const drainSeconds = (Date.now() - started) / 1000;
      const syncs = counter ? await counter.stop() : null;
      const queued = now.queued - before.queued;
      const delivered = now.delivered - before.delivered;
      const other = now.other - before.other;
      if (queued !== messages) problems.push(`the queue took ${queued} of ${messages} messages`);
      if (delivered !== messages) {
        problems.push(`${delivered} of ${messages} messages delivered after ${drainSeconds.toFixed(1)} s`);
      }
      if (other) problems.push(`${other} recipients deferred or failed`);
      const figures: Record<string, number> = { drainSeconds };
      const busiestWorker = busiestShare(before.byWorker, now.byWorker, 0);
      if (busiestWorker !== undefined) figures.busiestWorker = busiestWorker;
      if (syncs) {
        figures.fdatasync = syncs.fdatasync;
        figures.fsync = syncs.fsync;
        figures.fdatasyncPerSecond = syncs.fdatasync / (seconds + drainSeconds);
        figures.messagesPerFdatasync = messages / (syncs.fdatasync || 1);
      }
      return { problems, figures };
    },
  };
}

/**
 * For smtp-sink: counts its syncs too (there are none) but keeps no figures, so that the system
 * call tracepoints, which cost every system call on the machine a little, are on for both servers.
 */
function evenProbe(server: Server, perf: string): Probe {
  let counter: SyncCounter | null = null;
  return {
    async start() {
      counter = await SyncCounter.attach(perf, workerPids(server));
    },
    async finish() {
      await counter?.stop();
      return { problems: [] };
    },
  };
}

/**
 * Segment files left in the journals of a queue's parts (the queue folder itself, and a `part-<k>`
 * folder for each further worker): after the last delivery only the one being written in each
 * part should be.
 */
function segments(queueDir: string): { parts: number; files: number; bytes: number } {
  const parts = [
    queueDir,
    ...readdirSync(queueDir)
      .filter((f) => /^part-\d+$/.test(f))
      .map((f) => join(queueDir, f)),
  ];
  let files = 0;
  let bytes = 0;
  for (const part of parts) {
    const dir = join(part, 'journal');
    const found = readdirSync(dir).filter((f) => f.endsWith('.seg'));
    files += found.length;
    bytes += found.reduce((n, f) => n + statSync(join(dir, f)).size, 0);
  }
  return { parts: parts.length, files, bytes };
}

// ---------------------------------------------------------------- the CPU profile

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
  readonly hitCount?: number;
}

/** The functions that used the most self time in a .cpuprofile, and the shares by area. */
function summarizeProfile(file: string, top: number): string {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as {
    nodes: ProfileNode[];
    samples: number[];
    timeDeltas: number[];
  };
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  const areas = new Map<string, number>();
  let total = 0;
  profile.samples.forEach((id, i) => {
    const node = byId.get(id);
    const dt = profile.timeDeltas[i] ?? 0;
    if (!node || node.callFrame.functionName === '(idle)') return;
    total += dt;
    const { functionName, url, lineNumber } = node.callFrame;
    const where = url.startsWith('file://') ? relative(ROOT, new URL(url).pathname) : url;
    const key = `${functionName || '(anonymous)'} ${where ? `${where}:${lineNumber + 1}` : ''}`.trim();
    self.set(key, (self.get(key) ?? 0) + dt);
    const area = where.startsWith('dist/plugins/queue/')
      ? 'plugins/queue'
      : where.startsWith('dist/bench/')
        ? 'bench plugin'
        : where.startsWith('dist/core/')
          ? 'core'
          : where.includes('node_modules')
            ? 'dependencies'
            : where.startsWith('node:')
              ? 'Node (JS)'
              : functionName.startsWith('(')
                ? functionName
                : 'native';
    areas.set(area, (areas.get(area) ?? 0) + dt);
  });
  const share = (t: number): string => `${((t / (total || 1)) * 100).toFixed(1).padStart(5)}%`;
  const lines = [`busy time sampled: ${(total / 1e6).toFixed(2)} s`, '', 'by area:'];
  for (const [area, t] of [...areas].sort((a, b) => b[1] - a[1])) lines.push(`  ${share(t)}  ${area}`);
  lines.push('', `top ${top} functions by self time:`);
  for (const [key, t] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    lines.push(`  ${share(t)}  ${key}`);
  }
  return lines.join('\n');
}

/**
 * Runs Petrel alone (one worker) under `--cpu-prof` at 50 sessions, 1 KB, and summarizes the
 * profile of its worker. The primary, which only supervises, writes a profile of its own beside it.
 */
async function profile(source: string, base: string): Promise<number> {
  const dir = mkdtempSync(join(base, 'petrel-durable-'));
  const profiles = join(ROOT, 'var', `durable-profile-${Date.now()}`);
  mkdirSync(profiles, { recursive: true });
  const petrel = await startDurablePetrel(dir, 1, ['--cpu-prof', `--cpu-prof-dir=${profiles}`]);
  const [worker] = workerPids(petrel);
  try {
    const probe = durableProbe(petrel, null);
    const messages = Math.max(50, Math.round(5000 * scale()));
    await sample(source, petrel, 1 * KB, 10, 500, probe);
    const s = await sample(source, petrel, 1 * KB, 50, messages, probe);
    if (s.failure) throw new BenchError(`the profiled run failed: ${s.failure}`);
    process.stdout.write(
      `Petrel, 1 KB × ${messages} over 50 sessions: ${s.perSecond.toFixed(0)} msg/s, ` +
        `server CPU ${percent(s.serverCpu)}\n`,
    );
  } finally {
    await stop(petrel.child);
    rmSync(dir, { recursive: true, force: true });
  }
  // Node names a profile CPU.<date>.<time>.<pid>.<thread>.<sequence>.cpuprofile; thread 0 is the
  // worker's main thread (its watchdog thread writes one too).
  const file = readdirSync(profiles).find((f) => {
    const [, , , pid, thread] = f.split('.');
    return f.endsWith('.cpuprofile') && pid === String(worker) && thread === '0';
  });
  if (!file) throw new BenchError(`no profile of the worker (pid ${worker}) was written to ${profiles}`);
  process.stdout.write(
    `\n${summarizeProfile(join(profiles, file), 30)}\n\nProfile: ${join(profiles, file)}\n`,
  );
  return 0;
}

// ---------------------------------------------------------------- main

/** The queue folder of a Petrel whose config is in `dir`. */
const queueOf = (dir: string): string => join(dir, 'queue');

/** Starts Petrel with the bench plugin and the queue; its config, spool and queue go in `dir`. */
function startDurablePetrel(dir: string, workers: number, nodeArgs: readonly string[] = []): Promise<Server> {
  const plugins = [
    { name: PLUGIN, config: { readBack: READ_BACK } },
    { name: 'queue', config: { dir: queueOf(dir), retry: '1h' } },
  ];
  return startPetrel(dir, plugins, workers, nodeArgs);
}

function columns(): Column[] {
  const figure = (r: Run, name: string, digits: number): string =>
    r.figures[name] === undefined ? '' : r.figures[name].toFixed(digits);
  return [
    { head: 'fdatasync/s', cell: (r) => figure(r, 'fdatasyncPerSecond', 0) },
    { head: 'msg/fdatasync', cell: (r) => figure(r, 'messagesPerFdatasync', 2) },
    { head: 'drain s', cell: (r) => figure(r, 'drainSeconds', 2) },
    ...processColumns(),
  ];
}

async function main(): Promise<number> {
  const factor = scale();
  const { source, sink } = peerPrograms();
  requireBuilt([CLI, PLUGIN], 'npm run build --silent && node dist/bench/durable.js');
  const base = queueBase();
  if (process.argv.includes('--profile')) return profile(source, base);

  const machine = describeMachine();
  const out = process.stdout;
  const dir = mkdtempSync(join(base, 'petrel-durable-'));
  const servers: Server[] = [];
  try {
    const idle = await backgroundLoad();
    out.write(machineLine(machine, idle));
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    const fs = fsType(dir);
    const latency = await syncLatency(dir, SYNC_PROBES);
    out.write(
      `Queue: ${dir} (${fs}). fdatasync after a 1 KB append, ${latency.probes} times: ` +
        `median ${latency.medianMs.toFixed(2)} ms (10–90%: ${latency.p10Ms.toFixed(2)}–${latency.p90Ms.toFixed(2)} ms, ` +
        `max ${latency.maxMs.toFixed(1)} ms), so one sync at a time allows about ${(1000 / latency.medianMs).toFixed(0)} a second\n`,
    );
    if (IN_MEMORY.has(fs)) log(`warning: ${dir} is in memory; the syncs cost nothing there`);

    // Each Petrel has a folder (and so a queue) of its own.
    const queueDirs = new Map<Server, string>();
    for (const workers of WORKER_COUNTS) {
      const own = join(dir, `workers-${workers}`);
      const petrel = await startDurablePetrel(own, workers);
      servers.push(petrel);
      queueDirs.set(petrel, queueOf(own));
      log(
        `${petrel.target} on ${HOST}:${petrel.port} (primary ${petrel.child.pid}, ` +
          `workers ${workerPids(petrel).join(', ')})`,
      );
    }
    const smtpSink = await startSink(sink);
    servers.push(smtpSink);
    log(`smtp-sink on ${HOST}:${smtpSink.port}`);

    const perf = findProgram('perf');
    let counting = false;
    if (perf) {
      const trial = await SyncCounter.attach(perf, workerPids(servers[0]!));
      counting = (await trial?.stop()) != null;
    }
    if (!counting) log('perf cannot count system calls here: no fdatasync figures');
    const probeOf = (server: Server): Probe | undefined =>
      server !== smtpSink
        ? durableProbe(server, counting ? perf : null)
        : counting && perf
          ? evenProbe(server, perf)
          : undefined;

    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size]?.[sessions] ?? 500) * factor));

    const runs = await runMatrix({
      servers,
      sizes: SIZES,
      sessions: SESSIONS,
      rounds: ROUNDS,
      warmupMessages: Math.max(10, Math.round(500 * factor)),
      count,
      measure: (server, size, sessions, messages) =>
        sample(source, server, size, sessions, messages, probeOf(server)),
    });
    const journals = [...queueDirs].map(([server, queueDir]) => ({
      target: server.target,
      ...segments(queueDir),
    }));

    const ratios = ratiosOf(runs, 1 * KB, 50);
    out.write(
      `\nDurable throughput (smtp-source, one connection per message, every 250 after fdatasync, ` +
        `scale ${factor}, median of ${ROUNDS} rounds${READ_BACK ? ', messages read back' : ''}; ` +
        `petrel×n: n worker processes):\n\n${table(runs, columns())}\n\n`,
    );
    out.write(ratioLine('Petrel (durable)/smtp-sink at 50 sessions, 1 KB', ratios, TARGET_RATIO));
    for (const j of journals) {
      out.write(
        `Journal of ${j.target} after the last delivery: ${j.files} segment file(s) in ${j.parts} part(s), ` +
          `${(j.bytes / 2 ** 20).toFixed(1)} MiB\n`,
      );
      // Each part keeps the segment it is writing.
      if (j.files > j.parts)
        log(`warning: segments of finished messages were left in the journal of ${j.target}`);
    }

    return finishRuns(out, RESULTS, {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      queueFilesystem: fs,
      syncLatency: latency,
      syncCounting: counting,
      readBack: READ_BACK,
      runs,
      ratio50x1KB: ratios,
      targetRatio: TARGET_RATIO,
      journalAfter: journals,
    });
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

runMain(main, 'bench');
