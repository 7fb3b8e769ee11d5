import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { ListenerConfig } from '../config/schema.js';
import type { Generation } from './generation.js';
import { formatReply } from './reply.js';
import { SmtpSession, type SessionHost } from './session.js';

export interface BoundListener {
  readonly name: string;
  readonly kind: ListenerConfig['kind'];
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
  private readonly perIp = new Map<string, number>();
  private stopping = false;

  constructor(
    private current: () => Generation,
    private readonly log: Logger,
  ) {}

  get shuttingDown(): boolean {
    return this.stopping;
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  async listen(listeners: readonly ListenerConfig[]): Promise<BoundListener[]> {
    const bound: BoundListener[] = [];
    for (const config of listeners) {
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
        server.listen({ host: config.address, port: config.port, backlog: 1024 }, () => {
          server.off('error', failed);
          resolve();
        });
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
    const config = gen.config.listeners.find((l) => l.name === bound.name && l.kind === bound.kind) ?? bound;
    const ip = socket.remoteAddress ?? '';
    const own = this.listenerCounts(config.name ?? '');
    socket.on('error', () => undefined);
    const global = gen.config.limits;
    const over =
      this.sessions.size >= global.maxConnections ||
      (this.perIp.get(ip) ?? 0) >= global.maxConnectionsPerIp ||
      (config.limits?.maxConnections !== undefined && own.count >= config.limits.maxConnections) ||
      (config.limits?.maxConnectionsPerIp !== undefined &&
        (own.perIp.get(ip) ?? 0) >= config.limits.maxConnectionsPerIp);
    if (this.stopping || over) {
      gen.metrics.inc('smtp.connections.refused');
      const text = this.stopping ? 'Service shutting down' : 'Too many connections, try again later';
      socket.end(formatReply(421, null, `${gen.config.hostname} ${text}`));
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    }
    const dec = (m: Map<string, number>): void => {
      const n = (m.get(ip) ?? 1) - 1;
      if (n > 0) m.set(ip, n);
      else m.delete(ip);
    };
    this.perIp.set(ip, (this.perIp.get(ip) ?? 0) + 1);
    own.perIp.set(ip, (own.perIp.get(ip) ?? 0) + 1);
    own.count++;
    gen.plugins.retain();
    gen.metrics.inc('smtp.connections');
    gen.metrics.add('smtp.connections.active', 1);
    const session = new SmtpSession(socket, config, gen, this);
    this.sessions.add(session);
    void session.run().finally(() => {
      this.sessions.delete(session);
      dec(this.perIp);
      dec(own.perIp);
      own.count--;
      gen.metrics.add('smtp.connections.active', -1);
      gen.plugins.release();
      if (this.stopping && this.sessions.size === 0) this.drained?.();
    });
  }

  private readonly byListener = new Map<string, { count: number; perIp: Map<string, number> }>();

  private listenerCounts(name: string): { count: number; perIp: Map<string, number> } {
    let c = this.byListener.get(name);
    if (!c) {
      c = { count: 0, perIp: new Map() };
      this.byListener.set(name, c);
    }
    return c;
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
