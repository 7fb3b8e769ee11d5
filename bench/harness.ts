/**
 * What the benchmarks share: starting Petrel (the real CLI) and Postfix's smtp-sink, running
 * Postfix's smtp-source against either and checking the run, reading CPU figures from /proc, and
 * printing the results as a table.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { cpus, release, totalmem } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';

export const HOST = '127.0.0.1';
/** The repository root (this file runs from dist/bench/). */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');

export const KB = 1024;
export const EX_UNAVAILABLE = 69;

export type Target = 'petrel' | 'smtp-sink';

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

const TICKS_PER_SECOND = 100; // USER_HZ on Linux

/** CPU seconds (user + system) a process has used so far. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may contain spaces) start at field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
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

/** Sends one command on a greeted socket and returns the reply's last line. */
export function command(socket: Socket, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const onData = (chunk: Buffer): void => {
      got += chunk.toString('latin1');
      const last = /(?:^|\r\n)(\d{3} [^\r\n]*)\r\n$/.exec(got);
      if (!last?.[1]) return;
      socket.off('data', onData);
      resolve(last[1]);
    };
    socket.on('data', onData);
    socket.once('error', reject);
    socket.write(`${line}\r\n`);
  });
}

/** Sends one command on a connection of its own and returns the reply's last line. */
export async function ask(port: number, line: string): Promise<string> {
  const socket = await openGreeted(port);
  try {
    const reply = await command(socket, line);
    await command(socket, 'QUIT');
    return reply;
  } finally {
    socket.destroy();
  }
}

/** Retries until something accepts connections and greets on `port`, or the process exits. */
async function waitForGreeting(
  port: number,
  child: ChildProcess,
  name: string,
  output: () => string,
): Promise<void> {
  const deadline = Date.now() + 15_000;
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
        throw new BenchError(`${name} did not greet on ${HOST}:${port} within 15 s:\n${output()}`);
      }
      await sleep(100);
    }
  }
}

// ---------------------------------------------------------------- the servers

export interface Server {
  readonly target: Target;
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
    const entry = JSON.parse(line) as { level?: number };
    return (entry.level ?? 0) >= 40;
  } catch {
    return true;
  }
}

/**
 * Starts Petrel with the given plugin list; its config and spool go in `dir` (created).
 * `nodeArgs` go to Node before the CLI (e.g. `--cpu-prof`).
 */
export async function startPetrel(
  dir: string,
  plugins: readonly unknown[],
  nodeArgs: readonly string[] = [],
): Promise<Server> {
  mkdirSync(dir, { recursive: true });
  const port = await freePort();
  const config = {
    hostname: 'bench.test',
    listeners: [{ kind: 'smtp', address: HOST, port }],
    limits: { maxConnections: 2000, maxConnectionsPerIp: 2000 },
    spool: { dir: join(dir, 'spool') },
    log: { level: 'warn', format: 'json' },
    plugins,
  };
  const file = join(dir, 'petrel.yaml');
  writeFileSync(file, stringify(config));
  const child = spawn(process.execPath, [...nodeArgs, CLI, 'start', '--config', file], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const complaints: string[] = [];
  collectLines(child, complaints, isComplaint);
  await ready(
    child,
    waitForGreeting(port, child, 'Petrel', () => complaints.join('\n')),
  );
  return { target: 'petrel', port, child, complaints };
}

export async function startSink(program: string): Promise<Server> {
  const port = await freePort();
  // As root smtp-sink insists on dropping privileges after binding.
  const args = [...(process.getuid?.() === 0 ? ['-u', 'nobody'] : []), `${HOST}:${port}`, '1024'];
  const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const complaints: string[] = [];
  collectLines(child, complaints, () => true);
  await ready(
    child,
    waitForGreeting(port, child, 'smtp-sink', () => complaints.join('\n')),
  );
  return { target: 'smtp-sink', port, child, complaints };
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

interface SourceResult {
  readonly seconds: number;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** The last value of smtp-source's DATA counter (-c). */
  readonly counted: number;
  readonly stderr: string;
}

function runSource(
  program: string,
  port: number,
  size: number,
  messages: number,
  sessions: number,
  timeoutMs: number,
): Promise<SourceResult> {
  const args = ['-c', '-l', String(size), '-m', String(messages), '-s', String(sessions)];
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
  const serverBefore = cpuSeconds(server.child.pid!);
  const machineBefore = machineTicks();
  const timeoutMs = 300_000;
  const r = await runSource(source, server.port, size, messages, sessions, timeoutMs);
  const serverCpu = (cpuSeconds(server.child.pid!) - serverBefore) / r.seconds;
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
    figures: checked.figures ?? {},
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

export function ratioOf(runs: readonly Run[], size: number, sessions: number): number | null {
  const find = (t: Target): Run | undefined =>
    runs.find((r) => r.target === t && r.size === size && r.sessions === sessions && !r.failure);
  const p = find('petrel');
  const s = find('smtp-sink');
  return p && s ? p.perSecond / s.perSecond : null;
}

export function percent(share: number): string {
  return `${(share * 100).toFixed(0)}%`;
}

/** An extra table column: its heading, and its cell for a run that did not fail. */
export interface Column {
  readonly head: string;
  cell(run: Run): string;
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
    const ratio = r.target === 'petrel' ? ratioOf(runs, r.size, r.sessions) : null;
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
 * Warms both servers up, then runs every size × sessions cell `rounds` times, Petrel and
 * smtp-sink taking turns going first (so neither always runs on a machine the other just
 * warmed), and summarises each cell. `measure` runs one sample; `count` says how many messages.
 */
export async function runMatrix(opts: {
  servers: readonly [Server, Server];
  sizes: readonly number[];
  sessions: readonly number[];
  rounds: number;
  warmupMessages: number;
  count: (size: number, sessions: number) => number;
  measure: (server: Server, size: number, sessions: number, messages: number) => Promise<Sample>;
}): Promise<Run[]> {
  const [first, second] = opts.servers;
  log('warm-up…');
  for (const server of opts.servers) {
    const w = await opts.measure(server, 1 * KB, 10, opts.warmupMessages);
    if (w.failure) throw new BenchError(`warm-up against ${server.target} failed: ${w.failure}`);
  }
  const runs: Run[] = [];
  for (const size of opts.sizes) {
    for (const sessions of opts.sessions) {
      const messages = opts.count(size, sessions);
      const samples = new Map<Target, Sample[]>(opts.servers.map((s) => [s.target, []]));
      for (let round = 0; round < opts.rounds; round++) {
        for (const server of round % 2 ? [second, first] : [first, second]) {
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
