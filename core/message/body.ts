import { createReadStream, createWriteStream, type WriteStream } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { once } from 'node:events';

/**
 * The spooled body of one message: chunks are kept in memory up to a threshold and then spill to
 * a file in the spool's `incoming/` folder. Either way the body is a list of Buffers or a file —
 * never one big string — and it is read back as a stream.
 *
 * Writes apply back-pressure: `write()` returns a promise when the file stream's buffer is full,
 * and the session stops reading from the socket until it settles.
 */
export class SpooledBody {
  private chunks: Buffer[] = [];
  private file: WriteStream | null = null;
  private filePath: string | null = null;
  private bytes = 0;
  private ended = false;
  private error: Error | null = null;

  constructor(
    private readonly dir: string,
    private readonly name: string,
    private readonly threshold: number,
  ) {}

  get size(): number {
    return this.bytes;
  }

  /** Path of the spilled file, or null while the body is in memory. */
  get path(): string | null {
    return this.filePath;
  }

  write(chunk: Buffer): Promise<void> | undefined {
    if (this.ended) throw new Error('write after end');
    if (this.error) throw this.error;
    if (chunk.length === 0) return undefined;
    this.bytes += chunk.length;
    if (this.file) {
      return this.file.write(chunk) ? undefined : this.drain();
    }
    this.chunks.push(chunk);
    if (this.bytes > this.threshold) return this.spill();
    return undefined;
  }

  /** Waits for the file buffer to drain, or rejects with the file's error (disk full, EACCES…). */
  private drain(): Promise<void> {
    const file = this.file!;
    return new Promise((resolve, reject) => {
      const done = (err?: Error): void => {
        file.off('drain', done);
        file.off('error', done);
        if (err) reject(err);
        else resolve();
      };
      file.on('drain', done);
      file.on('error', done);
    });
  }

  private spill(): Promise<void> | undefined {
    this.filePath = join(this.dir, this.name);
    // The spool creates its folder at start; opening is synchronous to order every later write.
    const file = createWriteStream(this.filePath, { flags: 'wx', mode: 0o600, highWaterMark: 256 * 1024 });
    file.on('error', (e) => (this.error = e));
    this.file = file;
    const pending = this.chunks;
    this.chunks = [];
    let full = false;
    for (const c of pending) full = !file.write(c) || full;
    return full ? this.drain() : undefined;
  }

  async end(): Promise<void> {
    this.ended = true;
    if (this.file) {
      const file = this.file;
      if (this.error) throw this.error;
      await new Promise<void>((resolve, reject) => {
        file.once('error', reject);
        file.end(() => resolve());
      });
    }
  }

  /** Forces the body onto disk (e.g. for a queue that adopts the file) and returns its path. */
  async toFile(): Promise<string> {
    if (!this.filePath) {
      const wasEnded = this.ended;
      this.ended = false;
      await this.spill();
      if (wasEnded) await this.end();
      else this.ended = false;
    }
    return this.filePath!;
  }

  /** Reads the body back as a stream of Buffers. */
  stream(): Readable {
    if (!this.ended) throw new Error('read before end');
    if (this.filePath) return createReadStream(this.filePath, { highWaterMark: 256 * 1024 });
    return Readable.from(this.chunks, { objectMode: false });
  }

  /**
   * Takes byte ranges out of the stored octets (a header field a plugin removed): `[start, end)`
   * offsets, sorted and not overlapping. The octets are copied once (in memory, or into a new
   * file that replaces the spilled one), so every later reader, the queue included, sees the
   * message without them.
   */
  async cut(ranges: readonly (readonly [number, number])[]): Promise<void> {
    if (!this.ended) throw new Error('cut before end');
    if (ranges.length === 0) return;
    const removed = ranges.reduce((n, [a, b]) => n + (b - a), 0);
    if (!this.filePath) {
      const kept: Buffer[] = [];
      for await (const c of without(this.chunks, ranges)) kept.push(c);
      this.chunks = kept;
    } else {
      const path = this.filePath;
      const tmp = `${path}.cut`;
      try {
        await pipeline(
          Readable.from(without(createReadStream(path, { highWaterMark: 256 * 1024 }), ranges)),
          createWriteStream(tmp, { flags: 'wx', mode: 0o600 }),
        );
        await rename(tmp, path);
      } catch (err) {
        // The spool file is unchanged; the half-written copy goes (a full disk, say).
        await rm(tmp, { force: true });
        throw err;
      }
    }
    this.bytes -= removed;
  }

  /**
   * Replaces every stored octet by `content`, which may read this body (a stream of it taken
   * before the call): the new octets go to a second body beside this one (`<name>.new`, in memory
   * up to the threshold, then a file, with back-pressure), and only once `content` has ended
   * without error do they take this body's place (a rename over the spilled file). On a failure
   * the body is unchanged and the half-written copy is removed. Memory: at most the threshold
   * for the copy, beside what this body already holds.
   */
  async rewrite(content: AsyncIterable<Buffer>): Promise<void> {
    if (!this.ended) throw new Error('rewrite before end');
    const next = new SpooledBody(this.dir, `${this.name}.new`, this.threshold);
    try {
      for await (const c of content) {
        const wait = next.write(c);
        if (wait) await wait;
      }
      await next.end();
    } catch (err) {
      await next.discard();
      throw err;
    }
    const target = join(this.dir, this.name);
    if (next.filePath) {
      await rename(next.filePath, target);
      this.filePath = target;
    } else if (this.filePath) {
      await rm(this.filePath, { force: true });
      this.filePath = null;
    }
    this.file = null;
    this.chunks = next.chunks;
    this.bytes = next.bytes;
  }

  /** Releases memory and removes the spilled file, if any. */
  async discard(): Promise<void> {
    this.chunks = [];
    const file = this.file;
    this.file = null;
    if (file && !file.closed) {
      file.destroy();
      await once(file, 'close').catch(() => undefined);
    }
    if (this.filePath) {
      const p = this.filePath;
      this.filePath = null;
      await rm(p, { force: true });
    }
  }
}

/** The chunks of `source` without the octets in `ranges` (sorted `[start, end)` offsets). */
async function* without(
  source: AsyncIterable<Buffer> | Iterable<Buffer>,
  ranges: readonly (readonly [number, number])[],
): AsyncGenerator<Buffer> {
  let pos = 0;
  let i = 0;
  for await (const c of source) {
    const base = pos;
    pos += c.length;
    let from = base; // the next octet of this chunk not yet given out or dropped
    while (i < ranges.length) {
      const [a, b] = ranges[i]!;
      if (a >= pos) break;
      if (a > from) yield c.subarray(from - base, a - base);
      from = Math.max(from, Math.min(b, pos));
      if (b > pos) break;
      i++;
    }
    if (from < pos) yield c.subarray(from - base);
  }
}
