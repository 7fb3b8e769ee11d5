import { isIPv4, isIPv6 } from 'node:net';

/**
 * The client network a greylisting triplet names: the address cut to `v4` bits (IPv4, and IPv4
 * mapped into IPv6) or `v6` bits (IPv6), as `a.b.c.0/24` or `2001:db8:1:2::/64`. A sender's
 * outgoing servers often retry from another address of the same pool.
 */
export function clientNetwork(address: string, v4: number, v6: number): string {
  const plain = address.replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(plain);
  const ip4 = mapped ? mapped[1]! : plain;
  if (isIPv4(ip4)) {
    const n = ip4.split('.').reduce((acc, o) => acc * 256 + Number(o), 0);
    const masked = v4 === 0 ? 0 : Math.floor(n / 2 ** (32 - v4)) * 2 ** (32 - v4);
    const octets = [24, 16, 8, 0].map((s) => Math.floor(masked / 2 ** s) % 256);
    return `${octets.join('.')}/${v4}`;
  }
  if (!isIPv6(plain)) return plain;
  const [head = '', tail] = plain.split('::');
  const groups = (s: string): number[] =>
    s === ''
      ? []
      : s.split(':').flatMap((g) => {
          if (!g.includes('.')) return [parseInt(g, 16)];
          const o = g.split('.').map(Number);
          return [o[0]! * 256 + o[1]!, o[2]! * 256 + o[3]!];
        });
  const left = groups(head);
  const right = tail === undefined ? [] : groups(tail);
  const full = [...left, ...Array<number>(8 - left.length - right.length).fill(0), ...right];
  const value = full.reduce((acc, g) => (acc << 16n) | BigInt(g), 0n);
  const masked = (value >> BigInt(128 - v6)) << BigInt(128 - v6);
  const out = Array.from({ length: 8 }, (_, i) => Number((masked >> BigInt(112 - 16 * i)) & 0xffffn));
  // Shortest form: the longest run of zero groups becomes `::` (RFC 5952 §4.2).
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && out[j] === 0) j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  const hex = out.map((g) => g.toString(16));
  const text =
    best < 0 ? hex.join(':') : `${hex.slice(0, best).join(':')}::${hex.slice(best + bestLen).join(':')}`;
  return `${text}/${v6}`;
}
