/**
 * Petrel's public API: what `import … from 'petrel'` gives a plugin file anywhere on disk.
 */
export { z } from 'zod';
export {
  definePlugin,
  TRANSFORM_PHASES,
  type PluginApi,
  type PluginDefinition,
  type PluginHooks,
  type TransformPhase,
  type PluginCommand,
  type CommandApi,
} from './plugins/define.js';
/** For commands plugins add to `petrel` (see `definePlugin({ commands })`). */
export { CommandError, UsageError, runSubcommand } from './cli/command.js';
export {
  proceed,
  accept,
  deny,
  defer,
  disconnect,
  routeTo,
  expandTo,
  postpone,
  type Verdict,
  type ReplySpec,
} from './hooks/verdict.js';
export { defineNote, Notes, type NoteKey } from './message/notes.js';
export { Tokens, defineToken, type Token, type WorkerInfo } from './di/tokens.js';
export { Petrel, type PetrelOptions } from './app.js';
export { ConfigError } from './config/errors.js';
/** A zod schema for a config duration: milliseconds, or a string such as `250ms`, `30s`, `5m`. */
export { duration } from './config/schema.js';
export { makeAddress, type Address } from './message/address.js';
export { localDomainMap, localDomainOf } from './message/domains.js';
export { Headers, formatHeaderField, foldHeaderField, type HeaderField } from './message/headers.js';
export { MessageCopy } from './message/copy.js';
// Small helpers every plugin may want, the same ones the core uses.
export { parseDuration } from './util/duration.js';
export { primaryGid, resolveGid, resolveUid } from './util/accounts.js';
export { rfc5322Date } from './util/date.js';
export { newId } from './util/ids.js';
/**
 * Networks in CIDR notation: check one (for a config schema), compile a list into a matcher, or
 * find the network of a client address (for per-network counters).
 */
export { cidrProblem, compileCidrs, networkOf } from './util/cidr.js';
export type { PetrelConfig, PetrelConfigInput } from './config/schema.js';
/** The core's DNS resolver (`dns.servers`, `dns.timeout`): a command builds one from `cli.petrel`. */
export { DnsResolver, type MxRecord } from './services/dns.js';
export type { Clock } from './services/clock.js';
/** The Metrics service (`resolve(Tokens.Metrics)`): see `MetricsRegistry` for the contract. */
export {
  LATENCY_BUCKETS,
  type MetricsRegistry,
  type MetricDefinition,
  type CounterFamily,
  type CounterCell,
  type GaugeFamily,
  type GaugeCell,
  type HistogramFamily,
  type HistogramCell,
} from './services/metrics.js';
/** Readiness checks for `/readyz` (`resolve(Tokens.Health)`). */
export type { HealthChecks, ReadinessCheck } from './services/health.js';
/** Control sockets for the web console to find (`resolve(Tokens.ControlSockets)`). */
export type { ControlSockets, ControlSocket } from './services/control-sockets.js';
/** The `http` listener's route seam (see `HttpServer`): `Petrel.http`, and the primary's. */
export type { HttpServer, HttpHandler, HttpMethod } from './http/server.js';
export { StateError, type StateStore } from './services/state.js';
export type * from './hooks/catalogue.js';
// The wire, for plugins that speak SMTP-family protocols or serve a socket of their own.
export { SocketReader, ReadTimeoutError } from './smtp/reader.js';
export {
  readReply,
  writeDrained,
  dotStuffed,
  MalformedReplyError,
  type WireReply,
} from './smtp/client-wire.js';
