import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { AnyListenerConfig, ListenerConfig } from '../config/schema.js';
import type { Generation } from './generation.js';
import { LocalGate, type ConnectionGate } from './gate.js';
import { compileCidrs } from '../util/cidr.js';
import { readProxyHeader } from './proxy-protocol.js';
import type { ConnectionRefusal } from './counters.js';
import { formatReply } from './reply.js';
import { SmtpSession, type ConnectionOrigin, type SessionHost } from './session.js';

export interface BoundListener {
  readonly name: string;
  readonly kind: AnyListenerConfig['kind'];
  readonly address: string;
  readonly port: number;
}

/**
 * One open SMTP session as the web console lists it: who, where and how far, never what was
 * said (no envelope, no content, no credentials beyond the authenticated user's name).
 */
export interface OpenSession {
  readonly id: string;
  /** The client's address and port (as the PROXY header or XCLIENT gave them, if any). */
  readonly client: string;
  readonly listener: string;
  /** `connected` (no HELO yet), `greeted`, or `in a transaction` (after MAIL FROM). */
  readonly state: 'connected' | 'greeted' | 'in a transaction';
  readonly helo: string | null;
  /** The TLS protocol (`TLSv1.3`), or null for a clear-text session. */
  readonly tls: string | null;
  readonly user: string | null;
  /** When the connection was accepted (ISO 8601). */
  readonly since: string;
}

/** Sessions one process reports to the console at most (the oldest first). */
export const MAX_REPORTED_SESSIONS = 500;

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

  /** The open sessions, oldest first, at most MAX_REPORTED_SESSIONS (see `OpenSession`). */
  openSessions(): OpenSession[] {
    const out: OpenSession[] = [];
    // A Set iterates in insertion order: the oldest connections first.
    for (const s of this.sessions) {
      if (out.length >= MAX_REPORTED_SESSIONS) break;
      const ip = s.remote.address;
      out.push({
        id: s.id,
        client: ip.includes(':') ? `[${ip}]:${s.remote.port}` : `${ip}:${s.remote.port}`,
        listener: s.listener.name,
        state: s.inTransaction ? 'in a transaction' : s.helo ? 'greeted' : 'connected',
        helo: s.helo?.hostname ?? null,
        tls: s.tls?.protocol ?? null,
        user: s.user,
        since: s.startedAt.toISOString(),
      });
    }
    return out;
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

  /** Connections whose PROXY header is still awaited: closed at once on shutdown. */
  private readonly awaitingHeader = new Set<Socket>();
  /** Each listener config's compiled `proxyProtocol.networks` (a new config compiles anew). */
  private readonly proxyNetworks = new WeakMap<ListenerConfig, (address: string) => boolean>();

  private accept(socket: Socket, bound: ListenerConfig): void {
    const gen = this.current();
    // Settings other than address and port follow a reload; the listener keeps its name.
    const config =
      gen.config.listeners.find(
        (l): l is ListenerConfig => l.kind !== 'http' && l.name === bound.name && l.kind === bound.kind,
      ) ?? bound;
    socket.on('error', () => undefined);
    if (!config.proxyProtocol) {
      return this.admit(socket, config, gen, {
        remote: { address: socket.remoteAddress ?? '', port: socket.remotePort ?? 0 },
        local: { address: socket.localAddress ?? '', port: socket.localPort ?? 0 },
        proxy: null,
      });
    }
    this.acceptProxied(socket, config, gen).catch((err: unknown) => {
      this.log.error({ err, listener: config.name }, 'PROXY protocol: accepting failed');
      socket.destroy();
    });
  }

  /**
   * A PROXY-protocol listener: the peer must be in `proxyProtocol.networks` and send a valid
   * header within `proxyProtocol.timeout`; then the header's client stands for the connection
   * from the connection limits on. A refusal closes the socket without a reply: the peer is a
   * proxy (or someone posing as one) and anything sent would reach its client as a greeting.
   */
  private async acceptProxied(socket: Socket, config: ListenerConfig, gen: Generation): Promise<void> {
    const proxyConfig = config.proxyProtocol!;
    let trusted = this.proxyNetworks.get(config);
    if (!trusted) {
      trusted = compileCidrs(proxyConfig.networks);
      this.proxyNetworks.set(config, trusted);
    }
    const proxy = { address: socket.remoteAddress ?? '', port: socket.remotePort ?? 0 };
    const refuse = (reason: string): void => {
      gen.counters.connectionRefused(config.name || config.kind, 'proxy');
      this.log.info(
        { listener: config.name, proxy: proxy.address, port: proxy.port, reason },
        'PROXY protocol: connection refused',
      );
      socket.destroy();
    };
    // Checked before reading a byte: a header from anyone else is never looked at.
    if (!trusted(proxy.address)) return refuse('peer not in proxyProtocol.networks');
    if (this.stopping) return refuse('shutting down');
    this.awaitingHeader.add(socket);
    const read = await readProxyHeader(socket, proxyConfig.timeout).finally(() =>
      this.awaitingHeader.delete(socket),
    );
    if (!read.ok) return refuse(this.stopping ? 'shutting down' : read.reason);
    if (this.stopping || socket.destroyed) return refuse('shutting down');
    const endpoints = read.header.endpoints;
    this.admit(socket, config, gen, {
      // LOCAL/UNKNOWN: the proxy speaks for itself (a health check) and keeps its own address.
      remote: endpoints?.remote ?? proxy,
      local: endpoints?.local ?? { address: socket.localAddress ?? '', port: socket.localPort ?? 0 },
      proxy,
      early: read.rest,
    });
  }

  private admit(socket: Socket, config: ListenerConfig, gen: Generation, origin: ConnectionOrigin): void {
    const ip = origin.remote.address;
    const listener = config.name ?? '';
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
      this.serve(socket, config, gen, origin, listener);
    };
    if (typeof admitted === 'boolean') return admittedThen(admitted);
    // A shared gate answers over IPC; meanwhile the client's bytes wait in the socket's buffer
    // (nothing reads them before the session attaches its reader).
    admitted.then(admittedThen, () => refuse('Service temporarily unavailable', 'unavailable'));
  }

  private serve(
    socket: Socket,
    config: ListenerConfig,
    gen: Generation,
    origin: ConnectionOrigin,
    listener: string,
  ): void {
    const ip = origin.remote.address;
    gen.plugins.retain();
    const cells = gen.counters.listener(listener || config.kind);
    cells.total.inc();
    cells.open.inc();
    const session = new SmtpSession(socket, config, gen, this, origin);
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
    // Not sessions yet: nothing to finish, and nothing may be sent before the header.
    for (const socket of this.awaitingHeader) socket.destroy();
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
