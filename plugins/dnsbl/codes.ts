/**
 * The names a list is queried under and what its answers mean. Pure functions, no I/O.
 */
import { isIPv4, isIPv6 } from 'node:net';
import { domainToASCII } from 'node:url';

/**
 * The query name of a client address under `zone` (RFC 5782 §2.1 for IPv4: octets reversed;
 * §2.4 for IPv6: the 32 nibbles reversed). An IPv4-mapped IPv6 address is its IPv4 address.
 */
export function reversedName(ip: string, zone: string): string | null {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  const v4 = mapped ? mapped[1]! : ip;
  if (isIPv4(v4)) return `${v4.split('.').reverse().join('.')}.${zone}`;
  if (!isIPv6(ip)) return null;
  return `${expandIPv6(ip).split('').reverse().join('.')}.${zone}`;
}

/** The 32 hex digits of an IPv6 address, without colons. */
export function expandIPv6(ip: string): string {
  let text = ip.toLowerCase().split('%')[0]!;
  // An embedded IPv4 tail (::ffff:1.2.3.4 and the like) becomes its two groups.
  const tail = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (tail) {
    const o = tail.slice(1).map(Number) as [number, number, number, number];
    const hex = (a: number, b: number): string => ((a << 8) | b).toString(16);
    text = `${text.slice(0, tail.index)}${hex(o[0], o[1])}:${hex(o[2], o[3])}`;
  }
  const [head = '', rest] = text.split('::');
  const left = head === '' ? [] : head.split(':');
  const right = rest === undefined || rest === '' ? [] : rest.split(':');
  const groups = [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return groups.map((g) => g.padStart(4, '0')).join('');
}

/**
 * The query name of a domain under `zone` (RFC 5782 §2.2), or null when the name is not one a
 * domain list can hold: an address literal, a name without a dot, or too long for DNS.
 */
export function domainName(domain: string, zone: string): string | null {
  if (domain.startsWith('[') || isIPv4(domain) || isIPv6(domain)) return null;
  const ascii = domainToASCII(domain.replace(/\.$/, '')).toLowerCase();
  if (!ascii || !ascii.includes('.') || !/^[a-z0-9_.-]+$/.test(ascii)) return null;
  const name = `${ascii}.${zone}`;
  return name.length > 253 || name.split('.').some((l) => l.length === 0 || l.length > 63) ? null : name;
}

/**
 * A code that says the list will not answer us rather than anything about the subject: anything
 * outside 127.0.0.0/8 (RFC 5782 §2.1: listings are in 127.0.0.0/8), 127.255.255.0/24 (what
 * Spamhaus and others answer to open resolvers and heavy users), and the list's own `refused`.
 */
export function isRefusalCode(code: string, refused: readonly string[]): boolean {
  return !code.startsWith('127.') || code.startsWith('127.255.255.') || refused.includes(code);
}

export interface Classified {
  readonly status: 'listed' | 'clear' | 'refused';
  readonly reasons: readonly string[];
  /** The codes that made it `listed`, or `refused`. */
  readonly decisive: readonly string[];
}

/**
 * What a list's answer means. A listing code wins over a refusal code in the same answer; codes
 * the config does not map are neither.
 */
export function classify(
  codes: readonly string[],
  list: { readonly codes?: Readonly<Record<string, string>>; readonly refused: readonly string[] },
): Classified {
  const refusals = codes.filter((c) => isRefusalCode(c, list.refused));
  const listings = codes.filter(
    (c) => !isRefusalCode(c, list.refused) && (list.codes === undefined || c in list.codes),
  );
  if (listings.length > 0) {
    const reasons = [...new Set(listings.map((c) => list.codes?.[c] ?? 'listed'))];
    return { status: 'listed', reasons, decisive: listings };
  }
  if (refusals.length > 0) return { status: 'refused', reasons: [], decisive: refusals };
  return { status: 'clear', reasons: [], decisive: [] };
}
