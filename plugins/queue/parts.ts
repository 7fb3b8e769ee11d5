import { readdir } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';

/**
 * The queue folder: the entry's `dir` (relative to the config file's folder), by default
 * `<spool.dir>/queue`. The plugin and `petrel queue` find it the same way.
 */
export function queueDir(dir: string | undefined, baseDir: string, spoolDir: string): string {
  if (!dir) return join(spoolDir, 'queue');
  return isAbsolute(dir) ? dir : resolve(baseDir, dir);
}

/**
 * The queue's parts. Each worker process owns one part of the queue folder, so that no two
 * processes ever write one journal: part 0 is the queue folder itself (the whole queue of a single
 * worker), part k ≥ 1 is its subfolder `part-<k>`. Parts belong to worker *slots*, not processes:
 * slot k always opens part k, so a replacement worker finds its predecessor's mail. When there are
 * fewer workers than parts (the config went from 4 workers to 2), slot i also adopts every part
 * k ≥ count with k mod count = i, and delivers what is in it; new mail goes to the slot's own part.
 */
export function partDir(queueDir: string, part: number): string {
  return part === 0 ? queueDir : join(queueDir, `part-${part}`);
}

/** The parts found in a queue folder (part 0 always; `part-<k>` subfolders). */
export async function existingParts(queueDir: string): Promise<number[]> {
  const names = await readdir(queueDir).catch(() => [] as string[]);
  const found = names
    .map((n) => /^part-([1-9]\d*)$/.exec(n)?.[1])
    .filter((k): k is string => k !== undefined)
    .map(Number);
  return [0, ...found].sort((a, b) => a - b);
}

/** The parts worker `slot` of `count` opens: its own, then the orphans it adopts. */
export async function partsOfSlot(queueDir: string, slot: number, count: number): Promise<number[]> {
  const adopted = (await existingParts(queueDir)).filter((k) => k >= count && k % count === slot);
  return [slot, ...adopted];
}
