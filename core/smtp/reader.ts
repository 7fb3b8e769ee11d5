import type { Duplex } from 'node:stream';

export class ReadTimeoutError extends Error {
  constructor(readonly phase: 'command' | 'data') {
    super(`timed out waiting for ${phase}`);
    this.name = 'ReadTimeoutError';
  }
}

export class ReadInterruptedError extends Error {
  constructor(readonly reason: string) {
    super(reason);
    this.name = 'ReadInterruptedError';
  }
}

export type LineResult = { readonly line: Buffer; readonly overlong: false } | { readonly overlong: true };

const HIGH_WATER = 1024 * 1024;
const LF = 0x0a;

/**
 * Buffers what a socket sends and hands it out as command lines or raw chunks, with back-pressure
 * (the socket is paused while more than 1 MiB waits) and per-read time limits. A time limit runs
 * from the start of the read, so a client dripping one byte at a time cannot hold it open.
 */
export class SocketReader {
  private buf: Buffer = Buffer.alloc(0);
  private socket: Duplex | null = null;
  private ended = false;
  private wake: (() => void) | null = null;
  private interrupted: Error | null = null;
  /** Bytes seen since the last call to `takeArrived()`: for the early-talker check. */
  private arrived = 0;

  private readonly onData = (chunk: Buffer): void => {
    this.arrived += chunk.length;
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    if (this.buf.length > HIGH_WATER) this.socket?.pause();
    this.notify();
  };

  private readonly onEnd = (): void => {
    this.ended = true;
    this.notify();
  };

  attach(socket: Duplex): void {
    this.socket = socket;
    this.ended = false;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  /** Stops reading from the socket (before it is handed to TLS). */
  detach(): void {
    const s = this.socket;
    if (!s) return;
    s.off('data', this.onData);
    s.off('end', this.onEnd);
    s.off('close', this.onEnd);
    s.off('error', this.onEnd);
    this.socket = null;
  }

  get buffered(): number {
    return this.buf.length;
  }

  takeArrived(): number {
    const n = this.arrived;
    this.arrived = 0;
    return n;
  }

  hasLine(): boolean {
    return this.buf.indexOf(LF) >= 0;
  }

  /** Drops everything buffered (RFC 3207 / CVE-2011-0411: nothing pipelined behind STARTTLS). */
  discard(): void {
    this.buf = Buffer.alloc(0);
  }

  /** Puts bytes back in front (what followed the end of data belongs to the next command). */
  unshift(bytes: Buffer): void {
    if (bytes.length) this.buf = this.buf.length ? Buffer.concat([bytes, this.buf]) : bytes;
  }

  /** Makes a pending or the next wait fail with `err` (shutdown). */
  interrupt(err: Error): void {
    this.interrupted = err;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private consume(n: number): Buffer {
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    if (this.buf.length <= HIGH_WATER && this.socket?.isPaused()) this.socket.resume();
    return out;
  }

  /** Waits until more bytes arrive, the peer goes, or the deadline passes. */
  private waitForData(deadline: number, phase: 'command' | 'data'): Promise<void> {
    if (this.interrupted) return Promise.reject(this.interrupted);
    if (this.socket?.isPaused()) this.socket.resume();
    return new Promise((resolve, reject) => {
      const ms = deadline - Date.now();
      if (ms <= 0) return reject(new ReadTimeoutError(phase));
      const timer = setTimeout(() => {
        this.wake = null;
        reject(new ReadTimeoutError(phase));
      }, ms);
      this.wake = () => {
        clearTimeout(timer);
        if (this.interrupted) reject(this.interrupted);
        else resolve();
      };
    });
  }

  /**
   * The next line without its LF (and without a CR before it), or `{ overlong: true }` when the
   * line exceeded `max` octets (the rest of it up to the LF is then discarded), or null when the
   * peer has gone.
   */
  async readLine(max: number, timeoutMs: number): Promise<LineResult | null> {
    const deadline = Date.now() + timeoutMs;
    let overlong = false;
    for (;;) {
      if (this.interrupted && !this.hasLine()) throw this.interrupted;
      const lf = this.buf.indexOf(LF);
      if (lf >= 0) {
        if (overlong || lf + 1 > max) {
          this.consume(lf + 1);
          return { overlong: true };
        }
        const raw = this.consume(lf + 1);
        const end = raw.length >= 2 && raw[raw.length - 2] === 0x0d ? raw.length - 2 : raw.length - 1;
        return { line: raw.subarray(0, end), overlong: false };
      }
      if (this.buf.length > max) {
        overlong = true;
        this.consume(this.buf.length);
      }
      if (this.ended) return null;
      await this.waitForData(deadline, 'command');
    }
  }

  /** Everything buffered (at least one byte), or null when the peer has gone. */
  async read(timeoutMs: number): Promise<Buffer | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length === 0) {
      if (this.ended) return null;
      await this.waitForData(deadline, 'data');
    }
    return this.consume(this.buf.length);
  }

  /** Up to `n` bytes (at least one), or null when the peer has gone (BDAT chunks). */
  async readUpTo(n: number, timeoutMs: number): Promise<Buffer | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length === 0) {
      if (this.ended) return null;
      await this.waitForData(deadline, 'data');
    }
    return this.consume(Math.min(n, this.buf.length));
  }
}
