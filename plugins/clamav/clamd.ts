/**
 * A clamd client for one INSTREAM scan (clamd(8), "INSTREAM"): `zINSTREAM\0`, then the message
 * in chunks each prefixed by its length as a 4-octet big-endian integer, then a zero length; the
 * reply is one NUL-terminated line.
 */
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import type { Readable } from 'node:stream';

export type ClamdTarget = { readonly socket: string } | { readonly host: string; readonly port: number };

export type ScanVerdict =
  | { readonly status: 'clean' }
  | { readonly status: 'infected'; readonly signature: string }
  | { readonly status: 'error'; readonly reason: string };

/** A reply longer than this is not clamd's: the scan fails rather than buffer it. */
const MAX_REPLY = 4096;

export class ScanTimeoutError extends Error {
  constructor(ms: number) {
    super(`no reply from clamd within ${ms} ms`);
  }
}

/** Reads clamd's reply to INSTREAM (without its NUL). */
export function parseReply(reply: string): ScanVerdict {
  const text = reply.replace(/\0+$/, '').trim();
  if (text === 'stream: OK') return { status: 'clean' };
  const found = /^stream: (.+) FOUND$/.exec(text);
  if (found) return { status: 'infected', signature: found[1]! };
  if (/ ERROR$/.test(text)) return { status: 'error', reason: text.slice(0, 200) };
  return { status: 'error', reason: `unexpected reply: ${text.slice(0, 200)}` };
}

/**
 * clamd closes the connection when the stream passes its StreamMaxLength; its reply ("INSTREAM
 * size limit exceeded") is then often lost with the reset, so the reset says it.
 */
function explained(err: NodeJS.ErrnoException): Error {
  if (err.code === 'EPIPE' || err.code === 'ECONNRESET')
    return new Error(
      `clamd closed the connection during the stream (${err.code}; over its StreamMaxLength?)`,
    );
  return err;
}

/**
 * Sends `source` to clamd and resolves to its reply and the octets sent. Each write waits for
 * the socket to drain (the message is never buffered whole); `timeoutMs` bounds the whole scan.
 * Rejects when clamd cannot be reached, closes without a reply, or the time runs out.
 */
export async function instream(
  target: ClamdTarget,
  source: Readable,
  timeoutMs: number,
): Promise<{ reply: string; bytes: number }> {
  const socket: Socket = 'socket' in target ? connect(target.socket) : connect(target.port, target.host);
  const stop = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  let bytes = 0;

  const reply = new Promise<string>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let length = 0;
    socket.on('data', (d: Buffer) => {
      chunks.push(d);
      length += d.length;
      const nul = d.indexOf(0);
      if (nul >= 0)
        resolve(
          Buffer.concat(chunks)
            .subarray(0, length - d.length + nul)
            .toString('latin1'),
        );
      else if (length > MAX_REPLY) reject(new Error(`clamd's reply is longer than ${MAX_REPLY} octets`));
    });
    socket.on('error', (err: NodeJS.ErrnoException) => reject(explained(err)));
    socket.on('close', () => reject(new Error('clamd closed the connection without a reply')));
  });

  const send = async (): Promise<void> => {
    await once(socket, 'connect', { signal: stop.signal });
    socket.write('zINSTREAM\0');
    for await (const chunk of source) {
      const data = chunk as Buffer;
      const size = Buffer.alloc(4);
      size.writeUInt32BE(data.length);
      bytes += data.length;
      socket.write(size);
      if (!socket.write(data)) await once(socket, 'drain', { signal: stop.signal });
    }
    socket.write(Buffer.alloc(4));
  };

  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ScanTimeoutError(timeoutMs)), timeoutMs);
    });
    // clamd may answer before the stream ends (a size limit error): its reply wins over the send.
    // A write error (also seen by `reply`) or a spool read error ends the scan at once.
    const sending = send().catch((err: NodeJS.ErrnoException) => Promise.reject(explained(err)));
    sending.catch(() => undefined);
    const text = await Promise.race([reply, timeout, sending.then(() => reply)]);
    return { reply: text, bytes };
  } finally {
    clearTimeout(timer);
    stop.abort();
    source.destroy();
    socket.destroy();
    reply.catch(() => undefined);
  }
}
