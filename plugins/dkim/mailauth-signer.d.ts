/**
 * Types for the parts of mailauth 7 the dkim plugin uses beyond its typed entry points: the
 * signer class behind `dkimSign` and `DkimSignStream` (lib/dkim/dkim-signer.js), which the
 * plugin subclasses (see sign.ts), and the helpers its `finalize` calls. The plugin's tests
 * verify every signature with dkimpy and OpenDKIM, so a change in these internals shows as
 * failing tests, not as bad mail.
 */
declare module 'mailauth/lib/dkim/dkim-signer.js' {
  import { Writable } from 'node:stream';

  /** One header field as mailauth parsed it: lower-case name, name as written, the raw line. */
  export interface ParsedHeaderLine {
    key: string;
    casedKey: string;
    line: Buffer;
  }

  export interface ParsedHeaders {
    parsed: ParsedHeaderLine[];
    original: Buffer;
  }

  export interface SignatureData {
    signingDomain: string;
    selector: string;
    privateKey: Buffer | string;
    algorithm?: string;
    canonicalization?: string;
  }

  export interface SignerError {
    selector?: string;
    signingDomain?: string;
    err: Error;
  }

  export class DkimSigner extends Writable {
    constructor(options: { canonicalization?: string; signatureData: SignatureData[] });
    /** The parsed header block, once the body starts. */
    protected headers: ParsedHeaders;
    /** One body hash per canonicalization and hash algorithm; `hash` (base64) is set before `finalize`. */
    protected bodyHashes: Map<string, { hash: string | null }>;
    /** One `DKIM-Signature: …` line (folded, no final CRLF) per signature made. */
    signatureHeaders: string[];
    errors: SignerError[];
    /** Runs once the body hash is known: makes the signatures. */
    protected finalize(): Promise<void>;
    /** Octets written so far (after line-break repair). */
    protected byteLength: number;
    /** The last octet written, to tell a CRLF split across two chunks. */
    protected lastByte: number | undefined;
    /** `_write`'s work: repairs bare LFs, then hands the octets to `processChunk`. */
    protected writeAsync(chunk: Buffer | string, encoding?: BufferEncoding): Promise<void>;
    /** Splits the header block from the body and hashes the body. */
    protected processChunk(chunk: Buffer): Promise<void>;
  }
}

declare module 'mailauth/lib/dkim/header/index.js' {
  import type { ParsedHeaderLine } from 'mailauth/lib/dkim/dkim-signer.js';

  /** The header data a signature covers (RFC 6376 §3.7), and the tags of the signature field. */
  export function generateCanonicalizedHeader(
    type: 'DKIM',
    signingHeaderLines: { keys: string; headers: ParsedHeaderLine[] },
    options: {
      signingDomain: string;
      selector: string;
      algorithm: string;
      canonicalization: string;
      bodyHash: string;
      /** `t=` in seconds. */
      timestamp: number;
      /** `x=`; false leaves it out. */
      expiration: false | number;
    },
  ): { canonicalizedHeader: Buffer; dkimHeaderOpts: Record<string, unknown> };
}

declare module 'mailauth/lib/tools.js' {
  import type { ParsedHeaderLine } from 'mailauth/lib/dkim/dkim-signer.js';

  /** The fields of `fieldNames` (colon-separated) the message has, bottom-up, and their names for `h=`. */
  export function getSigningHeaderLines(
    parsed: ParsedHeaderLine[],
    fieldNames: string,
  ): { keys: string; headers: ParsedHeaderLine[] };

  /** A `DKIM-Signature: …` line from its tags, folded when `folded`. */
  export function formatSignatureHeaderLine(
    type: 'DKIM',
    values: Record<string, unknown>,
    folded: boolean,
  ): string;
}
