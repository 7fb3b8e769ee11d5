/**
 * What the benchmarks share: starting Petrel (the real CLI, with one or more worker processes) and
 * Postfix's smtp-sink, running Postfix's smtp-source against either and checking the run, reading
 * CPU and memory figures of a server's whole process tree from /proc, asking the bench plugin in
 * every worker of a Petrel for its counts, and printing the results as a table.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  accessSync,
  constants,
  mkdirSync,
  readdirSync,
  readFileSync,
  statfsSync,
  writeFileSync,
} from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { countSocketPath } from './count-socket.js';

export const HOST = '127.0.0.1';
/** The repository root (this file runs from dist/bench/). */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');
/** As root, Petrel starts only with `user` in the config or `--run-as-root`. */
const START = ['start', ...(process.getuid?.() === 0 ? ['--run-as-root'] : [])];

export const KB = 1024;
export const EX_UNAVAILABLE = 69;

/**
 * What a run measured: Petrel with one worker (`petrel`, the figures of earlier versions, which
 * ran in one process), Petrel with n workers (`petrel×n`), or smtp-sink.
 */
/** `petrel+<feature>`: one worker with a feature on (the relay bench's `petrel+dkim`). */
export type Target = 'petrel' | `petrel×${number}` | `petrel+${string}` | 'smtp-sink';

/** The numbers of workers each benchmark runs Petrel with, side by side with smtp-sink. */
export const WORKER_COUNTS = [1, 2] as const;

export function petrelTarget(workers: number): Target {
  return workers === 1 ? 'petrel' : `petrel×${workers}`;
}

/** One smtp-source run against one server. */
export interface Sample {
  readonly seconds: number;
  readonly perSecond: number;
  /** CPU time the server used during the run, as a share of one core (1 = one core busy). */
  readonly serverCpu: number;
  /** How busy the whole machine was during the run, as a share of all its cores. */
  readonly machineCpu: number;
  /** Figures a benchmark measures besides the rate (by name; absent when not measured). */
  readonly figures: Readonly<Record<string, number>>;
  /** Why the run does not count, or null when it does. */
  readonly failure: string | null;
}

/** The rounds of one target at one size and concurrency; the figures are medians. */
export interface Run {
  readonly target: Target;
  readonly size: number;
  readonly sessions: number;
  readonly messages: number;
  readonly rounds: number;
  readonly seconds: number;
  readonly perSecond: number;
  readonly minPerSecond: number;
  readonly maxPerSecond: number;
  readonly serverCpu: number;
  readonly machineCpu: number;
  /** The median of each extra figure over the rounds that have it. */
  readonly figures: Readonly<Record<string, number>>;
  readonly failure: string | null;
  readonly samples: readonly Sample[];
}

export class BenchError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
  ) {
    super(message);
  }
}

// ---------------------------------------------------------------- small helpers

export function scale(): number {
  const raw = process.env.BENCH_SCALE;
  if (raw === undefined || raw === '') return 1;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) {
    throw new BenchError(`BENCH_SCALE must be a positive number, got "${raw}"`);
  }
  return n;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Finds an executable on PATH or in the sbin folders Postfix installs to. */
export function findProgram(name: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin', '/sbin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const path = join(dir, name);
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // not here
    }
  }
  return null;
}

/** smtp-source and smtp-sink, or a BenchError (exit code 69) naming what is missing. */
export function peerPrograms(): { source: string; sink: string } {
  const source = findProgram('smtp-source');
  const sink = findProgram('smtp-sink');
  const missing = [!source && 'smtp-source', !sink && 'smtp-sink'].filter(Boolean);
  if (!source || !sink) {
    throw new BenchError(
      `missing peer program(s): ${missing.join(', ')}. They come with Postfix ` +
        '(Debian/Ubuntu: apt-get install postfix; the programs land in /usr/sbin).',
      EX_UNAVAILABLE,
    );
  }
  return { source, sink };
}

/** Fails with a hint to build when a compiled file the bench runs is missing. */
export function requireBuilt(files: readonly string[], script: string): void {
  for (const f of files) {
    try {
      accessSync(f, constants.R_OK);
    } catch {
      throw new BenchError(`${f} is missing; build first (npm run build), or run ${script}`);
    }
  }
}

export interface Machine {
  readonly cpus: number;
  readonly cpuModel: string;
  readonly memoryMiB: number;
  readonly kernel: string;
  readonly node: string;
}

export function describeMachine(): Machine {
  return {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memoryMiB: Math.round(totalmem() / 2 ** 20),
    kernel: release(),
    node: process.version,
  };
}

export function machineLine(machine: Machine, idle: number): string {
  return (
    `Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memoryMiB} MiB, Linux ${machine.kernel}, ` +
    `Node ${machine.node}; ${percent(idle)} busy before the start\n`
  );
}

const IN_MEMORY = new Set([0x01021994, 0x858458f6]); // tmpfs, ramfs

/** A folder for the queue on a filesystem with a disk under it. */
export function queueBase(): string {
  const chosen = process.env.BENCH_DIR;
  if (chosen) {
    mkdirSync(chosen, { recursive: true });
    return chosen;
  }
  if (!IN_MEMORY.has(statfsSync(tmpdir()).type)) return tmpdir();
  const fallback = join(ROOT, 'var');
  mkdirSync(fallback, { recursive: true });
  return fallback;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, HOST, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

// ---------------------------------------------------------------- a server's processes

/**
 * The children of a process: the union of its threads' lists in /proc (a child is listed under
 * the thread that forked it).
 */
export function childPids(pid: number): number[] {
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return []; // it has exited
  }
  const children = new Set<number>();
  for (const task of tasks) {
    try {
      const list = readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
      for (const child of list ? list.split(/\s+/) : []) children.add(Number(child));
    } catch {
      // the thread has ended
    }
  }
  return [...children];
}

/** A process and all its descendants. */
export function processTree(pid: number): number[] {
  const all = [pid];
  for (let i = 0; i < all.length; i++) all.push(...childPids(all[i]!));
  return all;
}

/**
 * The processes that do a server's work: for Petrel the workers (the children of the `petrel
 * start` primary, which only supervises), for smtp-sink the one process.
 */
export function workerPids(server: Server): number[] {
  const pid = server.child.pid!;
  return server.target === 'smtp-sink' ? [pid] : childPids(pid);
}

const TICKS_PER_SECOND = 100; // USER_HZ on Linux

/**
 * CPU seconds (user + system, all threads) a process has used so far (`own`), and those of its
 * children that have exited and been waited for (`reaped`). 0 for a process that has exited.
 */
function cpuOf(pid: number): { own: number; reaped: number } {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return { own: 0, reaped: 0 }; // it exited between listing and reading; its parent's `reaped` has it now
  }
  // Fields after the command name (which may contain spaces) start at field 3: utime is field 14.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const [utime = 0, stime = 0, cutime = 0, cstime = 0] = fields.slice(11, 15).map(Number);
  return { own: (utime + stime) / TICKS_PER_SECOND, reaped: (cutime + cstime) / TICKS_PER_SECOND };
}

/**
 * CPU seconds the whole server has used so far: its process and every descendant (Petrel's
 * primary and workers), with the children they reaped, so that the sum does not go back when a
 * worker ends.
 */
export function serverCpuSeconds(server: Server): number {
  return processTree(server.child.pid!).reduce((sum, pid) => {
    const cpu = cpuOf(pid);
    return sum + cpu.own + cpu.reaped;
  }, 0);
}

/** CPU seconds the server's first process alone has used: Petrel's primary. */
function primaryCpuSeconds(server: Server): number {
  return cpuOf(server.child.pid!).own;
}

/** Resident set size of one process, in KiB (0 if it has exited). */
function rssKiB(pid: number): number {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return 0;
  }
  return Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0);
}

/**
 * Resident memory of the whole server, in KiB: the sum over its processes. Pages the processes
 * share (Node's own code, mapped by each) count once per process, so the sum overstates the
 * memory a server of several processes takes; differences (what connections add) are private
 * memory and not affected.
 */
export function serverRssKiB(server: Server): number {
  return processTree(server.child.pid!).reduce((sum, pid) => sum + rssKiB(pid), 0);
}

/** Busy and total CPU ticks of the whole machine, all cores (the first line of /proc/stat). */
export function machineTicks(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
  const ticks = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = ticks.reduce((a, b) => a + b, 0);
  const idle = (ticks[3] ?? 0) + (ticks[4] ?? 0); // idle + iowait
  return { busy: total - idle, total };
}

/** How busy the machine is before the bench starts (a share of all cores, over one second). */
export async function backgroundLoad(): Promise<number> {
  const before = machineTicks();
  await sleep(1000);
  const after = machineTicks();
  return (after.busy - before.busy) / (after.total - before.total || 1);
}

export function formatSize(bytes: number): string {
  return `${bytes / KB} KB`;
}

export function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

// ---------------------------------------------------------------- SMTP over a plain socket

/** Opens a connection and resolves with it once the complete 220 greeting has arrived. */
export function openGreeted(port: number, timeoutMs = 10_000): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: HOST, port });
    let got = '';
    const timer = setTimeout(() => fail(new Error('no greeting within time')), timeoutMs);
    const fail = (err: Error): void => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const onData = (chunk: Buffer): void => {
      got += chunk.toString('latin1');
      if (!got.endsWith('\r\n')) return;
      clearTimeout(timer);
      socket.off('data', onData);
      if (/^220 /m.test(got)) resolve(socket);
      else fail(new Error(`unexpected greeting: ${got.trim()}`));
    };
    socket.on('data', onData);
    socket.once('error', fail);
    socket.once('close', () =>
      fail(new Error(`connection closed before the greeting (got "${got.trim()}")`)),
    );
  });
}

// ---------------------------------------------------------------- the bench plugins' counts

/** Each worker's counts, by process id, as a bench plugin tells them. */
export type WorkerCounts = ReadonlyMap<number, readonly number[]>;

/**
 * Asks the bench plugin in every worker of a Petrel for its counts (`fields` numbers), on each
 * worker's count socket (bench/count-socket.ts). A worker still setting up has no socket yet: it
 * is asked again until it answers, or fails after 15 s.
 */
export async function countEveryWorker(server: Server, fields: number): Promise<WorkerCounts> {
  const pids = workerPids(server);
  if (!pids.length || !server.dir) throw new BenchError(`${server.target} has no worker processes`);
  const dir = server.dir;
  const counts = await Promise.all(
    pids.map(async (pid) => {
      const path = countSocketPath(dir, pid);
      const deadline = Date.now() + 15_000;
      for (;;) {
        try {
          return await readCounts(path, fields);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          const starting = code === 'ENOENT' || code === 'ECONNREFUSED';
          if (!starting || Date.now() > deadline) {
            throw new BenchError(
              `no counts from worker ${pid} of ${server.target} (${path}): ${String(err)}`,
            );
          }
          await sleep(50);
        }
      }
    }),
  );
  return new Map(pids.map((pid, i) => [pid, counts[i]!]));
}

/** Reads the one line a count socket answers with. */
function readCounts(path: string, fields: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    let got = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error('no answer within 10 s'));
    }, 10_000);
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => (got += s));
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.once('end', () => {
      clearTimeout(timer);
      const numbers = got.trim().split(' ').map(Number);
      if (numbers.length === fields && numbers.every(Number.isInteger)) resolve(numbers);
      else reject(new BenchError(`${path} answered "${got.trim()}"; expected ${fields} counts`));
    });
  });
}

/**
 * What a queue bench plugin (relay-plugin.ts, queue-plugin.ts) reports, added up over every
 * worker: recipients queued, delivered, deferred and failed, in that order on its count socket.
 */
export interface QueueCounts {
  readonly queued: number;
  readonly delivered: number;
  readonly deferred: number;
  readonly failed: number;
  /** Each worker's counts, in the plugin's order. */
  readonly byWorker: WorkerCounts;
}

export async function queueCounts(server: Server): Promise<QueueCounts> {
  const byWorker = await countEveryWorker(server, 4);
  const [queued, delivered, deferred, failed] = [0, 1, 2, 3].map((i) => sumOf(byWorker, i)) as [
    number,
    number,
    number,
    number,
  ];
  return { queued, delivered, deferred, failed, byWorker };
}

/** One count (`field`) added up over every worker. */
export function sumOf(counts: WorkerCounts, field: number): number {
  let sum = 0;
  for (const numbers of counts.values()) sum += numbers[field] ?? 0;
  return sum;
}

/**
 * The largest share of a run's count (`field`, between `before` and `after`) that one worker
 * took: 0.5 is an even split over two workers, 1 means one worker took everything. Undefined with
 * one worker, or when nothing was counted.
 */
export function busiestShare(before: WorkerCounts, after: WorkerCounts, field: number): number | undefined {
  if (after.size < 2) return undefined;
  const taken = [...after].map(([pid, numbers]) => (numbers[field] ?? 0) - (before.get(pid)?.[field] ?? 0));
  const total = taken.reduce((a, b) => a + b, 0);
  return total > 0 ? Math.max(...taken) / total : undefined;
}

/** Retries until something accepts connections and greets on `port`, or the process exits. */
async function waitForGreeting(
  port: number,
  child: ChildProcess,
  name: string,
  output: () => string,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new BenchError(
        `${name} exited during start-up (${child.exitCode ?? child.signalCode}):\n${output()}`,
      );
    }
    try {
      const socket = await openGreeted(port, 2000);
      socket.end('QUIT\r\n');
      socket.destroy();
      return;
    } catch {
      if (Date.now() > deadline) {
        throw new BenchError(
          `${name} did not greet on ${HOST}:${port} within ${timeoutMs / 1000} s:\n${output()}`,
        );
      }
      await sleep(20);
    }
  }
}

// ---------------------------------------------------------------- the servers

export interface Server {
  readonly target: Target;
  /** Petrel's folder (its config, spool and the bench plugin's count sockets); null for smtp-sink. */
  readonly dir: string | null;
  readonly port: number;
  readonly child: ChildProcess;
  /** Log lines at warn or worse (Petrel), or anything the server printed (smtp-sink). */
  readonly complaints: string[];
}

function collectLines(child: ChildProcess, into: string[], keep: (line: string) => boolean): void {
  const take = (stream: NodeJS.ReadableStream | null): void => {
    let partial = '';
    stream?.setEncoding('utf8');
    stream?.on('data', (chunk: string) => {
      const lines = (partial + chunk).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) if (line.trim() && keep(line)) into.push(line);
    });
  };
  take(child.stdout);
  take(child.stderr);
}

/** Keeps Petrel's JSON log lines at warn (40) or worse, and anything that is not JSON. */
function isComplaint(line: string): boolean {
  try {
    const entry = JSON.parse(line) as { level?: number; msg?: string };
    // As root the bench starts Petrel with --run-as-root (START), which warns once that it did.
    if (START.length > 1 && entry.msg?.startsWith('running as root (--run-as-root)')) return false;
    return (entry.level ?? 0) >= 40;
  } catch {
    return true;
  }
}

/**
 * Starts Petrel with the given plugin list and `workers` worker processes; its config and spool go
 * in `dir` (created). `nodeArgs` go to Node before the CLI (e.g. `--cpu-prof`); the primary passes
 * them on to its workers.
 */
export async function startPetrel(
  dir: string,
  plugins: readonly unknown[],
  workers: number,
  nodeArgs: readonly string[] = [],
  /** More top-level config keys (`dns`, …); `listeners` are added after the SMTP one. */
  extra: Record<string, unknown> = {},
  /** How long it may take to greet (a start that reads a large queue takes longer). */
  greetTimeoutMs = 15_000,
): Promise<Server> {
  mkdirSync(dir, { recursive: true });
  const port = await freePort();
  const { listeners: more = [], ...rest } = extra as { listeners?: unknown[] };
  const config = {
    ...rest,
    hostname: 'bench.test',
    workers,
    listeners: [{ kind: 'smtp', address: HOST, port }, ...more],
    limits: { maxConnections: 2000, maxConnectionsPerIp: 2000 },
    spool: { dir: join(dir, 'spool') },
    log: { level: 'warn', format: 'json' },
    plugins,
  };
  const file = join(dir, 'petrel.yaml');
  writeFileSync(file, stringify(config));
  const child = spawn(process.execPath, [...nodeArgs, CLI, ...START, '--config', file], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const complaints: string[] = [];
  collectLines(child, complaints, isComplaint);
  await ready(
    child,
    waitForGreeting(port, child, 'Petrel', () => complaints.join('\n'), greetTimeoutMs),
  );
  return { target: petrelTarget(workers), dir, port, child, complaints };
}

/** Starts smtp-sink, on `port` when given (a destination that comes back), else on a free one. */
export async function startSink(program: string, port?: number): Promise<Server> {
  port ??= await freePort();
  // As root smtp-sink insists on dropping privileges after binding.
  const args = [...(process.getuid?.() === 0 ? ['-u', 'nobody'] : []), `${HOST}:${port}`, '1024'];
  const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const complaints: string[] = [];
  collectLines(child, complaints, () => true);
  await ready(
    child,
    waitForGreeting(port, child, 'smtp-sink', () => complaints.join('\n')),
  );
  return { target: 'smtp-sink', dir: null, port, child, complaints };
}

/** Waits for a server to come up; one that does not is stopped before the error goes on. */
async function ready(child: ChildProcess, up: Promise<void>): Promise<void> {
  try {
    await up;
  } catch (err) {
    await stop(child);
    throw err;
  }
}

export async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

// ---------------------------------------------------------------- throughput

export interface SourceResult {
  readonly seconds: number;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** The last value of smtp-source's DATA counter (-c). */
  readonly counted: number;
  readonly stderr: string;
}

/** Runs smtp-source; `extra` are more of its options (`-d`: many messages per connection). */
export function runSource(
  program: string,
  port: number,
  size: number,
  messages: number,
  sessions: number,
  timeoutMs: number,
  extra: readonly string[] = [],
): Promise<SourceResult> {
  const args = ['-c', ...extra, '-l', String(size), '-m', String(messages), '-s', String(sessions)];
  args.push('-f', 'from@bench.test', '-t', 'to@bench.test', `${HOST}:${port}`);
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      // The counter is rewritten in place with CR; only the tail matters.
      stdout = (stdout + s).slice(-64);
    });
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      clearTimeout(timer);
      const counters = stdout.split(/[\r\n]+/).filter((s) => /^\d+$/.test(s));
      resolve({ seconds, code, signal, counted: Number(counters.at(-1) ?? 0), stderr: stderr.trim() });
    });
  });
}

/**
 * What a benchmark checks and measures on the server around one run: `start` just before
 * smtp-source starts, `finish` once it has exited (after the CPU figures are taken). `finish`
 * returns the problems it found (the run then fails) and figures to keep with the sample.
 */
export interface Probe {
  start(): Promise<void>;
  finish(
    messages: number,
    seconds: number,
  ): Promise<{ problems: string[]; figures?: Record<string, number> }>;
}

/** One smtp-source run against one server, checked. */
export async function sample(
  source: string,
  server: Server,
  size: number,
  sessions: number,
  messages: number,
  probe?: Probe,
): Promise<Sample> {
  await probe?.start();
  const complaintsBefore = server.complaints.length;
  const petrel = server.target !== 'smtp-sink';
  const serverBefore = serverCpuSeconds(server);
  const primaryBefore = petrel ? primaryCpuSeconds(server) : 0;
  const machineBefore = machineTicks();
  const timeoutMs = 300_000;
  const r = await runSource(source, server.port, size, messages, sessions, timeoutMs);
  const serverCpu = (serverCpuSeconds(server) - serverBefore) / r.seconds;
  const primaryCpu = (primaryCpuSeconds(server) - primaryBefore) / r.seconds;
  const machineAfter = machineTicks();
  const machineCpu =
    (machineAfter.busy - machineBefore.busy) / (machineAfter.total - machineBefore.total || 1);

  const problems: string[] = [];
  if (r.signal) problems.push(`smtp-source was killed (${r.signal}) after ${timeoutMs / 1000} s`);
  else if (r.code !== 0) problems.push(`smtp-source exited with ${r.code}`);
  if (r.stderr) problems.push(r.stderr);
  if (r.counted !== messages) problems.push(`smtp-source counted ${r.counted} of ${messages} messages`);
  const checked = probe ? await probe.finish(messages, r.seconds) : { problems: [] };
  problems.push(...checked.problems);
  const complaints = server.complaints.slice(complaintsBefore);
  if (complaints.length) problems.push(`${server.target} said:\n  ${complaints.slice(0, 5).join('\n  ')}`);
  if (server.child.exitCode !== null || server.child.signalCode !== null) {
    problems.push(`${server.target} died`);
  }
  return {
    seconds: r.seconds,
    perSecond: messages / r.seconds,
    serverCpu,
    machineCpu,
    figures: { ...(petrel ? { primaryCpu } : {}), ...checked.figures },
    failure: problems.length ? problems.join('; ') : null,
  };
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Sums up the rounds of one target and cell: medians, and the first failure if any. */
export function summarize(
  target: Target,
  size: number,
  sessions: number,
  messages: number,
  samples: Sample[],
): Run {
  const failed = samples.find((s) => s.failure);
  const perSecond = samples.map((s) => s.perSecond);
  const figures: Record<string, number> = {};
  for (const name of new Set(samples.flatMap((s) => Object.keys(s.figures)))) {
    const values = samples.map((s) => s.figures[name]).filter((v) => v !== undefined);
    figures[name] = median(values);
  }
  return {
    target,
    size,
    sessions,
    messages,
    rounds: samples.length,
    seconds: median(samples.map((s) => s.seconds)),
    perSecond: median(perSecond),
    minPerSecond: Math.min(...perSecond),
    maxPerSecond: Math.max(...perSecond),
    serverCpu: median(samples.map((s) => s.serverCpu)),
    machineCpu: median(samples.map((s) => s.machineCpu)),
    figures,
    failure: failed?.failure ?? null,
    samples,
  };
}

/** Prints a line about one finished round to stderr. */
export function logRound(
  server: Server,
  size: number,
  messages: number,
  sessions: number,
  round: number,
  s: Sample,
): void {
  log(
    `${server.target.padEnd(9)} ${formatSize(size).padStart(6)} × ${messages} over ` +
      `${String(sessions).padStart(2)} sessions, round ${round + 1}: ` +
      (s.failure ? `FAILED: ${s.failure}` : `${s.perSecond.toFixed(0)} msg/s`),
  );
}

// ---------------------------------------------------------------- report

/** A Petrel target's median rate over smtp-sink's in one cell (default: one worker), or null. */
export function ratioOf(
  runs: readonly Run[],
  size: number,
  sessions: number,
  target: Target = 'petrel',
): number | null {
  const find = (t: Target): Run | undefined =>
    runs.find((r) => r.target === t && r.size === size && r.sessions === sessions && !r.failure);
  const p = find(target);
  const s = find('smtp-sink');
  return p && s ? p.perSecond / s.perSecond : null;
}

/** Every Petrel target's ratio to smtp-sink at one cell: `{ petrel: …, 'petrel×2': … }`. */
export function ratiosOf(
  runs: readonly Run[],
  size: number,
  sessions: number,
): Record<string, number | null> {
  const targets = [...new Set(runs.map((r) => r.target))].filter((t) => t !== 'smtp-sink');
  return Object.fromEntries(targets.map((t) => [t, ratioOf(runs, size, sessions, t)]));
}

/**
 * The summary line of a benchmark: each Petrel target's ratio to smtp-sink at one cell, and
 * whether the single-worker ratio (the one the target was set for) meets it.
 */
export function ratioLine(what: string, ratios: Record<string, number | null>, target: number): string {
  const shown = (r: number | null | undefined): string => (r == null ? 'n/a' : r.toFixed(2));
  const single = ratios.petrel;
  const others = Object.entries(ratios)
    .filter(([t]) => t !== 'petrel')
    .map(([t, r]) => `; ${t}: ${shown(r)}`)
    .join('');
  return (
    `${what}: ${shown(single)} with one worker ` +
    `(target ≥ ${target}: ${single == null ? 'not measured' : single >= target ? 'met' : 'NOT met'})${others}\n`
  );
}

export function percent(share: number): string {
  return `${(share * 100).toFixed(0)}%`;
}

/** An extra table column: its heading, and its cell for a run that did not fail. */
export interface Column {
  readonly head: string;
  cell(run: Run): string;
}

/**
 * The columns about Petrel's processes: how much of a core the primary used (it runs no sessions,
 * but with several workers it counts their connections for the shared limits), and the largest
 * share of a run's messages one worker took (`busiestWorker`, a figure the count probes keep).
 */
export function processColumns(): Column[] {
  return [
    {
      head: 'primary CPU',
      cell: (r) => (r.figures.primaryCpu === undefined ? '' : percent(r.figures.primaryCpu)),
    },
    {
      head: 'busiest worker',
      cell: (r) => (r.figures.busiestWorker === undefined ? '' : percent(r.figures.busiestWorker)),
    },
  ];
}

export function table(runs: readonly Run[], extra: readonly Column[] = []): string {
  const head = [
    'target',
    'size',
    'sessions',
    'messages',
    'seconds',
    'msg/s',
    'min–max',
    'server CPU',
    'machine CPU',
    'Petrel/sink',
    ...extra.map((c) => c.head),
  ];
  const rows = runs.map((r) => {
    const cells = [r.target, formatSize(r.size), String(r.sessions), String(r.messages)];
    if (r.failure) return [...cells, '-', 'FAILED', '-', '-', '-', '', ...extra.map(() => '')];
    const ratio = r.target === 'smtp-sink' ? null : ratioOf(runs, r.size, r.sessions, r.target);
    return [
      ...cells,
      r.seconds.toFixed(2),
      r.perSecond.toFixed(0),
      `${r.minPerSecond.toFixed(0)}–${r.maxPerSecond.toFixed(0)}`,
      percent(r.serverCpu),
      percent(r.machineCpu),
      ratio === null ? '' : ratio.toFixed(2),
      ...extra.map((c) => c.cell(r)),
    ];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: readonly string[]): string =>
    `| ${cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i < 2 ? ` ${'-'.repeat(w)} ` : ` ${'-'.repeat(w - 1)}: `)).join('|')}|`;
  return [line(head), rule, ...rows.map(line)].join('\n');
}

/** Writes a result object as JSON, creating the folder. */
export function writeResults(file: string, result: unknown): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`);
}

/** Runs a benchmark's main and turns its outcome into the exit code. */
export function runMain(main: () => Promise<number>, name: string): void {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      log(`${name}: ${err instanceof Error ? err.message : String(err)}`);
      process.exitCode = err instanceof BenchError ? err.exitCode : 1;
    },
  );
}

/**
 * Warms every server up, then runs every size × sessions cell `rounds` times, the servers taking
 * turns: each round starts one server further along (a, b, c; then b, c, a; …), so that none
 * always runs first or always on a machine another just warmed. Summarises each cell by server.
 * `measure` runs one sample; `count` says how many messages.
 */
export async function runMatrix(opts: {
  servers: readonly Server[];
  sizes: readonly number[];
  sessions: readonly number[];
  rounds: number;
  warmupMessages: number;
  count: (size: number, sessions: number) => number;
  measure: (server: Server, size: number, sessions: number, messages: number) => Promise<Sample>;
}): Promise<Run[]> {
  const servers = opts.servers;
  log('warm-up…');
  for (const server of opts.servers) {
    const w = await opts.measure(server, 1 * KB, 10, opts.warmupMessages);
    if (w.failure) throw new BenchError(`warm-up against ${server.target} failed: ${w.failure}`);
  }
  const runs: Run[] = [];
  for (const size of opts.sizes) {
    for (const sessions of opts.sessions) {
      const messages = opts.count(size, sessions);
      const samples = new Map<Target, Sample[]>(servers.map((s) => [s.target, []]));
      for (let round = 0; round < opts.rounds; round++) {
        const turn = round % servers.length;
        for (const server of [...servers.slice(turn), ...servers.slice(0, turn)]) {
          const s = await opts.measure(server, size, sessions, messages);
          samples.get(server.target)!.push(s);
          logRound(server, size, messages, sessions, round, s);
          await sleep(300);
        }
      }
      for (const [target, list] of samples) runs.push(summarize(target, size, sessions, messages, list));
    }
  }
  return runs;
}

/**
 * Writes the results file and lists the runs that failed (their figures do not count). Returns
 * the exit code: 1 when any run failed.
 */
export function finishRuns(
  out: NodeJS.WritableStream,
  file: string,
  result: { readonly runs: readonly Run[] } & Record<string, unknown>,
): number {
  writeResults(file, result);
  out.write(`\nWritten to ${file}\n`);
  const failures = result.runs.filter((r) => r.failure);
  if (!failures.length) return 0;
  log(`\n${failures.length} run(s) failed; their figures do not count:`);
  for (const f of failures) log(`  ${f.target} ${formatSize(f.size)} × ${f.sessions} sessions: ${f.failure}`);
  return 1;
}
