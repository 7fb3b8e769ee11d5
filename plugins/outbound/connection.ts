/**
 * One SMTP client connection (RFC 5321) on the core's SocketReader: replies with their enhanced
 * codes, EHLO with HELO fallback and the capabilities it announces, STARTTLS (RFC 3207), AUTH
 * PLAIN/LOGIN (RFC 4954), RSET and QUIT. A connection outlives one message: it is bound to the
 * signal of whichever delivery uses it, and that signal aborting destroys it.
 */
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { X509Certificate } from 'node:crypto';
import {
  connect as tlsConnect,
  type ConnectionOptions,
  type DetailedPeerCertificate,
  type TLSSocket,
} from 'node:tls';
import {
  MalformedReplyError,
  ReadTimeoutError,
  readReply,
  SocketReader,
  writeDrained,
  type WireReply,
} from '../../core/index.js';

/** Where a connection goes: the host name (for logs, SNI and verification) and one of its addresses. */
export interface PeerAddress {
  readonly host: string;
  readonly ip: string;
  readonly port: number;
}

/** A reply: its code, RFC 3463 code (`<class>.0.0` when none was given) and lines of text. */
export type SmtpReply = WireReply;

export type Stage =
  | 'connect'
  | 'greeting'
  | 'ehlo'
  | 'starttls'
  | 'auth'
  | 'mail'
  | 'rcpt'
  | 'data'
  | 'body'
  | 'final'
  | 'rset'
  | 'quit';

const PHASE: Record<Stage, string> = {
  connect: 'while connecting',
  greeting: 'while receiving the initial server greeting',
  ehlo: 'while performing the EHLO handshake',
  starttls: 'while performing the STARTTLS handshake',
  auth: 'while authenticating',
  mail: 'while sending MAIL FROM',
  rcpt: 'while sending RCPT TO',
  data: 'while sending DATA',
  body: 'while sending the message body',
  final: 'while waiting for the reply to the end of data',
  rset: 'while sending RSET',
  quit: 'while sending QUIT',
};

/**
 * Why a conversation stopped: the network (`network`), a time limit (`timeout`), a reply that
 * did not allow going on (`reply`), a reply that made no sense (`protocol`) or TLS (`tls`).
 */
export class SmtpFailure extends Error {
  override readonly name = 'SmtpFailure';
  constructor(
    readonly stage: Stage,
    readonly kind: 'network' | 'timeout' | 'reply' | 'protocol' | 'tls',
    message: string,
    readonly reply?: SmtpReply,
    cause?: unknown,
  ) {
    super(message, cause === undefined ? undefined : { cause });
  }

  /** The code of the error underneath (a TLS failure's `ERR_TLS_CERT_ALTNAME_INVALID`, say). */
  get code(): string | undefined {
    return (this.cause as NodeJS.ErrnoException | undefined)?.code;
  }
}

/** `250 2.0.0 first line / second line`, for logs and made-up replies. */
export function describeReply(r: SmtpReply): string {
  return `${r.code} ${r.enhanced} ${r.lines.join(' / ')}`.trim();
}

/** `mx.example.test [192.0.2.1]`: who answered, as results report it. */
export function describePeer(p: PeerAddress): string {
  return `${p.host} [${p.ip}]`;
}

export class SmtpConnection {
  /** `mx.example.test [192.0.2.1]`. */
  readonly remote: string;
  /** EHLO keywords (upper-cased) and their parameters; empty after HELO. */
  readonly caps = new Map<string, string>();
  /** The name the server gave in its EHLO/HELO reply. */
  peerName = '';
  secure = false;
  /** Transactions that reached DATA on this connection. */
  messages = 0;
  /**
   * No transaction is open: none has started yet, the last one ended with the peer's reply to the
   * end of data (RFC 5321 §4.1.1.4 clears its state), or RSET was accepted. A clean connection
   * takes the next MAIL FROM without an RSET first.
   */
  clean = true;
  /** The TLSA record the peer's certificate matched (set by the transport after a DANE check). */
  daneMatch: string | null = null;

  private socket: Socket | TLSSocket;
  private readonly reader = new SocketReader();
  private lastError: Error | null = null;
  private signal: AbortSignal | null = null;
  /** Why the delivery using the connection stopped it (its time ran out), if it did. */
  private abortedBy: Error | null = null;
  private isClosed = false;
  private readonly closeListeners = new Set<() => void>();

  private constructor(
    private readonly raw: Socket,
    readonly peer: PeerAddress,
  ) {
    this.socket = raw;
    this.remote = describePeer(peer);
    this.reader.attach(raw);
    this.watch(raw);
  }

  /** Opens a TCP connection (Nagle off: every command and chunk leaves as it is written). */
  static open(peer: PeerAddress, timeoutMs: number, signal: AbortSignal): Promise<SmtpConnection> {
    return new Promise((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason as Error);
      const socket = netConnect({ host: peer.ip, port: peer.port });
      const fail = (err: Error): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        socket.destroy();
        const why =
          (err as NodeJS.ErrnoException).code === 'ECONNREFUSED' ? 'Connection refused' : err.message;
        reject(
          new SmtpFailure('connect', 'network', `connect to ${describePeer(peer)}:${peer.port}: ${why}`),
        );
      };
      const onAbort = (): void => fail(signal.reason as Error);
      const timer = setTimeout(
        () => fail(new Error(`Connection timed out after ${timeoutMs} ms`)),
        timeoutMs,
      );
      signal.addEventListener('abort', onAbort, { once: true });
      socket.once('error', fail);
      socket.once('connect', () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        socket.off('error', fail);
        socket.setNoDelay(true);
        const conn = new SmtpConnection(socket, peer);
        conn.bind(signal);
        resolve(conn);
      });
    });
  }

  private watch(s: Socket | TLSSocket): void {
    s.on('error', (err) => (this.lastError = err));
    s.once('close', () => {
      if (this.isClosed) return;
      this.isClosed = true;
      for (const fn of this.closeListeners) fn();
      this.closeListeners.clear();
    });
  }

  get closed(): boolean {
    return this.isClosed || this.socket.destroyed;
  }

  /** Runs `fn` once when the connection closes; returns a function that cancels it. */
  onClose(fn: () => void): () => void {
    if (this.closed) {
      fn();
      return () => undefined;
    }
    this.closeListeners.add(fn);
    return () => this.closeListeners.delete(fn);
  }

  /** From now on, `signal` aborting ends the connection (and whatever wait is pending). */
  bind(signal: AbortSignal): void {
    this.unbind();
    this.signal = signal;
    if (signal.aborted) this.abort();
    else signal.addEventListener('abort', this.abort, { once: true });
  }

  unbind(): void {
    this.signal?.removeEventListener('abort', this.abort);
    this.signal = null;
  }

  private readonly abort = (): void => {
    const reason = this.signal?.reason;
    this.abortedBy = reason instanceof Error ? reason : new Error('aborted');
    this.reader.interrupt(this.abortedBy);
    this.destroy();
  };

  /** A failure for a read or write that could not complete. */
  private lost(stage: Stage, err?: unknown): SmtpFailure {
    if (err instanceof SmtpFailure) return err;
    if (this.abortedBy) {
      return new SmtpFailure(stage, 'timeout', `delivery stopped ${PHASE[stage]}: ${this.abortedBy.message}`);
    }
    if (err instanceof ReadTimeoutError || (err instanceof Error && /timed out/.test(err.message)))
      return new SmtpFailure(stage, 'timeout', `conversation with ${this.remote} timed out ${PHASE[stage]}`);
    const detail = this.lastError ? ` (${this.lastError.message})` : '';
    return new SmtpFailure(stage, 'network', `lost connection with ${this.remote} ${PHASE[stage]}${detail}`);
  }

  /** Reads one reply, all its lines, within `timeoutMs` for the whole of it. */
  async read(stage: Stage, timeoutMs: number): Promise<SmtpReply> {
    let reply: SmtpReply | null;
    try {
      reply = await readReply(this.reader, Date.now() + timeoutMs);
    } catch (err) {
      if (err instanceof MalformedReplyError)
        throw new SmtpFailure(stage, 'protocol', `${this.remote} sent ${err.message}`);
      throw this.lost(stage, err);
    }
    if (reply === null) throw this.lost(stage);
    return reply;
  }

  /** Writes and, when the socket's buffer is full, waits (bounded) until it drains. */
  async write(data: string | Buffer, stage: Stage, timeoutMs: number): Promise<void> {
    if (this.closed) throw this.lost(stage);
    const result = await writeDrained(this.socket, data, timeoutMs);
    if (result === 'closed') throw this.lost(stage);
    if (result === 'timeout') {
      this.destroy();
      throw new SmtpFailure(stage, 'timeout', `conversation with ${this.remote} timed out ${PHASE[stage]}`);
    }
  }

  /** Sends one command line and reads its reply. */
  async command(line: string, stage: Stage, timeoutMs: number): Promise<SmtpReply> {
    await this.write(`${line}\r\n`, stage, timeoutMs);
    return this.read(stage, timeoutMs);
  }

  /** Reads the greeting; anything but 220 is a failure carrying the reply. */
  async greeting(timeoutMs: number): Promise<SmtpReply> {
    const reply = await this.read('greeting', timeoutMs);
    if (reply.code !== 220) {
      throw new SmtpFailure(
        'greeting',
        'reply',
        `${this.remote} refused to talk to me: ${describeReply(reply)}`,
        reply,
      );
    }
    return reply;
  }

  /** EHLO, and HELO when the server does not know EHLO (a 5xx). Fills `caps` and `peerName`. */
  async hello(name: string, timeoutMs: number): Promise<void> {
    let reply = await this.command(`EHLO ${name}`, 'ehlo', timeoutMs);
    this.caps.clear();
    if (reply.code >= 500) reply = await this.command(`HELO ${name}`, 'ehlo', timeoutMs);
    else if (reply.code === 250) {
      for (const l of reply.lines.slice(1)) {
        const [kw = '', ...rest] = l.trim().split(/[ =]/);
        if (kw) this.caps.set(kw.toUpperCase(), rest.join(' '));
      }
    }
    if (reply.code !== 250) {
      throw new SmtpFailure(
        'ehlo',
        'reply',
        `${this.remote} refused the EHLO/HELO: ${describeReply(reply)}`,
        reply,
      );
    }
    this.peerName = (reply.lines[0] ?? '').trim().split(/\s+/)[0] ?? '';
  }

  /** The server's SIZE limit (RFC 1870), or 0 when it declared none. */
  get sizeLimit(): number {
    const n = Number(this.caps.get('SIZE') ?? '');
    return Number.isSafeInteger(n) && n > 0 ? n : 0;
  }

  /**
   * STARTTLS and the handshake. Resolves with the server's reply when it refused STARTTLS (the
   * session goes on in plain text); a failed handshake throws and leaves the connection dead.
   * The capabilities are cleared: EHLO again afterwards (RFC 3207 §4.2).
   */
  async starttls(options: ConnectionOptions, timeoutMs: number): Promise<SmtpReply | null> {
    const reply = await this.command('STARTTLS', 'starttls', timeoutMs);
    if (reply.code !== 220) return reply;
    // Nothing the server sent before the handshake may be read as if it came over TLS.
    this.reader.detach();
    this.reader.discard();
    const secure = tlsConnect({ ...options, socket: this.raw });
    this.watch(secure);
    this.socket = secure;
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error): void => {
        clearTimeout(timer);
        secure.off('secureConnect', onSecure);
        secure.off('error', done);
        secure.off('close', onClose);
        if (!err) return resolve();
        secure.destroy();
        this.raw.destroy();
        reject(err);
      };
      const onSecure = (): void => done();
      const onClose = (): void => done(new Error('the connection closed during the handshake'));
      const timer = setTimeout(() => done(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs);
      secure.once('secureConnect', onSecure);
      secure.once('error', done);
      secure.once('close', onClose);
    }).catch((err: Error) => {
      throw new SmtpFailure(
        'starttls',
        'tls',
        `TLS handshake with ${this.remote} failed: ${err.message}`,
        undefined,
        err,
      );
    });
    this.reader.attach(secure);
    this.secure = true;
    this.caps.clear();
    return null;
  }

  /**
   * Why the peer's certificate is not verified (chain or name, Node's code such as
   * `ERR_TLS_CERT_ALTNAME_INVALID`), or null when it is; `'no TLS'` without TLS. Set even when
   * the handshake did not insist on verification, so that a policy can look at it afterwards.
   */
  get authorizationError(): string | null {
    if (!this.secure) return 'no TLS';
    const s = this.socket as TLSSocket;
    return s.authorized ? null : String(s.authorizationError ?? 'unverified');
  }

  /** How the peer's certificate was verified: for its host name (PKIX), by DANE, or not at all. */
  get verifiedBy(): 'pkix' | 'dane' | null {
    if (!this.secure) return null;
    if (this.daneMatch) return 'dane';
    return this.authorizationError === null ? 'pkix' : null;
  }

  /** The peer's certificate chain as it presented it, leaf first; empty without TLS. */
  peerChain(): X509Certificate[] {
    if (!this.secure) return [];
    const chain: X509Certificate[] = [];
    const seen = new Set<string>();
    let c: DetailedPeerCertificate | undefined = (this.socket as TLSSocket).getPeerCertificate(true);
    while (c?.raw && !seen.has(c.fingerprint256)) {
      seen.add(c.fingerprint256);
      chain.push(new X509Certificate(c.raw));
      c = c.issuerCertificate;
    }
    return chain;
  }

  /** The negotiated TLS version and cipher, for logs. */
  /** The TLS version agreed (`TLSv1.3`), or null in plain text. */
  get tlsProtocol(): string | null {
    return this.secure ? ((this.socket as TLSSocket).getProtocol() ?? 'unknown') : null;
  }

  get tlsDescription(): string | null {
    if (!this.secure) return null;
    const s = this.socket as TLSSocket;
    return `${s.getProtocol() ?? '?'} ${s.getCipher()?.name ?? '?'}`;
  }

  /** AUTH PLAIN, or LOGIN when PLAIN is not offered (RFC 4954). Throws unless the server says 235. */
  async auth(user: string, pass: string, timeoutMs: number): Promise<void> {
    const mechanisms = (this.caps.get('AUTH') ?? '').toUpperCase().split(/\s+/);
    const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');
    let reply: SmtpReply;
    if (mechanisms.includes('PLAIN')) {
      reply = await this.command(`AUTH PLAIN ${b64(`\0${user}\0${pass}`)}`, 'auth', timeoutMs);
    } else if (mechanisms.includes('LOGIN')) {
      reply = await this.command('AUTH LOGIN', 'auth', timeoutMs);
      if (reply.code === 334) reply = await this.command(b64(user), 'auth', timeoutMs);
      if (reply.code === 334) reply = await this.command(b64(pass), 'auth', timeoutMs);
    } else {
      throw new SmtpFailure('auth', 'protocol', `${this.remote} offers neither AUTH PLAIN nor AUTH LOGIN`);
    }
    if (reply.code === 334) {
      // A challenge we cannot answer: cancel the exchange (RFC 4954 §4).
      await this.write('*\r\n', 'auth', timeoutMs);
      reply = await this.read('auth', timeoutMs);
    }
    if (reply.code !== 235) {
      throw new SmtpFailure(
        'auth',
        'reply',
        `authentication failed at ${this.remote}: ${describeReply(reply)}`,
        reply,
      );
    }
  }

  /** RSET before the next transaction; false when the connection is no good any more. */
  async rset(timeoutMs: number): Promise<boolean> {
    if (this.closed) return false;
    try {
      this.clean = (await this.command('RSET', 'rset', timeoutMs)).code === 250;
      return this.clean;
    } catch {
      return false;
    }
  }

  /** QUIT politely, briefly; the connection is closed whatever the server says. Never throws. */
  async quit(timeoutMs: number): Promise<void> {
    if (!this.closed) {
      try {
        await this.command('QUIT', 'quit', timeoutMs);
      } catch {
        // the outcome is already known
      }
    }
    this.destroy();
  }

  destroy(): void {
    this.unbind();
    this.reader.detach();
    this.socket.destroy();
    this.raw.destroy();
  }
}

/**
 * TLS options for STARTTLS with a host: SNI with its name (never an IP), verification as asked.
 * The trust anchors apply either way: an unverified session still learns whether the peer's
 * certificate would have verified (`authorizationError`).
 */
export function tlsOptions(host: string, verify: boolean, ca?: readonly string[]): ConnectionOptions {
  const named = isIP(host) === 0 && !host.startsWith('[');
  return {
    ...(named ? { servername: host } : { host }),
    rejectUnauthorized: verify,
    ...(ca ? { ca: [...ca] } : {}),
  };
}
