import 'reflect-metadata';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import type { PetrelConfigInput } from '../../core/config/schema.js';
import type { PluginDefinition } from '../../core/plugins/define.js';
import { definePlugin } from '../../core/plugins/define.js';
import { accept } from '../../core/hooks/verdict.js';
import { REDACT_PATHS } from '../../core/services/logger.js';

/** The repository root (tests run from dist/test/…). */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const FIXTURES = join(ROOT, 'test', 'fixtures');
export const TLS = { cert: join(FIXTURES, 'tls', 'cert.pem'), key: join(FIXTURES, 'tls', 'key.pem') };

/** Accepts every recipient: for tests that are about something else. */
export const acceptAllRecipients = definePlugin({
  name: 'test-accept-rcpt',
  setup: () => ({ rcpt: async () => accept() }),
});

export interface CapturedMessage {
  readonly sender: string;
  readonly recipients: string[];
  readonly data: Buffer;
  readonly raw: Buffer;
}

/** A queue that keeps accepted messages in memory so a test can look at them. */
export function memoryQueue(into: CapturedMessage[]): PluginDefinition {
  return definePlugin({
    name: 'test-memory-queue',
    setup: () => ({
      async queue({ transaction, message }) {
        const chunks: Buffer[] = [];
        for await (const c of message.stream()) chunks.push(c as Buffer);
        const raw: Buffer[] = [];
        for await (const c of message.streamRaw()) raw.push(c as Buffer);
        into.push({
          sender: transaction.sender?.address ?? '',
          recipients: transaction.recipients.map((r) => r.address.address),
          data: Buffer.concat(chunks),
          raw: Buffer.concat(raw),
        });
        return accept();
      },
    }),
  });
}

export interface TestServer {
  readonly app: Petrel;
  readonly port: number;
  readonly submissionPort: number;
  readonly submissionsPort: number;
  /** JSON log lines written so far. */
  readonly logs: Record<string, unknown>[];
  readonly spoolDir: string;
  /** The config it was started with (for `app.reload(config)`). */
  readonly config: PetrelConfigInput;
  close(): Promise<void>;
}

/**
 * Starts Petrel in this process on port 0 (smtp, submission and submissions listeners, test TLS
 * certificate, a temporary spool), with the given plugins listed in order.
 */
export async function startServer(
  opts: {
    plugins?: PluginDefinition[];
    config?: Partial<PetrelConfigInput>;
    entries?: PetrelConfigInput['plugins'];
  } = {},
): Promise<TestServer> {
  const spoolDir = mkdtempSync(join(tmpdir(), 'petrel-test-'));
  const logs: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n'))
        if (line) logs.push(JSON.parse(line) as Record<string, unknown>);
      cb();
    },
  });
  const logger = pino({ level: 'debug', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, sink);
  const plugins = opts.plugins ?? [];
  const config: PetrelConfigInput = {
    hostname: 'mx.test',
    listeners: [
      { kind: 'smtp', address: '127.0.0.1', port: 0 },
      { kind: 'submission', address: '127.0.0.1', port: 0 },
      { kind: 'submissions', address: '127.0.0.1', port: 0 },
    ],
    tls: TLS,
    spool: { dir: spoolDir },
    plugins: opts.entries ?? plugins.map((p) => p.name),
    ...opts.config,
  };
  const app = await Petrel.start({ config, plugins, logger });
  const portOf = (kind: 'smtp' | 'submission' | 'submissions'): number =>
    app.listeners.find((l) => l.kind === kind)?.port ?? 0;
  return {
    app,
    port: portOf('smtp'),
    submissionPort: portOf('submission'),
    submissionsPort: portOf('submissions'),
    logs,
    spoolDir,
    config,
    async close() {
      await app.stop(1000);
      rmSync(spoolDir, { recursive: true, force: true });
    },
  };
}
