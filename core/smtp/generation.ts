import type { Logger } from 'pino';
import type { DependencyContainer } from 'tsyringe';
import type { PetrelConfig } from '../config/schema.js';
import type { Spool } from '../message/spool.js';
import type { PluginSet } from '../plugins/loader.js';
import type { Clock } from '../services/clock.js';
import type { MetricsRegistry } from '../services/metrics.js';
import type { SmtpCounters } from './counters.js';
import type { TlsContexts } from './tls.js';

/**
 * Everything built from one config: the plugin set, TLS contexts and services. A session keeps
 * the generation it started with; a reload builds a new one and swaps it in for new sessions.
 */
export interface Generation {
  readonly config: PetrelConfig;
  readonly file: string;
  readonly container: DependencyContainer;
  readonly plugins: PluginSet;
  readonly tls: TlsContexts | null;
  readonly spool: Spool;
  readonly log: Logger;
  readonly metrics: MetricsRegistry;
  /** The engine's own metrics, bound once (see counters.ts). */
  readonly counters: SmtpCounters;
  readonly clock: Clock;
}
