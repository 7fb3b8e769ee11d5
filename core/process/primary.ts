/**
 * The primary process of `petrel start`: it binds the listening sockets, forks the workers and
 * keeps them running, and is the one place signals arrive. It runs no plugin code.
 *
 * Promises:
 * - The listening sockets are bound here and stay open for the primary's whole life: workers
 *   accept on shared copies, so while one is replaced new connections wait in the kernel's backlog
 *   (or go to another worker) instead of being refused.
 * - A worker that exits unexpectedly is started again in the same slot, after a pause that grows
 *   while it keeps failing; a worker whose heartbeat stops for `watchdog` is killed and replaced,
 *   and the log names it and, when its watchdog thread could tell, the plugin and hook it was in.
 * - SIGHUP: the config is read again and every running worker builds it; only when all of them
 *   succeed do they all switch to it. Otherwise all keep the running config.
 * - SIGTERM/SIGINT: every worker drains and exits (killed after `timeouts.shutdown` plus a grace
 *   period); then the primary closes the sockets and exits.
 * - With several workers, connection limits are counted here, across all of them.
 * - The `http` listener is served here, not by the workers: `/metrics` asks every serving worker
 *   for its metric families over IPC and sums them (a worker that does not answer within
 *   `ASK_TIMEOUT_MS` is left out of that scrape), so a scrape survives a worker's restart and
 *   reports it; `/readyz` asks each worker what keeps it from serving. The web console (when
 *   configured) asks the workers for their open sessions and their plugins' control sockets, and
 *   speaks to the queue through those sockets.
 * - Started as root, it binds the sockets as root and then becomes the configured `user` before it
 *   writes a file or forks a worker (core/process/privileges.ts): no process that runs plugin
 *   code ever holds root, and nothing after the bind needs it.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { availableParallelism } from 'node:os';
import net, { isIPv6 } from 'node:net';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { getSystemErrorName } from 'node:util';
import type { Logger } from 'pino';
import type { ConfigSource } from '../app.js';
import { ConfigError } from '../config/errors.js';
import { loadConfig, type LoadedConfig } from '../config/load.js';
import type { PetrelConfig } from '../config/schema.js';
import { createLogger } from '../services/logger.js';
import { LocalGate } from '../smtp/gate.js';
import type { BoundListener } from '../smtp/server.js';
import { ensureSelfSigned } from '../smtp/tls.js';
import {
  checkOwnership,
  dropPrivileges,
  planPrivileges,
  warnRunningAsRoot,
  type PrivilegeOptions,
} from './privileges.js';
import { BEAT_MS, REPORT_FD, type FromWorker, type Questions, type ToWorker } from './protocol.js';
import { HttpServer } from '../http/server.js';
import { addObservabilityRoutes } from '../http/observability.js';
import { addConsoleRoutes } from '../http/console/index.js';
import { httpListener } from '../config/schema.js';
import { MetricsRegistry, type MetricFamilyJson } from '../services/metrics.js';

const WORKER = fileURLToPath(new URL('./worker.js', import.meta.url));
/** Time a stopping worker gets beyond `timeouts.shutdown` before it is killed. */
const STOP_GRACE_MS = 5000;
/** A worker that ran this long before exiting is restarted at once. */
const STABLE_MS = 10_000;
const MAX_BACKOFF_MS = 10_000;
/** How long the primary waits for a worker's answer to a question (a scrape, a readiness probe). */
const ASK_TIMEOUT_MS = 3000;

/** A bound, not yet listening, TCP socket handle (what Node's own cluster module shares). */
type ServerHandle = { close(cb?: () => void): void; getsockname(out: { port?: number }): number };
const createServerHandle = (
  net as unknown as {
    _createServerHandle?: (
      address: string,
      port: number,
      addressType: number,
      fd?: number,
      flags?: number,
    ) => ServerHandle | number;
  }
)._createServerHandle;

interface Slot {
  readonly slot: number;
  child: ChildProcess | null;
  ready: boolean;
  lastBeat: number;
  startedAt: number;
  /** Consecutive quick failures, for the restart pause. */
  failures: number;
  /** What the worker's watchdog thread last said about a blocked event loop. */
  blocked: { blockedMs: number; plugin?: string; hook?: string } | null;
  /** The primary killed it (watchdog), so its exit is expected. */
  replacing: boolean;
  /** Which accepted config it runs (see `version`). */
  version: number;
  restartTimer: NodeJS.Timeout | null;
  /** Connections it was admitted, to give back if it dies: key → count. */
  readonly admitted: Map<string, number>;
}

export interface SupervisorOptions extends PrivilegeOptions {
  readonly configFile?: string;
  readonly cwd?: string;
}

export class Supervisor {
  private readonly slots: Slot[] = [];
  /** By listener index; the http listener (served by the primary itself) leaves a hole. */
  private readonly handles: (ServerHandle | undefined)[] = [];
  private readonly gate = new LocalGate();
  private source: ConfigSource;
  private version = 0;
  private reloadId = 0;
  private readonly pending = new Map<
    number,
    { waiting: Set<number>; answers: Map<number, string | null>; done: () => void }
  >();
  private stopping: Promise<void> | null = null;
  private watchdogTimer: NodeJS.Timeout | null = null;
  private lastCheck = Date.now();
  /** It gave root up after binding: a listener added later cannot be bound by it. */
  private unprivileged = false;
  listeners: BoundListener[] = [];
  plugins: string[] = [];
  /**
   * The `http` listener's routes, when the config has one: the seam through which later features
   * (a web console) add pages to the same listener (see HttpServer).
   */
  http: HttpServer | null = null;
  /** The web console on the http listener, when configured (its rate sampler stops with us). */
  private console: { close(): void } | null = null;
  private httpBound: BoundListener[] = [];
  /** The primary's own metrics: worker restarts and how many serve, its memory and event loop. */
  readonly metrics = new MetricsRegistry();
  private readonly restarts = this.metrics.counter({
    name: 'petrel_worker_restarts_total',
    help: 'Workers started again after they exited (exited) or stopped answering (watchdog), by slot',
    labelNames: ['worker', 'reason'],
  });
  private askId = 0;
  private readonly asks = new Map<number, { slot: number; resolve: (v: unknown) => void }>();

  private constructor(
    private loaded: LoadedConfig,
    readonly log: Logger,
  ) {
    this.source = { input: loaded.input, file: loaded.file, baseDir: loaded.baseDir };
  }

  get config(): PetrelConfig {
    return this.loaded.config;
  }

  /** The config file it runs (the embedded default's path when none was found). */
  get configFile(): string {
    return this.loaded.file;
  }

  /** Process ids of the running workers, by slot (null while one is being replaced). */
  get workerPids(): (number | null)[] {
    return this.slots.map((s) => s.child?.pid ?? null);
  }

  /** Binds, forks, and resolves once every worker serves; throws (after cleaning up) if one cannot. */
  static async start(opts: SupervisorOptions = {}): Promise<Supervisor> {
    const loaded = await loadConfig({ file: opts.configFile, cwd: opts.cwd });
    // One writer for our stdout (our own lines and the workers'), so that lines never tear.
    const log = createLogger({
      level: loaded.config.log.level,
      format: logFormat(loaded.config),
      destination: process.stdout,
    });
    // Refused before anything is bound: root without `user`, an unknown account.
    const account = planPrivileges(loaded, opts);
    const sup = new Supervisor(loaded, log);
    try {
      // Ports below 1024 need root: bind first, then give root up for good, before any file is
      // written or any worker (plugin code) exists.
      sup.bind();
      await sup.listenHttp();
      sup.unprivileged = account !== null && process.getuid?.() === 0;
      if (account) dropPrivileges(account, log);
      else warnRunningAsRoot(log);
      checkOwnership(loaded, account);
      // Workers would race to make it: the primary does it once.
      await ensureSelfSigned(loaded.config, log);
      const count = workerCount(loaded.config.workers);
      for (let i = 0; i < count; i++) sup.slots.push(newSlot(i));
      await Promise.all(sup.slots.map((s) => sup.firstStart(s)));
    } catch (err) {
      await sup.shutdown();
      throw err;
    }
    sup.lastCheck = Date.now();
    sup.watchdogTimer = setInterval(() => sup.checkHeartbeats(), BEAT_MS);
    log.info(
      {
        config: loaded.file,
        plugins: sup.plugins,
        hostname: loaded.config.hostname,
        workers: sup.slots.length,
        pids: sup.workerPids,
        listeners: sup.listeners,
      },
      'petrel started',
    );
    return sup;
  }

  private bind(): void {
    const { config, file } = this.loaded;
    if (typeof createServerHandle !== 'function')
      throw new Error('this Node.js cannot share listening sockets with worker processes');
    config.listeners.forEach((l, i) => {
      // The http listener is the primary's own (listenHttp); handles keep the listeners' indexes.
      if (l.kind === 'http') return;
      const h = createServerHandle(l.address, l.port, isIPv6(l.address) ? 6 : 4, undefined, 0);
      if (typeof h === 'number') {
        const code = getSystemErrorName(h);
        const why = code === 'EADDRINUSE' ? 'it is in use' : code === 'EACCES' ? 'permission denied' : code;
        throw ConfigError.one(
          file,
          `listeners[${i}]`,
          `expected a free address and port: cannot listen on ${l.address}:${l.port}: ${why}`,
        );
      }
      this.handles[i] = h;
    });
  }

  /** Serves the config's http listener, if any: health, readiness and the workers' metrics summed. */
  private async listenHttp(): Promise<void> {
    const { config, file } = this.loaded;
    const l = httpListener(config);
    if (!l) return;
    const serving = this.metrics.gauge({
      name: 'petrel_workers_serving',
      help: 'Workers serving now, against the number configured (state: serving, configured)',
      labelNames: ['state'],
    });
    const cells = { serving: serving.labels('serving'), configured: serving.labels('configured') };
    this.metrics.onCollect(() => {
      cells.serving.set(this.slots.filter((s) => s.child && s.ready).length);
      cells.configured.set(this.slots.length);
    }, [serving]);
    this.metrics.trackProcess('primary');
    const http = new HttpServer(this.log);
    const collect = async (): Promise<MetricFamilyJson[][]> => {
      const answers = await Promise.all(this.servingSlots().map((s) => this.ask(s, 'metrics')));
      return [this.metrics.collect(), ...answers.filter((a) => a !== null)];
    };
    addObservabilityRoutes(
      http,
      { collect, readiness: () => this.readiness() },
      { metricsToken: l.metricsToken },
    );
    if (l.console) {
      this.console = addConsoleRoutes(
        http,
        {
          collect,
          sessions: () =>
            Promise.all(
              this.slots.map(async (s) => ({
                worker: s.slot,
                sessions: s.child && s.ready ? await this.ask(s, 'sessions') : null,
              })),
            ),
          controlSockets: async () =>
            (await Promise.all(this.servingSlots().map((s) => this.ask(s, 'controlSockets')))).flatMap(
              (a) => a ?? [],
            ),
        },
        l.console,
        this.log,
      );
    }
    try {
      const bound = await http.listen(l);
      this.httpBound = [{ name: l.name ?? 'http', kind: 'http', ...bound }];
      this.listeners = [...this.httpBound];
      this.http = http;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === 'EADDRINUSE' ? 'it is in use' : code === 'EACCES' ? 'permission denied' : code;
      throw ConfigError.one(
        file,
        `listeners[${config.listeners.indexOf(l)}]`,
        `expected a free address and port: cannot listen on ${l.address}:${l.port}: ${why}`,
      );
    }
  }

  private servingSlots(): Slot[] {
    return this.slots.filter((s) => s.child && s.ready);
  }

  /** What keeps the server from serving mail: a worker not serving, or what a worker reports. */
  private async readiness(): Promise<string[]> {
    if (this.stopping) return ['stopping'];
    const answers = await Promise.all(
      this.slots.map(async (s) => {
        if (!s.child || !s.ready) return [`worker ${s.slot}: not serving`];
        const problems = await this.ask(s, 'readiness');
        if (problems === null) return [`worker ${s.slot}: did not answer`];
        return problems.map((p) => `worker ${s.slot}: ${p}`);
      }),
    );
    return answers.flat();
  }

  /** Asks a worker a question (see `Questions`); null when it did not answer in time or exited. */
  private ask<K extends keyof Questions>(slot: Slot, what: K): Promise<Questions[K] | null> {
    const child = slot.child;
    if (!child) return Promise.resolve(null);
    const id = ++this.askId;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.asks.delete(id);
        resolve(null);
      }, ASK_TIMEOUT_MS);
      this.asks.set(id, {
        slot: slot.slot,
        resolve: (v) => {
          clearTimeout(timer);
          this.asks.delete(id);
          resolve(v as Questions[K] | null);
        },
      });
      this.send(child, { t: 'ask', id, what });
    });
  }

  /** Starts a slot's first worker and waits until it serves, or fails with its reason. */
  private firstStart(slot: Slot): Promise<void> {
    return new Promise((resolve, reject) => {
      const child = this.fork(slot);
      const onMessage = (m: FromWorker): void => {
        if (m.t === 'ready') {
          cleanup();
          resolve();
        } else if (m.t === 'failed') {
          cleanup();
          reject(
            m.config
              ? new ConfigError(m.config.file, m.config.problems)
              : Object.assign(new Error(m.message), { exitCode: m.exitCode }),
          );
        }
      };
      const onExit = (code: number | null, signal: NodeJS.Signals | null): void => {
        cleanup();
        reject(new Error(`worker ${slot.slot} exited while starting (${code ?? signal})`));
      };
      const cleanup = (): void => {
        child.off('message', onMessage);
        child.off('exit', onExit);
      };
      child.on('message', onMessage);
      child.once('exit', onExit);
    });
  }

  private fork(slot: Slot): ChildProcess {
    const child = fork(WORKER, [], {
      stdio: ['ignore', 'pipe', 'inherit', 'ipc', 'pipe'],
      serialization: 'json',
    });
    slot.child = child;
    slot.ready = false;
    slot.lastBeat = Date.now();
    slot.startedAt = Date.now();
    slot.blocked = null;
    slot.replacing = false;
    slot.version = this.version;
    this.relayLines(child.stdout!, (line) => this.writeOut(line));
    this.relayLines(child.stdio[REPORT_FD] as Readable, (line) => this.watchdogReport(slot, line));
    child.on('message', (m: FromWorker) => this.onMessage(slot, child, m));
    child.once('exit', (code, signal) => this.onExit(slot, child, code, signal));
    child.on('error', (err: NodeJS.ErrnoException) => {
      // A message to a worker that is exiting: its exit is handled on its own.
      if (err.code === 'EPIPE' || err.code === 'ERR_IPC_CHANNEL_CLOSED') return;
      this.log.error({ err, worker: slot.slot }, 'worker channel error');
    });
    // forEach skips the http listener's hole.
    this.handles.forEach((h, index) => this.send(child, { t: 'listen', index }, h));
    this.send(child, {
      t: 'start',
      slot: slot.slot,
      count: this.slots.length,
      source: this.source,
      watchdogMs: this.config.watchdog,
      logFormat: logFormat(this.config),
    });
    return child;
  }

  private send(child: ChildProcess, m: ToWorker, handle?: ServerHandle): void {
    if (!child.connected) return;
    try {
      child.send(m, handle as never);
    } catch {
      // It is exiting; its exit is handled on its own.
    }
  }

  /**
   * Copies a worker's output to ours a whole line at a time (two workers' lines never mix), and
   * stops reading the worker while our stdout is full.
   */
  private relayLines(stream: Readable, onLine: (line: string) => boolean | void): void {
    let partial = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      const lines = (partial + chunk).split('\n');
      partial = lines.pop() ?? '';
      let full = false;
      for (const line of lines) if (onLine(line) === false) full = true;
      if (full) {
        stream.pause();
        process.stdout.once('drain', () => stream.resume());
      }
    });
    stream.on('end', () => {
      if (partial) onLine(partial);
    });
  }

  private writeOut(line: string): boolean {
    return process.stdout.write(`${line}\n`);
  }

  private watchdogReport(slot: Slot, line: string): void {
    let r: { blockedMs: number; plugin?: string; hook?: string; recovered?: boolean };
    try {
      r = JSON.parse(line) as typeof r;
    } catch {
      return;
    }
    if (r.recovered) {
      slot.blocked = null;
      this.log.warn({ worker: slot.slot, pid: slot.child?.pid }, 'worker event loop runs again');
      return;
    }
    slot.blocked = r;
    this.log.warn(
      { worker: slot.slot, pid: slot.child?.pid, blockedMs: r.blockedMs, plugin: r.plugin, hook: r.hook },
      'worker event loop blocked',
    );
  }

  private onMessage(slot: Slot, child: ChildProcess, m: FromWorker): void {
    if (slot.child !== child) return;
    switch (m.t) {
      case 'beat':
        slot.lastBeat = Date.now();
        return;
      case 'ready':
        slot.ready = true;
        this.listeners = [...m.listeners, ...this.httpBound];
        this.plugins = [...m.plugins];
        if (!this.stopping && slot.version !== this.version) void this.catchUp(slot);
        return;
      case 'failed':
        this.log.error({ worker: slot.slot, err: m.message }, 'worker could not start');
        return;
      case 'admit': {
        const ok = !this.stopping && this.gate.admit(m.ip, m.listener, m.limits);
        if (ok) {
          const key = `${m.listener}\0${m.ip}`;
          slot.admitted.set(key, (slot.admitted.get(key) ?? 0) + 1);
        }
        this.send(child, { t: 'admitted', id: m.id, ok });
        return;
      }
      case 'leave': {
        const key = `${m.listener}\0${m.ip}`;
        const n = slot.admitted.get(key) ?? 0;
        if (n <= 0) return;
        if (n === 1) slot.admitted.delete(key);
        else slot.admitted.set(key, n - 1);
        this.gate.leave(m.ip, m.listener);
        return;
      }
      case 'answer':
        this.asks.get(m.id)?.resolve(m.value);
        return;
      case 'prepared': {
        const p = this.pending.get(m.id);
        if (m.ok && m.plugins) this.plugins = [...m.plugins];
        if (!p || !p.waiting.delete(slot.slot)) return;
        p.answers.set(slot.slot, m.ok ? null : (m.error ?? 'failed'));
        if (p.waiting.size === 0) p.done();
        return;
      }
    }
  }

  private onExit(slot: Slot, child: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (slot.child !== child) return;
    slot.child = null;
    slot.ready = false;
    // Its connections are gone with it.
    for (const [key, n] of slot.admitted) {
      const [listener = '', ip = ''] = key.split('\0');
      for (let i = 0; i < n; i++) this.gate.leave(ip, listener);
    }
    slot.admitted.clear();
    for (const a of [...this.asks.values()]) if (a.slot === slot.slot) a.resolve(null);
    for (const p of this.pending.values()) {
      if (p.waiting.delete(slot.slot)) {
        p.answers.set(slot.slot, 'the worker exited');
        if (p.waiting.size === 0) p.done();
      }
    }
    if (this.stopping) return;
    const ranFor = Date.now() - slot.startedAt;
    this.restarts.labels(String(slot.slot), slot.replacing ? 'watchdog' : 'exited').inc();
    if (slot.replacing) {
      slot.failures = 0;
    } else {
      slot.failures = ranFor >= STABLE_MS ? 0 : slot.failures + 1;
      this.log.error(
        { worker: slot.slot, pid: child.pid, code, signal, ranMs: ranFor },
        'worker exited; restarting it',
      );
    }
    const pause = slot.failures === 0 ? 0 : Math.min(MAX_BACKOFF_MS, 100 * 2 ** (slot.failures - 1));
    slot.restartTimer = setTimeout(() => {
      slot.restartTimer = null;
      if (this.stopping) return;
      const next = this.fork(slot);
      this.log.info({ worker: slot.slot, pid: next.pid }, 'worker started');
    }, pause);
  }

  /** The watchdog: a worker whose heartbeat stopped for `watchdog` is killed and replaced. */
  private checkHeartbeats(): void {
    const now = Date.now();
    // If the primary itself was held up (its stdout blocked by a slow log reader, say), the
    // workers' beats are still waiting in their channels: do not count that time against them.
    const late = now - this.lastCheck - BEAT_MS;
    this.lastCheck = now;
    if (late > BEAT_MS) for (const slot of this.slots) slot.lastBeat += late;
    for (const slot of this.slots) {
      const child = slot.child;
      if (!child || slot.replacing || this.stopping) continue;
      const silent = now - slot.lastBeat;
      // Loading the code and setting the plugins up may hold the loop for a while on a busy
      // machine: a worker that is not serving yet has the setup deadline instead.
      const limit = slot.ready
        ? this.config.watchdog
        : Math.max(this.config.watchdog, this.config.timeouts.setup);
      if (silent < limit) continue;
      slot.replacing = true;
      this.log.error(
        {
          worker: slot.slot,
          pid: child.pid,
          silentMs: silent,
          ...(slot.blocked?.plugin ? { plugin: slot.blocked.plugin, hook: slot.blocked.hook } : {}),
        },
        slot.blocked?.plugin
          ? `worker blocked in plugin ${slot.blocked.plugin} (hook ${slot.blocked.hook}); replacing it`
          : 'worker stopped answering; replacing it',
      );
      child.kill('SIGKILL');
    }
  }

  /** A worker that started on an older config than the one accepted since: bring it along. */
  private async catchUp(slot: Slot): Promise<void> {
    const error = (await this.prepare([slot]))[0];
    const child = slot.child;
    if (!child) return;
    if (error === null) {
      this.send(child, { t: 'commit', id: this.reloadId });
      slot.version = this.version;
    } else {
      this.send(child, { t: 'abort', id: this.reloadId });
      this.log.error(
        { worker: slot.slot, err: error },
        'worker could not take the current config; it keeps its own',
      );
    }
  }

  /** Asks workers to build the current source; the error of each (null: ready to commit). */
  private prepare(slots: readonly Slot[]): Promise<(string | null)[]> {
    const id = ++this.reloadId;
    const waiting = new Set(slots.map((s) => s.slot));
    const answers = new Map<number, string | null>();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        for (const s of waiting) answers.set(s, 'no answer in time');
        waiting.clear();
        done();
      }, this.config.timeouts.setup + STOP_GRACE_MS);
      const done = (): void => {
        clearTimeout(timer);
        this.pending.delete(id);
        resolve(slots.map((s) => (answers.has(s.slot) ? answers.get(s.slot)! : 'no answer')));
      };
      this.pending.set(id, { waiting, answers, done });
      for (const s of slots) this.send(s.child!, { t: 'reload', id, source: this.source });
    });
  }

  /**
   * SIGHUP: reads the config again; every running worker builds it, and they switch only if all
   * of them could. A bad config changes nothing and is logged.
   */
  async reload(): Promise<void> {
    if (this.stopping) return;
    let next: LoadedConfig;
    try {
      next = await loadConfig({ file: this.loaded.file });
    } catch (err) {
      this.log.error(
        { err: err instanceof ConfigError ? err.message : err },
        'reload refused; keeping the running config',
      );
      return;
    }
    const sockets = (c: PetrelConfig): string =>
      JSON.stringify(c.listeners.map((l) => [l.name, l.kind, l.address, l.port]));
    if (sockets(next.config) !== sockets(this.config))
      this.log.warn(
        this.unprivileged
          ? 'listeners changed in the config; restart to apply them (Petrel gave up root after binding, so it cannot bind a port below 1024 until it is started again)'
          : 'listeners changed in the config; restart to apply them',
      );
    if (next.config.user !== this.config.user || next.config.group !== this.config.group)
      this.log.warn('user or group changed in the config; restart to apply them');
    if (workerCount(next.config.workers) !== this.slots.length)
      this.log.warn('the number of workers changed in the config; restart to apply it');
    const previous = { source: this.source, loaded: this.loaded };
    this.source = { input: next.input, file: next.file, baseDir: next.baseDir };
    const live = this.slots.filter((s) => s.child && s.ready);
    const errors = await this.prepare(live);
    const id = this.reloadId;
    const failed = errors.map((e, i) => ({ worker: live[i]!.slot, err: e })).filter((x) => x.err !== null);
    if (failed.length) {
      this.source = previous.source;
      for (const s of live) if (s.child) this.send(s.child, { t: 'abort', id });
      this.log.error(
        { err: failed[0]!.err, workers: failed.map((f) => f.worker) },
        'reload refused; keeping the running config',
      );
      return;
    }
    this.loaded = next;
    this.version++;
    for (const s of live) {
      if (!s.child) continue;
      this.send(s.child, { t: 'commit', id });
      s.version = this.version;
    }
    this.log.info({ config: next.file, plugins: this.plugins, workers: live.length }, 'config reloaded');
  }

  /** Drains every worker (killing what is left after the deadline), then closes the sockets. */
  stop(): Promise<void> {
    return (this.stopping ??= this.shutdown());
  }

  private async shutdown(): Promise<void> {
    this.stopping ??= Promise.resolve();
    if (this.watchdogTimer) clearInterval(this.watchdogTimer);
    const deadline = this.config.timeouts.shutdown + STOP_GRACE_MS;
    await Promise.all(
      this.slots.map(async (slot) => {
        if (slot.restartTimer) clearTimeout(slot.restartTimer);
        const child = slot.child;
        if (!child || child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        this.send(child, { t: 'stop' });
        const timer = setTimeout(() => {
          this.log.error({ worker: slot.slot, pid: child.pid }, 'worker did not stop in time; killing it');
          child.kill('SIGKILL');
        }, deadline);
        await exited;
        clearTimeout(timer);
      }),
    );
    for (const h of this.handles) h?.close();
    this.handles.length = 0;
    this.console?.close();
    await this.http?.close();
    this.metrics.close();
    this.log.info('stopped');
    this.log.flush?.();
  }
}

function newSlot(slot: number): Slot {
  return {
    slot,
    child: null,
    ready: false,
    lastBeat: 0,
    startedAt: 0,
    failures: 0,
    blocked: null,
    replacing: false,
    version: 0,
    restartTimer: null,
    admitted: new Map(),
  };
}

/** `auto` is pretty on a terminal: ours, since the workers write into a pipe to us. */
function logFormat(config: PetrelConfig): 'json' | 'pretty' {
  const f = config.log.format;
  return f === 'auto' ? (process.stdout.isTTY ? 'pretty' : 'json') : f;
}

/** `workers` from the config as a number: `auto` is one per CPU core. */
export function workerCount(workers: PetrelConfig['workers']): number {
  return workers === 'auto' ? Math.max(1, availableParallelism()) : workers;
}
