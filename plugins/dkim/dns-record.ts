import { createPublicKey, type KeyObject } from 'node:crypto';

/**
 * The DKIM key record (RFC 6376 §3.6.1): making the TXT record for a key, and reading one back
 * to see whether it is that key. Pure functions, no DNS.
 */

/** The DNS name a selector's record lives at (RFC 6376 §3.6.2.1). */
export function recordName(domain: string, selector: string): string {
  return `${selector}._domainkey.${domain}`;
}

/** `k=` and `p=` for a private or public key: SPKI DER for RSA, the raw 32 octets for Ed25519 (RFC 8463 §4.2). */
export function publicKeyTags(key: KeyObject): { k: 'rsa' | 'ed25519'; p: string } {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  const der = pub.export({ type: 'spki', format: 'der' });
  if (pub.asymmetricKeyType === 'ed25519')
    return { k: 'ed25519', p: der.subarray(der.length - 32).toString('base64') };
  if (pub.asymmetricKeyType === 'rsa') return { k: 'rsa', p: der.toString('base64') };
  throw new Error(`a ${pub.asymmetricKeyType} key cannot be a DKIM key`);
}

/** The record's text: `v=DKIM1; k=rsa; p=…`. */
export function recordText(key: KeyObject): string {
  const { k, p } = publicKeyTags(key);
  return `v=DKIM1; k=${k}; p=${p}`;
}

/**
 * Splits a TXT value into character-strings of at most `max` octets: a single string in a TXT
 * record holds at most 255 (RFC 1035 §3.3.14); verifiers join them (RFC 6376 §3.6.2.2).
 */
export function splitTxt(text: string, max = 255): string[] {
  const out: string[] = [];
  for (let i = 0; i < text.length; i += max) out.push(text.slice(i, i + max));
  return out.length ? out : [''];
}

/** A zone-file line for the record, its strings quoted. */
export function zoneLine(domain: string, selector: string, text: string): string {
  const strings = splitTxt(text).map((s) => `"${s}"`);
  const owner = `${recordName(domain, selector)}.`;
  return strings.length === 1
    ? `${owner} IN TXT ${strings[0]}`
    : `${owner} IN TXT ( ${strings.join('\n        ')} )`;
}

/** A tag-list (RFC 6376 §3.2) as a map; null when it is not one (a tag twice is malformed). */
export function parseTagList(text: string): Map<string, string> | null {
  const tags = new Map<string, string>();
  for (const part of text.split(';')) {
    if (!part.trim()) continue;
    const eq = part.indexOf('=');
    if (eq <= 0) return null;
    const name = part.slice(0, eq).trim();
    if (!/^[A-Za-z][A-Za-z0-9_]*$/.test(name) || tags.has(name)) return null;
    tags.set(name, part.slice(eq + 1).replace(/[ \t\r\n]+/g, ''));
  }
  return tags;
}

export type RecordCheck =
  | { readonly kind: 'match'; readonly k: string }
  | { readonly kind: 'mismatch'; readonly k: string }
  | { readonly kind: 'revoked' }
  | { readonly kind: 'malformed'; readonly reason: string }
  | { readonly kind: 'several' };

/**
 * Does the published record hold this key? `records` is what the resolver returned for the
 * name: one array of strings per TXT record, joined here (RFC 6376 §3.6.2.2).
 */
export function checkRecord(records: readonly (readonly string[])[], key: KeyObject): RecordCheck {
  const texts = records.map((r) => r.join(''));
  if (texts.length > 1) return { kind: 'several' };
  const text = texts[0] ?? '';
  const tags = parseTagList(text);
  if (!tags) return { kind: 'malformed', reason: 'not a tag=value list' };
  const v = tags.get('v');
  if (v !== undefined && v !== 'DKIM1') return { kind: 'malformed', reason: `v=${v}, expected DKIM1` };
  const p = tags.get('p');
  if (p === undefined) return { kind: 'malformed', reason: 'no p= tag' };
  if (p === '') return { kind: 'revoked' };
  if (!/^[A-Za-z0-9+/]+=*$/.test(p)) return { kind: 'malformed', reason: 'p= is not base64' };
  const k = tags.get('k') ?? 'rsa';
  if (k !== 'rsa' && k !== 'ed25519') return { kind: 'malformed', reason: `k=${k} is not rsa or ed25519` };
  const ours = publicKeyTags(key);
  if (k !== ours.k) return { kind: 'mismatch', k };
  if (k === 'rsa') {
    let published: KeyObject;
    try {
      published = createPublicKey({ key: Buffer.from(p, 'base64'), format: 'der', type: 'spki' });
    } catch {
      return { kind: 'malformed', reason: 'p= is not an RSA public key' };
    }
    return published.export({ type: 'spki', format: 'der' }).equals(Buffer.from(ours.p, 'base64'))
      ? { kind: 'match', k }
      : { kind: 'mismatch', k };
  }
  const raw = Buffer.from(p, 'base64');
  if (raw.length !== 32)
    return { kind: 'malformed', reason: `p= holds ${raw.length} octets, an Ed25519 key 32` };
  return raw.equals(Buffer.from(ours.p, 'base64')) ? { kind: 'match', k } : { kind: 'mismatch', k };
}
