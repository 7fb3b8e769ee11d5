import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { AnyListenerConfig, ListenerConfig } from '../config/schema.js';
import type { Generation } from './generation.js';
import { LocalGate, type ConnectionGate } from './gate.js';
import type { ConnectionRefusal } from './counters.js';
import { formatReply } from './reply.js';
import { SmtpSession, type SessionHost } from './session.js';

export interface BoundListener {
  readonly name: string;
  readonly kind: AnyListenerConfig['kind'];
  readonly address: string;
  readonly port: number;
}

/**
 * The listeners and the connections on them. It enforces connection limits (in total and per
 * client address), hands each connection to a session on the current generation, and drains
 * sessions on shutdown.
 */
export class SmtpServer implements SessionHost {
  private readonly servers: { server: Server; config: ListenerConfig }[] = [];
  private readonly sessions = new Set<SmtpSession>();
  private stopping = false;

  constructor(
    private current: () => Generation,
    private readonly log: Logger,
    /** Counts connections against the limits: this process's own, or shared by every worker. */
    private readonly gate: ConnectionGate = new LocalGate(),
  ) {}

  get shuttingDown(): boolean {
    return this.stopping;
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  /**
   * Listens on each listener's address, or, where `handles` has an entry for it, on that
   * already-bound socket (a supervisor's, shared by its workers: the kernel hands each new
   * connection to one of them, and the socket outlives any one worker).
   */
  async listen(
    listeners: readonly AnyListenerConfig[],
    handles: readonly object[] = [],
  ): Promise<BoundListener[]> {
    const bound: BoundListener[] = [];
    for (const [index, config] of listeners.entries()) {
      // The http listener is not SMTP: its owner (the app, or the primary) serves it.
      if (config.kind === 'http') continue;
      const handle = handles[index];
      const server = createServer({ noDelay: true, pauseOnConnect: false }, (socket) =>
        this.accept(socket, config),
      );
      await new Promise<void>((resolve, reject) => {
        const failed = (err: NodeJS.ErrnoException): void => {
          const i = listeners.indexOf(config);
          const why =
            err.code === 'EADDRINUSE'
              ? 'it is in use'
              : err.code === 'EACCES'
                ? 'permission denied'
                : err.message;
          const e = new Error(`listeners[${i}]: cannot listen on ${config.address}:${config.port}: ${why}`);
          reject(Object.assign(e, { code: err.code, listener: i }));
        };
        server.once('error', failed);
        const ready = (): void => {
          server.off('error', failed);
          resolve();
        };
        if (handle) server.listen(handle, 1024, ready);
        else server.listen({ host: config.address, port: config.port, backlog: 1024 }, ready);
      });
      server.on('error', (err) => this.log.error({ err, listener: config.name }, 'listener error'));
      const addr = server.address() as AddressInfo;
      this.servers.push({ server, config });
      bound.push({
        name: config.name ?? config.kind,
        kind: config.kind,
        address: addr.address,
        port: addr.port,
      });
      this.log.info(
        { listener: config.name, kind: config.kind, address: addr.address, port: addr.port },
        'listening',
      );
    }
    return bound;
  }

  private accept(socket: Socket, bound: ListenerConfig): void {
    const gen = this.current();
    // Settings other than address and port follow a reload; the listener keeps its name.
    const config =
      gen.config.listeners.find(
        (l): l is ListenerConfig => l.kind !== 'http' && l.name === bound.name && l.kind === bound.kind,
      ) ?? bound;
    const ip = socket.remoteAddress ?? '';
    const listener = config.name ?? '';
    socket.on('error', () => undefined);
    const refuse = (text: string, reason: ConnectionRefusal): void => {
      gen.counters.connectionRefused(listener || config.kind, reason);
      socket.end(formatReply(421, null, `${gen.config.hostname} ${text}`));
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    if (this.stopping) return refuse('Service shutting down', 'shutdown');
    const global = gen.config.limits;
    const admitted = this.gate.admit(ip, listener, {
      maxConnections: global.maxConnections,
      maxConnectionsPerIp: global.maxConnectionsPerIp,
      listenerMaxConnections: config.limits?.maxConnections,
      listenerMaxConnectionsPerIp: config.limits?.maxConnectionsPerIp,
    });
    const admittedThen = (ok: boolean): void => {
      if (!ok) return refuse('Too many connections, try again later', 'limit');
      if (this.stopping || socket.destroyed) {
        this.gate.leave(ip, listener);
        if (!socket.destroyed) refuse('Service shutting down', 'shutdown');
        return;
      }
      this.serve(socket, config, gen, ip, listener);
    };
    if (typeof admitted === 'boolean') return admittedThen(admitted);
    // A shared gate answers over IPC; meanwhile the client's bytes wait in the socket's buffer
    // (nothing reads them before the session attaches its reader).
    admitted.then(admittedThen, () => refuse('Service temporarily unavailable', 'unavailable'));
  }

  private serve(socket: Socket, config: ListenerConfig, gen: Generation, ip: string, listener: string): void {
    gen.plugins.retain();
    const cells = gen.counters.listener(listener || config.kind);
    cells.total.inc();
    cells.open.inc();
    const session = new SmtpSession(socket, config, gen, this);
    this.sessions.add(session);
    void session.run().finally(() => {
      this.sessions.delete(session);
      this.gate.leave(ip, listener);
      cells.open.dec();
      gen.plugins.release();
      if (this.stopping && this.sessions.size === 0) this.drained?.();
    });
  }

  private drained: (() => void) | null = null;

  /**
   * Stops accepting, lets sessions finish their transaction up to `deadlineMs`, then answers
   * `421 4.3.2` to the rest and closes them.
   */
  async close(deadlineMs: number): Promise<void> {
    this.stopping = true;
    // close() stops accepting at once; its callback waits for every connection, so don't await it.
    for (const { server } of this.servers) server.close();
    // Idle sessions (no transaction in progress) are told at once.
    for (const s of this.sessions) if (!s.inTransaction) s.interrupt();
    if (this.sessions.size === 0) return;
    await new Promise<void>((resolve) => {
      this.drained = resolve;
      const timer = setTimeout(() => {
        for (const s of this.sessions) s.interrupt();
        // Give the interrupted sessions a moment to say 421 and run their disconnect hooks.
        setTimeout(resolve, 2000).unref();
      }, deadlineMs);
      timer.unref();
    });
  }
}
