import { open, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { newId } from '../util/ids.js';

/**
 * A message read whole and kept to be read again, for a transform that must see all of it
 * before it can emit its first octet (a signature or a seal goes on top of what it covers).
 *
 * Memory: up to `memoryLimit` octets, the start of the message (so the header block is in memory
 * whenever it fits); the rest goes to a temporary file in `tempDir`, created with mode 0600 and
 * unlinked as soon as it is open, so a crash leaves nothing behind. The file is closed when the
 * stream made by `stream()` ends or is destroyed, or by `discard()`.
 */
export class MessageCopy {
  private readonly memory: Buffer[] = [];
  private inMemory = 0;
  private file: FileHandle | null = null;
  private fileSize = 0;

  private constructor(
    private readonly memoryLimit: number,
    private readonly tempDir: string,
  ) {}

  /**
   * Reads `content` to its end (after `first`, octets already read from it). A read or write
   * failure closes the file and rejects.
   */
  static async of(
    content: AsyncIterable<unknown> | Iterable<unknown>,
    opts: { readonly memoryLimit: number; readonly tempDir: string; readonly first?: Buffer },
  ): Promise<MessageCopy> {
    const copy = new MessageCopy(opts.memoryLimit, opts.tempDir);
    try {
      if (opts.first?.length) await copy.add(opts.first);
      for await (const c of content) await copy.add(Buffer.isBuffer(c) ? c : Buffer.from(c as string));
    } catch (err) {
      await copy.discard();
      throw err;
    }
    return copy;
  }

  /** Octets in the copy. */
  get size(): number {
    return this.inMemory + this.fileSize;
  }

  /**
   * The part held in memory, in order: the whole message when `inMemoryOnly`, so a caller can
   * hand it on without going through an async iteration.
   */
  get chunks(): readonly Buffer[] {
    return this.memory;
  }

  /** The whole copy is in memory: reading it again costs no I/O. */
  get inMemoryOnly(): boolean {
    return this.file === null;
  }

  private async add(chunk: Buffer): Promise<void> {
    if (!this.file) {
      const room = this.memoryLimit - this.inMemory;
      const head = chunk.length <= room ? chunk : chunk.subarray(0, room);
      if (head.length) {
        this.memory.push(head);
        this.inMemory += head.length;
      }
      if (head.length === chunk.length) return;
      chunk = chunk.subarray(head.length);
      const path = join(this.tempDir, `petrel-copy-${newId()}.tmp`);
      this.file = await open(path, 'wx+', 0o600);
      await unlink(path);
    }
    await this.file.write(chunk, 0, chunk.length, this.fileSize);
    this.fileSize += chunk.length;
  }

  /** The start of the message up to the end of its header block (or all that is in memory). */
  headerBlock(): Buffer {
    const head = this.memory.length === 1 ? this.memory[0]! : Buffer.concat(this.memory, this.inMemory);
    const crlf = head.indexOf('\r\n\r\n');
    const lf = head.indexOf('\n\n');
    const ends = [crlf >= 0 ? crlf + 4 : -1, lf >= 0 ? lf + 2 : -1].filter((n) => n >= 0);
    return ends.length ? head.subarray(0, Math.min(...ends)) : head;
  }

  /** The octets from the start, once more; `release` closes the file after the last one. */
  async *octets(release = false): AsyncGenerator<Buffer> {
    try {
      yield* this.memory;
      if (this.file) {
        for await (const c of this.file.createReadStream({ start: 0, autoClose: false })) yield c as Buffer;
      }
    } finally {
      if (release) await this.discard();
    }
  }

  /**
   * The message to send on: `prefix` (header fields to put on top), then the octets exactly as
   * read. The copy is released when the stream ends or is destroyed, read or not.
   */
  stream(prefix?: Buffer): Readable {
    if (this.inMemoryOnly) {
      return Readable.from(prefix?.length ? [prefix, ...this.memory] : this.memory, { objectMode: false });
    }
    const stream = Readable.from(
      (async function* (copy: MessageCopy) {
        if (prefix?.length) yield prefix;
        yield* copy.octets(true);
      })(this),
      { objectMode: false },
    );
    stream.once('close', () => void this.discard());
    return stream;
  }

  /** Closes the temporary file, if any; the copy cannot be read after. */
  async discard(): Promise<void> {
    const f = this.file;
    this.file = null;
    await f?.close().catch(() => undefined);
  }
}
