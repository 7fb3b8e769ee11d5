import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { syncDir, writeComplete } from './durable-fs.js';

/**
 * The quarantine: `<queue dir>/quarantine/`, where recovery sets aside journal bytes it cannot
 * read instead of discarding them. For a damaged range of segment `00000002.seg` starting at byte
 * 8192 it holds
 *
 *   00000002-8192.bin    the damaged bytes, exactly as they were in the segment
 *   00000002-8192.json   where they came from and what could still be read in them
 *
 * and `blob-<id>.eml` for the body file of a large message whose Message record was damaged.
 * Nothing here is read back by the queue: it is for the operator (see docs/operations.md).
 */
export const QUARANTINE_DIR = 'quarantine';

/** The `.json` beside each `.bin`. */
export interface QuarantineMeta {
  /** The segment file the bytes came from. */
  readonly source: string;
  readonly start: number;
  readonly end: number;
  readonly bytes: number;
  readonly reason: string;
  /** When recovery found them (ISO 8601). */
  readonly foundAt: string;
  /** What could still be read in them (record headers, queue ids). */
  readonly contents: object;
}

/** The name (without `.bin`) of the first copy of a damaged range of a segment file. */
export function quarantineName(segmentFile: string, start: number): string {
  return `${basename(segmentFile).replace(/\.seg$/, '')}-${start}`;
}

async function ensureDir(dir: string): Promise<void> {
  if (existsSync(dir)) return;
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await syncDir(dirname(dir));
}

/**
 * Copies damaged bytes of a segment into the quarantine folder, durably: the files are fsynced,
 * then the folder, before this resolves. The same range found again at a later start (the
 * segment is still there) is recognised and not copied twice.
 */
export async function quarantine(
  dir: string,
  file: string,
  range: { readonly start: number; readonly end: number; readonly reason: string },
  bytes: Buffer,
  contents: object,
): Promise<{ path: string; existed: boolean }> {
  await ensureDir(dir);
  const base = quarantineName(file, range.start);
  for (let k = 1; ; k++) {
    const name = k === 1 ? base : `${base}.${k}`;
    const path = join(dir, `${name}.bin`);
    const existing = await readFile(path).catch(() => null);
    if (existing?.equals(bytes)) return { path, existed: true };
    // Other bytes under this name: an earlier journal (segment numbers start again in a new one).
    if (existing) continue;
    const meta: QuarantineMeta = {
      source: file,
      start: range.start,
      end: range.end,
      bytes: bytes.length,
      reason: range.reason,
      foundAt: new Date().toISOString(),
      contents,
    };
    await writeComplete(join(dir, `${name}.json`), `${JSON.stringify(meta, null, 2)}\n`);
    // The .bin last: its presence says the copy is complete.
    await writeComplete(path, bytes);
    await syncDir(dir);
    return { path, existed: false };
  }
}

/** Moves a large message's body file into the quarantine (its Message record was damaged). */
export async function quarantineBlob(dir: string, blob: string, id: string): Promise<string> {
  await ensureDir(dir);
  const target = join(dir, `blob-${id}.eml`);
  await rename(blob, target);
  await syncDir(dir);
  await syncDir(dirname(blob));
  return target;
}

/** The `.bin` and `.eml` files in a quarantine folder (none when it does not exist). */
export async function quarantined(dir: string): Promise<string[]> {
  if (!existsSync(dir)) return [];
  return (await readdir(dir)).filter((f) => f.endsWith('.bin') || f.endsWith('.eml')).sort();
}
