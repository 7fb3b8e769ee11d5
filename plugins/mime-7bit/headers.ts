/**
 * 8-bit header text to 7-bit: RFC 2047 encoded words for text and display names, RFC 2231
 * parameters for `Content-Type` and `Content-Disposition`, IDNA (punycode) for domains.
 */
import { domainToASCII } from 'node:url';
import libmime from 'libmime';
import { foldHeaderField } from '../../core/index.js';

/**
 * RFC 2047 §2: a line holding an encoded word is at most 76 characters, so an encoded word on a
 * continuation line (after its space) is at most 75.
 */
const LINE_LENGTH = 76;
const WORD_LENGTH = LINE_LENGTH - 1;
/** The shortest encoded word we write: room for a few characters after `=?UTF-8?Q?`. */
const MIN_WORD_LENGTH = 40;

/** Header fields whose value is an address list (RFC 5322 §3.6.2, §3.6.3, §3.6.6 and kin). */
const ADDRESS_FIELDS = new Set([
  'from',
  'sender',
  'reply-to',
  'to',
  'cc',
  'bcc',
  'resent-from',
  'resent-sender',
  'resent-to',
  'resent-cc',
  'resent-bcc',
  'return-path',
  'delivered-to',
  'disposition-notification-to',
  'mail-followup-to',
  'mail-reply-to',
  'errors-to',
]);

/** Fields with a value and parameters, whose parameters get RFC 2231 encoding. */
const PARAMETER_FIELDS = new Set(['content-type', 'content-disposition']);

const NON_ASCII = /[^\x00-\x7f]/;
const EIGHT_BIT = /[\x80-\xff]/;

/** True when a header line (as a binary string, one char per octet) holds an octet above 127. */
export function hasEightBit(binary: string): boolean {
  return EIGHT_BIT.test(binary);
}

/**
 * Turns header octets into text: UTF-8 when they are valid UTF-8 (RFC 6532), else the part's
 * charset when Node knows it, else Windows-1252 (the superset of Latin-1 that readers assume).
 */
export function decodeHeaderOctets(octets: Buffer, charset?: string | false): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(octets);
  } catch {
    // not UTF-8
  }
  if (charset && !/^(utf-?8|us-ascii|ascii)$/i.test(charset)) {
    try {
      return new TextDecoder(charset).decode(octets);
    } catch {
      // unknown to Node: fall through
    }
  }
  return new TextDecoder('windows-1252').decode(octets);
}

/**
 * Rewrites one raw header line (field name, colon, value, folds) that holds 8-bit octets into a
 * 7-bit line, folded at 76 characters with the first word on the field's first line
 * (`foldHeaderField`). Encoded words are made short enough that the first one fits there after
 * the name, unless the name is so long that it leaves less than `MIN_WORD_LENGTH`, when the first
 * line is longer. `binary` has one char per octet.
 */
export function encodeHeaderLine(binary: string, charset?: string | false): string {
  const colon = binary.indexOf(':');
  if (colon <= 0) return ascii(binary);
  const name = binary.slice(0, colon).trim();
  const raw = Buffer.from(binary.slice(colon + 1), 'latin1');
  const value = decodeHeaderOctets(raw, charset)
    .replace(/\r?\n(?=[ \t])/g, '')
    .trim();
  const key = name.toLowerCase();
  const words = Math.max(MIN_WORD_LENGTH, Math.min(WORD_LENGTH, LINE_LENGTH - `${name}: `.length));
  let encoded: string;
  if (ADDRESS_FIELDS.has(key)) encoded = encodeAddressList(value, words);
  else if (PARAMETER_FIELDS.has(key)) encoded = encodeParameters(value, words);
  else encoded = encodeText(value, words);
  return foldHeaderField(ascii(name), ascii(encoded), LINE_LENGTH);
}

/** Whatever is left that is not ASCII (there should be nothing) becomes `?`. */
function ascii(text: string): string {
  return text.replace(/[^\x00-\x7f]/g, '?');
}

/** Unstructured text (`Subject`, `Comments`, unknown fields): non-ASCII words become encoded words. */
export function encodeText(value: string, wordLength = WORD_LENGTH): string {
  return NON_ASCII.test(value) ? libmime.encodeWords(value, 'Q', wordLength) : value;
}

/** `Content-Type` / `Content-Disposition`: the value as it was, parameters re-encoded (RFC 2231). */
export function encodeParameters(value: string, wordLength = WORD_LENGTH): string {
  const parsed = libmime.parseHeaderValue(value);
  if (!parsed.value || NON_ASCII.test(parsed.value)) return encodeText(value, wordLength);
  return libmime.buildHeaderValue({ value: parsed.value, params: parsed.params });
}

// ------------------------------------------------------------------ address lists

type TokenKind = 'space' | 'atom' | 'quoted' | 'comment' | 'angle' | 'special';

interface Token {
  readonly kind: TokenKind;
  /** The token as written. */
  readonly raw: string;
  /** Its content: a quoted string unquoted, a comment or angle address without the brackets. */
  readonly text: string;
}

function tokenize(value: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < value.length) {
    const c = value[i]!;
    const start = i;
    if (c === ' ' || c === '\t' || c === '\r' || c === '\n') {
      while (i < value.length && /[ \t\r\n]/.test(value[i]!)) i++;
      tokens.push({ kind: 'space', raw: value.slice(start, i), text: ' ' });
    } else if (c === '"') {
      let text = '';
      i++;
      while (i < value.length && value[i] !== '"') {
        if (value[i] === '\\' && i + 1 < value.length) i++;
        text += value[i];
        i++;
      }
      i++;
      tokens.push({ kind: 'quoted', raw: value.slice(start, i), text });
    } else if (c === '(') {
      let depth = 0;
      while (i < value.length) {
        const d = value[i]!;
        if (d === '\\') i++;
        else if (d === '(') depth++;
        else if (d === ')' && --depth === 0) {
          i++;
          break;
        }
        i++;
      }
      const raw = value.slice(start, i);
      tokens.push({ kind: 'comment', raw, text: raw.slice(1, raw.endsWith(')') ? -1 : undefined) });
    } else if (c === '<') {
      while (i < value.length && value[i] !== '>') i++;
      i++;
      const raw = value.slice(start, i);
      tokens.push({ kind: 'angle', raw, text: raw.slice(1, raw.endsWith('>') ? -1 : undefined) });
    } else if (c === ',' || c === ';' || c === ':') {
      i++;
      tokens.push({ kind: 'special', raw: c, text: c });
    } else {
      while (i < value.length && !/[ \t\r\n"(<,;:]/.test(value[i]!)) i++;
      tokens.push({ kind: 'atom', raw: value.slice(start, i), text: value.slice(start, i) });
    }
  }
  return tokens;
}

const isAscii = (tokens: readonly Token[]): boolean => tokens.every((t) => !NON_ASCII.test(t.raw));

/** A comment with non-ASCII text: encoded words inside the parentheses (RFC 2047 §5 (2)). */
function encodeComment(token: Token, wordLength: number): string {
  if (!NON_ASCII.test(token.raw)) return token.raw;
  return `(${libmime.encodeWords(token.text, 'Q', wordLength)})`;
}

/** Display name or group name: the whole phrase becomes encoded words when any of it is not ASCII. */
function encodePhrase(tokens: readonly Token[], wordLength: number): string {
  if (isAscii(tokens)) return tokens.map((t) => t.raw).join('');
  let out = '';
  let words: string[] = [];
  const flush = (): void => {
    const text = words.join('').replace(/\s+/g, ' ').trim();
    if (text) out += (out && !out.endsWith(' ') ? ' ' : '') + libmime.encodeWord(text, 'Q', wordLength);
    words = [];
  };
  for (const t of tokens) {
    if (t.kind === 'comment') {
      flush();
      out += (out ? ' ' : '') + encodeComment(t, wordLength);
    } else {
      words.push(t.text);
    }
  }
  flush();
  return out;
}

/** `local@domain` with an IDNA domain, or null when the local part itself is not ASCII. */
function asciiAddress(address: string): string | null {
  if (!NON_ASCII.test(address)) return address;
  const at = address.lastIndexOf('@');
  const local = at < 0 ? address : address.slice(0, at);
  if (at < 0 || NON_ASCII.test(local)) return null;
  const domain = domainToASCII(address.slice(at + 1));
  return domain ? `${local}@${domain}` : null;
}

/**
 * One mailbox, `phrase <address>` or a bare address (`phrase` has no space at either end). An
 * address whose local part is not ASCII cannot be written in 7-bit: the mailbox becomes an empty
 * group (`=?UTF-8?Q?…?= :;`) whose name shows the display name and the address, the form
 * RFC 6857 uses, so that the reader still sees both.
 */
function encodeMailbox(
  phrase: readonly Token[],
  angle: Token | null,
  trailing: readonly Token[],
  wordLength: number,
): string {
  const rest = trailing.map((t) => (t.kind === 'comment' ? encodeComment(t, wordLength) : t.raw)).join('');
  let address: string;
  let name: string;
  let nameText: string;
  if (angle) {
    address = angle.text.trim();
    name = encodePhrase(phrase, wordLength);
    nameText = phrase
      .filter((t) => t.kind !== 'comment')
      .map((t) => t.text)
      .join('')
      .replace(/\s+/g, ' ')
      .trim();
  } else {
    // A bare address: its atoms and quoted strings, in order, are the address; comments follow.
    address = phrase
      .filter((t) => t.kind === 'atom' || t.kind === 'quoted')
      .map((t) => t.raw)
      .join('');
    name = phrase
      .filter((t) => t.kind === 'comment')
      .map((t) => encodeComment(t, wordLength))
      .join(' ');
    nameText = '';
  }
  const converted = asciiAddress(address);
  if (converted !== null) {
    if (angle) return `${name}${name ? ' ' : ''}<${converted}>${rest}`;
    return `${converted}${name ? ` ${name}` : ''}${rest}`;
  }
  const shown = nameText ? `${nameText} <${address}>` : address;
  return `${libmime.encodeWord(shown, 'Q', wordLength)} :;${rest}`;
}

/**
 * An address list (`From`, `To`, …). Display names and group names with non-ASCII text become
 * encoded words; non-ASCII domains become punycode; addresses, angle brackets, commas and groups
 * stay where they were, and a mailbox that is all ASCII is left exactly as it was written.
 */
export function encodeAddressList(value: string, wordLength = WORD_LENGTH): string {
  if (!NON_ASCII.test(value)) return value;
  const tokens = tokenize(value);
  let out = '';
  let pending: Token[] = [];
  let angle: Token | null = null;
  let trailing: Token[] = [];
  const flush = (): void => {
    const all = [...pending, ...(angle ? [angle] : []), ...trailing];
    if (isAscii(all) || !all.some((t) => t.kind !== 'space')) {
      out += all.map((t) => t.raw).join('');
    } else {
      let start = 0;
      let end = pending.length;
      while (start < end && pending[start]!.kind === 'space') start++;
      while (end > start && pending[end - 1]!.kind === 'space') end--;
      out += pending
        .slice(0, start)
        .map((t) => t.raw)
        .join('');
      out += encodeMailbox(pending.slice(start, end), angle, trailing, wordLength);
    }
    pending = [];
    angle = null;
    trailing = [];
  };
  for (const t of tokens) {
    if (t.kind === 'special') {
      if (t.raw === ':' && !angle) {
        // A group name.
        out += `${encodePhrase(pending, wordLength)}:`;
        pending = [];
        trailing = [];
        continue;
      }
      flush();
      out += t.raw;
    } else if (t.kind === 'angle' && !angle) {
      angle = t;
    } else if (angle) {
      trailing.push(t);
    } else {
      pending.push(t);
    }
  }
  flush();
  return out.trim();
}
