import { constants, createReadStream } from 'node:fs';
import { mkdir, open, readdir, rm, type FileHandle } from 'node:fs/promises';
import { syncDir } from './durable-fs.js';
import { quarantine } from './quarantine.js';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { crc32 } from 'node:zlib';

/**
 * The queue's write-ahead journal: numbered segment files of checksummed records, appended with
 * group commit. Every record handed to `append()` while a sync is in flight joins the next batch;
 * a batch is one `writev` and one `fdatasync`, and each `append()` resolves only after the sync
 * that covers its own bytes.
 *
 * Record: magic "PTRL" | type u8 | 3 zero bytes | payload length u32 | crc32 u32 | payload.
 * The crc covers the type, the zero bytes, the length and the payload.
 *
 * Recovery (`open`) reads every segment with `scanSegment`, the one reader of this format (the
 * offline `petrel queue verify` uses it too). A record that does not verify does not end the
 * scan: it resumes at the next record that does, so one bad record costs that record only. The
 * damaged bytes are copied to the quarantine folder and fsynced before anything else changes; the
 * segment itself is left as it is. The one exception is a torn tail — the last write of an
 * unclean stop, cut short, with nothing intact after it, at the end of the newest segment — which
 * was never acknowledged and is cut off.
 */

const MAGIC = 0x5054524c;
const MAGIC_BYTES = Buffer.from('PTRL', 'latin1');
const HEADER = 16;
const MAX_BATCH_BYTES = 8 * 1024 * 1024;

/** Positions (`positionOf`) are `segment * SEGMENT_SPAN + offset of the record's header`: one number. */
const SEGMENT_SPAN = 2 ** 32;
/** `readRecord` reads this much at first: most records fit, so one read does. */
const READ_AHEAD = 8192;
/** Segments `readRecord` keeps a handle open on. */
const READERS = 16;

/** A record's position in the journal as one number (a double holds it exactly). */
export function positionOf(ref: RecordRef): number {
  return ref.segment * SEGMENT_SPAN + ref.offset - HEADER;
}

/** The segment of a position. */
export function segmentOf(pos: number): number {
  return Math.floor(pos / SEGMENT_SPAN);
}

interface StartOptions {
  segmentSize: number;
  /** Told after each batch is durable: how long its write and sync took, and its records. */
  onSync?: (seconds: number, records: number) => void;
}

interface ReplayOptions {
  /** The last run stopped cleanly: then nothing at all can be a torn write. */
  cleanStop: boolean;
  quarantineDir: string;
  onRecord: (type: number, payload: Buffer, ref: RecordRef) => string | void;
  onDamage: (report: DamageReport) => void;
  /** What the damaged bytes held, for the quarantine's metadata. */
  describe?: (bytes: Buffer) => object;
}

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

/** A damaged byte range of a segment, as a scan finds it. */
export interface DamagedRange {
  readonly segment: number;
  /** First damaged byte: where the record that failed begins. */
  readonly start: number;
  /** Where the next record that verifies begins, or the end of the file. */
  readonly end: number;
  readonly reason: string;
  /**
   * A torn tail: the last write of an unclean stop, cut short. Only at the end of the newest
   * segment, with no intact record after it, and only when the last run did not stop cleanly.
   */
  readonly tornTail: boolean;
}

/** The type and length of the record at `pos` once its checksum verifies, or why it does not. */
function recordAt(data: Buffer, pos: number): { type: number; length: number } | string {
  if (data.length - pos < HEADER) return 'truncated header';
  if (data.readUInt32BE(pos) !== MAGIC) return 'bad magic';
  const length = data.readUInt32BE(pos + 8);
  // A length past the end is a write cut short, or a damaged length field: the checksum cannot tell.
  if (length > data.length - pos - HEADER) return 'length runs past the end of the segment';
  const crc = crc32(
    data.subarray(pos + HEADER, pos + HEADER + length),
    crc32(data.subarray(pos + 4, pos + 12)),
  );
  if (crc >>> 0 !== data.readUInt32BE(pos + 12)) return 'checksum mismatch';
  return { type: data.readUInt8(pos + 4), length };
}

/**
 * Reads one segment's records in order, handing each one that verifies to `onRecord`, and returns
 * the damaged ranges. After a record that fails, the scan looks for the next magic whose whole
 * record verifies and resumes there: it never trusts the failed record's length (a damaged length
 * would skip intact records), and a magic that merely occurs in damaged bytes is not enough.
 * (A whole record carried unencoded inside a damaged message's octets would verify and be taken;
 * that needs a message that carries a journal file, and damage in exactly that message.)
 * `onRecord` may answer with a reason when a verified record still cannot be read; that record is
 * damage too. No I/O: recovery and `petrel queue verify` share it.
 */
export function scanSegment(
  data: Buffer,
  segment: number,
  opts: {
    /** The newest segment after an unclean stop: a damaged tail may be a torn write. */
    tornTailPossible: boolean;
    onRecord: (type: number, payload: Buffer, ref: RecordRef) => string | void;
  },
): DamagedRange[] {
  const damage: DamagedRange[] = [];
  let pos = 0;
  while (pos < data.length) {
    const found = recordAt(data, pos);
    if (typeof found !== 'string') {
      const ref = { segment, offset: pos + HEADER, length: found.length };
      const unreadable = opts.onRecord(found.type, data.subarray(ref.offset, ref.offset + ref.length), ref);
      const end = ref.offset + ref.length;
      if (unreadable) damage.push({ segment, start: pos, end, reason: unreadable, tornTail: false });
      pos = end;
      continue;
    }
    let next = data.indexOf(MAGIC_BYTES, pos + 1);
    while (next >= 0 && typeof recordAt(data, next) === 'string') next = data.indexOf(MAGIC_BYTES, next + 1);
    const end = next < 0 ? data.length : next;
    damage.push({
      segment,
      start: pos,
      end,
      reason: found,
      tornTail: opts.tornTailPossible && end === data.length,
    });
    pos = end;
  }
  return damage;
}

/** The segment numbers in a journal folder, oldest first. */
export async function listSegments(dir: string): Promise<number[]> {
  return (await readdir(dir))
    .filter((f) => /^\d{8}\.seg$/.test(f))
    .map((f) => Number(f.slice(0, 8)))
    .sort((a, b) => a - b);
}

/** What recovery did about one damaged range. */
export interface DamageReport extends DamagedRange {
  /** The segment file. */
  readonly file: string;
  /** The damaged bytes. */
  readonly bytes: Buffer;
  /**
   * `cut`: a torn tail, cut off. `quarantined`: copied to `quarantine` (fsynced), the segment
   * left as it was. `kept`: the copy could not be made (`error`); the segment is kept whole and
   * is not removed while this process runs.
   */
  readonly action: 'cut' | 'quarantined' | 'kept';
  readonly quarantine?: string;
  /** The same bytes were already in quarantine (found by an earlier start). */
  readonly alreadyQuarantined?: boolean;
  readonly error?: Error;
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
    /** Damaged segments whose quarantine copy failed: never removed while this process runs. */
    private readonly pinned: Set<number>,
    /** The segments there at `start`, for `replay` to read. */
    private older: number[],
    private readonly onSync?: (seconds: number, records: number) => void,
  ) {}

  /** Read-only handles for `readRecord`, least recently used first. */
  private readonly readers = new Map<number, Promise<FileHandle>>();

  /** The segment being appended to (never compacted away). */
  get currentSegment(): number {
    return this.segment;
  }

  segmentPath(n: number): string {
    return join(this.dir, segmentName(n));
  }

  /**
   * Opens the journal in `dir`, replaying every intact record through `onRecord` in order (see
   * `start` and `replay`, which this is both of, one after the other).
   */
  static async open(dir: string, opts: StartOptions & ReplayOptions): Promise<Journal> {
    const journal = await Journal.start(dir, opts);
    await journal.replay(opts);
    return journal;
  }

  /**
   * Opens the journal in `dir` for appending, without reading it: appending continues in a fresh
   * segment, numbered after every segment already there. Those older segments are read by
   * `replay`, which may run while records are appended (recovery in the background): no record
   * about a message that only they hold is appended before they are read, since nothing knows
   * that message yet.
   */
  static async start(dir: string, opts: StartOptions): Promise<Journal> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const older = await listSegments(dir);
    const next = (older.at(-1) ?? 0) + 1;
    const fh = await Journal.create(dir, next);
    return new Journal(dir, fh, next, 0, opts.segmentSize, new Set(), older, opts.onSync);
  }

  /**
   * Reads the segments that were there at `start`, oldest first, handing every intact record to
   * `onRecord` in order (see `scanSegment`). Each damaged range is copied to `quarantineDir` and
   * fsynced, then reported through `onDamage`; a torn tail is cut off instead. One segment at a
   * time, so the event loop runs between segments. Runs once.
   */
  async replay(opts: ReplayOptions): Promise<void> {
    const segments = this.older;
    this.older = [];
    // One buffer for every segment, read into again and again: a million messages are a hundred
    // segments, and a fresh buffer each would stay in memory until the next garbage collection.
    // `onRecord` must copy what it keeps of a payload (the store decodes it); a damage report gets
    // its own copy of the damaged bytes.
    let buffer = Buffer.alloc(0);
    for (const n of segments) {
      // Closing stops the reading (the caller sees `isClosed`).
      if (this.closed) return;
      const path = join(this.dir, segmentName(n));
      const fh = await open(path, 'r');
      let data: Buffer;
      try {
        const { size } = await fh.stat();
        if (buffer.length < size) buffer = Buffer.allocUnsafe(Math.max(size, this.segmentSize));
        let got = 0;
        while (got < size) {
          const { bytesRead } = await fh.read(buffer, got, size - got, got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
        data = buffer.subarray(0, got);
      } finally {
        await fh.close();
      }
      const damage = scanSegment(data, n, {
        tornTailPossible: !opts.cleanStop && n === segments.at(-1),
        onRecord: opts.onRecord,
      });
      // Copies first: the torn tail is cut (the only change to a segment) once they are stable.
      for (const d of damage) {
        if (d.tornTail) continue;
        const bytes = Buffer.from(data.subarray(d.start, d.end));
        try {
          const q = await quarantine(opts.quarantineDir, path, d, bytes, opts.describe?.(bytes) ?? {});
          opts.onDamage({
            ...d,
            file: path,
            bytes,
            action: 'quarantined',
            quarantine: q.path,
            alreadyQuarantined: q.existed,
          });
        } catch (err) {
          this.pinned.add(n);
          opts.onDamage({ ...d, file: path, bytes, action: 'kept', error: err as Error });
        }
      }
      const torn = damage.find((d) => d.tornTail);
      if (torn) {
        const fh = await open(path, 'r+');
        try {
          await fh.truncate(torn.start);
          await fh.sync();
        } finally {
          await fh.close();
        }
        opts.onDamage({
          ...torn,
          file: path,
          bytes: Buffer.from(data.subarray(torn.start, torn.end)),
          action: 'cut',
        });
      }
    }
  }

  /** True once `close` was called. */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Reads back the record at a position (`positionOf`), checking its checksum: for a message
   * whose details are not held in memory. Rejects when the record there does not verify.
   */
  async readRecord(pos: number): Promise<{ type: number; payload: Buffer; ref: RecordRef }> {
    const segment = segmentOf(pos);
    const at = pos - segment * SEGMENT_SPAN;
    const fh = await this.reader(segment);
    let buf = Buffer.allocUnsafe(READ_AHEAD);
    let { bytesRead } = await fh.read(buf, 0, READ_AHEAD, at);
    if (bytesRead >= HEADER && buf.readUInt32BE(0) === MAGIC) {
      const whole = HEADER + buf.readUInt32BE(8);
      if (whole > bytesRead) {
        buf = Buffer.allocUnsafe(whole);
        ({ bytesRead } = await fh.read(buf, 0, whole, at));
      }
    }
    const found = recordAt(buf.subarray(0, bytesRead), 0);
    if (typeof found === 'string')
      throw new Error(`queue journal record at ${segmentName(segment)}:${at} unreadable: ${found}`);
    // A copy of the payload alone, so that a small record does not keep the read-ahead's buffer.
    const payload = Buffer.from(buf.subarray(HEADER, HEADER + found.length));
    return { type: found.type, payload, ref: { segment, offset: at + HEADER, length: found.length } };
  }

  /** A read-only handle on a segment, kept open for the next reads (a few segments at most). */
  private reader(n: number): Promise<FileHandle> {
    const known = this.readers.get(n);
    if (known) {
      this.readers.delete(n);
      this.readers.set(n, known);
      return known;
    }
    const fh = open(this.segmentPath(n), 'r');
    this.readers.set(n, fh);
    fh.catch(() => this.readers.delete(n));
    while (this.readers.size > READERS) {
      const [oldest, handle] = this.readers.entries().next().value!;
      this.readers.delete(oldest);
      void handle.then((h) => h.close()).catch(() => undefined);
    }
    return fh;
  }

  private closeReader(n: number): void {
    const handle = this.readers.get(n);
    if (!handle) return;
    this.readers.delete(n);
    void handle.then((h) => h.close()).catch(() => undefined);
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
        const started = performance.now();
        await writeAll(this.fh, buffers, start);
        await this.fh.datasync();
        this.onSync?.((performance.now() - started) / 1000, batch.length);
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
    await finish(this.fh, this.offset);
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

  /** Keeps a segment on disk for as long as this process runs (`removeSegment` leaves it). */
  keep(n: number): void {
    this.pinned.add(n);
  }

  async removeSegment(n: number): Promise<void> {
    if (n === this.segment || this.pinned.has(n)) return;
    this.closeReader(n);
    await rm(this.segmentPath(n), { force: true });
    await syncDir(this.dir);
  }

  async close(): Promise<void> {
    this.closed = true;
    while (this.flushing) await this.flushing;
    for (const n of [...this.readers.keys()]) this.closeReader(n);
    await finish(this.fh, this.offset);
  }
}

/**
 * Closes a segment that is done with, ending it at its last acknowledged record: bytes of a failed
 * batch that could not be truncated away then must not read as damage at the next start.
 */
async function finish(fh: FileHandle, end: number): Promise<void> {
  try {
    if ((await fh.stat()).size > end) {
      await fh.truncate(end);
      await fh.datasync();
    }
  } finally {
    await fh.close();
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
