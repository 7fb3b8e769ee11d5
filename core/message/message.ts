import { Readable } from 'node:stream';
import type { MessageView } from '../hooks/catalogue.js';
import type { SpooledBody } from './body.js';
import { formatHeaderField, type HeaderField, Headers } from './headers.js';

/** A received message: parsed headers, the spooled octets, and the header fields added here. */
export class ReceivedMessage implements MessageView {
  private readonly added: HeaderField[] = [];

  constructor(
    readonly headers: Headers,
    private readonly body: SpooledBody,
  ) {}

  get size(): number {
    return this.body.size;
  }

  get addedHeaders(): readonly HeaderField[] {
    return this.added;
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
