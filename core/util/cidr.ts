import { BlockList, isIPv4, isIPv6 } from 'node:net';

/**
 * Checks one network in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`) or a single address.
 * Returns what is wrong, or null when it is good. Host bits set after the prefix
 * (`192.0.2.1/24`) are refused: they usually mean a typo, and the reader cannot tell which
 * network was meant.
 */
export function cidrProblem(text: string): string | null {
  const m = /^([^/\s]+)(?:\/(\d{1,3}))?$/.exec(text.trim());
  if (!m) return `expected a network such as 192.0.2.0/24 or 2001:db8::/32, got "${text}"`;
  const [, ip = '', bits] = m;
  const v4 = isIPv4(ip);
  if (!v4 && !isIPv6(ip)) return `expected an IPv4 or IPv6 address before the "/", got "${ip}"`;
  const max = v4 ? 32 : 128;
  const prefix = bits === undefined ? max : Number(bits);
  if (prefix > max) return `expected a prefix length of 0 to ${max} for ${ip}, got /${bits}`;
  const network = networkAddress(ip, prefix, v4);
  if (network !== null && network !== canonical(ip, v4)) {
    return `expected no host bits after the prefix in "${text}"; did you mean ${network}/${prefix}?`;
  }
  return null;
}

function ipToBigInt(ip: string, v4: boolean): bigint {
  if (v4) return ip.split('.').reduce((acc, o) => (acc << 8n) | BigInt(Number(o)), 0n);
  const [head = '', tail] = ip.split('::');
  const groups = (s: string): number[] =>
    s === ''
      ? []
      : s.split(':').flatMap((g) => {
          if (!g.includes('.')) return [parseInt(g, 16)];
          const o = g.split('.').map(Number) as [number, number, number, number];
          return [(o[0] << 8) | o[1], (o[2] << 8) | o[3]];
        });
  const left = groups(head);
  const right = tail === undefined ? [] : groups(tail);
  const all = [...left, ...Array<number>(8 - left.length - right.length).fill(0), ...right];
  return all.reduce((acc, g) => (acc << 16n) | BigInt(g), 0n);
}

function bigIntToIp(n: bigint, v4: boolean): string {
  if (v4) return [24n, 16n, 8n, 0n].map((s) => String((n >> s) & 255n)).join('.');
  const groups: string[] = [];
  for (let s = 112n; s >= 0n; s -= 16n) groups.push(((n >> s) & 0xffffn).toString(16));
  // Shorten the longest run of zero groups, as the canonical text form does (RFC 5952).
  const text = groups.join(':');
  const runs = [...text.matchAll(/(?:^|:)0(?::0)+(?::|$)/g)];
  if (runs.length === 0) return text;
  const longest = runs.reduce((a, b) => (b[0].length > a[0].length ? b : a));
  return `${text.slice(0, longest.index)}::${text.slice(longest.index + longest[0].length)}`;
}

function canonical(ip: string, v4: boolean): string {
  return bigIntToIp(ipToBigInt(ip, v4), v4);
}

function networkAddress(ip: string, prefix: number, v4: boolean): string | null {
  const width = v4 ? 32n : 128n;
  const hostBits = width - BigInt(prefix);
  const mask = ((1n << width) - 1n) ^ ((1n << hostBits) - 1n);
  return bigIntToIp(ipToBigInt(ip, v4) & mask, v4);
}

/**
 * Compiles a list of networks into a matcher. Throws on a bad entry (validate with cidrProblem
 * first to report it nicely). IPv4-mapped IPv6 client addresses (`::ffff:192.0.2.1`, what a
 * dual-stack listener sees) match the IPv4 networks.
 */
export function compileCidrs(list: readonly string[]): (address: string) => boolean {
  // Asked for every client at several hooks: an empty list (a plugin told to judge everyone)
  // answers without parsing the address.
  if (list.length === 0) return () => false;
  const block = new BlockList();
  for (const text of list) {
    const problem = cidrProblem(text);
    if (problem) throw new RangeError(problem);
    const [ip = '', bits] = text.trim().split('/');
    const family = isIPv4(ip) ? 'ipv4' : 'ipv6';
    block.addSubnet(ip, bits === undefined ? (family === 'ipv4' ? 32 : 128) : Number(bits), family);
  }
  return (address: string): boolean => {
    const plain = address.replace(/%.*$/, '');
    if (isIPv4(plain)) return block.check(plain, 'ipv4');
    if (isIPv6(plain)) return block.check(plain, 'ipv6');
    return false;
  };
}

/**
 * The network a client address belongs to, as `address/prefix` in canonical form
 * (`192.0.2.0/24`, `2001:db8:1:2::/64`): what per-network counters key on. An IPv4-mapped IPv6
 * address (`::ffff:192.0.2.1`) counts as its IPv4 address; a zone (`%eth0`) is dropped. Text
 * that is not an address is returned as it is.
 */
export function networkOf(
  address: string,
  prefixes: { readonly ipv4: number; readonly ipv6: number },
): string {
  const plain = address.replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(plain);
  const ip = mapped ? mapped[1]! : plain;
  const v4 = isIPv4(ip);
  if (!v4 && !isIPv6(ip)) return address;
  const prefix = v4 ? prefixes.ipv4 : prefixes.ipv6;
  return `${v4 ? ipv4Network(ip, prefix) : networkAddress(ip, prefix, false)}/${prefix}`;
}

/**
 * networkAddress for IPv4 in plain numbers: several hooks ask it for every client, and the
 * BigInt form costs microseconds a call. `ip` passed isIPv4, so it is already canonical.
 */
function ipv4Network(ip: string, prefix: number): string {
  if (prefix === 32) return ip;
  const o = ip.split('.');
  const n = ((Number(o[0]) << 24) | (Number(o[1]) << 16) | (Number(o[2]) << 8) | Number(o[3])) >>> 0;
  const masked = prefix === 0 ? 0 : (n & (~0 << (32 - prefix))) >>> 0;
  return `${masked >>> 24}.${(masked >>> 16) & 255}.${(masked >>> 8) & 255}.${masked & 255}`;
}
