import { isIP, type Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { Limits, ListenerConfig } from '../config/schema.js';
import type {
  ClientIdentity,
  Endpoint,
  MailParams,
  Recipient,
  RecipientParams,
  ScramExchange,
  SessionView,
  TlsInfo,
  TransactionView,
} from '../hooks/catalogue.js';
import type { CallContext, HookRunner, VerdictOutcome } from '../hooks/runner.js';
import { deny, type ReplySpec, type Verdict } from '../hooks/verdict.js';
import { parsePath, type Address } from '../message/address.js';
import type { SpooledBody } from '../message/body.js';
import { ReceivedMessage } from '../message/message.js';
import { Notes } from '../message/notes.js';
import { newId } from '../util/ids.js';
import { ContentReceiver, HeaderCapture } from './content.js';
import { ContentDeadline } from './deadline.js';
import type { ListenerCells } from './counters.js';
import type { Generation } from './generation.js';
import { parseMailParams, parseRcptParams } from './params.js';
import { ReadInterruptedError, ReadTimeoutError, SocketReader, type LineResult } from './reader.js';
import { envelopeEdits, homePostmaster } from './envelope-edits.js';
import { receivedValue } from './received.js';
import {
  deepFreeze,
  SessionViewOf,
  TransactionViewOf,
  type SessionState,
  type TransactionState,
} from './views.js';
import { formatReply } from './reply.js';
import { checkClientFinal, parseClientFirst, serverFirst } from './scram.js';

/**
 * Where a connection comes from: the socket's endpoints, or, behind a proxy that sent a PROXY
 * header, the client and address the header declared plus the proxy itself.
 */
export interface ConnectionOrigin {
  readonly remote: Endpoint;
  readonly local: Endpoint;
  /** The socket's peer when it sent a PROXY header; null for a direct client. */
  readonly proxy: Endpoint | null;
  /** Octets the client sent that were read with the PROXY header; the session sees them first. */
  readonly early?: Buffer;
}

/** What the listener tells a session about the server as a whole. */
export interface SessionHost {
  readonly shuttingDown: boolean;
}

class Transaction implements TransactionState {
  readonly id = newId();
  readonly notes = new Notes();
  /** Recipients accepted so far, frozen: hooks get this array itself, through `view`. */
  acceptedRecipients: readonly Recipient[] = Object.freeze([]);
  /** What hooks get: a read-only view (views.ts). */
  readonly view: TransactionView = new TransactionViewOf(this);
  /** Set once DATA or the first BDAT has passed the `data` hook. */
  dataStarted = false;
  usedBdat = false;
  /** A BDAT chunk failed; later chunks are read and refused until RSET. */
  bdatFailed = false;
  body: SpooledBody | null = null;
  content: ContentReceiver | null = null;
  capture: HeaderCapture | null = null;
  /** While the content is being received: when it must be complete. */
  deadline: ContentDeadline | null = null;
  tooBig = false;
  storageError: Error | null = null;

  /** The received message, once the content is complete (its body replacements end with it). */
  message: ReceivedMessage | null = null;

  constructor(
    /** Set at MAIL; `data_post` may change it (envelope-edits.ts). */
    public sender: Address | null,
    readonly mailParams: MailParams,
  ) {
    deepFreeze(sender);
    deepFreeze(mailParams);
  }

  get recipients(): readonly Recipient[] {
    return this.acceptedRecipients;
  }

  addRecipient(r: Recipient): void {
    this.setRecipients([...this.acceptedRecipients, r]);
  }

  setRecipients(list: readonly Recipient[]): void {
    this.acceptedRecipients = Object.freeze(list.map((r) => deepFreeze(r)));
  }
}

class ClientGoneError extends Error {}

/** A deadline passed: for a command line, for a message's content, or for the client to read its replies. */
class DeadlineError extends Error {
  constructor(
    readonly reason: 'command' | 'content' | 'replies',
    readonly detail: Record<string, unknown> = {},
  ) {
    super(`${reason} deadline passed`);
  }
}

/**
 * Reply octets not yet taken by the client (ours plus the socket's buffer) above which the
 * session reads no further command until the socket drains. Pipelining (RFC 2920) lets a client
 * send many commands before it reads; this keeps a client that never reads from filling memory
 * with replies. Part of the per-session memory budget (docs/security.md).
 */
export const REPLY_BOUND = 64 * 1024;
/** Commands answered from the input buffer in a row before other sessions get a turn. */
const BURST = 256;

const NOT_IMPLEMENTED = new Set(['EXPN', 'TURN', 'ETRN', 'SEND', 'SOML', 'SAML']);
const HTTP_VERBS = new Set(['GET', 'POST', 'PUT', 'HEAD', 'CONNECT', 'OPTIONS', 'DELETE']);
const HELP_TEXT = [
  'Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH',
  'End of HELP info',
];
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

/**
 * One SMTP connection, from greeting to close. It parses the wire, keeps the state, asks the
 * plugins through hooks at each step, and turns their verdicts into replies. Replies are batched
 * until the client's pipelined commands are used up (RFC 2920).
 */
export class SmtpSession implements SessionState {
  readonly id = newId();
  readonly startedAt: Date;
  /** Replaced when the client identity changes: what plugins noted was about the old client. */
  notes = new Notes();
  remote: Endpoint;
  local: Endpoint;
  remoteName: string | null = null;
  readonly peer: Endpoint;
  readonly proxy: Endpoint | null;
  readonly listener: { kind: ListenerConfig['kind']; name: string };
  helo: SessionView['helo'] = null;
  tls: TlsInfo | null = null;
  user: string | null = null;
  /** What hooks get: a read-only view of this session (views.ts), never the session itself. */
  readonly view: SessionView = new SessionViewOf(this);

  private socket: Duplex;
  private readonly reader = new SocketReader();
  private readonly runner: HookRunner;
  private logger: Logger | null = null;
  private readonly limits: Limits;
  private pending = '';
  private tx: Transaction | null = null;
  private refusedAtConnect = false;
  private closing = false;
  private unknownCommands = 0;
  private authFailures = 0;
  private messages = 0;
  private lastReply = '';
  private readonly listenerCells: ListenerCells;

  constructor(
    private readonly raw: Socket,
    private readonly listenerConfig: ListenerConfig,
    private readonly gen: Generation,
    private readonly host: SessionHost,
    private readonly origin: ConnectionOrigin = {
      remote: { address: raw.remoteAddress ?? '', port: raw.remotePort ?? 0 },
      local: { address: raw.localAddress ?? '', port: raw.localPort ?? 0 },
      proxy: null,
    },
  ) {
    this.socket = raw;
    this.startedAt = gen.clock.now();
    this.remote = Object.freeze({ ...origin.remote });
    this.local = Object.freeze({ ...origin.local });
    this.peer = this.remote;
    this.proxy = origin.proxy ? Object.freeze({ ...origin.proxy }) : null;
    this.listener = Object.freeze({
      kind: listenerConfig.kind,
      name: listenerConfig.name ?? listenerConfig.kind,
    });
    this.runner = gen.plugins.runner;
    this.listenerCells = gen.counters.listener(this.listener.name);
    this.limits = { ...gen.config.limits, ...listenerConfig.limits };
    raw.setNoDelay(true);
    raw.on('error', () => undefined); // reported as the reader seeing the end
  }

  /** The session's child logger, made on first use (most sessions log only their summary line). */
  private get log(): Logger {
    return (this.logger ??= this.gen.log.child({ session: this.id }));
  }

  /** For log lines: the client, and who vouched for it when that is someone else. */
  private who(): Record<string, unknown> {
    return {
      remote: this.remote.address,
      ...(this.remoteName ? { remoteName: this.remoteName } : {}),
      ...(this.peer !== this.remote ? { peer: this.peer.address } : {}),
      ...(this.proxy ? { proxy: `${this.proxy.address}:${this.proxy.port}` } : {}),
    };
  }

  // ---------------------------------------------------------------- lifecycle

  async run(): Promise<void> {
    const cfg = this.gen.config;
    try {
      // Implicit TLS (RFC 8314): the handshake comes before anything else.
      const early = this.origin.early ?? Buffer.alloc(0);
      if (this.listener.kind === 'submissions') {
        // Implicit TLS behind a proxy: the PROXY header came before the handshake; whatever
        // followed it in the same read is the start of the handshake, put back for TLS to read.
        if (early.length > 0) this.raw.unshift(early);
        if (!(await this.upgradeTls())) return;
      } else {
        this.reader.attach(this.raw);
        this.reader.arrivedBefore(early);
      }
      if (cfg.timeouts.greetingDelay > 0) await delay(cfg.timeouts.greetingDelay);
      const greeting = await this.connectVerdict();
      // RFC 5321 §3.1: a client must wait for the greeting. Bytes before it mean a bot or a
      // client that will not read replies; refuse it before it can do anything.
      if (this.reader.takeArrived() > 0) {
        this.gen.counters.connectionRefused(this.listener.name, 'early_talker');
        this.log.info(this.who(), 'client talked before the greeting');
        this.reply(554, '5.5.0', 'Protocol error: client sent data before the greeting');
        return;
      }
      if (!this.greet(greeting)) return;
      let burst = 0;
      while (!this.closing) {
        if (this.host.shuttingDown && !this.tx) {
          this.reply(421, '4.3.2', `${cfg.hostname} Service shutting down, closing connection`);
          break;
        }
        // Replies go out when the client's pipelined commands are used up (RFC 2920 §3.1), or
        // when they pile up: then no command is read until the client has taken them.
        if (this.pending.length + this.socket.writableLength > REPLY_BOUND) await this.makeRoom();
        else if (!this.reader.hasLine()) {
          this.flush();
          burst = 0;
        } else if (++burst >= BURST) {
          burst = 0;
          await new Promise<void>((resolve) => setImmediate(resolve));
        }
        const res = await this.readCommandLine();
        if (res === null) break;
        if (res.overlong) {
          this.reply(500, '5.5.2', 'Line too long');
          if (this.countError()) break;
          continue;
        }
        await this.command(res.line);
      }
    } catch (err) {
      if (err instanceof DeadlineError) {
        this.gen.counters.timeouts.inc();
        this.log.info({ deadline: err.reason, ...err.detail }, 'deadline passed, closing connection');
        this.reply(421, '4.4.2', `${cfg.hostname} Timeout exceeded, closing connection`);
      } else if (err instanceof ReadInterruptedError) {
        this.reply(421, '4.3.2', `${cfg.hostname} Service shutting down, closing connection`);
      } else if (!(err instanceof ClientGoneError)) {
        this.log.error({ err }, 'session failed');
        this.reply(421, '4.3.0', `${cfg.hostname} Local error, closing connection`);
      }
    } finally {
      await this.finish();
    }
  }

  /** Runs the `connect` hooks for the client as it stands and says which greeting follows. */
  private async connectVerdict(): Promise<{ code: number; text: string | readonly string[] }> {
    const cfg = this.gen.config;
    const connect = await this.runner.verdict('connect', this.base());
    const v = connect.verdict;
    // RFC 5321 §3.1/§4.3.2: the greeting is 220, 554 (no service; only QUIT follows) or 421,
    // whatever code a plugin chose; the log says what was sent.
    const greeting =
      v.kind === 'deny'
        ? { code: 554, text: v.reply.text }
        : v.kind === 'defer' || v.kind === 'disconnect'
          ? { code: 421, text: v.reply?.text ?? 'Closing connection' }
          : { code: 220, text: `${cfg.hostname} ${cfg.smtp.banner}` };
    this.logVerdict('connect', v, connect.plugin, { code: greeting.code });
    return greeting;
  }

  /** Sends the greeting; false when it closes the session (421). */
  private greet(greeting: { code: number; text: string | readonly string[] }): boolean {
    this.reply(greeting.code, null, greeting.text);
    if (greeting.code !== 220) this.gen.counters.connectionRefused(this.listener.name, 'policy');
    this.refusedAtConnect = greeting.code === 554;
    if (greeting.code === 421) this.closing = true;
    return greeting.code !== 421;
  }

  /**
   * A plugin declared another client (`changeClient`, e.g. XCLIENT): the session ends as the old
   * client and starts as the new one on the same connection. The old client's `disconnect`
   * hooks run, the notes are cleared, the identity is replaced (HELO/EHLO is forgotten unless
   * declared; TLS stays), the `connect` hooks run for the new client, and their greeting (220,
   * 554 or 421) is the reply to the command. Refused during a mail transaction, as Postfix does.
   */
  private async changeClient(change: ClientIdentity, plugin: string | null): Promise<void> {
    if (this.tx) {
      this.reply(503, '5.5.1', 'Not allowed during a mail transaction');
      return;
    }
    const before = this.who();
    await this.runner.notify('disconnect', this.base());
    if (change.address !== undefined || change.port !== undefined) {
      this.remote = Object.freeze({
        address: change.address ?? this.remote.address,
        port: change.port ?? this.remote.port,
      });
    }
    if (change.local) this.local = Object.freeze({ address: change.local.address, port: change.local.port });
    if (change.name !== undefined) this.remoteName = change.name;
    if (change.user !== undefined) this.user = change.user;
    this.helo = change.helo
      ? Object.freeze({ verb: change.helo.verb, hostname: change.helo.hostname })
      : null;
    this.notes = new Notes();
    this.gen.counters.clientChanges.inc();
    this.log.info(
      { plugin, from: before, to: this.who(), helo: this.helo?.hostname, user: this.user },
      'client identity changed',
    );
    this.greet(await this.connectVerdict());
  }

  /** Ends an idle session now, or the session's next wait (server shutdown). */
  interrupt(): void {
    const err = new ReadInterruptedError('shutdown');
    this.reader.interrupt(err);
    this.stopWaitingForRoom?.(err);
  }

  get inTransaction(): boolean {
    return this.tx !== null;
  }

  private async finish(): Promise<void> {
    this.flush();
    this.closing = true;
    if (!this.socket.destroyed) {
      this.socket.end();
      // Give the last reply a moment to leave, then make sure the socket is gone.
      setTimeout(() => this.socket.destroy(), 2000).unref();
    }
    this.reader.detach();
    if (this.tx) await this.endTransaction('aborted');
    await this.runner.notify('disconnect', this.base());
    this.log.info(
      {
        ...this.who(),
        helo: this.helo?.hostname,
        tls: this.tls?.protocol,
        user: this.user,
        messages: this.messages,
        last: this.lastReply.trim(),
        ms: Date.now() - this.startedAt.getTime(),
      },
      'connection closed',
    );
  }

  // ---------------------------------------------------------------- replies

  private reply(code: number, enhanced: string | null, text: string | readonly string[]): void {
    const r = formatReply(code, enhanced, text);
    this.gen.counters.reply(code);
    this.pending += r;
    this.lastReply = r;
  }

  private replySpec(spec: ReplySpec, enhancedOverride?: null): void {
    this.reply(spec.code, enhancedOverride === null ? null : spec.enhanced, spec.text);
  }

  private flush(): void {
    if (!this.pending) return;
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(this.pending);
    this.pending = '';
  }

  private stopWaitingForRoom: ((err: Error) => void) | null = null;

  /**
   * Sends what is pending and, while more than `REPLY_BOUND` octets of replies are still unsent,
   * waits for the socket to drain: the session reads no command meanwhile, so the reader pauses
   * the socket once its own buffer is full. A client that does not read its replies within
   * `timeouts.command` is cut off.
   */
  private async makeRoom(): Promise<void> {
    this.flush();
    const socket = this.socket;
    if (socket.writableLength <= REPLY_BOUND || socket.destroyed) return;
    const waited = Date.now();
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error): void => {
        clearTimeout(timer);
        socket.off('drain', onDrain);
        socket.off('close', onDrain);
        this.stopWaitingForRoom = null;
        if (err) reject(err);
        else resolve();
      };
      const onDrain = (): void => done();
      const timer = setTimeout(
        () =>
          done(
            new DeadlineError('replies', {
              unsent: socket.writableLength,
              ms: Date.now() - waited,
            }),
          ),
        this.gen.config.timeouts.command,
      );
      socket.on('drain', onDrain);
      // A closed socket never drains; the next read then sees the end.
      socket.on('close', onDrain);
      this.stopWaitingForRoom = done;
    });
  }

  /**
   * The next command line, within `timeouts.command` from now; between the chunks of a BDAT
   * message, also within the message's content deadline (the command lines are part of it).
   */
  private async readCommandLine(): Promise<LineResult | null> {
    const commandBy = Date.now() + this.gen.config.timeouts.command;
    const content = this.tx?.deadline ?? null;
    const contentBy = content ? content.at : Infinity;
    try {
      return await this.reader.readLine(this.limits.maxLineLength, Math.min(commandBy, contentBy));
    } catch (err) {
      if (!(err instanceof ReadTimeoutError)) throw err;
      throw content && contentBy <= commandBy
        ? new DeadlineError('content', content.describe())
        : new DeadlineError('command');
    }
  }

  /** Message content octets (up to `max`), by the content deadline, which they then extend. */
  private async readContent(deadline: ContentDeadline, max?: number): Promise<Buffer> {
    let chunk: Buffer | null;
    try {
      chunk =
        max === undefined
          ? await this.reader.read(deadline.at)
          : await this.reader.readUpTo(max, deadline.at);
    } catch (err) {
      if (err instanceof ReadTimeoutError) throw new DeadlineError('content', deadline.describe());
      throw err;
    }
    if (chunk === null) throw new ClientGoneError();
    deadline.add(chunk.length);
    return chunk;
  }

  private newContentDeadline(): ContentDeadline {
    const t = this.gen.config.timeouts;
    return new ContentDeadline(t.data, t.minDataRate);
  }

  /** Counts an error; true when the session has had too many and was told so. */
  private countError(): boolean {
    this.unknownCommands++;
    if (this.unknownCommands < this.limits.maxUnknownCommands) return false;
    this.reply(421, '4.7.0', `${this.gen.config.hostname} Too many errors, closing connection`);
    this.closing = true;
    return true;
  }

  /** Replies with a verdict that refused something; true when it also closes the session. */
  private replyRefusal(v: Verdict): boolean {
    if (v.kind === 'deny' || v.kind === 'defer') {
      this.replySpec(v.reply);
      return false;
    }
    if (v.kind === 'disconnect') {
      this.replySpec(v.reply ?? { code: 421, enhanced: '4.7.0', text: 'Closing connection' });
      this.closing = true;
      return true;
    }
    return false;
  }

  /** A message refused by a plugin at or after DATA, for `petrel_messages_refused_total`. */
  private countRefusal(hook: string, outcome: VerdictOutcome): void {
    this.gen.counters.messageRefused(hook, outcome.plugin, outcome.failed ? 'failed' : outcome.verdict.kind);
  }

  private logVerdict(
    hook: string,
    v: Verdict,
    plugin: string | null,
    extra: Record<string, unknown> = {},
  ): void {
    if (v.kind === 'proceed') return;
    // `extra` may name the code actually sent where the engine overrides the plugin's.
    const fields = {
      hook,
      plugin,
      verdict: v.kind,
      ...('reply' in v && v.reply ? { code: v.reply.code } : {}),
      ...extra,
    };
    this.log.info(fields, 'verdict');
  }

  // ---------------------------------------------------------------- dispatch

  private base(): CallContext<'connect'> {
    return { session: this.view };
  }

  private async command(line: Buffer): Promise<void> {
    if (line.includes(0)) {
      this.reply(500, '5.5.2', 'NUL bytes are not allowed in commands');
      this.countError();
      return;
    }
    let text: string;
    try {
      text = utf8Decoder.decode(line);
    } catch {
      this.reply(500, '5.5.2', 'Invalid octets in command (not UTF-8)');
      this.countError();
      return;
    }
    const sp = text.indexOf(' ');
    const verb = (sp < 0 ? text : text.slice(0, sp)).toUpperCase();
    this.gen.counters.command(verb);
    const args = sp < 0 ? '' : text.slice(sp + 1);
    const nonAscii = /[^\x00-\x7f]/.test(text);
    // RFC 6531: UTF-8 in commands only in MAIL/RCPT of a transaction that uses SMTPUTF8.
    if (nonAscii && verb !== 'MAIL' && verb !== 'RCPT') {
      this.reply(500, '5.5.2', '8-bit characters are not allowed in this command');
      this.countError();
      return;
    }
    if (this.refusedAtConnect && verb !== 'QUIT') {
      this.reply(503, '5.5.1', 'Connection refused; only QUIT is allowed');
      return;
    }
    switch (verb) {
      case 'HELO':
      case 'EHLO':
        return this.cmdHelo(verb, args);
      case 'MAIL':
        return this.cmdMail(args);
      case 'RCPT':
        return this.cmdRcpt(args);
      case 'DATA':
        return this.cmdData(args);
      case 'BDAT':
        return this.cmdBdat(args);
      case 'RSET':
        if (args.trim()) return this.reply(501, '5.5.4', 'RSET takes no arguments');
        if (this.tx) await this.endTransaction('aborted');
        return this.reply(250, '2.0.0', 'OK');
      case 'NOOP':
        return this.reply(250, '2.0.0', 'OK');
      case 'QUIT':
        this.reply(221, '2.0.0', `${this.gen.config.hostname} Bye`);
        this.closing = true;
        return;
      case 'VRFY':
        // RFC 5321 §3.5.3: 252 when we will not verify but will accept mail for the address.
        if (!args.trim()) return this.reply(501, '5.5.4', 'VRFY needs an address');
        return this.reply(252, '2.5.0', 'Cannot VRFY user, but will accept message and attempt delivery');
      case 'HELP':
        return this.reply(214, '2.0.0', HELP_TEXT);
      case 'STARTTLS':
        return this.cmdStartTls(args);
      case 'AUTH':
        return this.cmdAuth(args);
      default:
        return this.cmdUnknown(verb, args);
    }
  }

  private async cmdUnknown(verb: string, args: string): Promise<void> {
    if (HTTP_VERBS.has(verb) && /HTTP\/\d/.test(args)) {
      // A browser or proxy attack (cross-protocol): no point in talking.
      this.reply(554, '5.7.0', 'This is an SMTP server');
      this.closing = true;
      return;
    }
    let change: ClientIdentity | null = null;
    const { verdict, plugin } = await this.runner.verdict('unrecognized_command', {
      session: this.view,
      verb,
      args,
      changeClient: (identity) => {
        change = checkIdentity(identity);
      },
    });
    this.logVerdict('unrecognized_command', verdict, plugin, { verb });
    if (verdict.kind === 'accept' && change) return this.changeClient(change, plugin);
    if (verdict.kind === 'accept') {
      const r = verdict.reply;
      this.reply(r?.code ?? 250, r?.enhanced ?? '2.0.0', r?.text ?? 'OK');
      return;
    }
    if (this.replyRefusal(verdict)) return;
    if (verdict.kind !== 'proceed') return;
    if (NOT_IMPLEMENTED.has(verb)) {
      this.reply(502, '5.5.1', `${verb} not implemented`);
      return;
    }
    this.reply(500, '5.5.1', 'Command unrecognized');
    this.countError();
  }

  // ---------------------------------------------------------------- HELO / EHLO

  private async cmdHelo(verb: 'HELO' | 'EHLO', args: string): Promise<void> {
    const hostname = args.trim();
    if (!hostname || /\s/.test(hostname)) {
      this.reply(501, '5.5.4', `Syntax: ${verb} hostname`);
      return;
    }
    // RFC 5321 §4.1.4: HELO/EHLO resets the transaction.
    if (this.tx) await this.endTransaction('aborted');
    const { verdict, plugin } = await this.runner.verdict('helo', { session: this.view, verb, hostname });
    this.logVerdict('helo', verdict, plugin, { hostname });
    if (this.replyRefusal(verdict) || verdict.kind === 'deny' || verdict.kind === 'defer') {
      this.helo = null;
      return;
    }
    this.helo = { verb, hostname };
    const cfg = this.gen.config;
    const greeting = `${cfg.hostname} Hello ${hostname} [${this.remote.address}]`;
    if (verb === 'HELO') {
      this.reply(250, null, greeting);
      return;
    }
    const words = [
      'PIPELINING',
      '8BITMIME',
      'SMTPUTF8',
      `SIZE ${this.limits.maxMessageSize}`,
      'ENHANCEDSTATUSCODES',
      'DSN',
      'CHUNKING',
    ];
    if (this.gen.tls && !this.tls) words.push('STARTTLS');
    if (this.authOffered()) words.push('AUTH PLAIN LOGIN SCRAM-SHA-256');
    words.push(...(await this.runner.capabilities({ session: this.view })));
    this.reply(250, null, [greeting, ...words]);
  }

  private authOffered(): boolean {
    return (
      this.runner.has('auth') && !this.user && (this.tls !== null || this.listenerConfig.allowInsecureAuth)
    );
  }

  // ---------------------------------------------------------------- MAIL / RCPT

  private async cmdMail(args: string): Promise<void> {
    if (!this.helo) return this.reply(503, '5.5.1', 'Send HELO/EHLO first');
    if (this.tx) return this.reply(503, '5.5.1', 'Sender already specified');
    if (this.listener.kind !== 'smtp' && !this.user) {
      return this.reply(530, '5.7.0', 'Authentication required');
    }
    const m = /^FROM:/i.exec(args);
    if (!m) return this.reply(501, '5.5.4', 'Syntax: MAIL FROM:<address>');
    const path = parsePath(args.slice(5), { utf8: true, allowNull: true, allowPostmaster: false });
    if (!path.ok) {
      return path.reason === 'length'
        ? this.reply(501, '5.1.7', 'Sender address too long')
        : this.reply(501, '5.1.7', 'Bad sender address syntax');
    }
    if (path.rest && this.helo.verb === 'HELO') {
      return this.reply(555, '5.5.4', 'MAIL parameters need EHLO');
    }
    const params = parseMailParams(path.rest, { maxSize: this.limits.maxMessageSize, utf8Offered: true });
    if (!params.ok) return this.reply(params.code, params.enhanced, params.text);
    if (path.address?.utf8 && !params.value.smtputf8) {
      return this.reply(553, '5.6.7', 'Non-ASCII sender address needs SMTPUTF8');
    }
    const tx = new Transaction(path.address, params.value);
    const { verdict, plugin } = await this.runner.verdict('mail', {
      session: this.view,
      transaction: tx.view,
      sender: path.address,
      params: params.value,
    });
    this.logVerdict('mail', verdict, plugin, { tx: tx.id, from: path.address?.address ?? '<>' });
    if (verdict.kind === 'accept' || verdict.kind === 'proceed') {
      this.tx = tx;
      const r = verdict.kind === 'accept' ? verdict.reply : undefined;
      this.reply(r?.code ?? 250, r?.enhanced ?? '2.1.0', r?.text ?? 'Sender OK');
      return;
    }
    this.replyRefusal(verdict);
  }

  private async cmdRcpt(args: string): Promise<void> {
    const tx = this.tx;
    if (!tx) return this.reply(503, '5.5.1', 'Need MAIL before RCPT');
    if (tx.dataStarted) return this.reply(503, '5.5.1', 'RCPT not allowed during message transfer');
    const m = /^TO:/i.exec(args);
    if (!m) return this.reply(501, '5.5.4', 'Syntax: RCPT TO:<address>');
    if (tx.recipients.length >= this.limits.maxRecipients) {
      return this.reply(452, '4.5.3', 'Too many recipients');
    }
    const path = parsePath(args.slice(3), {
      utf8: tx.mailParams.smtputf8,
      allowNull: false,
      allowPostmaster: true,
    });
    if (!path.ok) {
      if (path.reason === 'utf8')
        return this.reply(553, '5.6.7', 'Non-ASCII recipient address needs SMTPUTF8');
      return this.reply(
        501,
        '5.1.3',
        path.reason === 'length' ? 'Recipient address too long' : 'Bad recipient address syntax',
      );
    }
    let recipient = path.address!;
    if (recipient.domain === '') {
      // RFC 5321 §4.5.1: `<postmaster>` without a domain must be accepted.
      const home = homePostmaster(this.gen.config.localDomains);
      if (!home) {
        this.log.warn({ tx: tx.id }, 'RCPT TO:<postmaster> refused: localDomains is empty');
        return this.reply(550, '5.1.1', 'No local postmaster mailbox here');
      }
      recipient = home;
    }
    const params = parseRcptParams(path.rest);
    if (!params.ok) return this.reply(params.code, params.enhanced, params.text);
    const { verdict, plugin } = await this.runner.verdict('rcpt', {
      session: this.view,
      transaction: tx.view,
      recipient,
      params: params.value,
    });
    this.logVerdict('rcpt', verdict, plugin, { tx: tx.id, to: recipient.address });
    if (verdict.kind === 'accept') {
      tx.addRecipient({ address: recipient, params: params.value satisfies RecipientParams });
      const r = verdict.reply;
      this.reply(r?.code ?? 250, r?.enhanced ?? '2.1.5', r?.text ?? 'Recipient OK');
      return;
    }
    if (verdict.kind === 'proceed') {
      // Nothing is accepted that no one owns: a recipient no plugin took is refused.
      this.reply(550, '5.7.1', 'Recipient not accepted here');
      return;
    }
    this.replyRefusal(verdict);
  }

  // ---------------------------------------------------------------- DATA / BDAT

  /** Checks shared by DATA and the first BDAT; returns false (after replying) when not allowed. */
  private async startContent(tx: Transaction | null): Promise<boolean> {
    if (!tx) {
      this.reply(503, '5.5.1', 'Need MAIL command');
      return false;
    }
    if (tx.recipients.length === 0) {
      this.reply(554, '5.5.1', 'No valid recipients');
      return false;
    }
    const outcome = await this.runner.verdict('data', {
      session: this.view,
      transaction: tx.view,
    });
    const { verdict, plugin } = outcome;
    this.logVerdict('data', verdict, plugin, { tx: tx.id });
    if (verdict.kind !== 'accept' && verdict.kind !== 'proceed') {
      this.countRefusal('data', outcome);
      this.replyRefusal(verdict);
      return false;
    }
    tx.dataStarted = true;
    tx.body = this.gen.spool.createBody(tx.id);
    tx.content = new ContentReceiver({
      dotStuffed: !tx.usedBdat,
      normalize: this.gen.config.smtp.bareLineEndings === 'normalize',
      stripNul: this.gen.config.smtp.nul === 'strip',
    });
    tx.capture = new HeaderCapture(this.limits.maxHeaderBytes);
    tx.deadline = this.newContentDeadline();
    return true;
  }

  /** Stores content octets, enforcing the size limit; writes wait for the disk (back-pressure). */
  private async store(tx: Transaction, chunks: readonly Buffer[]): Promise<void> {
    for (const c of chunks) {
      if (tx.tooBig || tx.storageError) return;
      if (tx.body!.size + c.length > this.limits.maxMessageSize) {
        tx.tooBig = true;
        await tx.body!.discard();
        return;
      }
      tx.capture!.add(c);
      try {
        const wait = tx.body!.write(c);
        if (wait) await wait;
      } catch (err) {
        tx.storageError = err as Error;
        this.log.error({ err, tx: tx.id }, 'could not spool message content');
        await tx.body!.discard();
      }
    }
  }

  private async cmdData(args: string): Promise<void> {
    if (args.trim()) return this.reply(501, '5.5.4', 'DATA takes no arguments');
    const tx = this.tx;
    if (tx?.usedBdat) return this.reply(503, '5.5.1', 'DATA not allowed after BDAT');
    if (!tx || !(await this.startContent(tx))) {
      if (!tx) this.reply(503, '5.5.1', 'Need MAIL command');
      return;
    }
    this.reply(354, null, 'End data with <CR><LF>.<CR><LF>');
    this.flush();
    const deadline = tx.deadline!;
    for (;;) {
      const chunk = await this.readContent(deadline);
      const { out, done, rest } = tx.content!.feed(chunk);
      await this.store(tx!, out);
      if (done) {
        if (rest) this.reader.unshift(rest);
        break;
      }
    }
    await this.finishContent(tx);
  }

  private async cmdBdat(args: string): Promise<void> {
    const m = /^(\d{1,15})(?: +(LAST))?\s*$/i.exec(args);
    if (!m) {
      // Without a valid size the chunk cannot be skipped, so the stream cannot be resynchronised.
      this.reply(501, '5.5.4', 'Syntax: BDAT size [LAST]');
      this.closing = true;
      return;
    }
    const size = Number(m[1]);
    const last = m[2] !== undefined;
    let tx = this.tx;
    let ok = true;
    if (tx?.bdatFailed) {
      ok = false;
      this.reply(503, '5.5.1', 'Previous BDAT failed; send RSET');
    } else if (tx && tx.dataStarted && !tx.usedBdat) {
      ok = false;
      this.reply(503, '5.5.1', 'BDAT not allowed after DATA');
    } else if (!tx?.dataStarted) {
      if (tx) tx.usedBdat = true;
      ok = await this.startContent(tx);
      if (!ok && tx) tx.bdatFailed = true;
      tx = this.tx;
    }
    // RFC 3030 §2: the chunk's octets follow the command whatever the reply; read them all, by
    // the message's content deadline (a chunk outside a message gets one of its own).
    const deadline = (ok && tx?.deadline) || this.newContentDeadline();
    let remaining = size;
    while (remaining > 0) {
      const chunk = await this.readContent(deadline, remaining);
      remaining -= chunk.length;
      if (ok && tx) await this.store(tx, tx.content!.feed(chunk).out);
    }
    if (!ok || !tx) return;
    if (!last && (tx.tooBig || tx.storageError)) {
      // The message has failed: its content phase (and deadline) is over; RSET comes next.
      tx.bdatFailed = true;
      tx.deadline = null;
      this.gen.counters.messageRefusedByCore(tx.tooBig ? 'size' : 'storage');
      return tx.tooBig
        ? this.reply(552, '5.3.4', 'Message size exceeds fixed maximum message size')
        : this.reply(452, '4.3.1', 'Insufficient system storage');
    }
    if (!last) {
      this.reply(250, '2.0.0', `${size} octets received`);
      return;
    }
    await this.finishContent(tx);
  }

  private async finishContent(tx: Transaction): Promise<void> {
    const body = tx.body!;
    tx.deadline = null;
    // A CR still waiting for its LF is bare (the last octet of a BDAT message), as in DATA.
    await this.store(tx, tx.content!.end());
    if (tx.tooBig) {
      this.gen.counters.messageRefusedByCore('size');
      this.reply(552, '5.3.4', 'Message size exceeds fixed maximum message size');
      return this.endTransaction('rejected');
    }
    if (!tx.storageError) {
      try {
        await body.end();
      } catch (err) {
        tx.storageError = err as Error;
        this.log.error({ err, tx: tx.id }, 'could not spool message content');
      }
    }
    if (tx.storageError) {
      this.gen.counters.messageRefusedByCore('storage');
      this.reply(452, '4.3.1', 'Insufficient system storage');
      return this.endTransaction('rejected');
    }
    if (tx.content!.bareLineEnding && this.gen.config.smtp.bareLineEndings === 'reject') {
      // RFC 5321 §2.3.8: CR and LF only as CRLF. Refusing closes the SMTP smuggling hole.
      this.gen.counters.messageRefusedByCore('bare_line_ending');
      this.log.info({ tx: tx.id }, 'refused message with bare LF or CR');
      this.reply(554, '5.6.0', 'Message contains bare LF or CR; lines must end with CRLF');
      return this.endTransaction('rejected');
    }
    if (tx.content!.nul && this.gen.config.smtp.nul === 'reject') {
      // RFC 5321 §2.3.8 text lines, and 8BITMIME content (RFC 6152 §2), have no NUL; relayed
      // unchanged, it would reach software that ends a string at the first NUL.
      this.gen.counters.messageRefusedByCore('nul');
      this.log.info({ tx: tx.id }, 'refused message with NUL octets');
      this.reply(554, '5.6.0', 'Message contains NUL octets, which SMTP does not allow');
      return this.endTransaction('rejected');
    }
    const message = new ReceivedMessage(tx.capture!.bytes(), body, {
      scratch: () => this.gen.spool.createBody(`${tx.id}.body-${newId()}`),
      maxBodySize: this.limits.maxMessageSize,
    });
    tx.message = message;
    message.prepend(
      'Received',
      receivedValue({
        session: this.view,
        hostname: this.gen.config.hostname,
        id: tx.id,
        utf8: tx.mailParams.smtputf8,
        recipients: tx.recipients.map((r) => r.address.address),
        date: this.gen.clock.now(),
      }),
    );
    const post = await this.runner.verdict('data_post', {
      session: this.view,
      transaction: tx.view,
      message,
      prependHeader: (name, value) => message.prepend(name, value),
      removeHeaders: (match) => message.removeHeaders(match),
      replaceBody: () => message.replaceBody(),
      ...envelopeEdits(tx, {
        maxRecipients: this.limits.maxRecipients,
        localDomains: this.gen.config.localDomains,
      }),
    });
    this.logVerdict('data_post', post.verdict, post.plugin, { tx: tx.id });
    if (post.verdict.kind !== 'accept' && post.verdict.kind !== 'proceed') {
      this.countRefusal('data_post', post);
      this.replyRefusal(post.verdict);
      return this.endTransaction('rejected');
    }
    if (tx.recipients.length === 0) {
      // A data_post hook removed every recipient: nothing is stored that no one would receive.
      this.log.info({ tx: tx.id }, 'message refused: data_post left it no recipient');
      this.reply(554, '5.5.1', 'No valid recipients');
      return this.endTransaction('rejected');
    }
    const queued = await this.runner.verdict('queue', { session: this.view, transaction: tx.view, message });
    if (queued.verdict.kind === 'accept') {
      const r = queued.verdict.reply;
      this.reply(r?.code ?? 250, r?.enhanced ?? '2.0.0', r?.text ?? `Ok: queued as ${tx.id}`);
      this.messages++;
      this.listenerCells.accepted.inc();
      this.log.info(
        {
          tx: tx.id,
          from: tx.sender?.address ?? '<>',
          rcpts: tx.recipients.length,
          size: message.size,
          queue: queued.plugin,
        },
        'message accepted',
      );
      return this.endTransaction('queued');
    }
    if (queued.verdict.kind === 'proceed') {
      this.gen.counters.messageRefusedByCore('not_queued');
      this.log.warn({ tx: tx.id }, 'no plugin accepted the message at queue');
      this.reply(451, '4.3.0', 'Message not queued, please try again later');
    } else {
      this.logVerdict('queue', queued.verdict, queued.plugin, { tx: tx.id });
      this.countRefusal('queue', queued);
      this.replyRefusal(queued.verdict);
    }
    return this.endTransaction('rejected');
  }

  private async endTransaction(outcome: 'queued' | 'rejected' | 'aborted'): Promise<void> {
    const tx = this.tx;
    if (!tx) return;
    this.tx = null;
    try {
      await this.runner.notify('reset', { session: this.view, transaction: tx.view, outcome });
    } finally {
      // The queue owner has its own durable copy (or moved the file); the rest belongs to no one.
      await tx.message
        ?.release()
        .catch((err: unknown) => this.log.warn({ err }, 'could not remove spool file'));
      await tx.body?.discard().catch((err: unknown) => this.log.warn({ err }, 'could not remove spool file'));
    }
  }

  // ---------------------------------------------------------------- STARTTLS / AUTH

  private async cmdStartTls(args: string): Promise<void> {
    if (args.trim()) return this.reply(501, '5.5.4', 'STARTTLS takes no arguments');
    if (this.tls) return this.reply(503, '5.5.1', 'TLS already active');
    if (!this.gen.tls) return this.reply(454, '4.7.0', 'TLS not available');
    if (this.tx) await this.endTransaction('aborted');
    this.reply(220, '2.0.0', 'Ready to start TLS');
    this.flush();
    // RFC 3207 §4.2 / CVE-2011-0411: anything the client pipelined after STARTTLS was sent in
    // plain text and must not be executed inside the TLS session.
    this.reader.discard();
    if (!(await this.upgradeTls())) {
      this.closing = true;
      return;
    }
    // RFC 3207 §4.2: forget everything learnt before TLS.
    this.helo = null;
    this.user = null;
  }

  /** Wraps the socket in TLS; false (after logging) when the handshake failed. */
  private async upgradeTls(): Promise<boolean> {
    const contexts = this.gen.tls;
    if (!contexts) {
      this.log.error('implicit-TLS listener without tls config');
      return false;
    }
    this.reader.detach();
    const secure = new TLSSocket(this.raw, {
      isServer: true,
      secureContext: contexts.default,
      SNICallback: (name, cb) => cb(null, contexts.byName(name)),
    });
    const ok = await new Promise<boolean>((resolve) => {
      const done = (result: boolean): void => {
        clearTimeout(timer);
        secure.off('secure', onSecure);
        secure.off('error', onError);
        secure.off('close', onClose);
        resolve(result);
      };
      const onSecure = (): void => done(true);
      const onError = (err: Error): void => {
        this.log.info({ err: err.message }, 'TLS handshake failed');
        done(false);
      };
      const onClose = (): void => done(false);
      // One deadline for the whole handshake, however slowly its records arrive.
      const timer = setTimeout(() => {
        this.gen.counters.timeouts.inc();
        this.log.info({ deadline: 'tls' }, 'deadline passed, closing connection');
        done(false);
      }, this.gen.config.timeouts.command);
      secure.once('secure', onSecure);
      secure.once('error', onError);
      secure.once('close', onClose);
    });
    secure.on('error', () => undefined);
    this.socket = secure;
    if (!ok) {
      this.gen.counters.tlsHandshake('failed', 'unknown');
      secure.destroy();
      return false;
    }
    const cipher = secure.getCipher();
    const servername = (secure as TLSSocket & { servername?: string | false }).servername;
    this.gen.counters.tlsHandshake('ok', secure.getProtocol() ?? 'unknown');
    this.tls = {
      protocol: secure.getProtocol() ?? 'TLS',
      cipher: cipher?.standardName ?? cipher?.name ?? 'unknown',
      ...(servername ? { servername } : {}),
    };
    this.reader.attach(secure);
    return true;
  }

  private async cmdAuth(args: string): Promise<void> {
    if (!this.runner.has('auth')) return this.reply(502, '5.5.1', 'AUTH not available');
    if (!this.tls && !this.listenerConfig.allowInsecureAuth) {
      return this.reply(538, '5.7.11', 'Encryption required for requested authentication mechanism');
    }
    if (!this.helo) return this.reply(503, '5.5.1', 'Send EHLO first');
    if (this.user) return this.reply(503, '5.5.1', 'Already authenticated');
    if (this.tx) return this.reply(503, '5.5.1', 'AUTH not allowed during a mail transaction');
    const [mech = '', initial] = args.trim().split(/ +/);
    const mechanism = mech.toUpperCase();
    if (mechanism === 'SCRAM-SHA-256') return this.authScram(initial);
    if (mechanism !== 'PLAIN' && mechanism !== 'LOGIN') {
      return this.reply(504, '5.5.4', 'Unrecognized authentication type');
    }
    let username: string;
    let password: string;
    let authzid = '';
    if (mechanism === 'PLAIN') {
      const response = initial ?? (await this.saslPrompt(''));
      if (response === null) return;
      const decoded = decodeBase64(response);
      const parts = decoded?.split('\0');
      if (!parts || parts.length !== 3) return this.reply(501, '5.5.2', 'Invalid AUTH PLAIN response');
      [authzid, username, password] = parts as [string, string, string];
    } else {
      const u = initial ?? (await this.saslPrompt('VXNlcm5hbWU6'));
      if (u === null) return;
      const user = decodeBase64(u);
      if (user === null) return this.reply(501, '5.5.2', 'Invalid base64');
      const p = await this.saslPrompt('UGFzc3dvcmQ6');
      if (p === null) return;
      const pass = decodeBase64(p);
      if (pass === null) return this.reply(501, '5.5.2', 'Invalid base64');
      username = user;
      password = pass;
    }
    const { verdict, plugin } = await this.runner.verdict('auth', {
      session: this.view,
      mechanism,
      username,
      password,
      authzid,
    });
    this.logVerdict('auth', verdict, plugin, { mechanism, username });
    if (verdict.kind === 'accept') return this.authenticated(username);
    this.authFailed(verdict);
  }

  private authenticated(username: string): void {
    this.user = username;
    this.gen.counters.authSuccess.inc();
    this.reply(235, '2.7.0', 'Authentication successful');
  }

  /**
   * AUTH SCRAM-SHA-256 (RFC 7677): the client's first message here, the rest inside the `auth`
   * hook, which calls `scram.verify` with the user's stored credentials. A hook that accepts
   * without a verified proof is refused: there would be no server signature to send.
   */
  private async authScram(initial: string | undefined): Promise<void> {
    const mechanism = 'SCRAM-SHA-256';
    const response = initial ?? (await this.saslPrompt(''));
    if (response === null) return;
    const text = decodeBase64(response);
    const first = text === null ? 'invalid base64' : parseClientFirst(text);
    if (typeof first === 'string') return this.reply(501, '5.5.2', `Invalid SCRAM-SHA-256 message: ${first}`);
    // Set by verify(), which the hook calls: a holder, since the compiler cannot see the closure run.
    // `read` is the client's final message; the session waits for it after the hook too, so that
    // a hook that timed out meanwhile never leaves a read pending beside the command loop's, and
    // a client gone or a deadline passed during it ends the session as anywhere else.
    const state: { read: Promise<string | null> | null; signature: Buffer | null } = {
      read: null,
      signature: null,
    };
    const scram: ScramExchange = {
      verify: async (credentials) => {
        if (state.read) throw new Error('scram.verify may be called once');
        const server = serverFirst(first, credentials);
        state.read = this.saslPrompt(Buffer.from(server.message).toString('base64'));
        const final = await state.read;
        if (final === null) return false; // cancelled, or a line too long: answered already
        const finalText = decodeBase64(final);
        state.signature = finalText === null ? null : checkClientFinal(finalText, first, server, credentials);
        return state.signature !== null;
      },
    };
    const { username, authzid } = first;
    const { verdict, plugin } = await this.runner.verdict('auth', {
      session: this.view,
      mechanism,
      username,
      authzid,
      scram,
    });
    this.logVerdict('auth', verdict, plugin, { mechanism, username });
    if (state.read && (await state.read) === null) return void this.gen.counters.authFailure.inc();
    const proven = state.signature;
    if (verdict.kind === 'accept' && proven) {
      // RFC 4954 §4: additional data with success goes in a 334 challenge, answered by an empty line.
      const ack = await this.saslPrompt(Buffer.from(`v=${proven.toString('base64')}`).toString('base64'));
      if (ack === null) return void this.gen.counters.authFailure.inc();
      if (ack !== '' && ack !== '=') return this.reply(501, '5.5.2', 'Expected an empty response');
      return this.authenticated(username);
    }
    if (verdict.kind === 'accept') {
      this.log.error(
        { plugin, mechanism },
        'auth hook accepted SCRAM-SHA-256 without a verified proof; refused',
      );
      return this.authFailed(deny(535, '5.7.8', 'Authentication credentials invalid'));
    }
    this.authFailed(verdict);
  }

  private authFailed(verdict: Verdict): void {
    this.gen.counters.authFailure.inc();
    this.authFailures++;
    if (verdict.kind === 'proceed') this.reply(535, '5.7.8', 'Authentication credentials invalid');
    else this.replyRefusal(verdict);
    if (this.authFailures >= this.limits.maxAuthFailures && !this.closing) {
      this.reply(421, '4.7.0', `${this.gen.config.hostname} Too many failed authentication attempts`);
      this.closing = true;
    }
  }

  /** Sends a 334 challenge and reads the response line; null when the client cancelled. */
  private async saslPrompt(challenge: string): Promise<string | null> {
    this.reply(334, null, challenge);
    this.flush();
    const res = await this.readCommandLine();
    if (res === null) throw new ClientGoneError();
    if (res.overlong) {
      this.reply(500, '5.5.2', 'Line too long');
      return null;
    }
    const line = res.line.toString('latin1').trim();
    if (line === '*') {
      this.reply(501, '5.0.0', 'Authentication cancelled');
      return null;
    }
    return line;
  }
}

/**
 * Validates what a plugin passed to `changeClient` at the call, so a mistake is that plugin's
 * failure (the runner logs it and answers `451 4.3.0`), not a session with a bad identity.
 */
function checkIdentity(c: ClientIdentity): ClientIdentity {
  const endpoint = (e: { address?: string; port?: number }, what: string): void => {
    if (e.address !== undefined && isIP(e.address) === 0)
      throw new TypeError(`changeClient: ${what} address is not an IP address`);
    if (e.port !== undefined && !(Number.isInteger(e.port) && e.port >= 0 && e.port <= 65535))
      throw new TypeError(`changeClient: ${what} port is not a number from 0 to 65535`);
  };
  endpoint(c, 'client');
  if (c.local) endpoint(c.local, 'local');
  if (c.local && (c.local.address === undefined || c.local.port === undefined))
    throw new TypeError('changeClient: local needs an address and a port');
  if (c.helo && (!c.helo.hostname || /\s/.test(c.helo.hostname) || !['HELO', 'EHLO'].includes(c.helo.verb)))
    throw new TypeError('changeClient: helo needs the verb HELO or EHLO and a host name without spaces');
  return Object.freeze({ ...c });
}

function decodeBase64(s: string): string | null {
  if (s === '=') return '';
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4 !== 0) return null;
  return Buffer.from(s, 'base64').toString('utf8');
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
