import { isIPv4, isIPv6 } from 'node:net';
import { domainToASCII } from 'node:url';

/**
 * An envelope address (RFC 5321 §4.1.2, with RFC 6531 UTF-8 where the transaction allows it).
 * `local` is the local part with quoting removed; `domain` is lower-cased (and, for IDNs, in
 * Unicode form as written); `domainAscii` is the A-label form used for DNS.
 */
export interface Address {
  /** `local@domain` in canonical form: the local part re-quoted only when it needs to be. */
  readonly address: string;
  readonly local: string;
  readonly domain: string;
  readonly domainAscii: string;
  /** The domain is an address literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]`. */
  readonly literal: boolean;
  /** Local part or domain has non-ASCII characters (needs SMTPUTF8). */
  readonly utf8: boolean;
  /** RFC 5321 §4.1.1.3 source route (`<@a,@b:user@c>`), kept but never used for routing. */
  readonly route: readonly string[];
}

export type PathParse =
  | { ok: true; address: Address | null; rest: string }
  | { ok: false; reason: 'syntax' | 'utf8' | 'length'; message: string };

const ATEXT = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]$/;
const LDH_LABEL = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

function isAtext(ch: string, utf8: boolean): boolean {
  return ATEXT.test(ch) || (utf8 && ch.charCodeAt(0) > 127);
}

function isDotString(s: string, utf8: boolean): boolean {
  if (s.length === 0 || s.startsWith('.') || s.endsWith('.') || s.includes('..')) return false;
  for (const ch of s) if (ch !== '.' && !isAtext(ch, utf8)) return false;
  return true;
}

/** A domain per RFC 5321 (LDH labels) or, with SMTPUTF8, IDNA U-labels. */
export function isValidDomain(domain: string, utf8: boolean): boolean {
  if (domain.length === 0 || domain.length > 255) return false;
  const labels = domain.split('.');
  for (const label of labels) {
    if (LDH_LABEL.test(label)) continue;
    if (!utf8 || label.length === 0 || !/[^\x00-\x7f]/.test(label)) return false;
    const ascii = domainToASCII(label);
    if (!ascii || !LDH_LABEL.test(ascii)) return false;
  }
  return true;
}

function isAddressLiteral(lit: string): boolean {
  const inner = lit.slice(1, -1);
  if (isIPv4(inner)) return true;
  if (/^IPv6:/i.test(inner)) return isIPv6(inner.slice(5));
  // General-address-literal = Standardized-tag ":" 1*dcontent; no tags are registered, so refuse.
  return false;
}

function quoteLocal(local: string): string {
  if (isDotString(local, true)) return local;
  return '"' + local.replace(/(["\\])/g, '\\$1') + '"';
}

function needsUtf8(s: string): boolean {
  return /[^\x00-\x7f]/.test(s);
}

export function makeAddress(local: string, domain: string, route: readonly string[] = []): Address {
  const literal = domain.startsWith('[');
  const lower = literal ? domain : domain.toLowerCase();
  const ascii = literal || !needsUtf8(lower) ? lower : domainToASCII(lower) || lower;
  return {
    address: domain ? `${quoteLocal(local)}@${lower}` : quoteLocal(local),
    local,
    domain: lower,
    domainAscii: ascii,
    literal,
    utf8: needsUtf8(local) || needsUtf8(lower),
    route,
  };
}

/** Parses the mailbox inside the angle brackets (no brackets, no route). */
export function parseMailbox(text: string, utf8: boolean): Address | null {
  let local: string;
  let i: number;
  if (text.startsWith('"')) {
    local = '';
    i = 1;
    for (;;) {
      if (i >= text.length) return null;
      const ch = text[i]!;
      if (ch === '"') break;
      if (ch === '\\') {
        const next = text[i + 1];
        if (next === undefined || (next.charCodeAt(0) < 32 && !utf8) || next.charCodeAt(0) === 127)
          return null;
        local += next;
        i += 2;
        continue;
      }
      const c = ch.charCodeAt(0);
      if (c < 32 || c === 127 || (c > 127 && !utf8)) return null;
      local += ch;
      i += 1;
    }
    i += 1;
    if (text[i] !== '@') return null;
  } else {
    i = text.lastIndexOf('@');
    if (i <= 0) return null;
    local = text.slice(0, i);
    if (!isDotString(local, utf8)) return null;
  }
  const domain = text.slice(i + 1);
  if (Buffer.byteLength(local) > 64) return null;
  if (domain.startsWith('[') && domain.endsWith(']')) {
    if (!isAddressLiteral(domain)) return null;
  } else if (!isValidDomain(domain, utf8)) {
    return null;
  }
  return makeAddress(local, domain);
}

/**
 * Parses a reverse-path or forward-path at the start of `text` (what follows `MAIL FROM:` or
 * `RCPT TO:`), returning the address (null for `<>`) and the rest of the line (the parameters).
 */
export function parsePath(
  text: string,
  opts: { utf8: boolean; allowNull: boolean; allowPostmaster: boolean },
): PathParse {
  const s = text.replace(/^ +/, ''); // tolerated: `MAIL FROM: <a@b>`
  if (!s.startsWith('<'))
    return { ok: false, reason: 'syntax', message: 'address must be in angle brackets' };
  // Find the closing bracket, skipping quoted strings.
  let end = -1;
  let inQuote = false;
  for (let i = 1; i < s.length; i++) {
    const ch = s[i];
    if (inQuote) {
      if (ch === '\\') i++;
      else if (ch === '"') inQuote = false;
    } else if (ch === '"') inQuote = true;
    else if (ch === '>') {
      end = i;
      break;
    }
  }
  if (end < 0) return { ok: false, reason: 'syntax', message: 'missing closing angle bracket' };
  const inner = s.slice(1, end);
  const rest = s.slice(end + 1);
  if (rest.length > 0 && !rest.startsWith(' ')) {
    return { ok: false, reason: 'syntax', message: 'unexpected text after address' };
  }
  if (Buffer.byteLength(inner) > 254) return { ok: false, reason: 'length', message: 'address too long' };
  if (!opts.utf8 && needsUtf8(inner)) {
    return { ok: false, reason: 'utf8', message: 'non-ASCII address without SMTPUTF8' };
  }
  if (inner === '') {
    return opts.allowNull
      ? { ok: true, address: null, rest: rest.trim() }
      : { ok: false, reason: 'syntax', message: 'empty address' };
  }
  if (opts.allowPostmaster && inner.toLowerCase() === 'postmaster') {
    return { ok: true, address: makeAddress('postmaster', ''), rest: rest.trim() };
  }
  let mailboxText = inner;
  let route: string[] = [];
  if (inner.startsWith('@')) {
    const colon = inner.indexOf(':');
    if (colon < 0) return { ok: false, reason: 'syntax', message: 'bad source route' };
    route = inner
      .slice(0, colon)
      .split(',')
      .map((r) => r.trim().slice(1));
    if (route.some((r) => !isValidDomain(r, opts.utf8))) {
      return { ok: false, reason: 'syntax', message: 'bad source route' };
    }
    mailboxText = inner.slice(colon + 1);
  }
  const mailbox = parseMailbox(mailboxText, opts.utf8);
  if (!mailbox) return { ok: false, reason: 'syntax', message: 'bad address syntax' };
  return {
    ok: true,
    address: route.length ? makeAddress(mailbox.local, mailbox.domain, route) : mailbox,
    rest: rest.trim(),
  };
}
