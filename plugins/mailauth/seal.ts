import { createPrivateKey } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { createSeal } from 'mailauth';
import { Headers, MessageCopy } from '../../core/index.js';
import { claimsAuthservId } from './header.js';

/**
 * ARC sealing (RFC 8617) of mail this server judged on arrival and now sends on to another
 * server: a forwarded copy. The receiver cannot check the original SPF (we are the client now)
 * and may see DKIM broken by a list footer or a rewrite; the ARC set records what we found when
 * it arrived, signed by us, so a receiver that trusts us can use it.
 *
 * The set is made over the message as it leaves (after every rewrite transform; this is a
 * `sign`-phase transform): `ARC-Authentication-Results` copies our `Authentication-Results`
 * field, `cv` is the `arc=` result we computed for the chain it arrived with (`none` for none).
 */

export interface SealKey {
  readonly domain: string;
  readonly selector: string;
  readonly privateKey: string;
}

/** Reads and checks the sealing key: RSA of at least 1024 bits (Ed25519 ARC is not widely verified). */
export async function loadSealKey(file: string, domain: string, selector: string): Promise<SealKey> {
  const pem = await readFile(file, 'utf8');
  const key = createPrivateKey(pem);
  const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
  if (key.asymmetricKeyType !== 'rsa' || bits < 1024)
    throw new Error(`${file}: the ARC key must be an RSA key of at least 1024 bits`);
  return { domain, selector, privateKey: pem };
}

/** Our `Authentication-Results` value in a header block, and the `arc=` result in it; null if none. */
export function ourResults(
  headerBlock: Buffer,
  authservId: string,
): { readonly value: string; readonly cv: 'none' | 'pass' | 'fail' } | null {
  const found = Headers.parse(headerBlock)
    .getAll('authentication-results')
    .find((v) => claimsAuthservId(v, authservId));
  if (found === undefined) return null;
  const value = found.replace(/\r?\n[ \t]+/g, ' ').trim();
  const arc = /(?:^|;)\s*arc=(pass|fail|none)\b/i.exec(value)?.[1]?.toLowerCase();
  return { value, cv: arc === 'pass' || arc === 'fail' ? arc : 'none' };
}

/**
 * The ARC set for the message in `copy`, as header text to put on top, or the reason none was
 * made (mailauth refuses, for one, to seal a chain whose newest seal says `cv=fail`).
 */
export async function arcSet(
  copy: MessageCopy,
  key: SealKey,
  results: { readonly value: string; readonly cv: 'none' | 'pass' | 'fail' },
): Promise<{ readonly headers: Buffer } | { readonly error: string }> {
  const made = await createSeal(Readable.from(copy.octets(false)), {
    seal: {
      signingDomain: key.domain,
      selector: key.selector,
      privateKey: key.privateKey,
      authResults: results.value,
      cv: results.cv,
    },
  });
  if (made.headers.length === 0) {
    const why = made.errors?.map((e) => e.err?.message ?? String(e)).join('; ');
    return { error: why || 'mailauth made no ARC set' };
  }
  return { headers: Buffer.from(made.headers.map((h) => `${h}\r\n`).join('')) };
}
