import { domainToASCII } from 'node:url';
import { RelaxedHash } from 'mailauth/lib/dkim/body/relaxed.js';
import {
  formatRelaxedLine,
  formatSignatureHeaderLine,
  getSigningHeaderLines,
  parseHeaders,
  type ParsedHeaderLine,
} from 'mailauth/lib/tools.js';
import { Headers, type MessageCopy } from '../../core/index.js';
import type { SigningKey } from './keys.js';
import type { SigningThreads } from './signer.js';

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
 * Folds a header field (RFC 5322 §2.2.3) by turning some of its single spaces into CRLF + space,
 * so that no line is longer than `width` where a space allows it. Relaxed canonicalization
 * (RFC 6376 §3.4.2) unfolds exactly that back to the space, so the folded field hashes as the
 * unfolded one did.
 */
export function foldAtSpaces(field: string, width = 76): string {
  const words = field.split(' ');
  let out = words[0]!;
  let line = out.length;
  for (let i = 1; i < words.length; i++) {
    const w = words[i]!;
    if (line + 1 + w.length > width) {
      out += `\r\n ${w}`;
      line = 1 + w.length;
    } else {
      out += ` ${w}`;
      line += 1 + w.length;
    }
  }
  return out;
}

/** base64 split into pieces of `n` characters with spaces between, for folding (RFC 6376 §3.5: FWS is allowed in `b=`). */
function spaced(base64: string, n = 64): string {
  const parts: string[] = [];
  for (let i = 0; i < base64.length; i += n) parts.push(base64.slice(i, i + n));
  return parts.join(' ');
}

/**
 * One signature field per key over a message whose header block and body hash are known.
 * mailauth picks the fields for `h=`, canonicalizes them and the signature field itself, and
 * lays out the tags (in its order, `b=` last); the names in `oversign` are appended to `h=` after every real instance,
 * where a verifier finds no field left for them and hashes nothing (RFC 6376 §5.4.2). The
 * private-key operation runs on a signing thread (signer.ts), not on the event loop.
 */
async function signatureFields(
  headers: ParsedHeaderLine[],
  bodyHash: string,
  opts: SignOptions & { readonly fieldNames: string },
  failures: { selector: string; reason: string }[],
): Promise<string[]> {
  const lines = getSigningHeaderLines(headers, opts.fieldNames);
  if (!lines.headers.some((h) => h.key === 'from')) {
    // RFC 6376 §5.4: From must be signed; without one there is nothing to sign.
    for (const k of opts.keys) failures.push({ selector: k.selector, reason: 'no From header' });
    return [];
  }
  const signing = [lines.keys, ...opts.oversign].join(': ');
  // The signed fields, relaxed (RFC 6376 §3.4.2), each with its CRLF; then the signature field itself.
  const signed = lines.headers.map((h) => formatRelaxedLine(h.line, '\r\n'));
  const t = Math.floor(Date.now() / 1000);
  const made = await Promise.all(
    opts.keys.map(async (k) => {
      // The field with an empty b=, unfolded: what the signature covers once relaxed, without
      // a final CRLF (RFC 6376 §3.7).
      const unsigned = formatSignatureHeaderLine(
        'DKIM',
        {
          a: k.algorithm,
          c: 'relaxed/relaxed',
          d: k.domain,
          s: k.selector,
          h: signing,
          t,
          bh: bodyHash,
          b: '',
        },
        false,
      );
      try {
        const b = await opts.signer.sign(k.key, Buffer.concat([...signed, formatRelaxedLine(unsigned)]));
        // Folding only turns spaces into CRLF + space, which relaxed canonicalization undoes,
        // and the b= value with the spaces around it is not hashed: the folded field verifies.
        return foldAtSpaces(`${unsigned}${spaced(b.toString('base64'))}`);
      } catch (err) {
        failures.push({ selector: k.selector, reason: (err as Error).message });
        return null;
      }
    }),
  );
  return made.filter((line): line is string => line !== null);
}

export interface SignOptions {
  readonly keys: readonly SigningKey[];
  /** Where the private-key operations run (one instance per plugin set, see signer.ts). */
  readonly signer: SigningThreads;
  readonly headers: readonly string[];
  readonly oversign: readonly string[];
}

export interface SignResult {
  /** The `DKIM-Signature:` fields, CRLF-terminated, to go in front of the message. */
  readonly signatures: Buffer;
  /** Keys that made no signature, and why. */
  readonly failures: readonly { readonly selector: string; readonly reason: string }[];
}

/**
 * Where the header block ends in `buf`: just past its empty line (an LF followed by LF or by
 * CRLF, so CRLF, bare-LF and mixed messages alike), searching from `from`; -1 if not there yet.
 */
function headerEnd(buf: Buffer, from: number): number {
  for (let i = buf.indexOf(0x0a, from); i >= 0; i = buf.indexOf(0x0a, i + 1)) {
    if (buf[i + 1] === 0x0a) return i + 2;
    if (buf[i + 1] === 0x0d && buf[i + 2] === 0x0a) return i + 3;
    if (i + 2 >= buf.length) return -1;
  }
  return -1;
}

/**
 * Signs the message with every key (relaxed/relaxed, RFC 6376 §3.4.2 and §3.4.4). One pass over
 * the copy, from memory or its file: the header block is gathered until its empty line and
 * parsed by mailauth; every octet after it goes through mailauth's relaxed body hash as it
 * comes. A message without an empty line is all header, with an empty body.
 */
export async function signCopy(copy: MessageCopy, opts: SignOptions): Promise<SignResult> {
  const body = new RelaxedHash('sha256');
  let head: Buffer = Buffer.alloc(0);
  let inBody = false;
  for await (const chunk of copy.octets(false)) {
    if (inBody) {
      body.update(chunk);
      continue;
    }
    // Search again from just before the new octets: an empty line may straddle the two.
    const from = Math.max(0, head.length - 2);
    head = head.length ? Buffer.concat([head, chunk]) : chunk;
    const end = headerEnd(head, from);
    if (end >= 0) {
      if (end < head.length) body.update(head.subarray(end));
      head = head.subarray(0, end);
      inBody = true;
    }
  }
  const failures: { selector: string; reason: string }[] = [];
  const fields = await signatureFields(
    parseHeaders(head).parsed,
    body.digest('base64'),
    { ...opts, fieldNames: [...new Set(opts.headers)].join(':') },
    failures,
  );
  return { signatures: Buffer.from(fields.map((f) => `${f}\r\n`).join('')), failures };
}
