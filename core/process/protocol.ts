import type { ConfigSource } from '../app.js';
import type { ConnectionLimits } from '../smtp/gate.js';
import type { MetricFamilyJson } from '../services/metrics.js';
import type { BoundListener, OpenSession } from '../smtp/server.js';
import type { ControlSocket } from '../services/control-sockets.js';

/**
 * What the primary may ask a worker (for the http listener's routes), and the answer's type. A
 * later feature that needs a worker's view (its open sessions, say) adds an entry here and a case
 * in worker.ts's `answer`.
 */
export interface Questions {
  /** The worker's metric families, for `/metrics`. */
  readonly metrics: MetricFamilyJson[];
  /** What keeps the worker from serving mail (empty: ready), for `/readyz`. */
  readonly readiness: string[];
  /** The worker's open SMTP sessions, for the web console (no contents, no credentials). */
  readonly sessions: OpenSession[];
  /** The control sockets its plugins serve (the queue's parts), for the web console. */
  readonly controlSockets: ControlSocket[];
}

/**
 * The messages between the primary and its workers, over the IPC channel `fork` opens. Each is
 * one JSON object with a `t` field. Listening sockets travel as handles beside `listen` messages.
 */
export type ToWorker =
  /** One of the primary's bound sockets, for listener `index` (sent before `start`). */
  | { readonly t: 'listen'; readonly index: number }
  /** Start serving with this config, as slot `slot` of `count`. */
  | {
      readonly t: 'start';
      readonly slot: number;
      readonly count: number;
      readonly source: ConfigSource;
      readonly watchdogMs: number;
      /** The log format the primary resolved (`auto` depends on the primary's terminal, not the pipe). */
      readonly logFormat: 'json' | 'pretty';
    }
  /** Build this config's generation and say whether it is good; serve it only on `commit`. */
  | { readonly t: 'reload'; readonly id: number; readonly source: ConfigSource }
  | { readonly t: 'commit'; readonly id: number }
  | { readonly t: 'abort'; readonly id: number }
  /** The answer to an `admit`. */
  | { readonly t: 'admitted'; readonly id: number; readonly ok: boolean }
  /** A question; the worker answers with `answer` and the same id. */
  | { readonly t: 'ask'; readonly id: number; readonly what: keyof Questions }
  /** Drain and exit. */
  | { readonly t: 'stop' };

export type FromWorker =
  | { readonly t: 'ready'; readonly listeners: readonly BoundListener[]; readonly plugins: readonly string[] }
  /** Start failed: `message` is for the operator, `exitCode` what `petrel start` should exit with. */
  | {
      readonly t: 'failed';
      readonly message: string;
      readonly exitCode: number;
      /** A config error, to be reported as the primary's own. */
      readonly config?: {
        readonly file: string;
        readonly problems: readonly { key: string; expected: string }[];
      };
    }
  | { readonly t: 'beat' }
  | {
      readonly t: 'prepared';
      readonly id: number;
      readonly ok: boolean;
      readonly error?: string;
      /** The new config's plugins, in order. */
      readonly plugins?: readonly string[];
    }
  | {
      readonly t: 'admit';
      readonly id: number;
      readonly ip: string;
      readonly listener: string;
      readonly limits: ConnectionLimits;
    }
  | { readonly t: 'leave'; readonly ip: string; readonly listener: string }
  | { readonly t: 'answer'; readonly id: number; readonly value: Questions[keyof Questions] };

/** The file descriptor, in a worker, of the pipe its watchdog thread reports on. */
export const REPORT_FD = 4;

/** How often a worker's main thread says it is alive. */
export const BEAT_MS = 500;
