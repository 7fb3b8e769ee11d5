import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import assert from 'node:assert/strict';

export interface Reply {
  readonly code: number;
  readonly lines: readonly string[];
  /** All lines joined with \n, each without its code. */
  readonly text: string;
  /** The raw reply as sent. */
  readonly raw: string;
}

/**
 * A raw SMTP client for transcript-style tests: `send` a line, `expect` a reply matching a
 * pattern. It does no protocol work of its own, so a test says exactly what went over the wire.
 */
export class SmtpClient {
  private buf = '';
  private waiters: (() => void)[] = [];
  private ended = false;
  private socket: Socket | TLSSocket;

  private constructor(socket: Socket | TLSSocket) {
    this.socket = socket;
    this.listen(socket);
  }

  private listen(socket: Socket | TLSSocket): void {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.buf += d;
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('error', () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(
    port: number,
    host = '127.0.0.1',
    opts: { tls?: boolean; servername?: string; localAddress?: string } = {},
  ): Promise<SmtpClient> {
    return new Promise((resolve, reject) => {
      const { localAddress } = opts;
      const s = opts.tls
        ? tlsConnect(
            {
              // From a chosen local address: over a plain socket connected from it.
              ...(localAddress ? { socket: netConnect({ port, host, localAddress }) } : { port, host }),
              rejectUnauthorized: false,
              servername: opts.servername ?? 'mx.test',
            },
            () => resolve(new SmtpClient(s)),
          )
        : netConnect({ port, host, localAddress }, () => resolve(new SmtpClient(s)));
      s.once('error', reject);
    });
  }

  /** A client over a socket that is already connected (a TLS socket a test set up itself). */
  static over(socket: Socket | TLSSocket): SmtpClient {
    return new SmtpClient(socket);
  }

  get tlsSocket(): TLSSocket | null {
    return 'getPeerCertificate' in this.socket ? (this.socket as TLSSocket) : null;
  }

  /** Sends one command line (CRLF appended). */
  send(line: string): void {
    this.socket.write(`${line}\r\n`);
  }

  /** Sends bytes exactly as given. */
  write(data: string | Buffer): void {
    this.socket.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
  }

  /** The next complete reply (all lines up to the one with a space after the code). */
  async reply(timeoutMs = 10_000): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = /^((?:\d{3}-[^\n]*\r?\n)*)(\d{3}) ([^\n]*)\r?\n/.exec(this.buf);
      if (m) {
        const raw = m[0];
        this.buf = this.buf.slice(raw.length);
        const lines = raw.split(/\r?\n/).filter(Boolean);
        return {
          code: Number(m[2]),
          lines,
          text: lines.map((l) => l.slice(4)).join('\n'),
          raw,
        };
      }
      if (this.ended)
        throw new Error(`connection closed while waiting for a reply; unread: ${JSON.stringify(this.buf)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms; unread: ${JSON.stringify(this.buf)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Reads the next reply and asserts it matches, e.g. `expect(/^250 2\.1\.5 /)`. Returns it. */
  async expect(pattern: RegExp, timeoutMs?: number): Promise<Reply> {
    const r = await this.reply(timeoutMs);
    assert.match(r.raw, pattern, `expected ${pattern}, got ${JSON.stringify(r.raw)}`);
    return r;
  }

  /** `send` then `expect`. */
  async cmd(line: string, pattern: RegExp): Promise<Reply> {
    this.send(line);
    return this.expect(pattern);
  }

  /** EHLO and return its keywords. */
  async ehlo(name = 'client.test'): Promise<string[]> {
    const r = await this.cmd(`EHLO ${name}`, /^250[ -]/);
    return r.lines.slice(1).map((l) => l.slice(4));
  }

  /** After a 220 to STARTTLS: handshake on the same socket and continue over TLS. */
  async upgrade(servername = 'mx.test'): Promise<TLSSocket> {
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    plain.removeAllListeners('error');
    const secure = await new Promise<TLSSocket>((resolve, reject) => {
      const s = tlsConnect({ socket: plain as Socket, rejectUnauthorized: false, servername }, () =>
        resolve(s),
      );
      s.once('error', reject);
    });
    this.buf = '';
    this.socket = secure;
    this.listen(secure);
    return secure;
  }

  /** Resolves when the server has closed the connection (fails after timeoutMs). */
  async closed(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('server did not close the connection');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  get isClosed(): boolean {
    return this.ended;
  }

  /** Whatever arrived that is not yet read as a reply. */
  get unread(): string {
    return this.buf;
  }

  close(): void {
    this.socket.destroy();
  }
}
