import { constants, createReadStream } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { crc32 } from 'node:zlib';

/**
 * The queue's write-ahead journal: numbered segment files of checksummed records, appended with
 * group commit. Every record handed to `append()` while a sync is in flight joins the next batch;
 * a batch is one `writev` and one `fdatasync`, and each `append()` resolves only after the sync
 * that covers its own bytes. A torn record at the end (a crash mid-write) fails its checksum and
 * is cut off at recovery; nothing after it was ever acknowledged.
 *
 * Record: magic "PTRL" | type u8 | 3 zero bytes | payload length u32 | crc32 u32 | payload.
 * The crc covers the type, the length and the payload.
 */

const MAGIC = 0x5054524c;
const HEADER = 16;
const MAX_BATCH_BYTES = 8 * 1024 * 1024;

export interface RecordRef {
  readonly segment: number;
  /** Offset of the payload in the segment file. */
  readonly offset: number;
  readonly length: number;
}

interface Pending {
  readonly type: number;
  readonly parts: readonly Buffer[];
  readonly length: number;
  resolve(ref: RecordRef): void;
  reject(err: Error): void;
}

export function segmentName(n: number): string {
  return `${String(n).padStart(8, '0')}.seg`;
}

function header(type: number, parts: readonly Buffer[], length: number): Buffer {
  const h = Buffer.alloc(HEADER);
  h.writeUInt32BE(MAGIC, 0);
  h.writeUInt8(type, 4);
  h.writeUInt32BE(length, 8);
  let crc = crc32(h.subarray(4, 12));
  for (const p of parts) crc = crc32(p, crc);
  h.writeUInt32BE(crc >>> 0, 12);
  return h;
}

export class Journal {
  private queue: Pending[] = [];
  private flushing: Promise<void> | null = null;
  private closed = false;

  private constructor(
    readonly dir: string,
    private fh: FileHandle,
    private segment: number,
    private offset: number,
    private readonly segmentSize: number,
  ) {}

  /** The segment being appended to (never compacted away). */
  get currentSegment(): number {
    return this.segment;
  }

  segmentPath(n: number): string {
    return join(this.dir, segmentName(n));
  }

  /**
   * Opens the journal in `dir`, replaying every intact record through `onRecord` in order and
   * cutting off a torn tail. Appending continues in a fresh segment.
   */
  static async open(
    dir: string,
    opts: {
      segmentSize: number;
      onRecord: (type: number, payload: Buffer, ref: RecordRef) => void;
      onCorrupt: (segment: number, offset: number, reason: string) => void;
    },
  ): Promise<Journal> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const segments = (await readdir(dir))
      .filter((f) => /^\d{8}\.seg$/.test(f))
      .map((f) => Number(f.slice(0, 8)))
      .sort((a, b) => a - b);
    for (const n of segments) {
      const path = join(dir, segmentName(n));
      const data = await readFile(path);
      let pos = 0;
      while (pos < data.length) {
        const bad = (reason: string): void => opts.onCorrupt(n, pos, reason);
        if (data.length - pos < HEADER) {
          bad('truncated header');
          break;
        }
        if (data.readUInt32BE(pos) !== MAGIC) {
          bad('bad magic');
          break;
        }
        const type = data.readUInt8(pos + 4);
        const length = data.readUInt32BE(pos + 8);
        const start = pos + HEADER;
        if (start + length > data.length) {
          bad('truncated record');
          break;
        }
        const payload = data.subarray(start, start + length);
        const crc = crc32(payload, crc32(data.subarray(pos + 4, pos + 12))) >>> 0;
        if (crc !== data.readUInt32BE(pos + 12)) {
          bad('checksum mismatch');
          break;
        }
        opts.onRecord(type, payload, { segment: n, offset: start, length });
        pos = start + length;
      }
      if (pos < data.length) {
        // Nothing past a torn record was acknowledged: cut it off so it is never read again.
        const fh = await open(path, 'r+');
        await fh.truncate(pos);
        await fh.sync();
        await fh.close();
      }
    }
    const next = (segments.at(-1) ?? 0) + 1;
    const fh = await Journal.create(dir, next);
    return new Journal(dir, fh, next, 0, opts.segmentSize);
  }

  private static async create(dir: string, n: number): Promise<FileHandle> {
    const fh = await open(
      join(dir, segmentName(n)),
      constants.O_RDWR | constants.O_CREAT | constants.O_EXCL,
      0o600,
    );
    await syncDir(dir); // the new file's name must survive a crash before any record in it is acknowledged
    return fh;
  }

  /** Appends one record; resolves once it is on stable storage. */
  append(type: number, parts: readonly Buffer[]): Promise<RecordRef> {
    if (this.closed) return Promise.reject(new Error('journal closed'));
    const length = parts.reduce((n, p) => n + p.length, 0);
    return new Promise((resolve, reject) => {
      this.queue.push({ type, parts, length, resolve, reject });
      this.kick();
    });
  }

  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flush().finally(() => {
      this.flushing = null;
      if (this.queue.length) this.kick();
    });
  }

  private async flush(): Promise<void> {
    while (this.queue.length) {
      let bytes = 0;
      let take = 0;
      while (take < this.queue.length && (take === 0 || bytes < MAX_BATCH_BYTES)) {
        bytes += HEADER + this.queue[take]!.length;
        take++;
      }
      const batch = this.queue.splice(0, take);
      try {
        if (this.offset > 0 && this.offset + bytes > this.segmentSize) await this.rotate();
      } catch (err) {
        for (const p of batch) p.reject(err as Error);
        continue;
      }
      const start = this.offset;
      const buffers: Buffer[] = [];
      const refs: RecordRef[] = [];
      let pos = start;
      for (const p of batch) {
        buffers.push(header(p.type, p.parts, p.length), ...p.parts);
        refs.push({ segment: this.segment, offset: pos + HEADER, length: p.length });
        pos += HEADER + p.length;
      }
      try {
        await writeAll(this.fh, buffers, start);
        await this.fh.datasync();
        this.offset = pos;
        batch.forEach((p, i) => p.resolve(refs[i]!));
      } catch (err) {
        // Disk full or I/O error: drop the partial batch so the next one starts on a record boundary.
        await this.fh.truncate(start).catch(() => undefined);
        for (const p of batch) p.reject(err as Error);
      }
    }
  }

  private async rotate(): Promise<void> {
    const next = this.segment + 1;
    const fh = await Journal.create(this.dir, next);
    await this.fh.close();
    this.fh = fh;
    this.segment = next;
    this.offset = 0;
  }

  /** A stream of `length` bytes at `offset` of a segment. */
  read(ref: RecordRef, skip = 0): Readable {
    return createReadStream(this.segmentPath(ref.segment), {
      start: ref.offset + skip,
      end: ref.offset + ref.length - 1,
      highWaterMark: 256 * 1024,
    });
  }

  async removeSegment(n: number): Promise<void> {
    if (n === this.segment) return;
    await rm(this.segmentPath(n), { force: true });
    await syncDir(this.dir);
  }

  async close(): Promise<void> {
    this.closed = true;
    while (this.flushing) await this.flushing;
    await this.fh.close();
  }
}

async function writeAll(fh: FileHandle, buffers: Buffer[], position: number): Promise<void> {
  let pos = position;
  let bufs = buffers;
  while (bufs.length) {
    const { bytesWritten } = await fh.writev(bufs, pos);
    pos += bytesWritten;
    let n = bytesWritten;
    while (bufs.length && n >= bufs[0]!.length) {
      n -= bufs[0]!.length;
      bufs = bufs.slice(1);
    }
    if (n > 0 && bufs.length) bufs = [bufs[0]!.subarray(n), ...bufs.slice(1)];
  }
}

export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
