import type { Address, HeaderField, SessionView } from '../../core/index.js';
import type { ScriptHook } from './config.js';

/**
 * What a script is given: copies of facts, as JSON, never a live object of the server. This
 * file builds them; the names here are the script API documented in the README.
 */
export interface ScriptAddress {
  readonly address: string;
  readonly local: string;
  readonly domain: string;
}

export interface ScriptSession {
  readonly id: string;
  readonly remote: { readonly address: string; readonly port: number };
  readonly local: { readonly address: string; readonly port: number };
  readonly listener: { readonly kind: string; readonly name: string };
  readonly helo: { readonly verb: string; readonly hostname: string } | null;
  readonly tls: {
    readonly protocol: string;
    readonly cipher: string;
    readonly servername: string | null;
  } | null;
  readonly user: string | null;
}

export interface ScriptEnvelope {
  /** Null for the null reverse-path `<>`. */
  readonly sender: ScriptAddress | null;
  /** Recipients accepted so far. */
  readonly recipients: readonly ScriptAddress[];
  /** At `rcpt`: the recipient being judged; otherwise null. */
  readonly recipient: ScriptAddress | null;
  /** At `mail`: the client's SIZE= (or null); at `data_post`: the octets received. */
  readonly size: number | null;
}

export interface ScriptInput {
  readonly hook: ScriptHook;
  readonly session: ScriptSession;
  /** Null before MAIL FROM (at `connect` and `helo`). */
  readonly envelope: ScriptEnvelope | null;
  /** At `data_post`, the header fields as received, in order; otherwise empty. */
  readonly headers: readonly HeaderField[];
  /** Some header fields were left out to keep the input within `maxInputBytes`. */
  readonly headersTruncated: boolean;
}

export function scriptAddress(a: Address): ScriptAddress {
  return { address: a.address, local: a.local, domain: a.domain };
}

export function scriptSession(s: SessionView): ScriptSession {
  return {
    id: s.id,
    remote: { address: s.remote.address, port: s.remote.port },
    local: { address: s.local.address, port: s.local.port },
    listener: { kind: s.listener.kind, name: s.listener.name },
    helo: s.helo ? { verb: s.helo.verb, hostname: s.helo.hostname } : null,
    tls: s.tls
      ? { protocol: s.tls.protocol, cipher: s.tls.cipher, servername: s.tls.servername ?? null }
      : null,
    user: s.user,
  };
}

/**
 * The input as JSON text of at most `maxBytes` octets: header fields are added in order while
 * they fit, and `headersTruncated` says when some did not. Null when even the input without
 * header fields is too large (an envelope with very many recipients).
 */
export function serializeInput(
  input: Omit<ScriptInput, 'headers' | 'headersTruncated'>,
  headers: readonly HeaderField[],
  maxBytes: number,
): string | null {
  // The object's JSON without its closing brace; the two header keys follow.
  const head = JSON.stringify(input).slice(0, -1);
  const tail = (truncated: boolean, fields: string[]): string =>
    `,"headersTruncated":${truncated},"headers":[${fields.join(',')}]}`;
  let budget = maxBytes - Buffer.byteLength(head) - Buffer.byteLength(tail(false, []));
  if (budget < 0) return null;
  const kept: string[] = [];
  for (const field of headers) {
    const json = JSON.stringify({ name: field.name, value: field.value });
    const cost = Buffer.byteLength(json) + (kept.length > 0 ? 1 : 0);
    if (cost > budget) break;
    budget -= cost;
    kept.push(json);
  }
  return head + tail(kept.length < headers.length, kept);
}
