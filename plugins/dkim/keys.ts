import { createPrivateKey, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { KeyLocation } from './config.js';

/** A key ready to sign with: read and checked once, at setup. */
export interface SigningKey {
  readonly domain: string;
  readonly selector: string;
  readonly algorithm: 'rsa-sha256' | 'ed25519-sha256';
  /** The key, parsed once. */
  readonly key: KeyObject;
  readonly file: string;
}

/** A key that could not be used, and why (logged at setup and for each message that needed it). */
export interface KeyProblem {
  readonly domain: string;
  readonly selector: string;
  readonly file: string;
  readonly reason: string;
}

/** What a domain has: its usable keys and the problems of the others. */
export interface DomainKeys {
  readonly keys: readonly SigningKey[];
  readonly problems: readonly KeyProblem[];
}

/** RFC 8301 §3.2: verifiers must refuse RSA keys under 1024 bits; we refuse them for signing too. */
const MIN_RSA_BITS = 1024;

/** Reads and checks one key file: an RSA (≥ 1024 bits) or Ed25519 private key in PEM. */
export async function loadKey(loc: KeyLocation): Promise<SigningKey | KeyProblem> {
  let pem: Buffer;
  try {
    pem = await readFile(loc.file);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    return { ...loc, reason: `cannot read ${loc.file}: ${e.code ?? e.message}` };
  }
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: pem, format: 'pem' });
  } catch (err) {
    return { ...loc, reason: `${loc.file} is not a PEM private key (${(err as Error).message})` };
  }
  if (key.asymmetricKeyType === 'ed25519') return { ...loc, algorithm: 'ed25519-sha256', key };
  if (key.asymmetricKeyType === 'rsa') {
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    if (bits < MIN_RSA_BITS)
      return { ...loc, reason: `${loc.file}: RSA key of ${bits} bits (at least 1024)` };
    return { ...loc, algorithm: 'rsa-sha256', key };
  }
  return { ...loc, reason: `${loc.file}: a ${key.asymmetricKeyType} key; DKIM signs with RSA or Ed25519` };
}

/** Loads every configured key, grouped by domain. A key that fails is a problem, not a throw. */
export async function loadKeys(locations: readonly KeyLocation[]): Promise<Map<string, DomainKeys>> {
  const loaded = await Promise.all(locations.map(loadKey));
  const out = new Map<string, { keys: SigningKey[]; problems: KeyProblem[] }>();
  for (const k of loaded) {
    const entry = out.get(k.domain) ?? { keys: [], problems: [] };
    if ('reason' in k) entry.problems.push(k);
    else entry.keys.push(k);
    out.set(k.domain, entry);
  }
  return out;
}

/**
 * The signing domain for a `From:` domain: the domain itself when it has keys, else (with
 * `parentDomains`) the nearest parent that has them, else the default domain, else none. The
 * parent walk stops before the last label: a key for `test` never signs for `a.test`.
 */
export function signingDomainFor(
  fromDomain: string | null,
  configured: ReadonlySet<string>,
  opts: { readonly parentDomains: boolean; readonly defaultDomain?: string | undefined },
): string | null {
  if (fromDomain) {
    if (configured.has(fromDomain)) return fromDomain;
    if (opts.parentDomains) {
      const labels = fromDomain.split('.');
      for (let i = 1; i < labels.length - 1; i++) {
        const parent = labels.slice(i).join('.');
        if (configured.has(parent)) return parent;
      }
    }
  }
  return opts.defaultDomain && configured.has(opts.defaultDomain) ? opts.defaultDomain : null;
}
