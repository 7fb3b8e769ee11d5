/**
 * Types for the one mailauth module the dkim plugin uses beyond its typed entry points: the
 * signer class behind `dkimSign` and `DkimSignStream` (mailauth 7, lib/dkim/dkim-signer.js).
 * The plugin subclasses it to oversign (see sign.ts); its tests verify every signature with
 * dkimpy and OpenDKIM, so a change in these internals shows as failing tests, not bad mail.
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
    constructor(options: {
      canonicalization?: string;
      headerList?: string | string[];
      signatureData: SignatureData[];
      signTime?: Date;
    });
    /** One `DKIM-Signature: …` line (folded, no final CRLF) per signature made. */
    signatureHeaders: string[];
    errors: SignerError[];
    warnings: string[];
    /** Called once the header block is parsed, before the body is hashed. */
    messageHeaders(headers: ParsedHeaders): Promise<void>;
  }
}
