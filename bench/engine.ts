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
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { COUNT_COMMAND } from './discard-plugin.js';

const HOST = '127.0.0.1';
/** The repository root (this file runs from dist/bench/). */
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');
const PLUGIN = join(ROOT, 'dist', 'bench', 'discard-plugin.js');
const RESULTS = join(ROOT, 'var', 'bench-results.json');

const KB = 1024;
const SIZES = [1 * KB, 100 * KB] as const;
const SESSIONS = [1, 10, 50] as const;
/** Messages per run at BENCH_SCALE=1, by payload size. */
const BASE_COUNT: Record<number, number> = { [1 * KB]: 5000, [100 * KB]: 1000 };
/** Each cell is measured this many times, the two servers taking turns; the median counts. */
const ROUNDS = 5;
const IDLE_CONNECTIONS = 1000;
/** The goal: at 50 sessions and 1 KB, at least half of smtp-sink's rate. */
const TARGET_RATIO = 0.5;
const EX_UNAVAILABLE = 69;

type Target = 'petrel' | 'smtp-sink';

/** One smtp-source run against one server. */
interface Sample {
  readonly seconds: number;
  readonly perSecond: number;
  /** CPU time the server used during the run, as a share of one core (1 = one core busy). */
  readonly serverCpu: number;
  /** How busy the whole machine was during the run, as a share of all its cores. */
  readonly machineCpu: number;
  /** Why the run does not count, or null when it does. */
  readonly failure: string | null;
}

/** The rounds of one target at one size and concurrency; the figures are medians. */
interface Run {
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
  readonly failure: string | null;
  readonly samples: readonly Sample[];
}

interface MemoryResult {
  readonly connections: number;
  readonly rssBeforeKiB: number;
  readonly rssAfterKiB: number;
  readonly totalKiB: number;
  readonly perConnectionKiB: number;
}

class BenchError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
  ) {
    super(message);
  }
}

// ---------------------------------------------------------------- small helpers

function scale(): number {
  const raw = process.env.BENCH_SCALE;
  if (raw === undefined || raw === '') return 1;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) {
    throw new BenchError(`BENCH_SCALE must be a positive number, got "${raw}"`);
  }
  return n;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Finds an executable on PATH or in the sbin folders Postfix installs to. */
function findProgram(name: string): string | null {
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

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, HOST, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

/** Resident set size of a process, in KiB. */
function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new BenchError(`no VmRSS for process ${pid}`);
  return Number(m[1]);
}

const TICKS_PER_SECOND = 100; // USER_HZ on Linux

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may contain spaces) start at field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
}

/** Busy and total CPU ticks of the whole machine, all cores (the first line of /proc/stat). */
function machineTicks(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
  const ticks = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = ticks.reduce((a, b) => a + b, 0);
  const idle = (ticks[3] ?? 0) + (ticks[4] ?? 0); // idle + iowait
  return { busy: total - idle, total };
}

function formatSize(bytes: number): string {
  return `${bytes / KB} KB`;
}

// ---------------------------------------------------------------- SMTP over a plain socket

/** Opens a connection and resolves with it once the complete 220 greeting has arrived. */
function openGreeted(port: number, timeoutMs = 10_000): Promise<Socket> {
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
function command(socket: Socket, line: string): Promise<string> {
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

/** Asks the discard plugin how many messages Petrel has accepted so far. */
async function acceptedCount(port: number): Promise<number> {
  const socket = await openGreeted(port);
  try {
    const reply = await command(socket, COUNT_COMMAND);
    const m = /^250 2\.0\.0 (\d+)$/.exec(reply);
    if (!m) throw new BenchError(`${COUNT_COMMAND} got "${reply}"; is the discard plugin loaded?`);
    await command(socket, 'QUIT');
    return Number(m[1]);
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

interface Server {
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

/** Starts Petrel with the discard plugin; its config and spool go in `dir` (created). */
async function startPetrel(dir: string): Promise<Server> {
  mkdirSync(dir, { recursive: true });
  const port = await freePort();
  const config = {
    hostname: 'bench.test',
    listeners: [{ kind: 'smtp', address: HOST, port }],
    limits: { maxConnections: 2000, maxConnectionsPerIp: 2000 },
    spool: { dir: join(dir, 'spool') },
    log: { level: 'warn', format: 'json' },
    plugins: [PLUGIN],
  };
  const file = join(dir, 'petrel.yaml');
  writeFileSync(file, stringify(config));
  const child = spawn(process.execPath, [CLI, 'start', '--config', file], {
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

async function startSink(program: string): Promise<Server> {
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

async function stop(child: ChildProcess): Promise<void> {
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

/** One smtp-source run against one server, checked. */
async function sample(
  source: string,
  server: Server,
  size: number,
  sessions: number,
  messages: number,
): Promise<Sample> {
  const before = server.target === 'petrel' ? await acceptedCount(server.port) : 0;
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
  if (server.target === 'petrel') {
    const accepted = (await acceptedCount(server.port)) - before;
    if (accepted !== messages) problems.push(`Petrel accepted ${accepted} of ${messages} messages`);
  }
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
    failure: problems.length ? problems.join('; ') : null,
  };
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Sums up the rounds of one target and cell: medians, and the first failure if any. */
function summarize(target: Target, size: number, sessions: number, messages: number, samples: Sample[]): Run {
  const failed = samples.find((s) => s.failure);
  const perSecond = samples.map((s) => s.perSecond);
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
    failure: failed?.failure ?? null,
    samples,
  };
}

// ---------------------------------------------------------------- idle connections

/**
 * Opens `connections` connections to a Petrel of its own (so that garbage left by other traffic
 * cannot hide the growth), waits for every greeting, and compares the RSS before and after.
 */
async function idleMemory(dir: string, connections: number): Promise<MemoryResult> {
  const server = await startPetrel(dir);
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

/** How busy the machine is before the bench starts (a share of all cores, over one second). */
async function backgroundLoad(): Promise<number> {
  const before = machineTicks();
  await sleep(1000);
  const after = machineTicks();
  return (after.busy - before.busy) / (after.total - before.total || 1);
}

// ---------------------------------------------------------------- report

function ratioOf(runs: readonly Run[], size: number, sessions: number): number | null {
  const find = (t: Target): Run | undefined =>
    runs.find((r) => r.target === t && r.size === size && r.sessions === sessions && !r.failure);
  const p = find('petrel');
  const s = find('smtp-sink');
  return p && s ? p.perSecond / s.perSecond : null;
}

function percent(share: number): string {
  return `${(share * 100).toFixed(0)}%`;
}

function table(runs: readonly Run[]): string {
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
  ];
  const rows = runs.map((r) => {
    const cells = [r.target, formatSize(r.size), String(r.sessions), String(r.messages)];
    if (r.failure) return [...cells, '-', 'FAILED', '-', '-', '-', ''];
    const ratio = r.target === 'petrel' ? ratioOf(runs, r.size, r.sessions) : null;
    return [
      ...cells,
      r.seconds.toFixed(2),
      r.perSecond.toFixed(0),
      `${r.minPerSecond.toFixed(0)}–${r.maxPerSecond.toFixed(0)}`,
      percent(r.serverCpu),
      percent(r.machineCpu),
      ratio === null ? '' : ratio.toFixed(2),
    ];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: readonly string[]): string =>
    `| ${cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i < 2 ? ` ${'-'.repeat(w)} ` : ` ${'-'.repeat(w - 1)}: `)).join('|')}|`;
  return [line(head), rule, ...rows.map(line)].join('\n');
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  const factor = scale();
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
  for (const f of [CLI, PLUGIN]) {
    try {
      accessSync(f, constants.R_OK);
    } catch {
      throw new BenchError(`${f} is missing; build first (npm run build), or run npm run bench`);
    }
  }

  const machine = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memoryMiB: Math.round(totalmem() / 2 ** 20),
    kernel: release(),
    node: process.version,
  };
  const out = process.stdout;
  const dir = mkdtempSync(join(tmpdir(), 'petrel-bench-'));
  const servers: Server[] = [];
  try {
    const idle = await backgroundLoad();
    out.write(
      `Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memoryMiB} MiB, Linux ${machine.kernel}, ` +
        `Node ${machine.node}; ${percent(idle)} busy before the start\n`,
    );
    if (idle > 0.15) log('warning: the machine is already busy; expect noisy figures');

    log(`idle connections: opening ${IDLE_CONNECTIONS} to a fresh Petrel…`);
    const memory = await idleMemory(join(dir, 'idle'), IDLE_CONNECTIONS);

    const petrel = await startPetrel(join(dir, 'throughput'));
    servers.push(petrel);
    const smtpSink = await startSink(sink);
    servers.push(smtpSink);
    log(`Petrel on ${HOST}:${petrel.port} (pid ${petrel.child.pid}), smtp-sink on ${HOST}:${smtpSink.port}`);

    const count = (size: number, sessions: number): number =>
      Math.max(sessions, Math.round((BASE_COUNT[size] ?? 1000) * factor));

    log('warm-up…');
    for (const server of [petrel, smtpSink]) {
      const messages = Math.max(10, Math.round(count(1 * KB, 10) / 5));
      const w = await sample(source, server, 1 * KB, 10, messages);
      if (w.failure) throw new BenchError(`warm-up against ${server.target} failed: ${w.failure}`);
    }

    const runs: Run[] = [];
    for (const size of SIZES) {
      for (const sessions of SESSIONS) {
        const messages = count(size, sessions);
        const samples = new Map<Target, Sample[]>([
          ['petrel', []],
          ['smtp-sink', []],
        ]);
        for (let round = 0; round < ROUNDS; round++) {
          // Take turns going first, so neither always runs on a machine the other just warmed.
          const order = round % 2 ? [smtpSink, petrel] : [petrel, smtpSink];
          for (const server of order) {
            const s = await sample(source, server, size, sessions, messages);
            samples.get(server.target)!.push(s);
            log(
              `${server.target.padEnd(9)} ${formatSize(size).padStart(6)} × ${messages} over ` +
                `${String(sessions).padStart(2)} sessions, round ${round + 1}: ` +
                (s.failure ? `FAILED: ${s.failure}` : `${s.perSecond.toFixed(0)} msg/s`),
            );
            await sleep(300);
          }
        }
        for (const [target, list] of samples) runs.push(summarize(target, size, sessions, messages, list));
      }
    }

    const ratio = ratioOf(runs, 1 * KB, 50);
    const failures = runs.filter((r) => r.failure);
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

    mkdirSync(dirname(RESULTS), { recursive: true });
    const result = {
      date: new Date().toISOString(),
      machine,
      scale: factor,
      rounds: ROUNDS,
      backgroundLoad: idle,
      runs,
      ratio50x1KB: ratio,
      targetRatio: TARGET_RATIO,
      idleConnections: memory,
    };
    writeFileSync(RESULTS, `${JSON.stringify(result, null, 2)}\n`);
    out.write(`\nWritten to ${RESULTS}\n`);

    if (failures.length) {
      log(`\n${failures.length} run(s) failed; their figures do not count:`);
      for (const f of failures) {
        log(`  ${f.target} ${formatSize(f.size)} × ${f.sessions} sessions: ${f.failure}`);
      }
      return 1;
    }
    return 0;
  } finally {
    await Promise.all(servers.map((s) => stop(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    log(`bench: ${err instanceof Error ? err.message : String(err)}`);
    process.exitCode = err instanceof BenchError ? err.exitCode : 1;
  },
);
