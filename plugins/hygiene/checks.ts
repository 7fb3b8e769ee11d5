import { isIPv4, isIPv6 } from 'node:net';
import { networkOf, type DnsResolver } from '../../core/index.js';
import type { Fcrdns, Finding } from './api.js';

/** At most this many PTR names are resolved forward (a PTR set is the client's to make large). */
const MAX_NAMES = 10;

/** One address in canonical form (`::ffff:192.0.2.1` is `192.0.2.1`), to compare two. */
export const canonical = (ip: string): string => networkOf(ip, { ipv4: 32, ipv6: 128 });

/**
 * RFC 5321 §4.1.2 Domain: dot-separated labels of letters, digits and inner hyphens (and, with
 * SMTPUTF8, U-labels: RFC 6531 §3.3), each at most 63 octets, 255 in all.
 */
const LABEL = /^[a-z0-9\u0080-\uffff]([a-z0-9\u0080-\uffff-]*[a-z0-9\u0080-\uffff])?$/i;
function isDomain(name: string): boolean {
  return name.length <= 255 && name.split('.').every((l) => l.length <= 63 && LABEL.test(l));
}

/**
 * The address of an address literal (RFC 5321 §4.1.3: `[192.0.2.1]`, `[IPv6:2001:db8::1]`), or
 * `general` for a valid General-address-literal (`[tag:text]`), or null when it is not one.
 */
function literal(text: string): string | 'general' | null {
  const inner = /^\[(.*)\]$/.exec(text)?.[1];
  if (inner === undefined) return null;
  if (isIPv4(inner)) return inner;
  const v6 = /^ipv6:(.*)$/i.exec(inner)?.[1];
  if (v6 !== undefined) return isIPv6(v6) ? v6 : null;
  return /^[a-z0-9-]*[a-z0-9]:[\x21-\x5a\x5e-\x7e]+$/i.test(inner) ? 'general' : null;
}

export interface Ours {
  /** Our host name and local domains, lower-cased. */
  readonly names: readonly string[];
  /** The address the client connected to. */
  readonly address: string;
}

/** What is wrong with a HELO name given by `client`; empty when nothing is. */
export function heloFindings(helo: string, client: string, ours: Ours): Finding[] {
  const name = helo.toLowerCase().replace(/\.$/, '');
  if (isIPv4(name) || isIPv6(name)) return ['helo-bare-ip'];
  const lit = literal(name);
  if (lit === 'general') return [];
  if (lit !== null) {
    if (canonical(lit) === canonical(ours.address)) return ['helo-ours'];
    return canonical(lit) === canonical(client) ? [] : ['helo-literal-mismatch'];
  }
  if (!isDomain(name)) return ['helo-invalid'];
  if (ours.names.includes(name)) return ['helo-ours'];
  return name.includes('.') ? [] : ['helo-no-dot'];
}

/** A DNS error that means "there is no such record" rather than "DNS failed". */
const absent = (err: unknown): boolean => {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOTFOUND' || code === 'ENODATA';
};
const codeOf = (err: unknown): string => (err as NodeJS.ErrnoException).code ?? String(err);

/**
 * FCrDNS (RFC 8601 §3 "iprev"): the PTR names of `ip`, each resolved forward (A for an IPv4
 * client, AAAA for IPv6) and matched against `ip`. `deadline` ends the whole check: what has not
 * answered by then is a temperror.
 */
export async function fcrdns(dns: DnsResolver, ip: string, deadline: Promise<void>): Promise<Fcrdns> {
  const addr = canonical(ip).replace(/\/\d+$/, '');
  const timedOut = deadline.then(() => 'timeout' as const);
  const check = async (): Promise<Fcrdns> => {
    let names: string[];
    try {
      names = (await dns.reverse(addr)).map((n) => n.toLowerCase().replace(/\.$/, ''));
    } catch (err) {
      if (absent(err)) return { result: 'fail', names: [], confirmed: null, detail: 'no PTR' };
      return { result: 'temperror', names: [], confirmed: null, detail: `PTR: ${codeOf(err)}` };
    }
    names = [...new Set(names)].slice(0, MAX_NAMES);
    if (names.length === 0) return { result: 'fail', names, confirmed: null, detail: 'no PTR' };
    const forward = isIPv4(addr) ? (n: string) => dns.resolve4(n) : (n: string) => dns.resolve6(n);
    const answers = await Promise.all(
      names.map((n) =>
        forward(n).then(
          (as) => ({ name: n, match: as.some((a) => canonical(a) === canonical(addr)), error: null }),
          (err: unknown) => ({ name: n, match: false, error: absent(err) ? null : codeOf(err) }),
        ),
      ),
    );
    const confirmed = answers.find((a) => a.match)?.name ?? null;
    if (confirmed) return { result: 'pass', names, confirmed, detail: `${confirmed} resolves back` };
    const failed = answers.find((a) => a.error !== null);
    // A name we could not resolve might have resolved back: that is not a fail.
    if (failed)
      return { result: 'temperror', names, confirmed: null, detail: `${failed.name}: ${failed.error}` };
    return { result: 'fail', names, confirmed: null, detail: 'no PTR name resolves back' };
  };
  const r = await Promise.race([check(), timedOut]);
  return r === 'timeout' ? { result: 'temperror', names: [], confirmed: null, detail: 'timeout' } : r;
}
