import pino, { type Logger } from 'pino';
import { createRequire } from 'node:module';

export type LogFormat = 'auto' | 'json' | 'pretty';

/** Keys whose values never reach a log line, wherever they appear. */
export const REDACT_PATHS = [
  'password',
  '*.password',
  'pass',
  '*.pass',
  'secret',
  '*.secret',
  'key',
  'tls.key',
  '*.tls.key',
  'authorization',
  '*.authorization',
  'credentials',
  '*.credentials',
];

/** pino: JSON to stdout by default, pretty on a terminal; secrets redacted. */
export function createLogger(opts: {
  level: string;
  format: LogFormat;
  destination?: NodeJS.WritableStream;
}): Logger {
  const options = {
    level: opts.level,
    base: { name: 'petrel' },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
  };
  const usePretty =
    opts.format === 'pretty' || (opts.format === 'auto' && !opts.destination && process.stdout.isTTY);
  if (usePretty) {
    // Loaded only for a terminal: a server logging JSON never needs it (and starts faster).
    const pretty = createRequire(import.meta.url)('pino-pretty') as typeof import('pino-pretty');
    return pino(options, pretty({ colorize: true, destination: opts.destination ?? 1, sync: true }));
  }
  return pino(options, opts.destination ?? pino.destination({ dest: 1, sync: false }));
}
