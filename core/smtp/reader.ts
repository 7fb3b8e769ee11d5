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

/**
 * Unread input above which the socket is paused: with one socket read (at most 64 KiB) on top,
 * the most a reader ever holds. Part of the per-session memory budget (docs/security.md).
 */
export const READER_HIGH_WATER = 256 * 1024;
const LF = 0x0a;
const EMPTY = Buffer.alloc(0);

/**
 * Buffers what a socket sends and hands it out as command lines or raw chunks, with back-pressure
 * (the socket is paused while more than `READER_HIGH_WATER` octets wait) and deadlines. Every read
 * takes an absolute deadline (`Date.now()` milliseconds, or `Infinity`), not a duration: a caller
 * that gives the same deadline to many reads bounds them all together, so a client dripping one
 * byte at a time cannot hold a step open by sending something now and then.
 */
export class SocketReader {
  private buf: Buffer = EMPTY;
  private socket: Duplex | null = null;
  private ended = false;
  private wake: (() => void) | null = null;
  private interrupted: Error | null = null;
  /** Bytes seen since the last call to `takeArrived()`: for the early-talker check. */
  private arrived = 0;

  private readonly onData = (chunk: Buffer): void => {
    this.arrived += chunk.length;
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    if (this.buf.length > READER_HIGH_WATER) this.socket?.pause();
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

  /**
   * Octets read from the socket before this reader was attached (what followed a PROXY header),
   * taken as if they had just arrived: they count for the early-talker check.
   */
  arrivedBefore(chunk: Buffer): void {
    if (chunk.length > 0) this.onData(chunk);
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
    this.buf = EMPTY;
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
    // An empty view would still hold the whole chunk it was cut from: let it go.
    this.buf = n < this.buf.length ? this.buf.subarray(n) : EMPTY;
    if (this.buf.length <= READER_HIGH_WATER && this.socket?.isPaused()) this.socket.resume();
    return out;
  }

  /** Waits until more bytes arrive, the peer goes, or the deadline passes. */
  private waitForData(deadline: number, phase: 'command' | 'data'): Promise<void> {
    if (this.interrupted) return Promise.reject(this.interrupted);
    if (this.socket?.isPaused()) this.socket.resume();
    return new Promise((resolve, reject) => {
      const ms = deadline - Date.now();
      if (ms <= 0) return reject(new ReadTimeoutError(phase));
      const timer = Number.isFinite(ms)
        ? setTimeout(() => {
            this.wake = null;
            reject(new ReadTimeoutError(phase));
          }, ms)
        : undefined;
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
   * peer has gone. Throws `ReadTimeoutError` when no whole line has come by `deadline`.
   */
  async readLine(max: number, deadline: number): Promise<LineResult | null> {
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

  /** Everything buffered (at least one byte) by `deadline`, or null when the peer has gone. */
  async read(deadline: number): Promise<Buffer | null> {
    while (this.buf.length === 0) {
      if (this.ended) return null;
      await this.waitForData(deadline, 'data');
    }
    return this.consume(this.buf.length);
  }

  /** Up to `n` bytes (at least one) by `deadline`, or null when the peer has gone (BDAT chunks). */
  async readUpTo(n: number, deadline: number): Promise<Buffer | null> {
    while (this.buf.length === 0) {
      if (this.ended) return null;
      await this.waitForData(deadline, 'data');
    }
    return this.consume(Math.min(n, this.buf.length));
  }
}
