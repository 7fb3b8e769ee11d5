/**
 * Test support for the outbound transport: real SMTP peers (smtp-server, postfix's smtp-sink) on
 * 127.0.0.x addresses, and an in-process Petrel with the queue and this transport whose results
 * a test can wait for.
 */
import {
  definePlugin,
  type PluginDefinition,
  type DeliveryStatus,
  type PeerCapabilities,
  type RecipientReply,
  type RecipientResult,
  type PetrelConfigInput,
} from '../../core/index.js';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import type { TestContext } from 'node:test';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import { address } from '../../core/testing/index.js';
import { acceptAllRecipients, startServer, TLS, type TestServer } from '../../test/harness/server.js';
import { has, requirePeer, stopChild } from '../../test/harness/peers.js';
import queue from '../queue/index.js';
import { Queue, type QueueService, type Submission } from '../queue/api.js';
import outbound from './index.js';

// ------------------------------------------------------------------ ports

function bindable(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, host, () => srv.close(() => resolve(true)));
  });
}

/** A port free on every one of `hosts` (the peers of a test share the port the transport uses). */
export async function freePortOn(hosts: readonly string[]): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = 20_000 + Math.floor(Math.random() * 40_000);
    let ok = true;
    for (const h of hosts) if (!(await bindable(port, h))) ok = false;
    if (ok) return port;
  }
  throw new Error(`no port free on ${hosts.join(', ')}`);
}

/** Resolves once something accepts connections on host:port (at most `timeoutMs`). */
export async function waitForPort(host: string, port: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ host, port });
      s.setTimeout(500);
      const done = (v: boolean): void => {
        s.destroy();
        resolve(v);
      };
      s.once('connect', () => done(true));
      s.once('error', () => done(false));
      s.once('timeout', () => done(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// ------------------------------------------------------------------ smtp-server peers

export interface PeerMessage {
  readonly session: string;
  readonly mailFrom: string;
  readonly mailArgs: Record<string, unknown>;
  readonly rcpts: readonly { readonly address: string; readonly args: Record<string, unknown> }[];
  readonly data: Buffer;
  readonly secure: boolean;
  readonly user: string | null;
}

export interface Peer {
  readonly host: string;
  readonly port: number;
  readonly messages: PeerMessage[];
  /** Connections accepted so far, and those closed. */
  readonly connections: { opened: number; closed: number };
  /** Every command each session sent, by session id, in order. */
  readonly commands: Map<string, string[]>;
  close(): Promise<void>;
}

export type Refusal = { code: number; message: string } | null;

/**
 * An smtp-server on host:port. `rcpt` may refuse a recipient, `data` the message (for all its
 * recipients); everything else is accepted and recorded.
 */
export async function smtpPeer(
  t: TestContext,
  host: string,
  port: number,
  opts: Partial<SMTPServerOptions> & {
    rcpt?: (address: string) => Refusal;
    data?: (rcpts: string[]) => Refusal;
    users?: Record<string, string>;
  } = {},
): Promise<Peer> {
  const { rcpt, data, users, onConnect, onClose, ...options } = opts;
  const messages: PeerMessage[] = [];
  const commands = new Map<string, string[]>();
  const connections = { opened: 0, closed: 0 };
  const refuse = (r: Refusal): Error | null =>
    r ? Object.assign(new Error(r.message), { responseCode: r.code }) : null;
  const record = (meta: unknown, ...args: unknown[]): void => {
    const m = meta as { tnx?: string; cid?: string } | undefined;
    if (m?.tnx !== 'command' || !m.cid) return;
    const list = commands.get(m.cid) ?? [];
    list.push(String(args[args.length - 1]));
    commands.set(m.cid, list);
  };
  const ignore = (): void => undefined;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: users ? [] : ['AUTH'],
    hideSTARTTLS: true,
    size: 10 * 1024 * 1024,
    // Clients still connected when the test ends are cut off soon after close().
    closeTimeout: 200,
    key: readFileSync(TLS.key),
    cert: readFileSync(TLS.cert),
    logger: {
      info: ignore,
      warn: ignore,
      error: ignore,
      debug: record,
      trace: ignore,
      fatal: ignore,
    } as never,
    ...options,
    onConnect(session, cb) {
      connections.opened++;
      if (onConnect) onConnect(session, cb);
      else cb();
    },
    onClose(session, cb) {
      connections.closed++;
      onClose?.(session, cb);
    },
    onAuth(auth, _session, cb) {
      if (users && users[auth.username ?? ''] === auth.password) return cb(null, { user: auth.username });
      cb(Object.assign(new Error('Invalid credentials'), { responseCode: 535 }));
    },
    onRcptTo(a, _session, cb) {
      cb(rcpt ? refuse(rcpt(a.address)) : null);
    },
    onData(stream, session: SMTPServerSession, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const env = session.envelope;
        const rcpts = env.rcptTo.map((r) => ({
          address: r.address,
          args: (r.args || {}) as Record<string, unknown>,
        }));
        const refusal = data?.(rcpts.map((r) => r.address)) ?? null;
        if (!refusal) {
          messages.push({
            session: session.id,
            mailFrom: env.mailFrom ? env.mailFrom.address : '',
            mailArgs: (env.mailFrom ? env.mailFrom.args || {} : {}) as Record<string, unknown>,
            rcpts,
            data: Buffer.concat(chunks),
            secure: session.secure,
            user: (session.user as string | undefined) ?? null,
          });
        }
        cb(refuse(refusal));
      });
    },
  });
  server.on('error', ignore);
  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  let closed: Promise<void> | null = null;
  const close = (): Promise<void> => {
    closed ??= new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 3000);
      server.close(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    return closed;
  };
  t.after(close);
  return { host, port, messages, commands, connections, close };
}

// ------------------------------------------------------------------ postfix's smtp-sink

export const SMTP_SINK = ['/usr/sbin/smtp-sink', 'smtp-sink'].find((p) => has(p)) ?? 'smtp-sink';

export interface Sink {
  /** What smtp-sink printed (with `-v`: the whole conversation). */
  output(): string;
  stop(): Promise<void>;
}

/** Starts postfix's smtp-sink on host:port with extra options, or skips the test without it. */
export async function smtpSink(
  t: TestContext,
  host: string,
  port: number,
  args: string[],
): Promise<Sink | null> {
  if (requirePeer(t, SMTP_SINK, 'apt-get install postfix') === null) return null;
  const asRoot = process.getuid?.() === 0;
  const child = spawn(
    SMTP_SINK,
    [...(asRoot ? ['-u', 'nobody'] : []), '-v', ...args, `${host}:${port}`, '100'],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  child.on('error', (err) => (out += String(err)));
  const stop = (): Promise<void> => stopChild(child);
  t.after(stop);
  try {
    await waitForPort(host, port, 10_000);
  } catch (err) {
    await stop();
    throw new Error(`smtp-sink did not start: ${(err as Error).message}\n${out}`, { cause: err });
  }
  return { output: () => out, stop };
}

// ------------------------------------------------------------------ Petrel with the queue and outbound

export interface Outcome {
  readonly recipient: string;
  readonly status: DeliveryStatus;
  readonly reply: RecipientReply;
  readonly queueId: string;
  /** The peer took the DSN request over (RecipientResult.dsnPassedOn). */
  readonly dsnPassedOn: boolean;
}

export interface Sender {
  readonly server: TestServer;
  readonly outcomes: Outcome[];
  /** What the transform hook was told about each peer. */
  readonly peers: PeerCapabilities[];
  /** Queues a message (through the queue's own service) and returns its id. */
  submit(
    to:
      | readonly string[]
      | readonly {
          address: string;
          notify?: ('SUCCESS' | 'FAILURE' | 'DELAY' | 'NEVER')[];
          orcpt?: string;
        }[],
    content?: string | Buffer,
    opts?: { from?: string | null; mailParams?: Submission['mailParams'] },
  ): Promise<string>;
  /** Waits (bounded) until every recipient of `id` has an outcome. */
  settled(id: string, count: number, timeoutMs?: number): Promise<Outcome[]>;
  close(): Promise<void>;
}

export const MESSAGE = 'From: alice@petrel.test\r\nTo: someone\r\nSubject: hello\r\n\r\nHello there.\r\n';

/**
 * Petrel in this process with [accept-all rcpt, queue, outbound, a recorder] and the given
 * outbound config; DNS goes to `dnsServer`.
 */
export async function startSender(
  t: TestContext,
  opts: {
    dnsServer: string;
    outbound: Record<string, unknown>;
    config?: Partial<PetrelConfigInput>;
    /** Extra plugins listed before outbound (transforms). */
    before?: PluginDefinition[];
  },
): Promise<Sender> {
  const outcomes: Outcome[] = [];
  const peers: PeerCapabilities[] = [];
  const holder: { queue: QueueService | null } = { queue: null };
  const recorder = definePlugin({
    name: 'test-outbound-recorder',
    setup(api) {
      holder.queue = api.resolve(Queue);
      const note =
        (status: DeliveryStatus) => async (ctx: { message: { id: string }; result: RecipientResult }) => {
          outcomes.push({
            recipient: ctx.result.recipient,
            status,
            reply: ctx.result.reply,
            queueId: ctx.message.id,
            dsnPassedOn: ctx.result.dsnPassedOn === true,
          });
        };
      return {
        delivered: note('delivered'),
        deferred: note('deferred'),
        failed: note('failed'),
        async transform({ peer, content }) {
          peers.push(peer);
          return content;
        },
      };
    },
  });
  const extra = opts.before ?? [];
  const server = await startServer({
    plugins: [acceptAllRecipients, queue, ...extra, outbound, recorder],
    entries: [
      acceptAllRecipients.name,
      { name: 'queue', config: { retry: '10m' } },
      ...extra.map((p) => p.name),
      { name: 'outbound', config: opts.outbound, timeout: 60_000 },
      recorder.name,
    ],
    config: {
      hostname: 'petrel.test',
      localDomains: ['petrel.test'],
      dns: { servers: [opts.dnsServer], timeout: 1000 },
      listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0 }],
      ...opts.config,
    },
  });
  let closed: Promise<void> | null = null;
  const close = (): Promise<void> => (closed ??= server.close());
  t.after(close);
  return {
    server,
    outcomes,
    peers,
    async submit(to, content = MESSAGE, o = {}) {
      if (!holder.queue) throw new Error('the queue service is not there');
      const recipients = to.map((r) => {
        if (typeof r === 'string') return { address: address(r) };
        return {
          address: address(r.address),
          params: {
            ...(r.notify ? { notify: r.notify } : {}),
            ...(r.orcpt ? { orcpt: { type: 'rfc822', address: r.orcpt } } : {}),
          },
        };
      });
      return holder.queue.submit({
        sender: o.from === null ? null : address(o.from ?? 'alice@petrel.test'),
        recipients,
        content: Buffer.isBuffer(content) ? content : Buffer.from(content),
        ...(o.mailParams ? { mailParams: o.mailParams } : {}),
      });
    },
    async settled(id, count, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const mine = outcomes.filter((o) => o.queueId === id);
        if (mine.length >= count) return mine;
        if (Date.now() > deadline) {
          const logs = server.logs.filter((l) => l.queueId === id).map((l) => JSON.stringify(l));
          throw new Error(
            `message ${id}: ${mine.length} of ${count} outcomes after ${timeoutMs} ms\n${logs.join('\n')}`,
          );
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    close,
  };
}

/** Short time limits for tests (a dead peer costs seconds, not minutes). */
export const FAST = {
  connect: 2000,
  greeting: 5000,
  ehlo: 5000,
  starttls: 5000,
  auth: 5000,
  mail: 5000,
  rcpt: 5000,
  data: 5000,
  block: 5000,
  final: 5000,
  rset: 2000,
  quit: 500,
  wait: 20_000,
};

/** `[recipient, status, code, enhanced]` of each outcome, in recipient order. */
export function summary(outcomes: readonly Outcome[]): [string, DeliveryStatus, number, string][] {
  return [...outcomes]
    .sort((a, b) => a.recipient.localeCompare(b.recipient))
    .map((o) => [o.recipient, o.status, o.reply.code, o.reply.enhanced]);
}
