/**
 * DANE for SMTP (RFC 7672): TLSA records of an MX host, trusted only when the configured
 * resolver says it validated them (the AD bit, RFC 4035 §3.2.3), and the check of a peer's
 * certificate chain against them (RFC 7671, RFC 6698 §2.1).
 *
 * Node's resolver does not show the AD bit, so TLSA queries are made here, over UDP with
 * dns-packet, to the same servers the core resolver uses (`dns.servers`). An AD bit is only as
 * trustworthy as the path to the resolver: it is meant for a validating resolver on this machine
 * or a trusted network (README.md).
 */
import { createHash, X509Certificate } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { createRequire } from 'node:module';
import { isIP } from 'node:net';
import type { PluginApi } from '../../core/index.js';

/** The parts of dns-packet used here (it ships no types). */
interface DnsPacket {
  encode(packet: {
    type: 'query';
    id: number;
    flags: number;
    questions: { type: string; name: string }[];
    additionals: { type: 'OPT'; name: '.'; udpPayloadSize: number }[];
  }): Buffer;
  decode(buf: Buffer): {
    id: number;
    rcode: string;
    flag_ad: boolean;
    flag_tc: boolean;
    answers?: { type: string; name: string; data: unknown }[];
  };
  RECURSION_DESIRED: number;
  AUTHENTIC_DATA: number;
}
const dnsPacket = createRequire(import.meta.url)('dns-packet') as DnsPacket;

/** One TLSA record (RFC 6698 §2.1). */
export interface Tlsa {
  readonly usage: number;
  readonly selector: number;
  readonly matchingType: number;
  readonly data: Buffer;
}

/** `3 1 1 1a2b…` (the data shortened), for logs and replies. */
export function describeTlsa(r: Tlsa): string {
  const hex = r.data.toString('hex');
  return `${r.usage} ${r.selector} ${r.matchingType} ${hex.length > 16 ? `${hex.slice(0, 16)}…` : hex}`;
}

/**
 * What the TLSA lookup for one MX host says: `none` — no authenticated records (none exist, or
 * the answer was not validated: DANE does not apply); `records` — validated records, so TLS is
 * mandatory; `failed` — no usable answer (SERVFAIL, a timeout), so the host must not be used
 * without them (RFC 7672 §2.2: an attacker could cause the failure to strip DANE).
 */
export type TlsaLookup =
  | { readonly kind: 'none'; readonly authenticated: boolean }
  | { readonly kind: 'records'; readonly records: readonly Tlsa[] }
  | { readonly kind: 'failed'; readonly reason: string };

/** `127.0.0.1`, `127.0.0.1:5353`, `[::1]:53` (as Resolver.getServers gives them) → host and port. */
function parseServer(s: string): { host: string; port: number } {
  if (isIP(s)) return { host: s, port: 53 };
  const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(s);
  if (v6) return { host: v6[1]!, port: Number(v6[2] ?? 53) };
  const i = s.lastIndexOf(':');
  return { host: s.slice(0, i), port: Number(s.slice(i + 1)) };
}

/** One query to one server, with the AD bit asked for (RFC 6840 §5.7); rejects on timeout. */
async function ask(
  server: string,
  name: string,
  type: string,
  timeoutMs: number,
): Promise<ReturnType<DnsPacket['decode']>> {
  const { host, port } = parseServer(server);
  const sock = createSocket(isIP(host) === 6 ? 'udp6' : 'udp4');
  const id = Math.floor(Math.random() * 65_536);
  try {
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no answer from ${server} in ${timeoutMs} ms`)),
        timeoutMs,
      );
      sock.on('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      sock.on('message', (msg, rinfo) => {
        let p: ReturnType<DnsPacket['decode']>;
        try {
          p = dnsPacket.decode(msg);
        } catch {
          return; // not a DNS reply: keep waiting for the real one
        }
        if (p.id !== id || rinfo.port !== port) return;
        clearTimeout(timer);
        resolve(p);
      });
      sock.send(
        dnsPacket.encode({
          type: 'query',
          id,
          flags: dnsPacket.RECURSION_DESIRED | dnsPacket.AUTHENTIC_DATA,
          questions: [{ type, name }],
          // EDNS for a large enough reply; AD in the query is enough to learn the status (no DO:
          // the signatures themselves are not wanted).
          additionals: [{ type: 'OPT', name: '.', udpPayloadSize: 1232 }],
        }),
        port,
        host,
      );
    });
  } finally {
    sock.close();
  }
}

/**
 * The TLSA records for `_<port>._tcp.<host>` (RFC 7672 §2.2.3), asked of each server in turn
 * until one answers.
 */
export async function lookupTlsa(
  servers: readonly string[],
  host: string,
  port: number,
  timeoutMs: number,
): Promise<TlsaLookup> {
  const name = `_${port}._tcp.${host}`;
  let lastError = 'no DNS server configured';
  for (const server of servers) {
    let p: ReturnType<DnsPacket['decode']>;
    try {
      p = await ask(server, name, 'TLSA', timeoutMs);
    } catch (err) {
      lastError = (err as Error).message;
      continue;
    }
    // A truncated answer would need TCP; TLSA answers fit in 1232 bytes in practice.
    if (p.flag_tc) return { kind: 'failed', reason: `TLSA lookup for ${name}: truncated answer` };
    if (p.rcode === 'NXDOMAIN') return { kind: 'none', authenticated: p.flag_ad };
    if (p.rcode !== 'NOERROR') return { kind: 'failed', reason: `TLSA lookup for ${name}: ${p.rcode}` };
    const records = (p.answers ?? [])
      .filter((a) => a.type === 'TLSA')
      .map((a) => {
        const d = a.data as { usage: number; selector: number; matchingType: number; certificate: Buffer };
        return { usage: d.usage, selector: d.selector, matchingType: d.matchingType, data: d.certificate };
      });
    if (!p.flag_ad || records.length === 0) return { kind: 'none', authenticated: p.flag_ad };
    return { kind: 'records', records };
  }
  return { kind: 'failed', reason: `TLSA lookup for ${name}: ${lastError}` };
}

/** The start of a deferral for a host whose validated TLSA records were not met. */
export function daneDemand(host: string, port: number): string {
  return `DANE: validated TLSA records for _${port}._tcp.${host} require TLS with a matching certificate`;
}

/**
 * Logs a DANE failure with the fields a TLS-RPT report would carry (RFC 8460 §4.3); the policy
 * domain is the recipient domain, whose `_smtp._tls` record says where reports go.
 */
export function daneFailure(
  log: PluginApi<unknown>['log'],
  domain: string,
  hop: { readonly host: string; readonly ip: string },
  resultType: string,
  reason: string,
): void {
  const tlsrpt = {
    policyType: 'tlsa',
    policyDomain: domain,
    resultType,
    receivingMxHostname: hop.host,
    receivingIp: hop.ip,
    failureReason: reason,
  };
  log.warn({ tlsrpt }, `DANE refused: ${reason}`);
}

/**
 * The records an SMTP client can use (RFC 7672 §3.1): DANE-TA(2) and DANE-EE(3) with a known
 * selector and matching type; PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (§3.1.3).
 */
export function usableTlsa(records: readonly Tlsa[]): Tlsa[] {
  return records.filter(
    (r) => (r.usage === 2 || r.usage === 3) && (r.selector === 0 || r.selector === 1) && r.matchingType <= 2,
  );
}

function matches(r: Tlsa, cert: X509Certificate): boolean {
  const selected =
    r.selector === 0 ? cert.raw : Buffer.from(cert.publicKey.export({ type: 'spki', format: 'der' }));
  const digest =
    r.matchingType === 0
      ? selected
      : createHash(r.matchingType === 1 ? 'sha256' : 'sha512')
          .update(selected)
          .digest();
  return digest.equals(r.data);
}

export type DaneCheck =
  { readonly ok: true; readonly match: string } | { readonly ok: false; readonly reason: string };

/**
 * Checks a peer's chain (leaf first, as presented) against the host's usable TLSA records:
 * - DANE-EE(3): the leaf matches; names and dates are not checked (RFC 7672 §3.1.1);
 * - DANE-TA(2): a certificate of the chain matches, the chain from the leaf up to it verifies,
 *   every certificate in it is within its dates, and the leaf is for `host` (§3.1.2, §3.2.2);
 */
export function checkDane(
  records: readonly Tlsa[],
  chain: readonly X509Certificate[],
  host: string,
  now = new Date(),
): DaneCheck {
  const use = usableTlsa(records);
  const leaf = chain[0];
  if (!leaf) return { ok: false, reason: 'the peer presented no certificate' };
  for (const r of use.filter((x) => x.usage === 3)) {
    if (matches(r, leaf)) return { ok: true, match: describeTlsa(r) };
  }
  const within = (c: X509Certificate): boolean => new Date(c.validFrom) <= now && now <= new Date(c.validTo);
  for (const r of use.filter((x) => x.usage === 2)) {
    for (let i = 1; i < chain.length; i++) {
      if (!matches(r, chain[i]!)) continue;
      let linked = true;
      for (let k = 0; k < i && linked; k++) {
        linked = chain[k]!.checkIssued(chain[k + 1]!) && chain[k]!.verify(chain[k + 1]!.publicKey);
      }
      if (!linked) continue;
      if (!chain.slice(0, i + 1).every(within)) {
        return {
          ok: false,
          reason: `the chain up to the trust anchor ${describeTlsa(r)} has an expired certificate`,
        };
      }
      if (!leaf.checkHost(host, { subject: 'never' })) {
        return { ok: false, reason: `the certificate is not for ${host} (DANE-TA names are checked)` };
      }
      return { ok: true, match: describeTlsa(r) };
    }
  }
  return {
    ok: false,
    reason: `the certificate matches none of the TLSA records (${use.map(describeTlsa).join(', ')})`,
  };
}
