import { Readable } from 'node:stream';
import type { BodyReplacement, MessageView } from '../hooks/catalogue.js';
import { ContentReceiver } from '../smtp/content.js';
import type { SpooledBody } from './body.js';
import { formatHeaderField, type HeaderField, Headers, scanHeaderFields } from './headers.js';

/** What a received message needs to replace its body. */
export interface ReplacementLimits {
  /** A new spooled body for the replacement octets (in the receiving spool, like the message's). */
  readonly scratch: () => SpooledBody;
  /** Most octets a replacement body may have (`limits.maxMessageSize`). */
  readonly maxBodySize: number;
}

/** A received message: parsed headers, the spooled octets, and the header fields added here. */
export class ReceivedMessage implements MessageView {
  private readonly added: HeaderField[] = [];
  private readonly removed: HeaderField[] = [];
  /** Body replacements begun and not yet committed or aborted: `release()` drops them. */
  private readonly pending = new Set<BodyReplacement>();
  #headers: Headers;

  /** `block` is the start of the received octets, at least up to the end of the header block. */
  constructor(
    private block: Buffer,
    private readonly body: SpooledBody,
    private readonly limits: ReplacementLimits,
  ) {
    this.#headers = Headers.parse(block);
  }

  /**
   * Begins replacing the body: what follows the header block's empty line (RFC 5322 §2.1). See
   * `DataPostContext.replaceBody` for the contract. The header block is not touched, so header
   * edits made before or after (`removeHeaders`, `prepend`) apply to the same fields.
   */
  replaceBody(): BodyReplacement {
    const scratch = this.limits.scratch();
    const lines = new ContentReceiver({ dotStuffed: false, normalize: true, stripNul: false });
    let size = 0;
    let last = -1;
    let state: 'open' | 'committing' | 'done' = 'open';
    const store = async (chunks: readonly Buffer[]): Promise<void> => {
      for (const c of chunks) {
        if (c.length === 0) continue;
        size += c.length;
        if (size > this.limits.maxBodySize)
          throw new RangeError(`replacement body over ${this.limits.maxBodySize} octets`);
        last = c[c.length - 1]!;
        const wait = scratch.write(c);
        if (wait) await wait;
      }
    };
    const drop = async (): Promise<void> => {
      state = 'done';
      this.pending.delete(replacement);
      await scratch.discard();
    };
    const replacement: BodyReplacement = {
      write: async (chunk) => {
        if (state !== 'open') throw new Error('body replacement already committed or aborted');
        try {
          const { out } = lines.feed(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
          // RFC 5321 §2.3.8 and RFC 6152 §2: stored text has no NUL, from a client or a plugin.
          if (lines.nul) throw new TypeError('replacement body has a NUL octet');
          await store(out);
        } catch (err) {
          await drop();
          throw err;
        }
      },
      commit: async () => {
        if (state !== 'open') throw new Error('body replacement already committed or aborted');
        state = 'committing';
        try {
          await store(lines.end());
          // The stored message ends its last line, as one received over DATA does.
          if (size > 0 && last !== 0x0a) await store([Buffer.from('\r\n')]);
          await scratch.end();
          const body = this.body;
          await body.rewrite(
            (async function* () {
              yield* headerPart(body.stream());
              yield* scratch.stream();
            })(),
          );
        } finally {
          await drop();
        }
      },
      abort: async () => {
        if (state === 'open') await drop();
      },
    };
    this.pending.add(replacement);
    return replacement;
  }

  /** Drops replacements a plugin began and never finished (at the end of the transaction). */
  async release(): Promise<void> {
    for (const r of [...this.pending]) await r.abort();
  }

  get headers(): Headers {
    return this.#headers;
  }

  get removedHeaders(): readonly HeaderField[] {
    return this.removed;
  }

  /**
   * Takes received header fields out of the message for good (the spooled octets are rewritten
   * without them). A field the header capture did not hold whole (a header block longer than
   * `limits.maxHeaderBytes`) cannot be removed and is left. Returns the fields removed.
   */
  async removeHeaders(match: (field: HeaderField) => boolean): Promise<HeaderField[]> {
    const hits = scanHeaderFields(this.block).filter(
      (f) => f.complete && match({ name: f.name, value: f.value }),
    );
    if (hits.length === 0) return [];
    const ranges = hits.map((f) => [f.start, f.end] as const);
    await this.body.cut(ranges);
    const kept: Buffer[] = [];
    let from = 0;
    for (const [a, b] of ranges) {
      kept.push(this.block.subarray(from, a));
      from = b;
    }
    kept.push(this.block.subarray(from));
    this.block = Buffer.concat(kept);
    this.#headers = Headers.parse(this.block);
    const fields = hits.map(({ name, value }) => ({ name, value }));
    this.removed.push(...fields);
    return fields;
  }

  get size(): number {
    return this.body.size;
  }

  get addedHeaders(): readonly HeaderField[] {
    return this.added;
  }

  get storedSize(): number {
    return Buffer.byteLength(this.addedText()) + this.size;
  }

  /** Adds a field on top (newest first, as trace fields are ordered). */
  prepend(name: string, value: string): void {
    formatHeaderField(name, value); // validates: throws on a name or value that would break the message
    this.added.unshift({ name, value });
  }

  /** The added header fields as wire text. */
  addedText(): string {
    return this.added.map((f) => formatHeaderField(f.name, f.value)).join('');
  }

  stream(): Readable {
    const head = Buffer.from(this.addedText(), 'utf8');
    const body = this.body;
    return Readable.from(
      (async function* () {
        if (head.length) yield head;
        yield* body.stream();
      })(),
      { objectMode: false },
    );
  }

  streamRaw(): Readable {
    return this.body.stream();
  }

  toFile(): Promise<string> {
    return this.body.toFile();
  }
}

/**
 * The header block of a stored message with its empty line: the octets up to the first CRLF CRLF
 * (RFC 5322 §2.1), or CRLF alone when the message starts with one (no header fields). A message
 * with no empty line is all header (or empty): it is yielded whole, then the CRLF that ends it.
 */
async function* headerPart(raw: Readable): AsyncGenerator<Buffer> {
  let tail = Buffer.alloc(0); // the last 3 octets given out, to find CRLF CRLF across chunks
  let first = true;
  try {
    for await (const c of raw) {
      const chunk = c as Buffer;
      if (first && chunk.length >= 2 && chunk[0] === 0x0d && chunk[1] === 0x0a) {
        yield chunk.subarray(0, 2);
        return;
      }
      first = false;
      const joined = Buffer.concat([tail, chunk]);
      const at = joined.indexOf('\r\n\r\n');
      if (at >= 0) {
        yield chunk.subarray(0, at + 4 - tail.length);
        return;
      }
      yield chunk;
      tail = joined.subarray(Math.max(0, joined.length - 3));
    }
    yield Buffer.from('\r\n');
  } finally {
    raw.destroy();
  }
}
