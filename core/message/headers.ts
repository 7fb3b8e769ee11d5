export interface HeaderField {
  /** Field name as written, e.g. `Subject`. */
  readonly name: string;
  /** Unfolded value with the leading space removed (RFC 5322 §2.2.3). */
  readonly value: string;
}

/** A header field and where its octets are in the header block it was read from. */
export interface ScannedField extends HeaderField {
  /** Offset of its first octet. */
  readonly start: number;
  /** Offset after its last line's line end. */
  readonly end: number;
  /**
   * The block shows where it ends: another line follows it. The last field of a block cut short
   * (no empty line) may go on past the block, so its octets are not known.
   */
  readonly complete: boolean;
}

/**
 * Reads the header fields of a header block (the octets up to the first empty line), with their
 * places. Lines end at LF, with an optional CR before it; a line starting with white space
 * continues the field before it (unfolding, RFC 5322 §2.2.3: the line end goes, the white space
 * stays); a line without a colon is not a field and is skipped. Values are decoded as UTF-8.
 */
export function scanHeaderFields(block: Buffer): ScannedField[] {
  const fields: { name: string; value: string; start: number; end: number; complete: boolean }[] = [];
  let current: (typeof fields)[number] | null = null;
  let pos = 0;
  while (pos < block.length) {
    const nl = block.indexOf(0x0a, pos);
    const next = nl < 0 ? block.length : nl + 1;
    const lineEnd = nl < 0 ? block.length : nl > pos && block[nl - 1] === 0x0d ? nl - 1 : nl;
    if (lineEnd === pos && nl >= 0) {
      if (current) current.complete = true;
      break; // the empty line: the body starts after it
    }
    const raw = block.toString('utf8', pos, lineEnd);
    if ((raw.startsWith(' ') || raw.startsWith('\t')) && current) {
      current.value += raw;
      current.end = next;
    } else {
      if (current) current.complete = true;
      const colon = raw.indexOf(':');
      current =
        colon <= 0
          ? null // not a header line; ignore (malformed, or the start of a body without a blank line)
          : {
              name: raw.slice(0, colon).trim(),
              value: raw.slice(colon + 1).replace(/^[ \t]+/, ''),
              start: pos,
              end: next,
              complete: false,
            };
      if (current) fields.push(current);
    }
    pos = next;
  }
  return fields;
}

/**
 * The header block of a message, parsed once at end of data. Lookups are case-insensitive.
 * Values are decoded as UTF-8 (RFC 6532 allows it); encoded words are left as they are.
 */
export class Headers {
  private readonly fields: HeaderField[];

  constructor(fields: HeaderField[]) {
    this.fields = fields;
  }

  static parse(block: Buffer): Headers {
    return new Headers(scanHeaderFields(block).map(({ name, value }) => ({ name, value })));
  }

  get(name: string): string | undefined {
    const lower = name.toLowerCase();
    return this.fields.find((f) => f.name.toLowerCase() === lower)?.value;
  }

  getAll(name: string): string[] {
    const lower = name.toLowerCase();
    return this.fields.filter((f) => f.name.toLowerCase() === lower).map((f) => f.value);
  }

  has(name: string): boolean {
    return this.get(name) !== undefined;
  }

  count(name: string): number {
    return this.getAll(name).length;
  }

  list(): readonly HeaderField[] {
    return this.fields;
  }
}

/** Formats one header field for the wire, refusing values that would inject lines. */
export function formatHeaderField(name: string, value: string): string {
  if (!/^[\x21-\x39\x3b-\x7e]+$/.test(name)) throw new TypeError(`invalid header name "${name}"`);
  // Keep folding white space that is already a valid fold; refuse bare CR/LF anywhere else.
  const folded = value.replace(/\r?\n(?=[ \t])/g, '\r\n');
  if (/\r(?!\n[ \t])|(?<!\r)\n/.test(folded))
    throw new TypeError(`header ${name} has a line break that is not a fold`);
  return `${name}: ${folded}\r\n`;
}

/**
 * Folds an unfolded header field into lines of at most `width` characters where it can, for the
 * wire, without the final CRLF. It folds only before white space that is already in the value
 * (RFC 5322 §2.2.3: unfolding removes the CRLF alone, so the value reads back exactly), never
 * straight after the colon: the first word of the value stays on the field's first line. A fold
 * there would leave an empty first line that some parsers read as a leading space or refuse, and
 * RFC 2047 §5 wants an encoded word in unstructured text to follow the colon's space. A word
 * longer than a line is left whole, and no line is only white space.
 */
export function foldHeaderField(name: string, value: string, width = 76): string {
  const pieces = value.replace(/^[ \t]+/, '').split(/(?=[ \t])/);
  const lines: string[] = [];
  let line = `${name}: ${pieces[0] ?? ''}`;
  for (const piece of pieces.slice(1)) {
    if (line.length + piece.length > width && /[^ \t]/.test(lines.length ? line : pieces[0]!)) {
      lines.push(line);
      line = piece;
    } else {
      line += piece;
    }
  }
  lines.push(line);
  return lines.join('\r\n');
}
