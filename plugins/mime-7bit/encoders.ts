/**
 * Synchronous, chunk-at-a-time byte coders for the 7-bit downgrade. Each keeps the little state
 * it needs between chunks (a held whitespace byte, an incomplete base64 triple, the current
 * column), so a part of any size goes through in constant memory and the output does not depend
 * on where the input was split.
 */

const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
const TAB = 0x09;
const EQUALS = 0x3d;
const HYPHEN = 0x2d;
const HEX = Buffer.from('0123456789ABCDEF', 'latin1');

/** RFC 5322 §2.1.1 / RFC 2045 §2.7: a line is at most 998 octets, CRLF excluded. */
export const MAX_LINE = 998;

/** Turns input chunks into output chunks; `end` returns whatever was held back. */
export interface ChunkCoder {
  update(chunk: Buffer): Buffer;
  end(): Buffer;
}

/**
 * Tells whether content is 7-bit data in the sense of RFC 2045 §2.7: no octet above 127, no NUL,
 * no line longer than 998 octets. With `eightBitOnly`, only octets above 127 count (enough for
 * deciding whether header text needs encoded words).
 */
export class SevenBitScanner {
  /** Set at the first octet (or line) that is not 7-bit data; it stays set. */
  unsafe = false;
  private column = 0;

  constructor(private readonly eightBitOnly = false) {}

  update(chunk: Buffer): boolean {
    if (this.unsafe) return true;
    if (this.eightBitOnly) {
      for (let i = 0; i < chunk.length; i++) {
        if (chunk[i]! >= 0x80) return (this.unsafe = true);
      }
      return false;
    }
    let column = this.column;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === LF) {
        column = 0;
      } else if (b >= 0x80 || b === 0) {
        return (this.unsafe = true);
      } else if (b !== CR && ++column > MAX_LINE) {
        return (this.unsafe = true);
      }
    }
    this.column = column;
    return false;
  }
}

/** True when every octet is 7-bit and not NUL (line lengths are not looked at). */
export function isSevenBitClean(chunk: Buffer): boolean {
  for (let i = 0; i < chunk.length; i++) {
    const b = chunk[i]!;
    if (b >= 0x80 || b === 0) return false;
  }
  return true;
}

/** Replaces every octet above 127 and every NUL by `?` (for preamble and epilogue text). */
export function maskEightBit(chunk: Buffer): Buffer {
  if (isSevenBitClean(chunk)) return chunk;
  const out = Buffer.from(chunk);
  for (let i = 0; i < out.length; i++) {
    const b = out[i]!;
    if (b >= 0x80 || b === 0) out[i] = 0x3f;
  }
  return out;
}

/**
 * Quoted-printable (RFC 2045 §6.7) for text. Line breaks are canonical: CRLF, a lone CR and a
 * lone LF all become a hard CRLF break, as RFC 2045 asks of text. Lines are soft-wrapped at 76
 * characters without splitting an `=XX` escape or a UTF-8 sequence; whitespace before a line end
 * is escaped, and so is a hyphen that starts a line, so an encoded line can never read as a MIME
 * boundary.
 */
export class QuotedPrintableEncoder implements ChunkCoder {
  private column = 0;
  /** A space or tab waiting to learn whether a line end follows it (then it is escaped). */
  private held = -1;
  private pendingCR = false;
  /** Scratch space, reused: the output of each chunk is copied out at its exact size. */
  private out: Buffer = Buffer.alloc(0);
  private pos = 0;

  constructor(private readonly lineLength = 76) {}

  update(chunk: Buffer): Buffer {
    // Three octets per input octet at most, plus a soft break every few dozen.
    const need = chunk.length * 4 + 16;
    if (this.out.length < need) this.out = Buffer.allocUnsafe(Math.max(need, 16 * 1024));
    this.pos = 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (this.pendingCR) {
        this.pendingCR = false;
        this.hardBreak();
        if (b === LF) continue;
      }
      if (b === CR) {
        this.pendingCR = true;
      } else if (b === LF) {
        this.hardBreak();
      } else if (b === SP || b === TAB) {
        if (this.held >= 0) this.literal(this.held);
        this.held = b;
      } else {
        if (this.held >= 0) {
          this.literal(this.held);
          this.held = -1;
        }
        this.byte(b);
      }
    }
    return this.take();
  }

  end(): Buffer {
    if (this.out.length < 16) this.out = Buffer.allocUnsafe(16);
    this.pos = 0;
    if (this.pendingCR) {
      this.pendingCR = false;
      this.hardBreak();
    }
    if (this.held >= 0) {
      // The part ends here, and a boundary line or the end of the message follows.
      this.escape(this.held, 3);
      this.held = -1;
    }
    return this.take();
  }

  private take(): Buffer {
    return Buffer.from(this.out.subarray(0, this.pos));
  }

  private hardBreak(): void {
    if (this.held >= 0) {
      this.escape(this.held, 3);
      this.held = -1;
    }
    this.out[this.pos++] = CR;
    this.out[this.pos++] = LF;
    this.column = 0;
  }

  /** Room for `width` more characters on this line, leaving one for the `=` of a soft break. */
  private room(width: number): void {
    if (this.column > 0 && this.column + width > this.lineLength - 1) {
      this.out[this.pos++] = EQUALS;
      this.out[this.pos++] = CR;
      this.out[this.pos++] = LF;
      this.column = 0;
    }
  }

  private literal(b: number): void {
    this.room(1);
    this.out[this.pos++] = b;
    this.column++;
  }

  private escape(b: number, reserve: number): void {
    this.room(reserve);
    this.out[this.pos++] = EQUALS;
    this.out[this.pos++] = HEX[b >> 4]!;
    this.out[this.pos++] = HEX[b & 15]!;
    this.column += 3;
  }

  private byte(b: number): void {
    if (b > SP && b < 0x7f && b !== EQUALS) {
      this.room(1);
      if (b === HYPHEN && this.column === 0) this.escape(b, 3);
      else {
        this.out[this.pos++] = b;
        this.column++;
      }
      return;
    }
    // Keep the escapes of one UTF-8 sequence on one line (some readers decode line by line): a
    // lead octet reserves room for the whole sequence. Only the octet itself decides, so the
    // output does not depend on where the input was split.
    const reserve = b >= 0xf0 && b <= 0xf4 ? 12 : b >= 0xe0 && b < 0xf0 ? 9 : b >= 0xc2 && b < 0xe0 ? 6 : 3;
    this.escape(b, reserve);
  }
}

/** Base64 (RFC 2045 §6.8), in lines of 76 characters. */
export class Base64Encoder implements ChunkCoder {
  private rest: Buffer = Buffer.alloc(0);
  private column = 0;

  /** @param finalBreak end the output with CRLF (for a body that ends the message). */
  constructor(private readonly finalBreak = false) {}

  update(chunk: Buffer): Buffer {
    const data = this.rest.length ? Buffer.concat([this.rest, chunk]) : chunk;
    const whole = data.length - (data.length % 3);
    this.rest = Buffer.from(data.subarray(whole));
    return this.wrap(data.toString('base64', 0, whole));
  }

  end(): Buffer {
    const tail = this.wrap(this.rest.toString('base64'));
    this.rest = Buffer.alloc(0);
    if (this.finalBreak && this.column > 0) {
      this.column = 0;
      return Buffer.concat([tail, Buffer.from('\r\n')]);
    }
    return tail;
  }

  private wrap(b64: string): Buffer {
    if (!b64.length) return Buffer.alloc(0);
    const out = Buffer.allocUnsafe(b64.length + Math.ceil(b64.length / 76) * 2 + 2);
    let pos = 0;
    let i = 0;
    while (i < b64.length) {
      if (this.column === 76) {
        out[pos++] = CR;
        out[pos++] = LF;
        this.column = 0;
      }
      const n = Math.min(76 - this.column, b64.length - i);
      pos += out.write(b64.slice(i, i + n), pos, 'latin1');
      this.column += n;
      i += n;
    }
    return out.subarray(0, pos);
  }
}

/**
 * Repairs a part that says it is base64 but carries octets a 7-bit peer cannot take: octets above
 * 127 and NULs are dropped (every base64 decoder skips them anyway) and a line longer than 998
 * octets is broken (decoders ignore line breaks). Clean input comes out unchanged.
 */
export class Base64Repair implements ChunkCoder {
  private column = 0;

  update(chunk: Buffer): Buffer {
    if (this.clean(chunk)) return chunk;
    const out = Buffer.allocUnsafe(chunk.length + Math.ceil(chunk.length / MAX_LINE) * 2 + 2);
    let pos = 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b >= 0x80 || b === 0) continue;
      if (b === LF) this.column = 0;
      else if (b !== CR) {
        if (this.column === MAX_LINE) {
          out[pos++] = CR;
          out[pos++] = LF;
          this.column = 0;
        }
        this.column++;
      }
      out[pos++] = b;
    }
    return out.subarray(0, pos);
  }

  end(): Buffer {
    return Buffer.alloc(0);
  }

  /** Checks a chunk and advances the column when it needs no change. */
  private clean(chunk: Buffer): boolean {
    let column = this.column;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b >= 0x80 || b === 0) return false;
      if (b === LF) column = 0;
      else if (b !== CR && ++column > MAX_LINE) return false;
    }
    this.column = column;
    return true;
  }
}

const isHex = (b: number): boolean =>
  (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);

/**
 * Repairs a part that says it is quoted-printable but carries raw octets above 127 or NULs, or
 * overlong lines: such an octet becomes its `=XX` escape (which decodes to the same octet a
 * lenient reader took it for), and an overlong line gets a soft break, never inside an escape.
 * Clean input comes out unchanged.
 */
export class QuotedPrintableRepair implements ChunkCoder {
  private column = 0;
  /** Hex digits still expected after an `=`. */
  private pendingHex = 0;
  private static readonly WRAP_AT = MAX_LINE - 6;

  update(chunk: Buffer): Buffer {
    // Nothing is copied until the first change: clean input is the common case.
    let out: Buffer | null = null;
    let pos = 0;
    const grow = (i: number): Buffer => {
      const b = Buffer.allocUnsafe(chunk.length * 3 + Math.ceil(chunk.length / 900) * 3 + 3);
      pos = chunk.copy(b, 0, 0, i);
      return b;
    };
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === LF || b === CR) {
        if (b === LF) this.column = 0;
        this.pendingHex = 0;
        if (out) out[pos++] = b;
        continue;
      }
      const raw = b >= 0x80 || b === 0;
      const width = raw ? 3 : 1;
      if (this.pendingHex === 0 && this.column + width > QuotedPrintableRepair.WRAP_AT) {
        out ??= grow(i);
        out[pos++] = EQUALS;
        out[pos++] = CR;
        out[pos++] = LF;
        this.column = 0;
      }
      if (raw) {
        out ??= grow(i);
        out[pos++] = EQUALS;
        out[pos++] = HEX[b >> 4]!;
        out[pos++] = HEX[b & 15]!;
        this.pendingHex = 0;
      } else {
        if (out) out[pos++] = b;
        if (b === EQUALS) this.pendingHex = 2;
        else if (this.pendingHex > 0 && isHex(b)) this.pendingHex--;
        else this.pendingHex = 0;
      }
      this.column += width;
    }
    return out ? out.subarray(0, pos) : chunk;
  }

  end(): Buffer {
    return Buffer.alloc(0);
  }
}
