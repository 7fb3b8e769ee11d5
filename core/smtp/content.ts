const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;
const CRLF = Buffer.from('\r\n');
const LF_ONLY = Buffer.from('\n');

export interface FeedResult {
  /** Content octets, in order (slices of the input where possible). */
  readonly out: Buffer[];
  /** End of data was seen (DATA only). */
  readonly done: boolean;
  /** Bytes after the end-of-data line: the next pipelined command(s). */
  readonly rest: Buffer | null;
}

/**
 * Turns wire octets of message content into stored octets.
 *
 * With `dotStuffed` (DATA): RFC 5321 §4.5.2 dot-unstuffing, and the end of data, which is only
 * CRLF "." CRLF. A line starts only after CRLF, so `<LF>.<CR><LF>`, `<CR><LF>.<LF>` and the like
 * never end the data here (SMTP smuggling: another server must not see a different end than we do).
 *
 * Either way (DATA or BDAT), the same rules: a bare LF or bare CR (RFC 5321 §2.3.8) sets
 * `bareLineEnding`, and with `normalize` each is also rewritten to CRLF in the output; a CR that
 * ends the content (the last octet of a `BDAT … LAST` message) is bare too (see `end()`). A NUL
 * octet sets `nul`, and with `stripNul` is left out of the output. NULs are removed only after
 * the line structure and the end of data were decided on the octets as received, so that removing
 * them can never make an end of data (`<CR><LF><NUL>.<CR><LF>` is content, here as anywhere).
 */
export class ContentReceiver {
  bareLineEnding = false;
  nul = false;
  private atLineStart = true;
  /** Previous input ended with a CR whose meaning depends on the next byte. */
  private pendingCR = false;
  private carry: Buffer | null = null;

  constructor(private readonly opts: { dotStuffed: boolean; normalize: boolean; stripNul: boolean }) {}

  feed(input: Buffer): FeedResult {
    // memchr: next to nothing on the common path, where there is none.
    if (input.indexOf(0) < 0) return this.parse(input);
    this.nul = true;
    const result = this.parse(input);
    return this.opts.stripNul ? { ...result, out: result.out.map(withoutNul) } : result;
  }

  /**
   * The content is complete (after the last octet of `BDAT … LAST`): a CR still waiting for its
   * LF is a bare CR. Returns what is left to store (the LF that completes it, with `normalize`).
   */
  end(): Buffer[] {
    if (!this.pendingCR) return [];
    this.pendingCR = false;
    this.bareLineEnding = true;
    return this.opts.normalize ? [LF_ONLY] : [];
  }

  private parse(input: Buffer): FeedResult {
    const buf = this.carry ? Buffer.concat([this.carry, input]) : input;
    this.carry = null;
    const out: Buffer[] = [];
    const normalize = this.opts.normalize;
    let runStart = 0;
    let pos = 0;
    const flush = (end: number): void => {
      if (end > runStart) out.push(buf.subarray(runStart, end));
    };

    if (this.pendingCR && buf.length > 0) {
      this.pendingCR = false;
      if (buf[0] === LF) {
        // CRLF split across reads: a real line end.
        pos = 1;
        this.atLineStart = true;
      } else {
        this.bareLineEnding = true;
        if (normalize) out.push(LF_ONLY); // the CR went out already; complete it to CRLF
        this.atLineStart = false;
      }
    }

    while (pos < buf.length) {
      if (this.atLineStart && this.opts.dotStuffed && buf[pos] === DOT) {
        const avail = buf.length - pos;
        if (avail === 1 || (avail === 2 && buf[pos + 1] === CR)) {
          // Could be the end-of-data line: wait for the next bytes.
          flush(pos);
          this.carry = buf.subarray(pos);
          return { out, done: false, rest: null };
        }
        if (buf[pos + 1] === CR && buf[pos + 2] === LF) {
          flush(pos);
          this.atLineStart = true;
          const rest = buf.subarray(pos + 3);
          return { out, done: true, rest: rest.length ? rest : null };
        }
        flush(pos);
        runStart = pos + 1; // drop the stuffed dot
      }
      this.atLineStart = false;
      const lf = buf.indexOf(LF, pos);
      const lineEnd = lf < 0 ? buf.length : lf;
      // CRs inside the line are bare unless immediately followed by the LF.
      let cr = buf.indexOf(CR, pos);
      while (cr >= 0 && cr < lineEnd) {
        if (cr === buf.length - 1) {
          this.pendingCR = true; // decided by the next read
        } else if (cr !== lf - 1) {
          this.bareLineEnding = true;
          if (normalize) {
            flush(cr);
            out.push(CRLF);
            runStart = cr + 1;
          }
        }
        cr = buf.indexOf(CR, cr + 1);
      }
      if (lf < 0) break;
      if (lf > pos && buf[lf - 1] === CR) {
        this.atLineStart = true;
      } else {
        // A bare LF: never a line start for the end-of-data check.
        this.bareLineEnding = true;
        if (normalize) {
          flush(lf);
          out.push(CRLF);
          runStart = lf + 1;
        }
      }
      pos = lf + 1;
    }
    flush(buf.length);
    return { out, done: false, rest: null };
  }
}

/** The octets of `b` without its NULs (a copy only when there is one). */
function withoutNul(b: Buffer): Buffer {
  if (b.indexOf(0) < 0) return b;
  let kept = 0;
  for (const octet of b) if (octet !== 0) kept++;
  const out = Buffer.allocUnsafeSlow(kept);
  let n = 0;
  for (const octet of b) if (octet !== 0) out[n++] = octet;
  return out;
}

/**
 * Keeps the first bytes of the content until the header block's end (an empty line), at most
 * `max` octets, so headers can be parsed at end of data without reading the spool back.
 */
export class HeaderCapture {
  private chunks: Buffer[] = [];
  private length = 0;
  private complete = false;
  /** The last bytes seen, so a blank line split across chunks is still found. */
  private tail: Buffer = Buffer.alloc(0);

  constructor(private readonly max: number) {}

  /** Linear in the bytes added: only the new chunk (and three bytes before it) is searched. */
  add(chunk: Buffer): void {
    if (this.complete) return;
    const room = this.max - this.length;
    // Copy: the input slices belong to the socket's buffers.
    const copy = Buffer.from(chunk.length > room ? chunk.subarray(0, room) : chunk);
    const first = this.length === 0;
    this.chunks.push(copy);
    this.length += copy.length;
    const probe = this.tail.length ? Buffer.concat([this.tail, copy]) : copy;
    if (
      this.length >= this.max ||
      probe.indexOf('\r\n\r\n') >= 0 ||
      probe.indexOf('\n\n') >= 0 ||
      (first && (copy[0] === 0x0a || (copy[0] === 0x0d && copy[1] === 0x0a)))
    ) {
      this.complete = true;
      return;
    }
    this.tail = Buffer.from(probe.subarray(Math.max(0, probe.length - 3)));
  }

  bytes(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0] ?? Buffer.alloc(0);
  }
}
