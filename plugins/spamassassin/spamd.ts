import { connect } from 'node:net';
import type { Readable } from 'node:stream';

/** spamd's answer to `SYMBOLS`. */
export interface SpamdAnswer {
  readonly score: number;
  readonly required: number;
  readonly symbols: string[];
}

/** An answer is a status line, two headers and a list of rule names: this is far more. */
const MAX_ANSWER = 64 * 1024;

/**
 * One `SYMBOLS` request to spamd (the spamc/spamd protocol, SPAMC/1.5): the request line,
 * `Content-length` (required: spamd reads exactly that many octets), then the message, streamed
 * with back-pressure. spamd answers `SPAMD/1.1 0 EX_OK`, a `Spam: True ; 1000.0 / 5.0` header and,
 * as the body, the matched rules separated by commas; then it closes the connection.
 * `size` must be the exact number of octets `message` yields: a mismatch is an error.
 */
export async function spamdSymbols(opts: {
  host: string;
  port: number;
  user?: string | undefined;
  message: Readable;
  size: number;
  signal: AbortSignal;
}): Promise<SpamdAnswer> {
  const { signal } = opts;
  signal.throwIfAborted();
  const socket = connect({ host: opts.host, port: opts.port });
  const onAbort = (): void => {
    socket.destroy(new Error(`spamd: ${String(signal.reason ?? 'aborted')}`));
    opts.message.destroy();
  };
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const answer = new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      let length = 0;
      socket.on('data', (c: Buffer) => {
        length += c.length;
        if (length > MAX_ANSWER) socket.destroy(new Error('spamd: answer too long'));
        else chunks.push(c);
      });
      socket.on('end', () => resolve(Buffer.concat(chunks)));
      socket.on('error', reject);
      socket.on('close', () => reject(new Error('spamd: connection closed before an answer')));
    });
    answer.catch(() => undefined); // awaited below; a failure while sending must not go unhandled
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const head =
      'SYMBOLS SPAMC/1.5\r\n' +
      `Content-length: ${opts.size}\r\n` +
      (opts.user ? `User: ${opts.user}\r\n` : '') +
      '\r\n';
    socket.write(head);
    let sent = 0;
    for await (const chunk of opts.message) {
      const buf = chunk as Buffer;
      sent += buf.length;
      if (sent > opts.size) throw new Error(`spamd: message longer than its stated size ${opts.size}`);
      if (!socket.write(buf))
        await new Promise<void>((resolve, reject) => {
          const done = (err?: Error): void => {
            socket.off('drain', done);
            socket.off('close', done);
            if (err) reject(err);
            else resolve();
          };
          socket.once('drain', () => done());
          socket.once('close', () => done(new Error('spamd: connection closed while sending')));
        });
    }
    if (sent !== opts.size)
      throw new Error(`spamd: message shorter (${sent}) than its stated size ${opts.size}`);
    socket.end();
    return parseAnswer((await answer).toString('latin1'));
  } finally {
    signal.removeEventListener('abort', onAbort);
    socket.destroy();
  }
}

/** Parses `SPAMD/1.1 0 EX_OK\r\nContent-length: n\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nRULE,RULE`. */
export function parseAnswer(text: string): SpamdAnswer {
  const end = text.indexOf('\r\n\r\n');
  if (end < 0) throw new Error(`spamd: incomplete answer ${JSON.stringify(text.slice(0, 200))}`);
  const [status = '', ...fields] = text.slice(0, end).split('\r\n');
  const m = /^SPAMD\/\d+\.\d+ (\d+) (.*)$/.exec(status);
  if (!m) throw new Error(`spamd: not a spamd answer: ${JSON.stringify(status.slice(0, 200))}`);
  if (m[1] !== '0') throw new Error(`spamd: error ${m[1]} ${m[2]}`);
  const spam = fields.find((f) => /^spam:/i.test(f));
  const s = spam && /^spam:\s*\w+\s*;\s*(-?[\d.]+)\s*\/\s*(-?[\d.]+)\s*$/i.exec(spam);
  if (!s) throw new Error(`spamd: answer without a score: ${JSON.stringify(status)}`);
  const body = text.slice(end + 4).trim();
  return {
    score: Number(s[1]),
    required: Number(s[2]),
    symbols: body
      ? body
          .split(',')
          .map((r) => r.trim())
          .filter(Boolean)
      : [],
  };
}
