import type { Socket } from 'node:net';

/**
 * The client side of the wire, shared by Petrel's SMTP-family clients (the lmtp and outbound
 * transports): the message body as it goes after DATA, and writes that respect back-pressure.
 */

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
 * Writes to a socket and, when its buffer is full, waits until it drains, the socket closes or
 * `timeoutMs` passes. Each client turns `closed` and `timeout` into its own error.
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
