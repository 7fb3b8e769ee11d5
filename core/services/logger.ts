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
  return pino(options, opts.destination ?? stdout());
}

/**
 * Standard output as pino's destination. A reader that went away (a worker's primary killed, or
 * `| head`) makes every write fail with EPIPE: those lines have nowhere to go, and the failure
 * must not become an uncaught exception, whose own log line would fail the same way.
 */
function stdout(): ReturnType<typeof pino.destination> {
  const dest = pino.destination({ dest: 1, sync: false });
  dest.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
  });
  return dest;
}

/**
 * The reader of this process's log is gone (a worker's primary, which relays its stdout, was
 * killed): drops what is buffered and writes nothing more. Otherwise the logger's final flush as
 * the process exits would retry its write to the broken pipe for ever (pino's destination retries
 * a failed synchronous write), and the process would never exit.
 */
export function abandonLogOutput(log: Logger): void {
  const stream = (log as unknown as Record<symbol, unknown>)[pino.symbols.streamSym] as
    { destroy?: () => void } | undefined;
  stream?.destroy?.();
}
