import { container as rootContainer, type DependencyContainer } from 'tsyringe';
import type { Logger } from 'pino';
import type { PetrelConfig } from '../config/schema.js';
import { Spool } from '../message/spool.js';
import { Clock } from '../services/clock.js';
import { DnsResolver } from '../services/dns.js';
import { MetricsRegistry } from '../services/metrics.js';
import { Tokens, type WorkerInfo } from './tokens.js';

/**
 * The composition root: the one place where services are bound to tokens. Each config
 * generation gets its own child container, so services built from config (DNS servers, the
 * spool folder) follow a reload; the logger and metrics live across generations.
 */
export function buildContainer(
  config: PetrelConfig,
  shared: { logger: Logger; metrics?: MetricsRegistry; worker?: WorkerInfo },
): DependencyContainer {
  const c = rootContainer.createChildContainer();
  c.register(Tokens.Worker, { useValue: shared.worker ?? { slot: 0, count: 1 } });
  c.register(Tokens.Config, { useValue: config });
  c.register(Tokens.Logger, { useValue: shared.logger });
  if (shared.metrics) c.register(Tokens.Metrics, { useValue: shared.metrics });
  else c.registerSingleton(Tokens.Metrics, MetricsRegistry);
  c.registerSingleton(Tokens.Clock, Clock);
  c.registerSingleton(Tokens.Dns, DnsResolver);
  c.registerSingleton(Tokens.Spool, Spool);
  return c;
}
