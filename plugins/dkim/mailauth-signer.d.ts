/**
 * Types for the parts of mailauth 7 the dkim plugin signs with beyond its typed entry points:
 * the header parser, field selection, relaxed header canonicalization and tag layout
 * (lib/tools.js), and the relaxed body hash (lib/dkim/body/relaxed.js) that mailauth's own
 * signer streams through. The plugin's tests verify every signature with mailauth's verifier,
 * dkimpy and OpenDKIM, so a change in these internals shows as failing tests, not as bad mail.
 */
declare module 'mailauth/lib/tools.js' {
  /** One header field as mailauth parsed it: lower-case name, name as written, the raw field. */
  export interface ParsedHeaderLine {
    key: string;
    casedKey: string;
    line: Buffer;
  }

  /** The fields of a header block (the block may end with its empty line), top to bottom. */
  export function parseHeaders(block: Buffer): { parsed: ParsedHeaderLine[]; original: Buffer };

  /** The fields of `fieldNames` (colon-separated) the message has, bottom-up, and their names for `h=`. */
  export function getSigningHeaderLines(
    parsed: ParsedHeaderLine[],
    fieldNames: string,
  ): { keys: string; headers: ParsedHeaderLine[] };

  /** A field in relaxed canonical form (RFC 6376 §3.4.2), followed by `suffix`. */
  export function formatRelaxedLine(line: Buffer | string, suffix?: string): Buffer;

  /** A `DKIM-Signature: …` line from its tags, in mailauth's tag order, folded when `folded`. */
  export function formatSignatureHeaderLine(
    type: 'DKIM',
    values: Record<string, unknown>,
    folded: boolean,
  ): string;
}

declare module 'mailauth/lib/dkim/body/relaxed.js' {
  /** The relaxed body hash (RFC 6376 §3.4.4), fed chunk by chunk; bare LFs count as CRLF. */
  export class RelaxedHash {
    constructor(algorithm: 'sha256' | 'sha1');
    update(chunk: Buffer): void;
    /** Ends the body and returns its hash. */
    digest(encoding: 'base64'): string;
  }
}
