import type { Logger } from 'pino';
import type { PetrelConfig } from '../config/schema.js';
import type { Clock } from '../services/clock.js';
import type { DnsResolver } from '../services/dns.js';
import type { HealthChecks } from '../services/health.js';
import type { ControlSockets } from '../services/control-sockets.js';
import type { MetricsRegistry } from '../services/metrics.js';
import type { Spool } from '../message/spool.js';
import type { StateStore } from '../services/state.js';

/**
 * Which worker this process is. `petrel start` runs `count` worker processes under a primary;
 * slot `i` (0-based) keeps its number when its process is replaced, so state a worker owns on disk
 * (its part of the queue) is found again by its replacement. A server started in-process (tests,
 * embedding) is slot 0 of 1.
 */
export interface WorkerInfo {
  readonly slot: number;
  readonly count: number;
}

/** A DI token that carries the type of what it resolves to. */
export type Token<T> = symbol & { readonly __type?: T };

/** Resolves a token from a container with its type (tsyringe alone types a symbol as unknown). */
export function resolveToken<T>(container: { resolve<R>(token: symbol): R }, t: Token<T>): T {
  return container.resolve<T>(t);
}

function token<T>(name: string): Token<T> {
  return Symbol.for(`petrel.${name}`) as Token<T>;
}

/**
 * A token for a service a plugin provides to other plugins (`api.provide(token, value)`), e.g.
 * a user directory. The name should start with the providing plugin's name: `users.Directory`.
 */
export function defineToken<T>(name: string): Token<T> {
  return Symbol(name) as Token<T>;
}

/**
 * Every service the core provides, by token. Plugins get them with `api.resolve(Tokens.X)`.
 * One file, so that the list of services is the list here.
 */
export const Tokens = {
  /** The validated config of this generation (it changes on reload). */
  Config: token<PetrelConfig>('Config'),
  /** The root logger; plugins get a child logger in their setup API instead. */
  Logger: token<Logger>('Logger'),
  /** DNS lookups, through `dns.servers` when configured. */
  Dns: token<DnsResolver>('Dns'),
  Clock: token<Clock>('Clock'),
  /**
   * Counters, gauges and histograms, exported on the `http` listener's `/metrics` (see
   * `MetricsRegistry` for the contract). One registry per process, kept across reloads.
   */
  Metrics: token<MetricsRegistry>('Metrics'),
  /** Readiness checks asked by `/readyz` (see `HealthChecks`). One per process. */
  Health: token<HealthChecks>('Health'),
  /** Control sockets plugins serve, for the web console to find (see `ControlSockets`). One per process. */
  ControlSockets: token<ControlSockets>('ControlSockets'),
  /** Where message bodies are spooled while a session receives them. */
  Spool: token<Spool>('Spool'),
  /**
   * Counters, lockouts and windows shared by every worker of the server (see `StateStore` for the
   * contract). One store per process, kept across reloads.
   */
  State: token<StateStore>('State'),
  /** This worker's slot and the number of workers (see `WorkerInfo`). */
  Worker: token<WorkerInfo>('Worker'),
} as const;

export type TokenName = keyof typeof Tokens;
