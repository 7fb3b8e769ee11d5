import { isIPv4, isIPv6 } from 'node:net';
import {
  accept,
  cidrProblem,
  compileCidrs,
  definePlugin,
  deny,
  proceed,
  z,
  type ClientIdentity,
} from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

export const xclientConfigSchema = z
  .object({
    /**
     * The peers allowed to send XCLIENT (a proxy, a content filter, a test client). Required: the
     * command lets its sender claim any address, so no one may use it unless named here.
     */
    networks: z.array(network).min(1, { message: 'expected at least one network allowed to send XCLIENT' }),
  })
  .strict();

/** The attributes this plugin understands, in the order the EHLO keyword lists them. */
export const XCLIENT_ATTRIBUTES = [
  'NAME',
  'ADDR',
  'PORT',
  'PROTO',
  'HELO',
  'LOGIN',
  'DESTADDR',
  'DESTPORT',
] as const;
type Attribute = (typeof XCLIENT_ATTRIBUTES)[number];

/** Values that say the proxy does not know (XCLIENT_README: `[UNAVAILABLE]`, `[TEMPUNAVAIL]`). */
const UNKNOWN = new Set(['[UNAVAILABLE]', '[TEMPUNAVAIL]']);
const HOSTNAME = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$/;

/** RFC 3461 §4 xtext: `+XX` is the octet with that hex value. */
function xtextDecode(text: string): string | null {
  if (/\+(?![0-9A-F]{2})/.test(text)) return null;
  return text.replace(/\+([0-9A-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
}

function address(value: string): string | null {
  const v6 = /^IPV6:/i.test(value) ? value.slice(5) : null;
  if (v6 !== null) return isIPv6(v6) ? v6.toLowerCase() : null;
  return isIPv4(value) ? value : null;
}

function port(value: string): number | null {
  if (!/^\d{1,5}$/.test(value)) return null;
  const n = Number(value);
  return n <= 65535 ? n : null;
}

export type XclientParse = { ok: true; identity: ClientIdentity } | { ok: false; text: string };

/**
 * Reads the arguments of one XCLIENT command into a client identity: a pure function. Attributes
 * not given keep the session's values (an XCLIENT may be split over several commands), except
 * HELO, which a restart forgets unless this command declares it.
 */
export function parseXclient(
  args: string,
  current: { local: { address: string; port: number } },
): XclientParse {
  const words = args.trim().split(/ +/).filter(Boolean);
  if (words.length === 0) return { ok: false, text: 'Syntax: XCLIENT attribute=value ...' };
  const seen = new Map<Attribute, string>();
  for (const word of words) {
    const eq = word.indexOf('=');
    const name = (eq < 0 ? word : word.slice(0, eq)).toUpperCase() as Attribute;
    if (eq < 0 || !XCLIENT_ATTRIBUTES.includes(name)) {
      return { ok: false, text: `Bad XCLIENT attribute name: ${name.slice(0, 32)}` };
    }
    const value = xtextDecode(word.slice(eq + 1));
    if (value === null) return { ok: false, text: `Bad XCLIENT ${name} value encoding` };
    seen.set(name, value);
  }
  const identity: { -readonly [K in keyof ClientIdentity]: ClientIdentity[K] } = {};
  const bad = (name: Attribute): XclientParse => ({ ok: false, text: `Bad XCLIENT ${name} value` });
  for (const [name, value] of seen) {
    const unknown = UNKNOWN.has(value.toUpperCase());
    switch (name) {
      case 'NAME':
        if (!unknown && !HOSTNAME.test(value)) return bad(name);
        identity.name = unknown ? null : value.toLowerCase();
        break;
      case 'ADDR': {
        // An unknown address cannot stand in for the client: keeping the proxy's own address
        // would hand a stranger whatever trust the proxy has.
        const a = unknown ? null : address(value);
        if (a === null) return bad(name);
        identity.address = a;
        break;
      }
      case 'PORT': {
        const p = unknown ? 0 : port(value);
        if (p === null) return bad(name);
        identity.port = p;
        break;
      }
      case 'PROTO':
        if (!/^E?SMTP$/i.test(value)) return bad(name);
        break;
      case 'HELO':
        if (!unknown && (value.length > 255 || /[\s\x00-\x1f\x7f]/.test(value))) return bad(name);
        break;
      case 'LOGIN':
        if (!unknown && (value.length > 255 || /[\x00-\x1f\x7f]/.test(value))) return bad(name);
        identity.user = unknown ? null : value;
        break;
      case 'DESTADDR':
      case 'DESTPORT':
        break;
    }
  }
  const helo = seen.get('HELO');
  if (helo !== undefined && !UNKNOWN.has(helo.toUpperCase())) {
    // PROTO says whether the original client spoke SMTP (HELO) or ESMTP (EHLO); ESMTP if not given.
    const verb = seen.get('PROTO')?.toUpperCase() === 'SMTP' ? 'HELO' : 'EHLO';
    identity.helo = { verb, hostname: helo };
  }
  const destAddr = seen.get('DESTADDR');
  const destPort = seen.get('DESTPORT');
  if (destAddr !== undefined || destPort !== undefined) {
    const a = destAddr === undefined ? current.local.address : address(destAddr);
    if (a === null) return bad('DESTADDR');
    const p = destPort === undefined ? current.local.port : port(destPort);
    if (p === null) return bad('DESTPORT');
    identity.local = { address: a, port: p };
  }
  return { ok: true, identity };
}

/**
 * xclient — Postfix's XCLIENT extension (https://www.postfix.org/XCLIENT_README.html) for the
 * peers in `networks`: a proxy or content filter in front of Petrel tells it who the real client
 * is, and the session restarts as that client (a new `220` greeting; the `connect` hooks run
 * again), so relay control, limits, DNSBL checks, logs and the `Received:` header see the real
 * client. Built on the engine's `changeClient` (docs/hooks.md), as any such extension can be.
 *
 * Trust is judged on `session.peer` — who speaks SMTP on the connection — which an XCLIENT
 * itself never moves, so a trusted proxy may send several in one session and nobody else any.
 */
export default definePlugin({
  name: 'xclient',
  config: xclientConfigSchema,
  setup({ config, log }) {
    const trusted = compileCidrs(config.networks);
    return {
      // Advertised only to the peers that may use it (XCLIENT_README: the keyword lists the
      // attributes supported).
      async capabilities({ session }) {
        return trusted(session.peer.address) ? [`XCLIENT ${XCLIENT_ATTRIBUTES.join(' ')}`] : [];
      },
      async unrecognized_command({ session, verb, args, changeClient }) {
        if (verb !== 'XCLIENT') return proceed();
        if (!trusted(session.peer.address)) {
          log.info(
            { session: session.id, peer: session.peer.address },
            'XCLIENT refused: peer not in networks',
          );
          return deny(550, '5.7.0', 'Insufficient authorization');
        }
        const parsed = parseXclient(args, session);
        if (!parsed.ok) return deny(501, '5.5.4', parsed.text);
        changeClient(parsed.identity);
        return accept();
      },
    };
  },
});
