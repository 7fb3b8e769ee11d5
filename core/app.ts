import 'reflect-metadata';
import { existsSync } from 'node:fs';
import type { Logger } from 'pino';
import { ConfigError } from './config/errors.js';
import { loadConfig, validateConfig, type LoadedConfig } from './config/load.js';
import type { PetrelConfigInput } from './config/schema.js';
import { buildContainer, openState, stateTarget } from './di/root.js';
import type { Spool } from './message/spool.js';
import { resolveToken, Tokens, type WorkerInfo } from './di/tokens.js';
import type { ConnectionGate } from './smtp/gate.js';
import { buildPluginSet, checkPlugins } from './plugins/loader.js';
import type { PluginDefinition } from './plugins/define.js';
import { createLogger } from './services/logger.js';
import { MetricsRegistry } from './services/metrics.js';
import { SmtpCounters } from './smtp/counters.js';
import { HealthChecks } from './services/health.js';
import { ControlSockets, type ControlSocket } from './services/control-sockets.js';
import { HttpServer } from './http/server.js';
import { addObservabilityRoutes } from './http/observability.js';
import { addConsoleRoutes } from './http/console/index.js';
import { httpListener } from './config/schema.js';
import type { StateStore } from './services/state.js';
import type { Generation } from './smtp/generation.js';
import { SmtpServer, type BoundListener, type OpenSession } from './smtp/server.js';
import { ensureSelfSigned, loadTls } from './smtp/tls.js';

export interface PetrelOptions {
  /** A config file; without it (and without `config`), discovery from `cwd`, then the embedded default. */
  readonly configFile?: string;
  /** A config object given in code (tests, embedding); relative paths resolve against `cwd`. */
  readonly config?: PetrelConfigInput;
  readonly cwd?: string;
  /** Plugin definitions given in code, referred to by name from the config's `plugins`. */
  readonly plugins?: readonly PluginDefinition[];
  /** A logger to use instead of one built from the config. */
  readonly logger?: Logger;
  /**
   * A config already read (by a supervisor): validated here against `baseDir`, with `file` as its
   * name in messages. Takes precedence over `configFile` and `config`.
   */
  readonly source?: ConfigSource;
  /** Sockets a supervisor bound, one per listener (by index): listened on instead of binding. */
  readonly listenHandles?: readonly object[];
  /** This process's worker slot (default slot 0 of 1). */
  readonly worker?: WorkerInfo;
  /** Counts connections against the limits, when they are shared with other processes. */
  readonly gate?: ConnectionGate;
}

/** A config as read from its file, not yet validated (what a supervisor hands its workers). */
export interface ConfigSource {
  readonly input: unknown;
  readonly file: string;
  readonly baseDir: string;
}

/** A new generation built and set up, not yet serving: `commit()` swaps it in, `abort()` drops it. */
export interface PreparedReload {
  readonly file: string;
  /** The new generation's plugins, in order. */
  readonly plugins: readonly string[];
  commit(): Promise<void>;
  abort(): Promise<void>;
}

/**
 * A running Petrel: the listeners, and the current generation (config + plugins) they serve.
 * `reload()` builds a whole new generation first and swaps it in only if it is good.
 */
export class Petrel {
  private gen: Generation;
  private readonly server: SmtpServer;
  private closed = false;
  listeners: BoundListener[] = [];
  /**
   * The `http` listener's routes when this process serves it (a Petrel on its own; under
   * `petrel start` the primary does): add routes with `http.route(...)` (see HttpServer).
   */
  http: HttpServer | null = null;
  /** Stops the web console's sampling (set when this process serves the console). */
  private closeConsole: () => void = () => undefined;

  private constructor(
    gen: Generation,
    private readonly opts: PetrelOptions,
    readonly log: Logger,
  ) {
    this.gen = gen;
    this.server = new SmtpServer(() => this.gen, log, opts.gate);
  }

  static async start(opts: PetrelOptions = {}): Promise<Petrel> {
    const loaded = await Petrel.readConfig(opts);
    const log =
      opts.logger ?? createLogger({ level: loaded.config.log.level, format: loaded.config.log.format });
    // Opened once per process and handed to every generation: what it holds outlives a reload.
    const state = openState(loaded.config, loaded.file, log);
    const metrics = new MetricsRegistry();
    const health = new HealthChecks();
    const controlSockets = new ControlSockets();
    const gen = await Petrel.build(loaded, opts, log, { state, metrics, health, controlSockets }).catch(
      async (err: unknown) => {
        await state.close();
        throw err;
      },
    );
    // Sampled only where something reads it: a config with an http listener.
    if (httpListener(loaded.config)) metrics.trackProcess(String(opts.worker?.slot ?? 0));
    const app = new Petrel(gen, opts, log);
    try {
      app.listeners = await app.server.listen(loaded.config.listeners, opts.listenHandles);
      // Under a supervisor the primary serves the http listener, for every worker at once.
      const httpConfig = opts.worker ? undefined : httpListener(loaded.config);
      if (httpConfig) {
        const http = new HttpServer(log);
        addObservabilityRoutes(
          http,
          { collect: async () => [metrics.collect()], readiness: () => app.readiness() },
          { metricsToken: httpConfig.metricsToken },
        );
        if (httpConfig.console) {
          const web = addConsoleRoutes(
            http,
            {
              collect: async () => [metrics.collect()],
              sessions: async () => [{ worker: 0, sessions: app.openSessions() }],
              controlSockets: async () => app.controlSockets(),
            },
            httpConfig.console,
            log,
          );
          app.closeConsole = () => web.close();
        }
        app.http = http;
        const bound = await http.listen(httpConfig).catch((err: NodeJS.ErrnoException) => {
          const index = loaded.config.listeners.indexOf(httpConfig);
          throw Object.assign(
            new Error(
              `cannot listen on ${httpConfig.address}:${httpConfig.port}: ${err.code ?? err.message}`,
            ),
            { listener: index },
          );
        });
        app.listeners.push({ name: httpConfig.name ?? 'http', kind: 'http', ...bound });
      }
    } catch (err) {
      app.closeConsole();
      await app.http?.close();
      await app.server.close(0);
      await gen.plugins.retire();
      await state.close();
      const e = err as Error & { listener?: number };
      if (e.listener !== undefined) {
        throw ConfigError.one(
          loaded.file,
          `listeners[${e.listener}]`,
          `expected a free address and port: ${e.message.replace(/^listeners\[\d+\]: /, '')}`,
        );
      }
      throw err;
    }
    log.info(
      {
        config: loaded.file,
        plugins: gen.plugins.plugins.map((p) => p.name),
        hostname: loaded.config.hostname,
      },
      // Under a supervisor, the primary says `petrel started` once every worker serves.
      opts.worker ? 'worker started' : 'petrel started',
    );
    return app;
  }

  /**
   * Checks a config the way `start` would, without side effects: certificates are read (unless
   * they are still to be generated), every plugin is found, loaded and its config validated by its
   * schema — but no plugin's `setup` runs and nothing is written. Returns the plugin names.
   */
  static async check(loaded: LoadedConfig, opts: PetrelOptions = {}): Promise<string[]> {
    const { config, file, baseDir } = loaded;
    if (!config.tls?.selfSigned || (existsSync(config.tls.cert) && existsSync(config.tls.key)))
      loadTls(config, file);
    const inline = new Map((opts.plugins ?? []).map((p) => [p.name, p]));
    return checkPlugins({ config, file, baseDir, inline });
  }

  private static async readConfig(opts: PetrelOptions): Promise<LoadedConfig> {
    if (opts.source) return validateConfig(opts.source.input, opts.source.file, opts.source.baseDir);
    if (opts.config) {
      const cwd = opts.cwd ?? process.cwd();
      return validateConfig(opts.config, '(inline config)', cwd);
    }
    return loadConfig({ file: opts.configFile, cwd: opts.cwd });
  }

  private static async build(
    loaded: LoadedConfig,
    opts: PetrelOptions,
    log: Logger,
    shared: {
      state: StateStore;
      metrics: MetricsRegistry;
      health: HealthChecks;
      controlSockets: ControlSockets;
    },
  ): Promise<Generation> {
    const { config, file, baseDir } = loaded;
    await ensureSelfSigned(config, log);
    const tls = loadTls(config, file);
    const container = buildContainer(config, { logger: log, ...shared, worker: opts.worker });
    let spool: Spool;
    try {
      spool = resolveToken(container, Tokens.Spool);
    } catch (err) {
      throw ConfigError.one(
        file,
        'spool.dir',
        `expected a writable folder at ${config.spool.dir}: ${(err as Error).message}`,
      );
    }
    const inline = new Map((opts.plugins ?? []).map((p) => [p.name, p]));
    const plugins = await buildPluginSet({ config, file, baseDir, container, log, inline });
    return {
      config,
      file,
      container,
      plugins,
      tls,
      spool,
      log,
      metrics: resolveToken(container, Tokens.Metrics),
      counters: SmtpCounters.of(resolveToken(container, Tokens.Metrics)),
      clock: resolveToken(container, Tokens.Clock),
    };
  }

  get generation(): Generation {
    return this.gen;
  }

  get metrics(): MetricsRegistry {
    return this.gen.metrics;
  }

  /**
   * What keeps this process from serving mail, one line each (empty: ready): it is stopping, it
   * has no SMTP listener, the State service does not answer, or a plugin's readiness check fails
   * (the queue's parts are not open). `/readyz` answers 503 with these lines.
   */
  async readiness(): Promise<string[]> {
    if (this.closed) return ['stopping'];
    const problems: string[] = [];
    if (!this.listeners.some((l) => l.kind !== 'http')) problems.push('no SMTP listener is serving');
    try {
      await resolveToken(this.gen.container, Tokens.State).get('core:readyz');
    } catch (err) {
      problems.push(`state service unreachable: ${(err as Error).message}`);
    }
    problems.push(...(await resolveToken(this.gen.container, Tokens.Health).problems()));
    return problems;
  }

  /** The open SMTP sessions, for the web console (see `OpenSession`). */
  openSessions(): OpenSession[] {
    return this.server.openSessions();
  }

  /** The control sockets this process's plugins serve, for the web console. */
  controlSockets(): ControlSocket[] {
    return resolveToken(this.gen.container, Tokens.ControlSockets).list();
  }

  /** Port of the first listener of a kind (handy with port 0). */
  port(kind: BoundListener['kind'] = 'smtp'): number {
    const l = this.listeners.find((x) => x.kind === kind);
    if (!l) throw new Error(`no ${kind} listener`);
    return l.port;
  }

  /**
   * Re-reads the config and swaps in a new plugin set for new sessions; sessions in flight finish
   * on the old one. A bad config is refused (logged and thrown) and the old one keeps running.
   */
  async reload(config?: PetrelConfigInput): Promise<void> {
    const source: ConfigSource | undefined = config
      ? { input: config, file: '(inline config)', baseDir: this.opts.cwd ?? process.cwd() }
      : undefined;
    const prepared = await this.prepareReload(source);
    await prepared.commit();
  }

  /**
   * The first half of a reload: builds and sets up the new generation without serving it, so a
   * supervisor can apply a reload to every worker or to none. `source` defaults to the file the
   * server runs from, read again. A bad config is logged and thrown; nothing changes.
   */
  async prepareReload(source?: ConfigSource): Promise<PreparedReload> {
    let next: Generation;
    try {
      const loaded = source
        ? validateConfig(source.input, source.file, source.baseDir)
        : await Petrel.readConfig({
            ...this.opts,
            source: undefined,
            configFile: this.opts.configFile ?? this.gen.file,
          });
      next = await Petrel.build(loaded, this.opts, this.log, {
        metrics: this.gen.metrics,
        health: resolveToken(this.gen.container, Tokens.Health),
        controlSockets: resolveToken(this.gen.container, Tokens.ControlSockets),
        state: resolveToken(this.gen.container, Tokens.State),
      });
      const sockets = (c: typeof next.config): string =>
        JSON.stringify(c.listeners.map((l) => [l.name, l.kind, l.address, l.port]));
      if (sockets(next.config) !== sockets(this.gen.config)) {
        this.log.warn('listeners changed in the config; restart to apply them');
      }
      if (stateTarget(next.config) !== stateTarget(this.gen.config)) {
        this.log.warn('state changed in the config; restart to apply it');
      }
    } catch (err) {
      this.log.error(
        { err: err instanceof ConfigError ? err.message : err },
        'reload refused; keeping the running config',
      );
      throw err;
    }
    let settled = false;
    return {
      file: next.file,
      plugins: next.plugins.plugins.map((p) => p.name),
      commit: async () => {
        if (settled) return;
        settled = true;
        const old = this.gen;
        this.gen = next;
        this.log.info(
          { config: next.file, plugins: next.plugins.plugins.map((p) => p.name) },
          'config reloaded',
        );
        await old.plugins.retire();
      },
      abort: async () => {
        if (settled) return;
        settled = true;
        await next.plugins.retire();
      },
    };
  }

  /** Stops accepting, drains sessions up to the configured deadline, closes the plugins. */
  async stop(deadlineMs = this.gen.config.timeouts.shutdown): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.log.info({ sessions: this.server.connectionCount, deadlineMs }, 'shutting down');
    this.closeConsole();
    await this.http?.close();
    await this.server.close(deadlineMs);
    await this.gen.plugins.retire();
    this.gen.metrics.close();
    await resolveToken(this.gen.container, Tokens.State).close();
    this.log.info('stopped');
    this.log.flush?.();
  }
}
