import { isIPv4, isIPv6, type Socket } from 'node:net';

/*
 * The PROXY protocol (HAProxy, "The PROXY protocol", versions 1 and 2): a proxy that forwards a
 * TCP connection first sends one header saying who the client is and whom it connected to.
 *
 *   v1: "PROXY TCP4|TCP6 <src> <dst> <srcport> <dstport>\r\n" or "PROXY UNKNOWN[ …]\r\n",
 *       at most 107 octets with the CRLF (spec §2.1).
 *   v2: 12-octet signature, version/command octet (0x20 LOCAL, 0x21 PROXY), family/transport
 *       octet, 16-bit big-endian length, then `length` octets: the addresses (12 for IPv4,
 *       36 for IPv6, 216 for UNIX) and optional TLVs, which are skipped (spec §2.2).
 *
 * LOCAL (v2) and UNKNOWN (v1) carry no client: the proxy speaks for itself (a health check), so
 * the connection keeps its real endpoints. So does a v2 PROXY of an unspecified or UNIX family
 * (spec §2.2: the receiver ignores the address block then).
 */

/** The v1 header's upper bound, CRLF included (spec §2.1). */
export const PROXY_V1_MAX = 107;
/**
 * The v2 header's upper bound in this server (16-octet fixed part plus the length field's
 * octets). The format allows 65 551; 4096 holds the addresses and any TLVs a proxy sends in
 * practice, and bounds what a connection can make us buffer before its first SMTP byte.
 */
export const PROXY_V2_MAX = 4096;

const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V1_PREFIX = Buffer.from('PROXY ', 'latin1');

export interface ProxyEndpoints {
  readonly remote: { readonly address: string; readonly port: number };
  readonly local: { readonly address: string; readonly port: number };
}

/** A complete, valid header. */
export interface ProxyHeader {
  readonly version: 1 | 2;
  /** The client and the address it connected to; null when the proxy speaks for itself (LOCAL, UNKNOWN). */
  readonly endpoints: ProxyEndpoints | null;
  /** Octets the header took; what follows belongs to the client. */
  readonly length: number;
}

export type ProxyParse =
  | { readonly kind: 'header'; readonly header: ProxyHeader }
  | { readonly kind: 'incomplete' }
  | { readonly kind: 'invalid'; readonly reason: string };

const INCOMPLETE: ProxyParse = Object.freeze({ kind: 'incomplete' });
const invalid = (reason: string): ProxyParse => ({ kind: 'invalid', reason });

/** Whether `buf` so far agrees with the start of `expected`. */
function startsLike(buf: Buffer, expected: Buffer): boolean {
  const n = Math.min(buf.length, expected.length);
  return buf.subarray(0, n).equals(expected.subarray(0, n));
}

/**
 * Reads one PROXY header from the start of `buf`: a header, `incomplete` (more octets may make
 * one; the caller enforces the size bound with `PROXY_V1_MAX`/`PROXY_V2_MAX` and the deadline),
 * or `invalid` with a reason for the log. A pure function: no socket, no state.
 */
export function parseProxyHeader(buf: Buffer): ProxyParse {
  if (buf.length === 0) return INCOMPLETE;
  if (startsLike(buf, V2_SIGNATURE)) return buf.length < 16 ? INCOMPLETE : parseV2(buf);
  if (startsLike(buf, V1_PREFIX)) return buf.length < V1_PREFIX.length ? INCOMPLETE : parseV1(buf);
  return invalid('no PROXY header');
}

const PORT = /^(?:0|[1-9][0-9]{0,4})$/;

function port(text: string): number | null {
  if (!PORT.test(text)) return null;
  const n = Number(text);
  return n <= 65535 ? n : null;
}

function parseV1(buf: Buffer): ProxyParse {
  const cr = buf.indexOf('\r\n', 0, 'latin1');
  if (cr < 0) {
    return buf.length >= PROXY_V1_MAX ? invalid('v1 header longer than 107 octets') : INCOMPLETE;
  }
  const length = cr + 2;
  if (length > PROXY_V1_MAX) return invalid('v1 header longer than 107 octets');
  const line = buf.subarray(0, cr).toString('latin1');
  const parts = line.split(' ');
  // Spec §2.1: UNKNOWN may be followed by anything up to the CRLF, which the receiver ignores.
  if (parts[1] === 'UNKNOWN') return { kind: 'header', header: { version: 1, endpoints: null, length } };
  if (parts.length !== 6) return invalid('v1 header does not have 6 fields');
  const [, proto, src = '', dst = '', sport = '', dport = ''] = parts;
  const isIp = proto === 'TCP4' ? isIPv4 : proto === 'TCP6' ? isIPv6 : null;
  if (!isIp) return invalid(`v1 protocol "${proto?.slice(0, 16)}" is not TCP4, TCP6 or UNKNOWN`);
  if (!isIp(src) || !isIp(dst)) return invalid(`v1 addresses are not ${proto} addresses`);
  const sp = port(sport);
  const dp = port(dport);
  if (sp === null || dp === null) return invalid('v1 ports are not numbers from 0 to 65535');
  return {
    kind: 'header',
    header: {
      version: 1,
      endpoints: { remote: { address: src, port: sp }, local: { address: dst, port: dp } },
      length,
    },
  };
}

function ipv6(b: Buffer): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(b.readUInt16BE(i).toString(16));
  // Canonical text form (RFC 5952), so the address compares equal to what a socket reports.
  const full = groups.join(':');
  let best = { at: -1, len: 0 };
  for (let i = 0; i < 8;) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > best.len) best = { at: i, len: j - i };
    i = j;
  }
  if (best.len < 2) return full;
  const head = groups.slice(0, best.at).join(':');
  const tail = groups.slice(best.at + best.len).join(':');
  return `${head}::${tail}`;
}

function parseV2(buf: Buffer): ProxyParse {
  const verCmd = buf[12]!;
  const famProto = buf[13]!;
  const len = buf.readUInt16BE(14);
  if (verCmd >> 4 !== 2) return invalid(`v2 version ${verCmd >> 4} is not 2`);
  const command = verCmd & 0x0f;
  if (command > 1) return invalid(`v2 command ${command} is neither LOCAL nor PROXY`);
  const length = 16 + len;
  if (length > PROXY_V2_MAX) return invalid(`v2 header of ${length} octets exceeds ${PROXY_V2_MAX}`);
  if (buf.length < length) return INCOMPLETE;
  // LOCAL: the proxy's own connection (a health check); the address block is ignored (§2.2).
  if (command === 0) return { kind: 'header', header: { version: 2, endpoints: null, length } };
  const family = famProto >> 4;
  const transport = famProto & 0x0f;
  if (family === 0 || family === 3)
    return { kind: 'header', header: { version: 2, endpoints: null, length } };
  if (transport !== 1) return invalid('v2 transport is not a stream (TCP)');
  const block = buf.subarray(16, length);
  if (family === 1) {
    if (block.length < 12) return invalid('v2 IPv4 address block shorter than 12 octets');
    const ip = (o: number): string => `${block[o]}.${block[o + 1]}.${block[o + 2]}.${block[o + 3]}`;
    return {
      kind: 'header',
      header: {
        version: 2,
        endpoints: {
          remote: { address: ip(0), port: block.readUInt16BE(8) },
          local: { address: ip(4), port: block.readUInt16BE(10) },
        },
        length,
      },
    };
  }
  if (family === 2) {
    if (block.length < 36) return invalid('v2 IPv6 address block shorter than 36 octets');
    return {
      kind: 'header',
      header: {
        version: 2,
        endpoints: {
          remote: { address: ipv6(block.subarray(0, 16)), port: block.readUInt16BE(32) },
          local: { address: ipv6(block.subarray(16, 32)), port: block.readUInt16BE(34) },
        },
        length,
      },
    };
  }
  return invalid(`v2 address family ${family} is unknown`);
}

export type ProxyRead =
  | { readonly ok: true; readonly header: ProxyHeader; readonly rest: Buffer }
  | { readonly ok: false; readonly reason: string };

/**
 * Reads the PROXY header from a freshly accepted socket, before anything is sent to it: within
 * `timeoutMs` in total (a byte arriving buys no time) and within the size bound of its version.
 * On success the socket is left paused and `rest` holds the octets that came after the header
 * (the client's), which the session must see first. On failure the caller closes the socket;
 * nothing here writes to it.
 */
export function readProxyHeader(socket: Socket, timeoutMs: number): Promise<ProxyRead> {
  return new Promise((resolve) => {
    let buf: Buffer = Buffer.alloc(0);
    const done = (result: ProxyRead): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onEnd);
      socket.pause();
      resolve(result);
    };
    const onData = (chunk: Buffer): void => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const parsed = parseProxyHeader(buf);
      if (parsed.kind === 'invalid') return done({ ok: false, reason: parsed.reason });
      if (parsed.kind === 'incomplete') {
        // Past both bounds nothing valid can follow (the parsers catch each sooner where they can).
        if (buf.length >= PROXY_V2_MAX) done({ ok: false, reason: 'header too long' });
        return;
      }
      done({ ok: true, header: parsed.header, rest: buf.subarray(parsed.header.length) });
    };
    const onEnd = (): void =>
      done({
        ok: false,
        reason: buf.length ? 'closed in the middle of the header' : 'closed before the header',
      });
    const timer = setTimeout(
      () =>
        done({
          ok: false,
          reason: buf.length ? 'header incomplete at the deadline' : 'no header by the deadline',
        }),
      timeoutMs,
    );
    socket.on('data', onData);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onEnd);
  });
}
