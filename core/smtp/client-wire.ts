import type { Socket } from 'node:net';
import type { SocketReader } from './reader.js';

/**
 * The client side of the wire, shared by Petrel's SMTP-family clients (the lmtp and outbound
 * transports): replies read within one deadline each, the message body as it goes after DATA,
 * and writes that respect back-pressure.
 */

/** A server's reply (RFC 5321 §4.2), as the clients read it. */
export interface WireReply {
  readonly code: number;
  /** The RFC 3463 code the server gave, or `<class>.0.0` when it gave none. */
  readonly enhanced: string;
  /** The text of each line, without code and enhanced code. */
  readonly lines: readonly string[];
}

/** A reply that is not one: what the server sent, for the error the client reports. */
export class MalformedReplyError extends Error {
  override readonly name = 'MalformedReplyError';
}

/** Longest reply line read (RFC 5321 §4.5.3.1.5 says 512; servers send more in their texts). */
export const MAX_REPLY_LINE = 8192;
/**
 * Most lines in one reply. An EHLO reply has a few dozen; a server that sends continuation lines
 * without end is not answering, and must not fill the client's memory.
 */
export const MAX_REPLY_LINES = 512;
const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)/;

/**
 * Reads one reply, all its lines, by `deadline` (`Date.now()` milliseconds): one deadline for the
 * whole reply, so a server that drips continuation lines cannot hold the client. Null when the
 * server has gone. Throws the reader's `ReadTimeoutError` (or the interruption it was given), or
 * `MalformedReplyError`.
 */
export async function readReply(reader: SocketReader, deadline: number): Promise<WireReply | null> {
  let code = 0;
  const lines: string[] = [];
  for (;;) {
    const got = await reader.readLine(MAX_REPLY_LINE, deadline);
    if (got === null) return null;
    if (got.overlong) throw new MalformedReplyError('an overlong reply line');
    const line = got.line.toString('utf8');
    const m = /^([2-5]\d\d)([ -]|$)(.*)$/.exec(line);
    if (!m || (code && Number(m[1]) !== code)) {
      throw new MalformedReplyError(`a malformed reply "${line.slice(0, 200)}"`);
    }
    code = Number(m[1]);
    lines.push(m[3]!);
    if (m[2] !== '-') break;
    if (lines.length >= MAX_REPLY_LINES) {
      throw new MalformedReplyError(`a reply of more than ${MAX_REPLY_LINES} lines`);
    }
  }
  const cls = String(code)[0]!;
  const given = ENHANCED.exec(lines[0]!);
  const ok = given !== null && given[1] === cls;
  const enhanced = ok ? `${given[1]}.${given[2]}.${given[3]}` : `${cls}.0.0`;
  const strip = (l: string): string => {
    const g = ENHANCED.exec(l);
    return ok && g ? l.slice(g[0].length) : l;
  };
  return { code, enhanced, lines: lines.map(strip) };
}

const DOT = 0x2e;
const LF = 0x0a;
const CR = 0x0d;
const LF_DOT = Buffer.from('\n.');
const DOT_BUF = Buffer.from('.');
/** Writes of at least this many octets (the last one excepted): never a line per write. */
export const WRITE_CHUNK = 65_536;

/**
 * The message as it goes after DATA: every line that starts with a dot gets another one
 * (RFC 5321 §4.5.2), a missing final CRLF is added, then the `.` line. Yields chunks of at least
 * `chunkSize` octets, except the last.
 */
export async function* dotStuffed(
  source: AsyncIterable<Uint8Array>,
  chunkSize = WRITE_CHUNK,
): AsyncGenerator<Buffer> {
  let pending: Buffer[] = [];
  let pendingSize = 0;
  let lineStart = true;
  let last = -1;
  let beforeLast = -1;
  const add = (b: Buffer): void => {
    pending.push(b);
    pendingSize += b.length;
  };
  for await (const piece of source) {
    if (piece.length === 0) continue;
    const chunk = Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, piece.length);
    let from = 0;
    if (lineStart && chunk[0] === DOT) add(DOT_BUF);
    for (let i = chunk.indexOf(LF_DOT); i !== -1; i = chunk.indexOf(LF_DOT, i + 1)) {
      add(chunk.subarray(from, i + 1));
      add(DOT_BUF);
      from = i + 1;
    }
    add(chunk.subarray(from));
    beforeLast = chunk.length > 1 ? chunk[chunk.length - 2]! : last;
    last = chunk[chunk.length - 1]!;
    lineStart = last === LF;
    if (pendingSize >= chunkSize) {
      yield Buffer.concat(pending, pendingSize);
      pending = [];
      pendingSize = 0;
    }
  }
  const empty = last === -1;
  add(Buffer.from(empty || (beforeLast === CR && last === LF) ? '.\r\n' : '\r\n.\r\n'));
  yield Buffer.concat(pending, pendingSize);
}

/**
 * Writes to a socket and, when its buffer is full (`write()` returned false), waits until it
 * drains, the socket closes or `timeoutMs` passes: a caller that awaits each write never has more
 * than one write beyond the socket's high-water mark in memory. Each client turns `closed` and
 * `timeout` into its own error.
 */
export function writeDrained(
  socket: Socket,
  data: string | Buffer,
  timeoutMs: number,
): Promise<'ok' | 'closed' | 'timeout'> {
  if (socket.destroyed) return Promise.resolve('closed');
  if (socket.write(data)) return Promise.resolve('ok');
  return new Promise((resolve) => {
    const done = (result: 'ok' | 'closed' | 'timeout'): void => {
      clearTimeout(timer);
      socket.off('drain', onDrain);
      socket.off('close', onClose);
      resolve(result);
    };
    const onDrain = (): void => done('ok');
    const onClose = (): void => done('closed');
    const timer = setTimeout(() => done('timeout'), timeoutMs);
    socket.on('drain', onDrain);
    socket.on('close', onClose);
  });
}
