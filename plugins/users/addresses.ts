import { domainToASCII } from 'node:url';

/**
 * Address text as the users plugin compares it: the local part lower-cased (mailboxes here are
 * case-insensitive, as with nearly every server, although RFC 5321 §2.4 lets a server choose) and
 * the domain lower-cased in its ASCII (A-label) form, so `bob@Bücher.test` and
 * `BOB@xn--bcher-kva.test` are the same key.
 */
export interface AddressKey {
  readonly local: string;
  readonly domain: string;
  /** `local@domain`, the lookup key. */
  readonly key: string;
}

// RFC 5322 atext, plus any non-ASCII character (RFC 6531).
const ATOM = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\uffff]+$/;
const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** The ASCII form of a domain, lower-cased; null when it is not a valid domain name. */
export function asciiDomain(domain: string): string | null {
  const lower = domain.toLowerCase();
  if (lower === '' || lower.endsWith('.')) return null;
  const ascii = /[^\x00-\x7f]/.test(lower) ? domainToASCII(lower) : lower;
  if (!ascii || ascii.length > 253) return null;
  return ascii.split('.').every((l) => LABEL.test(l)) ? ascii : null;
}

/** A dot-atom local part (no quoting): what the directory accepts for its own addresses. */
export function isDotAtom(local: string): boolean {
  if (local === '' || Buffer.byteLength(local) > 64) return false;
  return local.split('.').every((part) => ATOM.test(part));
}

/** The key of a local part and domain (as the SMTP engine hands them over). */
export function keyOf(local: string, domain: string): AddressKey {
  const l = local.toLowerCase();
  const d = asciiDomain(domain) ?? domain.toLowerCase();
  return { local: l, domain: d, key: `${l}@${d}` };
}

/**
 * Parses address text from a users or aliases file (`bob@hamburger.edu`, no angle brackets,
 * dot-atom local part without routing characters). Null when it is not such an address.
 */
export function parseAddressText(text: string): AddressKey | null {
  const at = text.lastIndexOf('@');
  if (at <= 0) return null;
  const local = text.slice(0, at);
  const domain = asciiDomain(text.slice(at + 1));
  if (!domain || !isDotAtom(local) || looksLikeRouting(local)) return null;
  return keyOf(local, domain);
}

/**
 * Characters that once meant routing inside a local part: `%` (the "percent hack"), `!` (UUCP
 * bang paths) and `@` (a quoted `"user@elsewhere"`). No mailbox or alias may have one, and no
 * catch-all or sub-address rule matches one: such a recipient at a local domain is unknown.
 */
export function looksLikeRouting(local: string): boolean {
  return /[%!@]/.test(local);
}
