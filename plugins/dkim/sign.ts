import { once } from 'node:events';
import { domainToASCII } from 'node:url';
import { createHash, sign } from 'node:crypto';
import { DkimSigner } from 'mailauth/lib/dkim/dkim-signer.js';
import { generateCanonicalizedHeader } from 'mailauth/lib/dkim/header/index.js';
import { formatSignatureHeaderLine, getSigningHeaderLines } from 'mailauth/lib/tools.js';
import { Headers, type MessageCopy } from '../../core/index.js';
import type { SigningKey } from './keys.js';

/**
 * Signing one message: read it whole (the signature goes in front of it), hash it with mailauth,
 * and hand back the signatures followed by the very octets that were hashed.
 *
 * Memory: up to `memoryLimit` octets of the message are kept in memory; the rest goes to a
 * temporary file that is unlinked as soon as it is opened (nothing is left behind by a crash),
 * read back once to hash it and once more to send it. mailauth hashes as it goes and keeps only
 * the header block.
 */

/**
 * The domain of the one `From:` mailbox (RFC 5322 §3.6.2), as a lower-case A-label; null when the
 * header has no `From:`, several, or one without an address.
 */
export function fromDomain(headerBlock: Buffer): string | null {
  const from = Headers.parse(headerBlock).getAll('From');
  if (from.length !== 1) return null;
  // Comments and quoted strings may hold '@' and '<' (`"a@b" <alice@crepes.test> (at work)`).
  const text = from[0]!.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/\((?:[^()\\]|\\.)*\)/g, ' ');
  const angle = /<([^<>]*)>/.exec(text);
  const addr = (angle ? angle[1]! : text).trim();
  const at = addr.lastIndexOf('@');
  if (at < 0) return null;
  const domain = addr
    .slice(at + 1)
    .split(/[\s,;>]/)[0]!
    .replace(/^\[|\]$/g, '')
    .replace(/\.$/, '');
  const ascii = domainToASCII(domain).toLowerCase();
  return ascii || null;
}

/**
 * mailauth's signer with the last step done here. mailauth parses the header block and hashes
 * the body (relaxed canonicalization, RFC 6376 §3.4.4 — the part other libraries get wrong);
 * `finalize`, which mailauth runs once the body hash is known, is replaced so that
 *
 * - **the keys are parsed once**, at setup: mailauth would parse the PEM and read the key's
 *   details for every signature, which costs a third as much as the RSA signature itself;
 * - **the private-key operation runs on libuv's thread pool** (`crypto.sign` with a callback),
 *   not on the event loop, which meanwhile serves the other sessions;
 * - **oversigning**: mailauth lists in `h=` only the fields the message has. The names in
 *   `oversign` are appended to `h=` after every real instance, where a verifier finds no field
 *   left for them and hashes nothing (RFC 6376 §5.4.2); the signed data is otherwise exactly
 *   what mailauth would sign.
 *
 * The header canonicalization and the formatting of the `DKIM-Signature:` field are mailauth's
 * own functions.
 */
class PetrelSigner extends DkimSigner {
  constructor(private readonly job: SignOptions & { readonly fieldNames: string }) {
    super({
      canonicalization: 'relaxed/relaxed',
      // mailauth sets up one body hash (relaxed, sha256) for these; the keys themselves are ours.
      signatureData: job.keys.map((k) => ({
        signingDomain: k.domain,
        selector: k.selector,
        privateKey: k.pem,
        algorithm: k.algorithm,
      })),
    });
  }

  /**
   * mailauth turns bare LFs into CRLF for hashing by looking at every octet in JavaScript
   * (`ensureLinebreaks`), a few nanoseconds each: for a 100 KB message more than the rest of the
   * work. A chunk whose every LF already follows a CR (every message the SMTP engine accepted
   * unless `smtp.bareLineEndings` lets them in) is handed on as it is, found with native
   * `indexOf`; any other chunk takes mailauth's own path.
   */
  protected override async writeAsync(chunk: Buffer | string, encoding?: BufferEncoding): Promise<void> {
    const buf = typeof chunk === 'string' ? Buffer.from(chunk, encoding) : chunk;
    if (!buf.length) return;
    if (hasBareLf(buf, this.lastByte)) return super.writeAsync(buf);
    this.lastByte = buf[buf.length - 1]!;
    await this.processChunk(buf);
    this.byteLength += buf.length;
  }

  override async finalize(): Promise<void> {
    const bodyHash = [...this.bodyHashes.values()][0]?.hash;
    const lines = getSigningHeaderLines(this.headers.parsed, this.job.fieldNames);
    if (!bodyHash || !lines.headers.some((h) => h.key === 'from')) {
      // RFC 6376 §5.4: From must be signed; without one there is nothing to sign.
      for (const k of this.job.keys) {
        this.errors.push({ selector: k.selector, signingDomain: k.domain, err: new Error('no From header') });
      }
      return;
    }
    const signing = { keys: [lines.keys, ...this.job.oversign].join(': '), headers: lines.headers };
    const timestamp = Math.floor(Date.now() / 1000);
    const made = await Promise.all(
      this.job.keys.map(async (k) => {
        const { canonicalizedHeader, dkimHeaderOpts } = generateCanonicalizedHeader('DKIM', signing, {
          signingDomain: k.domain,
          selector: k.selector,
          algorithm: k.algorithm,
          canonicalization: 'relaxed/relaxed',
          bodyHash,
          timestamp,
          expiration: false,
        });
        try {
          dkimHeaderOpts.b = (await signHeader(k, canonicalizedHeader)).toString('base64');
          return formatSignatureHeaderLine('DKIM', dkimHeaderOpts, true);
        } catch (err) {
          this.errors.push({ selector: k.selector, signingDomain: k.domain, err: err as Error });
          return null;
        }
      }),
    );
    for (const line of made) if (line) this.signatureHeaders.push(line);
  }
}

/** Whether `buf` has an LF not preceded by CR (`before` is the octet before it, if any). */
export function hasBareLf(buf: Buffer, before: number | undefined): boolean {
  for (let i = buf.indexOf(0x0a); i >= 0; i = buf.indexOf(0x0a, i + 1)) {
    if ((i === 0 ? before : buf[i - 1]) !== 0x0d) return true;
  }
  return false;
}

/**
 * The signature over the canonicalized header: RSA-SHA256 (RFC 6376 §3.3.1), or Ed25519 over
 * its SHA-256 digest (RFC 8463 §3), on the thread pool.
 */
function signHeader(key: SigningKey, data: Buffer): Promise<Buffer> {
  const rsa = key.algorithm === 'rsa-sha256';
  const input = rsa ? data : createHash('sha256').update(data).digest();
  return new Promise((resolve, reject) => {
    sign(rsa ? 'sha256' : null, input, key.key, (err, sig) => (err ? reject(err) : resolve(sig)));
  });
}

export interface SignOptions {
  readonly keys: readonly SigningKey[];
  readonly headers: readonly string[];
  readonly oversign: readonly string[];
}

export interface SignResult {
  /** The `DKIM-Signature:` fields, CRLF-terminated, to go in front of the message. */
  readonly signatures: Buffer;
  /** Keys that made no signature, and why. */
  readonly failures: readonly { readonly selector: string; readonly reason: string }[];
}

/** Signs the message with every key (relaxed/relaxed, RFC 6376 §3.4.2 and §3.4.4). */
export async function signCopy(copy: MessageCopy, opts: SignOptions): Promise<SignResult> {
  const signer = new PetrelSigner({ ...opts, fieldNames: [...new Set(opts.headers)].join(':') });
  const done = new Promise<void>((resolve, reject) => {
    signer.once('finish', resolve);
    signer.once('error', reject);
  });
  // A write error rejects `done` too; it is awaited below, or the loop's own await threw first.
  done.catch(() => undefined);
  if (copy.inMemoryOnly) {
    // Already in memory: hand it over at once (the signer buffers what it has not processed).
    for (const chunk of copy.chunks) signer.write(chunk);
  } else {
    for await (const chunk of copy.octets(false)) {
      if (!signer.write(chunk)) await once(signer, 'drain');
    }
  }
  signer.end();
  await done;
  const text = signer.signatureHeaders.map((s) => `${s}\r\n`).join('');
  return {
    signatures: Buffer.from(text),
    failures: signer.errors.map((e) => ({ selector: e.selector ?? '?', reason: e.err.message })),
  };
}
