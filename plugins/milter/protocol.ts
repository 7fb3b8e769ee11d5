/**
 * The MTA side of the Sendmail milter protocol, version 6 (libmilter's `mfdef.h`; Postfix's
 * MILTER_README). Every packet is a 4-octet big-endian length (which counts the command octet),
 * one command octet, then the data. Strings are NUL-terminated.
 */
import { connect as netConnect, type Socket } from 'node:net';

/** Commands the MTA sends. */
export const Cmd = {
  abort: 'A',
  body: 'B',
  connect: 'C',
  macro: 'D',
  bodyEob: 'E',
  helo: 'H',
  header: 'L',
  mail: 'M',
  eoh: 'N',
  optneg: 'O',
  quit: 'Q',
  rcpt: 'R',
  data: 'T',
} as const;

/** Replies and modification actions the milter sends. */
export const Reply = {
  addRcpt: '+',
  delRcpt: '-',
  addRcptPar: '2',
  accept: 'a',
  replBody: 'b',
  continue: 'c',
  discard: 'd',
  chgFrom: 'e',
  connFail: 'f',
  addHeader: 'h',
  insHeader: 'i',
  chgHeader: 'm',
  progress: 'p',
  quarantine: 'q',
  reject: 'r',
  skip: 's',
  tempfail: 't',
  replyCode: 'y',
} as const;

/** Actions a milter may ask for (SMFIF_*), negotiated at SMFIC_OPTNEG. */
export const A = {
  addHdrs: 0x1,
  chgBody: 0x2,
  addRcpt: 0x4,
  delRcpt: 0x8,
  chgHdrs: 0x10,
  quarantine: 0x20,
  chgFrom: 0x40,
  addRcptPar: 0x80,
  setSymList: 0x100,
} as const;

/** This client offers every action: it applies each one (README). */
export const ALL_ACTIONS = Object.values(A).reduce((all, f) => all | f, 0);

/**
 * The action each modification reply needs: a milter that sends one it did not negotiate breaks
 * the protocol (libmilter refuses to send it; a milter that does anyway is not to be trusted).
 */
export const ACTION_OF: Readonly<Record<string, number>> = {
  [Reply.addHeader]: A.addHdrs,
  [Reply.insHeader]: A.addHdrs,
  [Reply.chgHeader]: A.chgHdrs,
  [Reply.quarantine]: A.quarantine,
  [Reply.replBody]: A.chgBody,
  [Reply.chgFrom]: A.chgFrom,
  [Reply.addRcpt]: A.addRcpt,
  [Reply.addRcptPar]: A.addRcptPar,
  [Reply.delRcpt]: A.delRcpt,
};

/** Protocol flags (SMFIP_*): steps the milter asks to skip, or asks not to answer. */
export const P = {
  noConnect: 0x1,
  noHelo: 0x2,
  noMail: 0x4,
  noRcpt: 0x8,
  noBody: 0x10,
  noHdrs: 0x20,
  noEoh: 0x40,
  nrHdr: 0x80,
  noUnknown: 0x100,
  noData: 0x200,
  skip: 0x400,
  rcptRej: 0x800,
  nrConn: 0x1000,
  nrHelo: 0x2000,
  nrMail: 0x4000,
  nrRcpt: 0x8000,
  nrData: 0x10000,
  nrUnkn: 0x20000,
  nrEoh: 0x40000,
  nrBody: 0x80000,
  hdrLeadSpc: 0x100000,
} as const;

/**
 * The protocol flags this client offers: every "skip" and "no reply" step, SMFIR_SKIP, and
 * SMFIP_RCPT_REJ (the milter may also see rejected recipients; we never send them, which the
 * flag allows). Not SMFIP_HDR_LEADSPC: header values are sent without the leading space.
 */
export const OFFERED_PROTOCOL = 0x1fffff & ~P.hdrLeadSpc;

export const VERSION = 6;

/** Longest packet a milter may send us: a replaced body chunk is at most 64 KiB, plus slack. */
export const MAX_PACKET = 1 << 20;

/** Largest SMFIC_BODY chunk (libmilter's MILTER_CHUNK_SIZE). */
export const BODY_CHUNK = 65535;

export interface Packet {
  readonly cmd: string;
  readonly data: Buffer;
}

export class MilterError extends Error {
  override name = 'MilterError';
}

export function packet(cmd: string, data: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(data.length + 1, 0);
  head.write(cmd, 4, 'latin1');
  return Buffer.concat([head, data]);
}

/** NUL-terminated strings, joined. */
export function strings(...parts: string[]): Buffer {
  return Buffer.concat(parts.map((p) => Buffer.from(`${p}\0`, 'utf8')));
}

/** Splits NUL-terminated strings (a missing final NUL is tolerated). */
export function splitStrings(data: Buffer): string[] {
  const out = data.toString('utf8').split('\0');
  if (out.at(-1) === '') out.pop();
  return out;
}

/**
 * One connection to one milter. Reads have a total deadline each (`read(deadlineMs)`), not reset
 * by each octet; writes wait for the socket to drain (back-pressure).
 */
export class MilterConnection {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private closed: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      if (this.buf.length > MAX_PACKET + 5) {
        this.fail(new MilterError('milter sent a packet over the size limit'));
        return;
      }
      this.wake();
    });
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new MilterError('milter closed the connection')));
  }

  static open(
    target: { host?: string; port?: number; path?: string },
    timeoutMs: number,
  ): Promise<MilterConnection> {
    return new Promise((resolve, reject) => {
      const socket =
        target.path !== undefined
          ? netConnect({ path: target.path })
          : netConnect({ host: target.host ?? '127.0.0.1', port: target.port ?? 0 });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new MilterError(`connect timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new MilterConnection(socket));
      });
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private fail(err: Error): void {
    if (!this.closed) this.closed = err;
    this.wake();
  }

  get broken(): boolean {
    return this.closed !== null;
  }

  /** Sends one packet, resolving once the socket has taken it without growing its buffer. */
  async send(cmd: string, data?: Buffer): Promise<void> {
    if (this.closed) throw this.closed;
    if (!this.socket.write(packet(cmd, data))) {
      await new Promise<void>((resolve, reject) => {
        const onDrain = (): void => {
          this.socket.off('close', onClose);
          resolve();
        };
        const onClose = (): void => {
          this.socket.off('drain', onDrain);
          reject(this.closed ?? new MilterError('milter closed the connection'));
        };
        this.socket.once('drain', onDrain);
        this.socket.once('close', onClose);
      });
    }
  }

  /** Reads one packet, or throws when `deadline` (a `Date.now()` value) passes first. */
  async read(deadline: number): Promise<Packet> {
    for (;;) {
      if (this.buf.length >= 5) {
        const len = this.buf.readUInt32BE(0);
        if (len < 1 || len > MAX_PACKET) throw new MilterError(`milter sent a bad packet length ${len}`);
        if (this.buf.length >= 4 + len) {
          const cmd = String.fromCharCode(this.buf[4]!);
          const data = Buffer.from(this.buf.subarray(5, 4 + len));
          this.buf = this.buf.subarray(4 + len);
          return { cmd, data };
        }
      }
      if (this.closed) throw this.closed;
      const left = deadline - Date.now();
      if (left <= 0) throw new MilterError('milter did not reply in time');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.waiter = null;
          resolve();
        }, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  close(): void {
    this.socket.destroy();
    this.fail(new MilterError('closed'));
  }

  /** Sends SMFIC_QUIT and closes. */
  quit(): void {
    if (!this.closed) this.socket.end(packet(Cmd.quit));
    this.fail(new MilterError('closed'));
  }
}
