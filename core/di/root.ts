import { join } from 'node:path';
import { container as rootContainer, type DependencyContainer } from 'tsyringe';
import type { Logger } from 'pino';
import { ConfigError } from '../config/errors.js';
import type { PetrelConfig } from '../config/schema.js';
import { Spool } from '../message/spool.js';
import { Clock } from '../services/clock.js';
import { DnsResolver } from '../services/dns.js';
import { HealthChecks } from '../services/health.js';
import { ControlSockets } from '../services/control-sockets.js';
import { MetricsRegistry } from '../services/metrics.js';
import type { StateStore } from '../services/state.js';
import { RedisState } from '../services/state-redis.js';
import { SqliteState } from '../services/state-sqlite.js';
import { Tokens, type WorkerInfo } from './tokens.js';

/**
 * The composition root: the one place where services are bound to tokens. Each config
 * generation gets its own child container, so services built from config (DNS servers, the
 * spool folder) follow a reload; the logger, metrics and the State store live across generations.
 */
export function buildContainer(
  config: PetrelConfig,
  shared: {
    logger: Logger;
    state: StateStore;
    metrics?: MetricsRegistry;
    health?: HealthChecks;
    controlSockets?: ControlSockets;
    worker?: WorkerInfo;
  },
): DependencyContainer {
  const c = rootContainer.createChildContainer();
  c.register(Tokens.Worker, { useValue: shared.worker ?? { slot: 0, count: 1 } });
  c.register(Tokens.Config, { useValue: config });
  c.register(Tokens.Logger, { useValue: shared.logger });
  c.register(Tokens.Metrics, { useValue: shared.metrics ?? new MetricsRegistry() });
  c.register(Tokens.Health, { useValue: shared.health ?? new HealthChecks() });
  c.register(Tokens.ControlSockets, { useValue: shared.controlSockets ?? new ControlSockets() });
  c.register(Tokens.State, { useValue: shared.state });
  c.registerSingleton(Tokens.Clock, Clock);
  c.registerSingleton(Tokens.Dns, DnsResolver);
  c.registerSingleton(Tokens.Spool, Spool);
  return c;
}

/** The file the sqlite State backend uses: `state.path`, or `<spool.dir>/state.sqlite`. */
export function statePath(config: PetrelConfig): string {
  return config.state.path ?? join(config.spool.dir, 'state.sqlite');
}

/** What the State store is opened on; a reload that changes it warns that a restart applies it. */
export function stateTarget(config: PetrelConfig): string {
  return config.state.backend === 'redis'
    ? JSON.stringify(config.state.redis)
    : `sqlite ${statePath(config)}`;
}

/**
 * Opens the State store the config names. A server opens it once per process, at start, and keeps
 * it across reloads (a lockout must not end because the config was reloaded); a changed `state`
 * section takes effect at the next start. A store that cannot be opened stops the start with a
 * message naming the key. A Redis server that cannot be reached does not: the store reconnects on
 * its own and its operations fail (closed, for the callers) until Redis is back.
 */
export function openState(config: PetrelConfig, file: string, log: Logger): StateStore {
  const redis = config.state.redis;
  if (config.state.backend === 'redis' && redis) {
    try {
      return new RedisState({ url: redis.url, prefix: redis.prefix, timeoutMs: redis.timeout, log });
    } catch (err) {
      throw ConfigError.one(
        file,
        'state.redis.url',
        `expected a Redis URL the client accepts: ${(err as Error).message}`,
      );
    }
  }
  const path = statePath(config);
  try {
    return new SqliteState({ path, log });
  } catch (err) {
    const why = (err as Error).message;
    if (!config.state.path)
      throw ConfigError.one(file, 'spool.dir', `expected a writable folder at ${config.spool.dir}: ${why}`);
    throw ConfigError.one(file, 'state.path', `expected a writable SQLite database at ${path}: ${why}`);
  }
}
