/**
 * A worker process of `petrel start`: the primary forks it, hands it the listening sockets and the
 * config, and it runs a whole Petrel — sessions, plugins, its own part of the queue — on them.
 * It proves it is alive with a heartbeat; a watchdog thread reports, on a pipe of its own, a main
 * thread that stopped beating and the hook it was stuck in. Without its primary it exits at once:
 * what it accepted is on disk, and the next primary's worker in the same slot takes its part over.
 */
import 'reflect-metadata';
import { Worker as Thread } from 'node:worker_threads';
import type { Logger } from 'pino';
import { Petrel, type PreparedReload } from '../app.js';
import { ConfigError } from '../config/errors.js';
import { validateConfig } from '../config/load.js';
import type { ConnectionGate, ConnectionLimits } from '../smtp/gate.js';
import { abandonLogOutput, createLogger } from '../services/logger.js';
import { beat, shareActivity } from './activity.js';
import { BEAT_MS, REPORT_FD, type FromWorker, type Questions, type ToWorker } from './protocol.js';

if (!process.send) {
  process.stderr.write('petrel worker: this program is started by `petrel start`\n');
  process.exit(64);
}

/**
 * A message to the primary. The primary may be gone (killed) with the channel not yet seen closed:
 * the write then fails, and the 'disconnect' handler below ends this process. Without the
 * callback the failure would be an uncaught exception, logged to a stdout nobody reads any more.
 */
function send(m: FromWorker): void {
  if (process.connected) process.send!(m, undefined, undefined, ignoreClosedChannel);
}

function ignoreClosedChannel(err: Error | null): void {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  if (err && code !== 'EPIPE' && code !== 'ERR_IPC_CHANNEL_CLOSED') throw err;
}

/** Connection limits counted by the primary, across every worker. */
class PrimaryGate implements ConnectionGate {
  private next = 1;
  private readonly waiting = new Map<number, (ok: boolean) => void>();

  admit(ip: string, listener: string, limits: ConnectionLimits): Promise<boolean> {
    const id = this.next++;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      send({ t: 'admit', id, ip, listener, limits });
    });
  }

  leave(ip: string, listener: string): void {
    send({ t: 'leave', ip, listener });
  }

  answer(id: number, ok: boolean): void {
    const resolve = this.waiting.get(id);
    this.waiting.delete(id);
    resolve?.(ok);
  }
}

const handles: object[] = [];
const prepared = new Map<number, PreparedReload>();
let app: Petrel | null = null;
/** This process's logger, once made (its output is the primary's to read). */
let log: Logger | null = null;
let gate: PrimaryGate | null = null;
let stopping = false;

// Without the primary nobody supervises this process, and a new primary must be able to take its
// queue part: leave now. Nothing acknowledged is lost (the queue is durable).
process.on('disconnect', () => {
  // It relayed this process's stdout too: nothing logged from now on can be read.
  if (log) abandonLogOutput(log);
  process.exit(process.exitCode ?? 1);
});

setInterval(() => {
  beat();
  send({ t: 'beat' });
}, BEAT_MS);

function startWatchdog(watchdogMs: number): void {
  const thread = new Thread(new URL('./monitor-thread.js', import.meta.url), {
    workerData: {
      shared: shareActivity((index, name) => thread.postMessage({ index, name })),
      reportAfterMs: Math.max(500, Math.floor(watchdogMs / 2)),
      fd: REPORT_FD,
    },
  });
  thread.unref();
  thread.on('error', () => undefined);
}

async function start(m: Extract<ToWorker, { t: 'start' }>): Promise<void> {
  startWatchdog(m.watchdogMs);
  try {
    const loaded = validateConfig(m.source.input, m.source.file, m.source.baseDir);
    const logger = createLogger({ level: loaded.config.log.level, format: m.logFormat }).child({
      worker: m.slot,
    });
    log = logger;
    gate = m.count > 1 ? new PrimaryGate() : null;
    app = await Petrel.start({
      source: m.source,
      listenHandles: handles,
      worker: { slot: m.slot, count: m.count },
      logger,
      ...(gate ? { gate } : {}),
    });
  } catch (err) {
    const e = err as Error;
    send(
      err instanceof ConfigError
        ? {
            t: 'failed',
            message: e.message,
            exitCode: 78,
            config: { file: err.file, problems: err.problems },
          }
        : { t: 'failed', message: e.stack ?? e.message, exitCode: 1 },
    );
    process.exitCode = err instanceof ConfigError ? 78 : 1;
    process.disconnect();
    return;
  }
  const running = app;
  process.on('uncaughtException', (err) => {
    running.log.fatal({ err }, 'uncaught exception');
    process.exitCode = 70;
    stop();
  });
  process.on('unhandledRejection', (err) => {
    running.log.error({ err }, 'unhandled promise rejection');
  });
  send({
    t: 'ready',
    listeners: running.listeners,
    plugins: running.generation.plugins.plugins.map((p) => p.name),
  });
}

function stop(): void {
  if (stopping) return;
  stopping = true;
  const done = (): void => {
    process.exit(process.exitCode ?? 0);
  };
  if (!app) return done();
  app.stop().then(done, (err: unknown) => {
    app?.log.error({ err }, 'shutdown failed');
    process.exitCode = 1;
    done();
  });
}

async function reload(id: number, source: ToWorker & { t: 'reload' }): Promise<void> {
  if (!app) return send({ t: 'prepared', id, ok: false, error: 'not started' });
  try {
    const next = await app.prepareReload(source.source);
    prepared.set(id, next);
    send({ t: 'prepared', id, ok: true, plugins: next.plugins });
  } catch (err) {
    send({ t: 'prepared', id, ok: false, error: (err as Error).message });
  }
}

process.on('message', (m: ToWorker, handle?: object) => {
  switch (m.t) {
    case 'listen':
      if (handle) handles[m.index] = handle;
      return;
    case 'start':
      void start(m);
      return;
    case 'admitted':
      gate?.answer(m.id, m.ok);
      return;
    case 'reload':
      void reload(m.id, m);
      return;
    case 'commit':
    case 'abort': {
      const p = prepared.get(m.id);
      prepared.delete(m.id);
      void (m.t === 'commit' ? p?.commit() : p?.abort())?.catch((err: unknown) =>
        app?.log.error({ err }, `reload ${m.t} failed`),
      );
      return;
    }
    case 'ask':
      void answer(m.what).then(
        (value) => send({ t: 'answer', id: m.id, value }),
        (err: unknown) => app?.log.error({ err, question: m.what }, 'could not answer the primary'),
      );
      return;
    case 'stop':
      stop();
      return;
  }
});

/** Answers one of the primary's questions (see `Questions`). */
async function answer(what: keyof Questions): Promise<Questions[keyof Questions]> {
  switch (what) {
    case 'metrics':
      return app ? app.metrics.collect() : [];
    case 'readiness':
      return app ? app.readiness() : ['starting'];
    case 'sessions':
      return app ? app.openSessions() : [];
    case 'controlSockets':
      return app ? app.controlSockets() : [];
  }
}

// SIGTERM/SIGINT/SIGHUP go to the primary, which tells the workers; a worker ignores the terminal's
// copies (Ctrl-C reaches the whole process group).
process.on('SIGINT', () => undefined);
process.on('SIGHUP', () => undefined);
process.on('SIGTERM', () => stop());
