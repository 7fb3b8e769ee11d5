/**
 * One mail transaction on an open connection: MAIL FROM with the parameters the peer allows
 * (SIZE, BODY=8BITMIME, SMTPUTF8, RET/ENVID), the RCPTs (NOTIFY/ORCPT) and DATA — in one write
 * when the peer pipelines, one command at a time otherwise — then the transform chain's output
 * dot-stuffed in large chunks. Every recipient ends with a decision from the peer's own replies.
 */
import {
  type Address,
  type DeliveryRecipient,
  type DeliveryStatus,
  type MailParams,
  type PeerCapabilities,
  type QueuedMessageView,
  type RecipientReply,
  dotStuffed,
} from '../../core/index.js';
import { isAscii } from 'node:buffer';
import { addAbortSignal, type Readable } from 'node:stream';
import { SmtpFailure, type SmtpConnection, type SmtpReply } from './connection.js';

export interface Decision {
  readonly status: DeliveryStatus;
  readonly reply: RecipientReply;
  /** Accepted by a peer that offered DSN: the request went along and the peer reports now. */
  readonly dsnPassedOn?: boolean;
}

export interface TransactionTimeouts {
  readonly mail: number;
  readonly rcpt: number;
  readonly data: number;
  readonly block: number;
  readonly final: number;
}

/**
 * What a transaction needs to know about the message, worked out at most once per delivery:
 * whether it is 8-bit (declared, or found in the octets) and whether its header needs SMTPUTF8.
 */
export class MessageFacts {
  private eight: Promise<boolean> | null = null;
  private utf8Header: Promise<boolean> | null = null;

  /** `sender`: the envelope sender of this delivery (a forwarded copy's differs from the message's). */
  constructor(
    private readonly message: QueuedMessageView,
    readonly sender: Address | null,
  ) {}

  get mailParams(): MailParams {
    return this.message.mailParams;
  }
  get size(): number {
    return this.message.size;
  }

  /** Declared `BODY=8BITMIME`, or undeclared octets above 127 anywhere in the message. */
  eightBit(): Promise<boolean> {
    if (this.message.mailParams.body) return Promise.resolve(this.message.mailParams.body === '8BITMIME');
    this.eight ??= highOctets(this.message.stream(), false);
    return this.eight;
  }

  /** Octets above 127 in the header block (RFC 6532 UTF-8 headers). */
  headerNeedsUtf8(): Promise<boolean> {
    this.utf8Header ??= highOctets(this.message.stream(), true);
    return this.utf8Header;
  }
}

/** Where the header block ends in `buf` (after the blank line), or -1. */
function endOfHeader(buf: Buffer): number {
  const crlf = buf.indexOf('\r\n\r\n');
  if (crlf >= 0) return crlf + 4;
  const lf = buf.indexOf('\n\n');
  return lf >= 0 ? lf + 2 : -1;
}

const HEADER_SCAN_LIMIT = 1024 * 1024;

/** True when an octet above 127 occurs in the message (or, with `headerOnly`, in its header block). */
async function highOctets(source: Readable, headerOnly: boolean): Promise<boolean> {
  let tail: Buffer = Buffer.alloc(0);
  let seen = 0;
  try {
    for await (const piece of source) {
      const chunk = piece as Buffer;
      if (!headerOnly) {
        if (!isAscii(chunk)) return true;
        continue;
      }
      // The blank line may straddle two chunks: look at the end of the previous one too.
      const joined = tail.length ? Buffer.concat([tail, chunk]) : chunk;
      const end = endOfHeader(joined);
      if (!isAscii(end >= 0 ? joined.subarray(0, end) : joined)) return true;
      if (end >= 0) return false;
      seen += chunk.length;
      if (seen > HEADER_SCAN_LIMIT) return false;
      tail = joined.subarray(Math.max(0, joined.length - 3));
    }
    return false;
  } finally {
    source.destroy();
  }
}

/** RFC 3461 xtext: printable ASCII but `+` and `=` as is, everything else `+HH`. */
export function xtext(text: string): string {
  let out = '';
  for (const b of Buffer.from(text, 'utf8')) {
    out +=
      b >= 0x21 && b <= 0x7e && b !== 0x2b && b !== 0x3d
        ? String.fromCharCode(b)
        : `+${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** A local part beyond ASCII cannot be written without SMTPUTF8; a domain can (its A-label). */
function localNeedsUtf8(a: Address): boolean {
  return /[^\x00-\x7f]/.test(a.local);
}

/** The address as it goes on the wire: UTF-8 with SMTPUTF8, else with the domain's A-label. */
export function wireAddress(a: Address, utf8: boolean): string {
  if (utf8 || !a.utf8) return a.address;
  const at = a.address.lastIndexOf('@');
  return `${a.address.slice(0, at)}@${a.domainAscii}`;
}

/** 2xx delivered, 4xx deferred, 5xx failed, with the reply as the peer gave it. */
export function decide(reply: SmtpReply, remote: string): Decision {
  const status = reply.code < 300 ? 'delivered' : reply.code < 500 ? 'deferred' : 'failed';
  const text = reply.lines.length === 1 ? reply.lines[0]! : reply.lines;
  return { status, reply: { code: reply.code, enhanced: reply.enhanced, text, remote } };
}

/**
 * A decision made here, not a reply from the peer: it carries no `remote`, which names only a
 * server that answered (a bounce reports `Remote-MTA` and an `smtp;` diagnostic from it). The
 * text names the peer the decision concerns, where there is one.
 */
export function madeUp(code: number, enhanced: string, text: string): Decision {
  const status = code < 300 ? 'delivered' : code < 500 ? 'deferred' : 'failed';
  return { status, reply: { code, enhanced, text } };
}

export type TransactionOutcome =
  /** Every recipient decided; `reusable` when the connection can carry another transaction. */
  | {
      readonly kind: 'done';
      readonly decisions: readonly Decision[];
      readonly reusable: boolean;
      /** Recipients the peer accepted at RCPT. */
      readonly accepted: number;
      /**
       * Recipients answered `452` at RCPT (too many recipients, RFC 5321 §4.5.3.1.10) while
       * others were accepted: they may go in another transaction at once.
       */
      readonly tooMany: readonly number[];
      /** A local problem (the transform chain, reading the spool) behind some decisions. */
      readonly localError?: Error;
    }
  /** Nothing was decided and nothing sent after DATA: the next address should be tried. */
  | { readonly kind: 'next'; readonly failure: SmtpFailure };

export interface TransactionRequest {
  readonly conn: SmtpConnection;
  readonly message: MessageFacts;
  readonly recipients: readonly DeliveryRecipient[];
  /** The content to send, once the peer is known (the transform chain runs here). */
  readonly content: (peer: PeerCapabilities) => Promise<Readable>;
  readonly timeouts: TransactionTimeouts;
  readonly signal: AbortSignal;
}

export async function transaction(req: TransactionRequest): Promise<TransactionOutcome> {
  const { conn, message, recipients, timeouts } = req;
  const remote = conn.remote;
  const decisions: (Decision | null)[] = recipients.map(() => null);
  let accepted: number[] = [];
  const tooMany: number[] = [];
  const done = (reusable: boolean, localError?: Error): TransactionOutcome => ({
    kind: 'done',
    decisions: decisions.map(
      (d) =>
        d ?? madeUp(451, '4.3.0', `The transaction with ${remote} ended without a reply for this recipient`),
    ),
    reusable,
    accepted: accepted.length,
    tooMany: accepted.length ? tooMany : [],
    ...(localError ? { localError } : {}),
  });
  const every = (d: Decision, which: readonly number[] = recipients.map((_, i) => i)): void => {
    for (const i of which) decisions[i] ??= d;
  };

  // RFC 1870: no point sending what the peer already said it will refuse.
  const limit = conn.sizeLimit;
  if (limit && message.size > limit) {
    every(
      madeUp(552, '5.3.4', `Message size ${message.size} exceeds the limit of ${limit} octets of ${remote}`),
    );
    return done(true);
  }

  // RFC 6531 §3.2: without SMTPUTF8 at the peer, what needs it cannot go.
  const peerUtf8 = conn.caps.has('SMTPUTF8');
  if (!peerUtf8) {
    const noUtf8 = (what: string): Decision =>
      madeUp(553, '5.6.7', `${remote} does not support SMTPUTF8, which ${what} needs`);
    if (message.sender && localNeedsUtf8(message.sender)) {
      every(noUtf8('the sender address'));
      return done(true);
    }
    recipients.forEach((r, i) => {
      if (localNeedsUtf8(r.address)) decisions[i] = noUtf8('the recipient address');
    });
    if (
      decisions.some((d) => d === null) &&
      message.mailParams.smtputf8 &&
      !message.sender?.utf8 &&
      recipients.every((r) => !r.address.utf8) &&
      (await message.headerNeedsUtf8())
    ) {
      every(noUtf8('the message header'));
    }
  }
  const sent = recipients.map((_, i) => i).filter((i) => decisions[i] === null);
  if (sent.length === 0) return done(true);

  const utf8 =
    peerUtf8 &&
    (message.mailParams.smtputf8 ||
      Boolean(message.sender?.utf8) ||
      sent.some((i) => recipients[i]!.address.utf8));
  const dsn = conn.caps.has('DSN');
  let mail = `MAIL FROM:<${message.sender ? wireAddress(message.sender, utf8) : ''}>`;
  if (conn.caps.has('SIZE')) mail += ` SIZE=${message.size}`;
  if (conn.caps.has('8BITMIME') && (await message.eightBit())) mail += ' BODY=8BITMIME';
  if (utf8) mail += ' SMTPUTF8';
  if (dsn && message.mailParams.ret) mail += ` RET=${message.mailParams.ret}`;
  if (dsn && message.mailParams.envid) mail += ` ENVID=${xtext(message.mailParams.envid)}`;
  const rcpts = sent.map((i) => {
    const r = recipients[i]!;
    let line = `RCPT TO:<${wireAddress(r.address, utf8)}>`;
    if (dsn && r.params.notify?.length) line += ` NOTIFY=${r.params.notify.join(',')}`;
    if (dsn && r.params.orcpt) line += ` ORCPT=${r.params.orcpt.type};${xtext(r.params.orcpt.address)}`;
    return line;
  });

  const pipelining = conn.caps.has('PIPELINING');
  // The transform chain is set up before anything is sent: with PIPELINING, DATA ends the same
  // write as MAIL and the RCPTs (RFC 2920 §3.1), and the content must follow its 354 at once.
  let content: Readable;
  try {
    content = await req.content({ eightBitMime: conn.caps.has('8BITMIME'), smtputf8: peerUtf8 });
  } catch (err) {
    every(madeUp(451, '4.3.0', 'Temporary local problem preparing the message'), sent);
    return done(true, err as Error);
  }
  let dataReply: SmtpReply | null = null;
  conn.clean = false;
  try {
    if (pipelining) {
      const group = [mail, ...rcpts, 'DATA'].map((l) => `${l}\r\n`).join('');
      await conn.write(group, 'mail', timeouts.mail);
    } else {
      await conn.write(`${mail}\r\n`, 'mail', timeouts.mail);
    }
    const mailReply = await conn.read('mail', timeouts.mail);
    if (mailReply.code >= 400 && mailReply.code < 500) {
      content.destroy();
      return {
        kind: 'next',
        failure: new SmtpFailure(
          'mail',
          'reply',
          `${remote} said at MAIL FROM: ${describe(mailReply)}`,
          mailReply,
        ),
      };
    }
    if (mailReply.code >= 500) {
      content.destroy();
      every(decide(mailReply, remote), sent);
      if (!pipelining) return done(true);
      // The pipelined RCPTs and DATA still get (refusing) replies; read them to stay in step.
      try {
        for (let k = 0; k <= rcpts.length; k++) await conn.read('rcpt', timeouts.rcpt);
      } catch {
        return done(false);
      }
      return done(true);
    }
    if (mailReply.code >= 300) throw protocol('mail', remote, mailReply);
    for (const [k, i] of sent.entries()) {
      if (!pipelining) await conn.write(`${rcpts[k]}\r\n`, 'rcpt', timeouts.rcpt);
      const reply = await conn.read('rcpt', timeouts.rcpt);
      if (reply.code >= 300 && reply.code < 400) throw protocol('rcpt', remote, reply);
      if (reply.code < 300) accepted.push(i);
      else decisions[i] = decide(reply, remote);
      if (reply.code === 452) tooMany.push(i);
    }
    if (pipelining) dataReply = await conn.read('data', timeouts.data);
  } catch (err) {
    content.destroy();
    if (err instanceof SmtpFailure) {
      accepted = [];
      return { kind: 'next', failure: err };
    }
    throw err;
  }
  if (accepted.length === 0) {
    content.destroy();
    // A peer that opens DATA without a single recipient (RFC 2920 says it must not) gets no
    // message: the connection is dropped rather than ended with an empty one.
    if (dataReply?.code === 354) {
      conn.destroy();
      return done(false);
    }
    return done(true);
  }

  if (!dataReply) {
    try {
      dataReply = await conn.command('DATA', 'data', timeouts.data);
    } catch (err) {
      content.destroy();
      if (err instanceof SmtpFailure) {
        accepted = [];
        return { kind: 'next', failure: err };
      }
      throw err;
    }
  }
  if (dataReply.code !== 354) {
    content.destroy();
    if (dataReply.code < 400) return { kind: 'next', failure: protocol('data', remote, dataReply) };
    every(decide(dataReply, remote), accepted);
    return done(true);
  }

  conn.messages++;
  try {
    // A stalled read of the spool or of a transform ends too when the delivery's time is up.
    const body = addAbortSignal(req.signal, content);
    for await (const chunk of dotStuffed(body)) await conn.write(chunk, 'body', timeouts.block);
  } catch (err) {
    // Never the final dot after a failure: the peer must drop what it got.
    content.destroy();
    conn.destroy();
    if (err instanceof SmtpFailure) {
      every(madeUp(451, '4.4.2', err.message), accepted);
      return done(false);
    }
    every(madeUp(451, '4.3.0', 'Temporary local problem reading the message'), accepted);
    return done(false, err as Error);
  }
  try {
    const final = await conn.read('final', timeouts.final);
    if (final.code >= 300 && final.code < 400) {
      every(
        madeUp(451, '4.5.0', `${remote} sent an unexpected reply to the end of data: ${describe(final)}`),
        accepted,
      );
      return done(false);
    }
    const decision = decide(final, remote);
    every(dsn && decision.status === 'delivered' ? { ...decision, dsnPassedOn: true } : decision, accepted);
    conn.clean = true;
    return done(true);
  } catch (err) {
    if (!(err instanceof SmtpFailure)) throw err;
    // The peer may have taken the message: at least once, so it is tried again later.
    every(madeUp(451, '4.4.2', err.message), accepted);
    return done(false);
  }
}

function describe(r: SmtpReply): string {
  return `${r.code} ${r.enhanced} ${r.lines.join(' / ')}`;
}

function protocol(stage: 'mail' | 'rcpt' | 'data', remote: string, r: SmtpReply): SmtpFailure {
  return new SmtpFailure(stage, 'protocol', `${remote} sent an unexpected reply: ${describe(r)}`, r);
}
