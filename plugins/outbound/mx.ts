/**
 * Where mail for a domain goes (RFC 5321 §5.1): its MX hosts in preference order (random among
 * equals), the domain itself when it has no MX (the implicit MX), nowhere when it publishes a
 * null MX (RFC 7505); then every address of each host, in the configured family order. Our own
 * listeners are recognised so that a domain pointing back at us is a loop, not a delivery.
 */
import { type DnsResolver, type ReplySpec } from '../../core/index.js';
import { isIP, isIPv4 } from 'node:net';
import { networkInterfaces } from 'node:os';

export type Family = 'ipv4' | 'ipv6';

export interface MxHost {
  readonly host: string;
  readonly preference: number;
}

export interface ResolvedHost extends MxHost {
  readonly addresses: readonly string[];
  /** The host's address lookups failed temporarily (it may have addresses we did not learn). */
  readonly temporary: string | null;
}

export interface Hop {
  /** The host name (or address literal) as found in DNS or the config. */
  readonly host: string;
  readonly ip: string;
}

/** Where to connect, in order; or a final or temporary refusal for every recipient. */
export type Plan =
  | { readonly kind: 'hops'; readonly hops: readonly Hop[] }
  | { readonly kind: 'failed'; readonly reply: ReplySpec }
  | { readonly kind: 'deferred'; readonly reply: ReplySpec };

/** Node's codes for a name that does not exist, and for a name without records of the type asked. */
const NXDOMAIN = 'ENOTFOUND';
const NODATA = 'ENODATA';

function codeOf(err: unknown): string {
  return (err as NodeJS.ErrnoException)?.code ?? String(err);
}

const trimDot = (h: string): string => h.replace(/\.$/, '').toLowerCase();

/** Shuffles in place (Fisher–Yates) with the given random source. */
function shuffle<T>(items: T[], random: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

/** MX records sorted by preference, equal preferences in random order (RFC 5321 §5.1). */
export function orderMx(
  records: readonly { exchange: string; priority: number }[],
  random = Math.random,
): MxHost[] {
  const byPref = new Map<number, MxHost[]>();
  for (const r of records) {
    const list = byPref.get(r.priority) ?? [];
    list.push({ host: trimDot(r.exchange), preference: r.priority });
    byPref.set(r.priority, list);
  }
  return [...byPref.keys()].sort((a, b) => a - b).flatMap((p) => shuffle(byPref.get(p)!, random));
}

export type MxLookup =
  | { readonly kind: 'hosts'; readonly hosts: readonly MxHost[]; readonly implicit: boolean }
  | { readonly kind: 'null' }
  | { readonly kind: 'nxdomain' }
  | { readonly kind: 'error'; readonly code: string };

/** The MX hosts of a domain (A-label form), the domain itself when it has none. */
export async function lookupMx(dns: DnsResolver, domain: string, random = Math.random): Promise<MxLookup> {
  try {
    const records = await dns.resolveMx(domain);
    if (records.length === 0)
      return { kind: 'hosts', hosts: [{ host: domain, preference: 0 }], implicit: true };
    // RFC 7505: a single MX of "." says the domain takes no mail. A "." among others is ignored.
    const real = records.filter((r) => trimDot(r.exchange) !== '');
    if (real.length === 0) return { kind: 'null' };
    return { kind: 'hosts', hosts: orderMx(real, random), implicit: false };
  } catch (err) {
    const code = codeOf(err);
    if (code === NXDOMAIN) return { kind: 'nxdomain' };
    // The domain exists but has no MX: it is its own mail exchanger (RFC 5321 §5.1).
    if (code === NODATA) return { kind: 'hosts', hosts: [{ host: domain, preference: 0 }], implicit: true };
    return { kind: 'error', code };
  }
}

/** Every address of a host, in family order. An IP address stands for itself. */
export async function lookupAddresses(
  dns: DnsResolver,
  host: string,
  families: readonly Family[],
): Promise<{ addresses: string[]; temporary: string | null }> {
  if (isIP(host))
    return { addresses: families.includes(isIPv4(host) ? 'ipv4' : 'ipv6') ? [host] : [], temporary: null };
  const lookups = families.map(async (f) => {
    try {
      return { addresses: await (f === 'ipv4' ? dns.resolve4(host) : dns.resolve6(host)), temporary: null };
    } catch (err) {
      const code = codeOf(err);
      // No such name, or no record of this type: no addresses, and nothing to retry for.
      if (code === NXDOMAIN || code === NODATA) return { addresses: [], temporary: null };
      return {
        addresses: [],
        temporary: `${f === 'ipv4' ? 'A' : 'AAAA'} lookup for ${host} failed: ${code}`,
      };
    }
  });
  const results = await Promise.all(lookups);
  return {
    addresses: results.flatMap((r) => r.addresses),
    temporary: results.find((r) => r.temporary)?.temporary ?? null,
  };
}

/** The IP of an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), or null. */
export function literalAddress(domain: string): string | null {
  const m = /^\[(?:IPv6:)?([^\]]+)\]$/i.exec(domain);
  return m && isIP(m[1]!) ? m[1]! : null;
}

/**
 * Recognises this server: a host name equal to ours, or an address and port one of our listeners
 * accepts on (a wildcard listener accepts on every local address).
 */
export class Self {
  private readonly names: Set<string>;

  constructor(
    names: readonly string[],
    private readonly listeners: readonly { readonly address: string; readonly port: number }[],
    private readonly localAddresses: () => ReadonlySet<string> = interfaceAddresses,
  ) {
    this.names = new Set(names.map(trimDot));
  }

  isName(host: string): boolean {
    return this.names.has(trimDot(host));
  }

  isAddress(ip: string, port: number): boolean {
    const addr = normalize(ip);
    for (const l of this.listeners) {
      if (l.port !== port) continue;
      const listen = normalize(l.address);
      if (listen === addr) return true;
      const wildcard = listen === '0.0.0.0' || listen === '::';
      if (!wildcard) continue;
      // '::' takes IPv4 too (dual stack); '0.0.0.0' only IPv4.
      if (listen === '0.0.0.0' && !isIPv4(addr)) continue;
      if (isLoopback(addr) || this.localAddresses().has(addr)) return true;
    }
    return false;
  }
}

function normalize(ip: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  return (m ? m[1]! : ip).toLowerCase();
}

function isLoopback(ip: string): boolean {
  return ip === '::1' || (isIPv4(ip) && ip.startsWith('127.'));
}

function interfaceAddresses(): ReadonlySet<string> {
  const out = new Set<string>();
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) out.add(normalize(a.address.replace(/%.*$/, '')));
  }
  return out;
}

export interface PlanOptions {
  readonly dns: DnsResolver;
  readonly families: readonly Family[];
  readonly port: number;
  readonly self: Self;
  readonly random?: () => number;
}

const reply = (code: number, enhanced: string, text: string): ReplySpec => ({ code, enhanced, text });

/** Resolves the hosts' addresses and drops ourselves (RFC 5321 §5.1); a loop if nothing is left. */
export async function planHosts(what: string, hosts: readonly MxHost[], opts: PlanOptions): Promise<Plan> {
  const resolved: ResolvedHost[] = await Promise.all(
    hosts.map(async (h) => ({ ...h, ...(await lookupAddresses(opts.dns, h.host, opts.families)) })),
  );
  // When we are one of the hosts, only hosts more preferred than we are may be tried.
  const mine = resolved.filter(
    (h) => opts.self.isName(h.host) || h.addresses.some((ip) => opts.self.isAddress(ip, opts.port)),
  );
  const best = mine.length ? Math.min(...mine.map((h) => h.preference)) : Infinity;
  const usable = resolved.filter((h) => h.preference < best);
  if (mine.length && usable.length === 0) {
    return { kind: 'failed', reply: reply(554, '5.4.6', `mail for ${what} loops back to myself`) };
  }
  const hops = usable.flatMap((h) => h.addresses.map((ip) => ({ host: h.host, ip })));
  if (hops.length > 0) return { kind: 'hops', hops };
  const temporary = usable.find((h) => h.temporary)?.temporary;
  if (temporary)
    return {
      kind: 'deferred',
      reply: reply(451, '4.4.3', `Host or domain name lookup failed: ${temporary}`),
    };
  const names = usable.map((h) => h.host).join(', ');
  return {
    kind: 'failed',
    reply: reply(550, '5.4.4', `Unable to route: no address found for ${what} (${names})`),
  };
}

/** The plan for a recipient domain (A-label form): MX lookup, then `planHosts`. */
export async function planDomain(domain: string, opts: PlanOptions): Promise<Plan> {
  const literal = literalAddress(domain);
  if (literal) return planHosts(domain, [{ host: literal, preference: 0 }], opts);
  const mx = await lookupMx(opts.dns, domain, opts.random);
  switch (mx.kind) {
    case 'null':
      return {
        kind: 'failed',
        reply: reply(556, '5.1.10', `Domain ${domain} does not accept mail (null MX)`),
      };
    case 'nxdomain':
      return {
        kind: 'failed',
        reply: reply(550, '5.1.2', `Domain ${domain} does not exist (DNS: NXDOMAIN)`),
      };
    case 'error':
      return {
        kind: 'deferred',
        reply: reply(451, '4.4.3', `Host or domain name lookup failed: MX lookup for ${domain}: ${mx.code}`),
      };
    case 'hosts':
      return planHosts(domain, mx.hosts, opts);
  }
}
