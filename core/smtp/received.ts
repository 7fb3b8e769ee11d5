import { isIPv6 } from 'node:net';
import type { SessionView } from '../hooks/catalogue.js';
import { rfc5322Date } from '../util/date.js';

/**
 * RFC 3848 / RFC 6531 §3.7.3 protocol names for the `with` clause: ESMTP, plus S for TLS and A for
 * AUTH; UTF8SMTP variants when the transaction used SMTPUTF8.
 */
export function protocolName(session: SessionView, utf8: boolean): string {
  const base = session.helo?.verb === 'HELO' ? 'SMTP' : utf8 ? 'UTF8SMTP' : 'ESMTP';
  return base + (session.tls ? 'S' : '') + (session.user ? 'A' : '');
}

function addressLiteral(ip: string): string {
  const plain = ip.startsWith('::ffff:') && ip.includes('.') ? ip.slice(7) : ip;
  return isIPv6(plain) ? `[IPv6:${plain}]` : `[${plain}]`;
}

/**
 * The `Received:` value (RFC 5321 §4.4): who handed the message over, who took it, how, its
 * id, the recipient when there is exactly one (more would disclose Bcc recipients), and when.
 */
export function receivedValue(opts: {
  session: SessionView;
  hostname: string;
  id: string;
  utf8: boolean;
  recipients: readonly string[];
  date: Date;
}): string {
  const { session } = opts;
  const helo = session.helo?.hostname ?? 'unknown';
  // RFC 5321 §4.4 TCP-info: the address literal, after the host name when one is known.
  const who = session.remoteName
    ? `${session.remoteName} ${addressLiteral(session.remote.address)}`
    : addressLiteral(session.remote.address);
  let v = `from ${helo} (${who})\r\n\tby ${opts.hostname} (Petrel) with ${protocolName(session, opts.utf8)} id ${opts.id}`;
  if (session.tls) v += `\r\n\t(using ${session.tls.protocol} with cipher ${session.tls.cipher})`;
  if (opts.recipients.length === 1) v += `\r\n\tfor <${opts.recipients[0]}>`;
  return `${v};\r\n\t${rfc5322Date(opts.date)}`;
}
