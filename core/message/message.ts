import { Readable } from 'node:stream';
import type { MessageView } from '../hooks/catalogue.js';
import type { SpooledBody } from './body.js';
import { formatHeaderField, type HeaderField, Headers, scanHeaderFields } from './headers.js';

/** A received message: parsed headers, the spooled octets, and the header fields added here. */
export class ReceivedMessage implements MessageView {
  private readonly added: HeaderField[] = [];
  private readonly removed: HeaderField[] = [];
  #headers: Headers;

  /** `block` is the start of the received octets, at least up to the end of the header block. */
  constructor(
    private block: Buffer,
    private readonly body: SpooledBody,
  ) {
    this.#headers = Headers.parse(block);
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
