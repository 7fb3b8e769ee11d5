/**
 * Building a delivery status notification (RFC 3464) as a `multipart/report` (RFC 6522): a
 * human explanation, the machine-readable `message/delivery-status`, and the original message or
 * its header. Pure functions: the plugin gathers the facts, this module writes the octets.
 */
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { encode as qpEncode, wrap as qpWrap } from 'libqp';
import { foldHeaderField, type Address, type RecipientReply, rfc5322Date } from '../../core/index.js';

/** RFC 3464 §2.3.3: what happened to a recipient. (`expanded` is not something Petrel does.) */
export type Action = 'failed' | 'delayed' | 'delivered' | 'relayed';

/** Who gets the report: the original sender, or the postmaster for a message from `<>`. */
export type Audience = 'sender' | 'postmaster';

export interface ReportRecipient {
  readonly address: Address;
  /** The ORCPT parameter (RFC 3461 §4.2), decoded. */
  readonly orcpt?: { readonly type: string; readonly address: string };
  readonly action: Action;
  /** RFC 3463 enhanced status code. */
  readonly status: string;
  readonly reply: RecipientReply;
  /** Why a failed recipient failed: the remote refused it, or the queue gave up. */
  readonly reason?: 'refused' | 'expired';
  readonly lastAttemptAt: Date;
  /** Delayed recipients: when the queue will try again. */
  readonly nextAttemptAt?: Date;
  /** Delayed recipients: when the queue gives up (arrival + queue lifetime). */
  readonly willRetryUntil?: Date;
}

/** What comes back of the original message. */
export type Returned =
  | { readonly kind: 'full'; readonly content: Buffer }
  | { readonly kind: 'headers'; readonly content: Buffer; readonly why: 'requested' | 'too-large' }
  | { readonly kind: 'none'; readonly why: 'unavailable' };

export interface ReportInput {
  /** The reporting MTA's name (Reporting-MTA, From, Message-ID). */
  readonly hostname: string;
  readonly audience: Audience;
  /** The report's recipient. */
  readonly to: Address;
  /** The original's queue id, for the human part. */
  readonly queueId: string;
  readonly envid?: string;
  readonly arrivalDate: Date;
  /** The original was sent with SMTPUTF8 (RFC 6531): its header may be UTF-8. */
  readonly smtputf8: boolean;
  readonly recipients: readonly ReportRecipient[];
  readonly returned: Returned;
  /** The report's own date and Message-ID local part. */
  readonly date: Date;
  readonly messageId: string;
}

export interface BuiltReport {
  readonly content: Buffer;
  readonly subject: string;
  /** The report has 8-bit octets (the returned message does): send it with BODY=8BITMIME. */
  readonly eightBit: boolean;
  /** The report needs SMTPUTF8 (a UTF-8 address or a returned UTF-8 header). */
  readonly smtputf8: boolean;
}

const CRLF = '\r\n';

// ------------------------------------------------------------------------------ encodings

/** RFC 3461 §4: xtext — `+`, `=`, controls, space and non-ASCII octets as `+XX`. */
export function encodeXtext(s: string): string {
  let out = '';
  for (const byte of Buffer.from(s, 'utf8')) {
    out +=
      byte >= 0x21 && byte <= 0x7e && byte !== 0x2b && byte !== 0x3d
        ? String.fromCharCode(byte)
        : `+${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** RFC 6533 §3: utf-8-addr-xtext — printable ASCII as is, anything else (and `+ = \`) as `\x{HEX}`. */
export function encodeUtf8AddrXtext(s: string): string {
  let out = '';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    const plain = cp >= 0x21 && cp <= 0x7e && ch !== '+' && ch !== '=' && ch !== '\\';
    out += plain ? ch : `\\x{${cp.toString(16).toUpperCase().padStart(2, '0')}}`;
  }
  return out;
}

const PRINTABLE_ASCII = /^[\x21-\x7e]*$/;

/** An address-type and address for a DSN field, kept 7-bit as message/delivery-status requires. */
export function typedAddress(type: string, address: string): string {
  const t = type.toLowerCase();
  if (t === 'utf-8') return `utf-8; ${encodeUtf8AddrXtext(address)}`;
  return `${t}; ${PRINTABLE_ASCII.test(address) ? address : encodeXtext(address)}`;
}

/** Final-Recipient: `rfc822` for an ASCII address, RFC 6533's `utf-8` type for an internationalised one. */
export function finalRecipient(address: Address): string {
  return address.utf8 ? typedAddress('utf-8', address.address) : typedAddress('rfc822', address.address);
}

/** Remote-MTA's name from a reply's `remote` (`mx.example.test [192.0.2.1]`, `10.0.0.5:24`), or null. */
export function remoteMtaName(remote: string | undefined): string | null {
  const first = remote?.trim().split(/\s+/)[0];
  if (!first || first.startsWith('unix:') || first.startsWith('/')) return null;
  let host = first;
  const v6 = /^\[([^\]]+)\](?::\d+)?$/.exec(host);
  if (v6) host = `[${v6[1]}]`;
  else host = host.replace(/:\d+$/, '');
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(host)) host = `[${host}]`;
  if (!/^(\[[0-9A-Za-z.:]+\]|[0-9A-Za-z]([0-9A-Za-z.-]*[0-9A-Za-z])?)$/.test(host)) return null;
  return host;
}

/** A reply as one line of printable ASCII (for Diagnostic-Code; the human part keeps the original). */
function replyLine(reply: RecipientReply): string {
  return `${reply.code} ${reply.enhanced} ${diagnosticText(reply)}`;
}

/** The diagnostic-type of a reply made here (see `remoteFields`). */
const LOCAL_DIAGNOSTIC = 'X-Petrel';

/**
 * Remote-MTA and Diagnostic-Code for one recipient. A reply carries `remote` only when another
 * server sent it (a transport's contract); anything else is a decision made here: the queue's
 * lifetime ran out, no route, the administrator returned it, the peer lacks an extension the
 * message needs, a local mailbox failed.
 *
 * We read RFC 3464 §2.3.5 strictly: Remote-MTA names the MTA that *reported* the status to us,
 * so a decision of ours has none, even when it concerns a peer. §2.3.6 types a diagnostic by the
 * transport that issued it; `smtp;` is an SMTP (or LMTP) reply as the peer sent it, which a
 * reader may quote as the peer's words. Our own diagnostic is kept (the reason is worth having)
 * under a private `X-` diagnostic-type (only `smtp` is registered; Postfix writes `X-Postfix;`
 * the same way), with the text only: its code would be ours too, and `Status` already has it.
 */
function remoteFields(reply: RecipientReply): string {
  if (reply.remote === undefined)
    return foldField('Diagnostic-Code', `${LOCAL_DIAGNOSTIC}; ${diagnosticText(reply)}`);
  const mta = remoteMtaName(reply.remote);
  return (
    (mta ? foldField('Remote-MTA', `dns; ${mta}`) : '') +
    foldField('Diagnostic-Code', `smtp; ${replyLine(reply)}`)
  );
}

/** A reply's text as one line of printable ASCII. */
function diagnosticText(reply: RecipientReply): string {
  const text = typeof reply.text === 'string' ? reply.text : reply.text.join(' ');
  return text
    .replace(/[\r\n\t]+/g, ' ')
    .replace(/[^\x20-\x7e]/g, '?')
    .trim();
}

function replyText(reply: RecipientReply): string {
  const lines = typeof reply.text === 'string' ? reply.text.split(/\r?\n/) : reply.text;
  return lines.map((l) => `${reply.code} ${reply.enhanced} ${l}`).join(`${CRLF}    `);
}

/** A field of the report, folded at spaces so that lines stay under 78 characters where they can. */
export function foldField(name: string, value: string): string {
  return foldHeaderField(name, value, 78) + CRLF;
}

function hasEightBit(buf: Buffer): boolean {
  for (const b of buf) if (b > 0x7f) return true;
  return false;
}

/** The header block of a message: up to and including the CRLF that ends the last field. */
export function headerBlock(message: Buffer): Buffer {
  const end = message.indexOf('\r\n\r\n');
  if (end >= 0) return message.subarray(0, end + 2);
  if (message.subarray(0, 2).toString('latin1') === '\r\n') return message.subarray(0, 0);
  return message;
}

const HEADER_END = Buffer.from('\r\n\r\n');

/**
 * Reads what a report returns of the original: the whole message if it fits in `limit` octets
 * and the whole was asked for, else its header block only (the read stops at the blank line, so
 * a large message is never read further than its header).
 */
export async function readOriginal(
  stream: Readable,
  opts: { headersOnly: boolean; limit: number },
): Promise<Returned> {
  const chunks: Buffer[] = [];
  let size = 0;
  let headerEnd = -1;
  let tooLarge = false;
  // The last octets of what has been read: the blank line may be split between two chunks.
  let tail = Buffer.alloc(0);
  for await (const chunk of stream) {
    const c = chunk as Buffer;
    if (headerEnd < 0) {
      if (size === 0 && c[0] === 0x0d && c[1] === 0x0a) {
        headerEnd = 0; // no header at all
      } else {
        const window = Buffer.concat([tail, c]);
        const at = window.indexOf(HEADER_END);
        if (at >= 0) headerEnd = size - tail.length + at + 2;
        else tail = window.subarray(Math.max(0, window.length - 3));
      }
    }
    chunks.push(c);
    size += c.length;
    if (size > opts.limit) tooLarge = true;
    if (headerEnd >= 0 && (opts.headersOnly || tooLarge)) break;
    if (headerEnd < 0 && tooLarge) {
      headerEnd = opts.limit; // a header longer than the limit: return what fits
      break;
    }
  }
  const all = Buffer.concat(chunks);
  if (!opts.headersOnly && !tooLarge) return { kind: 'full', content: all };
  const head = headerEnd >= 0 ? all.subarray(0, headerEnd) : all;
  return { kind: 'headers', content: head, why: tooLarge ? 'too-large' : 'requested' };
}

// ------------------------------------------------------------------------------ the report

const SUBJECTS: Record<Action, string> = {
  failed: 'Undelivered Mail Returned to Sender',
  delayed: 'Delayed Mail (still being retried)',
  delivered: 'Successful Mail Delivery Report',
  relayed: 'Successful Mail Delivery Report',
};

/** The report's subject: by the first recipient's action (a report holds one kind). */
export function subjectFor(action: Action, audience: Audience): string {
  return audience === 'postmaster' ? `Postmaster Copy: ${SUBJECTS[action]}` : SUBJECTS[action];
}

function humanPart(input: ReportInput, action: Action): string {
  const { hostname, recipients, returned } = input;
  const out: string[] = [`This is the mail system at ${hostname}.`, ''];
  if (input.audience === 'postmaster') {
    out.push(
      'A message sent with the null sender <> (a delivery report or a similar',
      'automatic message) could not be delivered. Such messages are never',
      'returned to their sender, so this copy goes to the postmaster instead.',
      '',
    );
  } else if (action === 'failed') {
    out.push(
      'Your message could not be delivered to the recipients below. The mail',
      'system has given up on them and will not try again.',
      '',
    );
  } else if (action === 'delayed') {
    const until = recipients[0]?.willRetryUntil;
    out.push(
      'Your message has not been delivered yet to the recipients below. The',
      until ? `mail system keeps trying until ${rfc5322Date(until)};` : 'mail system keeps trying;',
      'you do not need to send it again.',
      '',
    );
  } else {
    out.push('This is the delivery report you asked for.', '');
  }
  for (const r of recipients) {
    const who = `<${r.address.address}>`;
    const remote = r.reply.remote;
    switch (r.action) {
      case 'failed':
        out.push(
          r.reason === 'expired'
            ? `${who}: still undeliverable when the message's time in the queue ran out.`
            : remote
              ? `${who}: refused by ${remote}, which said:`
              : `${who}: not delivered; the reason:`,
        );
        break;
      case 'delayed':
        out.push(
          remote ? `${who}: not yet delivered; ${remote} said:` : `${who}: not yet delivered; the reason:`,
        );
        break;
      case 'delivered':
        out.push(remote ? `${who}: delivered to ${remote}, which said:` : `${who}: delivered.`);
        break;
      case 'relayed':
        out.push(
          `${who}: passed on to ${remote ?? 'the next mail server'}, which does not send`,
          '    delivery reports of its own; this is the last report for this recipient.',
        );
        break;
    }
    out.push(`    ${replyText(r.reply)}`);
    if (r.action === 'delayed' && r.nextAttemptAt)
      out.push(`    Next attempt: ${rfc5322Date(r.nextAttemptAt)}`);
    out.push('');
  }
  switch (returned.kind) {
    case 'full':
      out.push('The original message is attached.');
      break;
    case 'headers':
      out.push(
        returned.why === 'too-large'
          ? 'The original message is too large to return; its header is attached.'
          : 'The header of the original message is attached.',
      );
      break;
    case 'none':
      out.push('The original message is no longer available to attach.');
      break;
  }
  out.push(`It arrived on ${rfc5322Date(input.arrivalDate)} as queue ID ${input.queueId}.`);
  return out.join(CRLF) + CRLF;
}

function deliveryStatusPart(input: ReportInput): string {
  let s = foldField('Reporting-MTA', `dns; ${input.hostname}`);
  if (input.envid !== undefined) {
    const id = PRINTABLE_ASCII.test(input.envid) ? input.envid : encodeXtext(input.envid);
    s += foldField('Original-Envelope-Id', id);
  }
  s += foldField('Arrival-Date', rfc5322Date(input.arrivalDate));
  for (const r of input.recipients) {
    s += CRLF;
    if (r.orcpt) s += foldField('Original-Recipient', typedAddress(r.orcpt.type, r.orcpt.address));
    s += foldField('Final-Recipient', finalRecipient(r.address));
    s += foldField('Action', r.action);
    s += foldField('Status', r.status);
    s += remoteFields(r.reply);
    s += foldField('Last-Attempt-Date', rfc5322Date(r.lastAttemptAt));
    if (r.action === 'delayed' && r.willRetryUntil)
      s += foldField('Will-Retry-Until', rfc5322Date(r.willRetryUntil));
  }
  return s;
}

/** The first text part: UTF-8, quoted-printable only when it needs more than ASCII. */
function textPart(text: string): { headers: string; body: string } {
  if (/^[\x00-\x7f]*$/.test(text)) {
    return {
      headers: `Content-Type: text/plain; charset=us-ascii${CRLF}Content-Transfer-Encoding: 7bit${CRLF}`,
      body: text,
    };
  }
  const body = text
    .split(CRLF)
    .map((line) => qpWrap(qpEncode(line), 76))
    .join(CRLF);
  return {
    headers: `Content-Type: text/plain; charset=utf-8${CRLF}Content-Transfer-Encoding: quoted-printable${CRLF}`,
    body,
  };
}

/** The report, ready for the queue: header, three parts, CRLF line ends throughout. */
export function buildReport(input: ReportInput): BuiltReport {
  const action = input.recipients[0]?.action ?? 'failed';
  const subject = subjectFor(action, input.audience);
  const boundary = `=_report_${randomBytes(12).toString('hex')}`;
  const returned = input.returned;
  const returnedBytes = returned.kind === 'none' ? Buffer.alloc(0) : returned.content;
  const eightBit = hasEightBit(returnedBytes);
  const returnedUtf8Header = input.smtputf8 && hasEightBit(headerBlock(returnedBytes));
  const smtputf8 = input.to.utf8 || returnedUtf8Header;

  const head =
    `From: Mail Delivery System <MAILER-DAEMON@${input.hostname}>${CRLF}` +
    `To: <${input.to.address}>${CRLF}` +
    `Subject: ${subject}${CRLF}` +
    `Date: ${rfc5322Date(input.date)}${CRLF}` +
    `Message-ID: <${input.messageId}@${input.hostname}>${CRLF}` +
    `Auto-Submitted: auto-replied${CRLF}` +
    `MIME-Version: 1.0${CRLF}` +
    `Content-Type: multipart/report; report-type=delivery-status;${CRLF}` +
    `\tboundary="${boundary}"${CRLF}` +
    CRLF +
    `This is a MIME-encapsulated delivery status notification.${CRLF}` +
    CRLF;

  const text = textPart(humanPart(input, action));
  const parts: (string | Buffer)[] = [
    head,
    `--${boundary}${CRLF}`,
    `Content-Description: Notification${CRLF}${text.headers}${CRLF}`,
    text.body,
    `${CRLF}--${boundary}${CRLF}`,
    `Content-Description: Delivery report${CRLF}Content-Type: message/delivery-status${CRLF}${CRLF}`,
    deliveryStatusPart(input),
  ];
  if (returned.kind !== 'none') {
    // RFC 6532 §3.7 / RFC 6533 §6: a UTF-8 header travels as message/global(-headers).
    const type =
      returned.kind === 'full'
        ? returnedUtf8Header
          ? 'message/global'
          : 'message/rfc822'
        : returnedUtf8Header
          ? 'message/global-headers'
          : 'text/rfc822-headers';
    // A success report returns a message that did arrive.
    const what = action === 'delivered' || action === 'relayed' ? 'Delivered message' : 'Undelivered message';
    const description = returned.kind === 'full' ? what : `${what} headers`;
    const cte = eightBit ? `Content-Transfer-Encoding: 8bit${CRLF}` : '';
    parts.push(
      `${CRLF}--${boundary}${CRLF}`,
      `Content-Description: ${description}${CRLF}Content-Type: ${type}${CRLF}${cte}${CRLF}`,
      returned.content,
    );
    const ends = returned.content.subarray(-2).toString('latin1') === CRLF;
    if (!ends && returned.content.length > 0) parts.push(CRLF);
  }
  parts.push(`${CRLF}--${boundary}--${CRLF}`);
  const content = Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : p)));
  return { content, subject, eightBit, smtputf8 };
}
