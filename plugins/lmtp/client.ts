/**
 * A small LMTP client (RFC 2033): one transaction per connection, PIPELINING when offered, the
 * message dot-stuffed and written in large chunks, one reply per accepted recipient after the dot.
 */
import { connect, type Socket } from 'node:net';
import { addAbortSignal, type Readable } from 'node:stream';
import {
  dotStuffed,
  MalformedReplyError,
  readReply,
  SocketReader,
  writeDrained,
  type WireReply,
  type Address,
  type MailParams,
  type PeerCapabilities,
} from '../../core/index.js';

export type Destination = { readonly host: string; readonly port: number } | { readonly path: string };

export interface LmtpTimeouts {
  /** Establishing the connection. */
  readonly connect: number;
  /** Each reply to the greeting, LHLO, MAIL, RCPT, DATA and QUIT. */
  readonly command: number;
  /** Each wait for the server to take more of the message. */
  readonly data: number;
  /** Each reply after the final dot (the server delivers before it answers). */
  readonly final: number;
}

/** A reply: its code, RFC 3463 code (`<class>.0.0` when none was given) and lines of text. */
export type LmtpReply = WireReply;

export interface LmtpRequest {
  readonly destination: Destination;
  /** The name given in LHLO. */
  readonly lhlo: string;
  readonly timeouts: LmtpTimeouts;
  readonly signal: AbortSignal;
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  readonly size: number;
  readonly recipients: readonly Address[];
  /**
   * The message to send (CRLF lines), made once the server's capabilities are known and before
   * MAIL, so that a failure to make it (the transform chain) costs no half-sent transaction.
   * Streamed, dot-stuffed on the way; the client destroys it when the transaction ends.
   */
  readonly content: (peer: PeerCapabilities) => Readable | Promise<Readable>;
}

export interface LmtpOutcome {
  /** Per recipient, in order: the reply that decides it, or null when nothing did. */
  readonly replies: readonly (LmtpReply | null)[];
  /** What stopped the transaction early (connection, time limit, protocol), if anything did. */
  readonly error: Error | null;
  /** Whether a connection was made at all. */
  readonly connected: boolean;
}

/** `host:port` or `unix:<path>`, for route keys and logs. */
export function describeDestination(d: Destination): string {
  return 'path' in d ? `unix:${d.path}` : `${d.host.includes(':') ? `[${d.host}]` : d.host}:${d.port}`;
}

export class LmtpProtocolError extends Error {
  override readonly name = 'LmtpProtocolError';
}

/** One connection to an LMTP server. */
class Connection {
  private readonly reader = new SocketReader();
  private lastError: Error | null = null;

  private constructor(
    private readonly socket: Socket,
    private readonly signal: AbortSignal,
  ) {
    this.reader.attach(socket);
    socket.on('error', (err) => (this.lastError = err));
    signal.addEventListener('abort', this.abort, { once: true });
  }

  /** The hook's time is up: a pending read or write fails at once. */
  private readonly abort = (): void => {
    this.reader.interrupt(this.gone());
    this.socket.destroy();
  };

  static open(destination: Destination, timeoutMs: number, signal: AbortSignal): Promise<Connection> {
    return new Promise((resolve, reject) => {
      signal.throwIfAborted();
      const socket = connect('path' in destination ? { path: destination.path } : destination);
      const fail = (err: Error): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        socket.destroy();
        reject(err);
      };
      const onAbort = (): void => fail(signal.reason as Error);
      const timer = setTimeout(() => fail(new Error(`connect timed out after ${timeoutMs} ms`)), timeoutMs);
      signal.addEventListener('abort', onAbort, { once: true });
      socket.once('error', fail);
      socket.once('connect', () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        socket.off('error', fail);
        // Commands and chunks go out as written: no Nagle delay waiting for the next write.
        socket.setNoDelay(true);
        resolve(new Connection(socket, signal));
      });
    });
  }

  /** Reads one reply (all its lines), within `timeoutMs` for the whole of it. */
  async reply(timeoutMs: number): Promise<LmtpReply> {
    let reply: LmtpReply | null;
    try {
      reply = await readReply(this.reader, Date.now() + timeoutMs);
    } catch (err) {
      if (err instanceof MalformedReplyError) throw new LmtpProtocolError(`the server sent ${err.message}`);
      throw err;
    }
    if (reply === null) throw this.gone();
    return reply;
  }

  /** Writes and, when the socket's buffer is full, waits (bounded) until it drains. */
  async write(data: string | Buffer, timeoutMs: number): Promise<void> {
    const result = await writeDrained(this.socket, data, timeoutMs);
    if (result === 'closed') throw this.gone();
    if (result === 'timeout') throw new Error(`sending timed out after ${timeoutMs} ms`);
  }

  /** Why the connection is gone: the hook's time ran out, a socket error, or the server hung up. */
  private gone(): Error {
    if (this.signal.aborted) return this.signal.reason as Error;
    return this.lastError ?? new Error('the LMTP server closed the connection');
  }

  close(): void {
    this.signal.removeEventListener('abort', this.abort);
    this.reader.detach();
    this.socket.destroy();
  }
}

/** Keywords of an LHLO reply, upper-cased, without their parameters. */
function keywords(reply: LmtpReply): Set<string> {
  return new Set(reply.lines.slice(1).map((l) => l.split(' ')[0]!.toUpperCase()));
}

function unexpected(stage: string, reply: LmtpReply): LmtpProtocolError {
  return new LmtpProtocolError(`${stage} answered ${reply.code} ${reply.lines.join(' / ')}`);
}

/**
 * What we say for the server when it cannot take a UTF-8 address (RFC 6531 §3.2). Our decision,
 * not the server's reply: the one reply in an outcome that the server did not send.
 */
export const NO_SMTPUTF8: LmtpReply = {
  code: 553,
  enhanced: '5.6.7',
  lines: ['The LMTP server does not support SMTPUTF8 (non-ASCII address)'],
};

/**
 * Runs one LMTP transaction for all recipients. Never throws: what went wrong is in `error`, and
 * a recipient nothing decided has a null reply.
 */
export async function lmtpTransaction(req: LmtpRequest): Promise<LmtpOutcome> {
  const { timeouts } = req;
  const replies: (LmtpReply | null)[] = req.recipients.map(() => null);
  const all = (r: LmtpReply): void => replies.forEach((_, i) => (replies[i] ??= r));
  let conn: Connection;
  let content: Readable | null = null;
  try {
    conn = await Connection.open(req.destination, timeouts.connect, req.signal);
  } catch (err) {
    return { replies, error: err as Error, connected: false };
  }
  try {
    const greeting = await conn.reply(timeouts.command);
    if (greeting.code !== 220) throw unexpected('the greeting', greeting);
    await conn.write(`LHLO ${req.lhlo}\r\n`, timeouts.command);
    const lhlo = await conn.reply(timeouts.command);
    if (lhlo.code !== 250) throw unexpected('LHLO', lhlo);
    const caps = keywords(lhlo);

    const utf8 = req.mailParams.smtputf8 && caps.has('SMTPUTF8');
    if (!caps.has('SMTPUTF8') && req.sender?.utf8) {
      all(NO_SMTPUTF8);
      return { replies, error: null, connected: true };
    }
    content = await req.content({ eightBitMime: caps.has('8BITMIME'), smtputf8: caps.has('SMTPUTF8') });
    let mail = `MAIL FROM:<${req.sender?.address ?? ''}>`;
    if (req.mailParams.body === '8BITMIME' && caps.has('8BITMIME')) mail += ' BODY=8BITMIME';
    if (utf8) mail += ' SMTPUTF8';
    if (caps.has('SIZE')) mail += ` SIZE=${req.size}`;
    const sent: number[] = [];
    const commands = [`${mail}\r\n`];
    req.recipients.forEach((r, i) => {
      if (r.utf8 && !caps.has('SMTPUTF8')) replies[i] = NO_SMTPUTF8;
      else {
        sent.push(i);
        commands.push(`RCPT TO:<${r.address}>\r\n`);
      }
    });
    // RFC 2920: MAIL and the RCPTs go in one write when PIPELINING is offered; else one by one.
    const pipelined = caps.has('PIPELINING');
    if (pipelined) await conn.write(commands.join(''), timeouts.command);
    for (const [k, command] of commands.entries()) {
      if (!pipelined) await conn.write(command, timeouts.command);
      const reply = await conn.reply(timeouts.command);
      if (k === 0) {
        if (reply.code !== 250) {
          if (reply.code < 400) throw unexpected('MAIL', reply);
          all(reply);
          break;
        }
      } else if (reply.code !== 250 && reply.code !== 251) {
        if (reply.code < 400) throw unexpected('RCPT', reply);
        replies[sent[k - 1]!] = reply;
      }
    }
    const accepted = sent.filter((i) => replies[i] === null);
    if (accepted.length > 0) {
      await conn.write('DATA\r\n', timeouts.command);
      const data = await conn.reply(timeouts.command);
      if (data.code !== 354) {
        if (data.code < 400) throw unexpected('DATA', data);
        for (const i of accepted) replies[i] = data;
      } else {
        // A stalled read of the spool ends too when the hook's time is up.
        const stream = addAbortSignal(req.signal, content);
        for await (const chunk of dotStuffed(stream)) await conn.write(chunk, timeouts.data);
        // RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
        for (const i of accepted) {
          const reply = await conn.reply(timeouts.final);
          if (reply.code >= 300 && reply.code < 400) throw unexpected('end of data', reply);
          replies[i] = reply;
        }
      }
    }
    await quit(conn, timeouts.command);
    return { replies, error: null, connected: true };
  } catch (err) {
    return { replies, error: err as Error, connected: true };
  } finally {
    content?.destroy();
    conn.close();
  }
}

/** QUIT politely, briefly: the transaction is over whatever the server says. */
async function quit(conn: Connection, timeoutMs: number): Promise<void> {
  try {
    await conn.write('QUIT\r\n', timeoutMs);
    await conn.reply(Math.min(timeoutMs, 5000));
  } catch {
    // the results are already known
  }
}
