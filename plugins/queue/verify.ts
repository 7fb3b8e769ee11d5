import { existsSync } from 'node:fs';
import { existingParts, partDir } from './parts.js';
import { readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { listSegments, scanSegment, segmentName } from './journal.js';
import { QUARANTINE_DIR, quarantined, quarantineName } from './quarantine.js';
import { decodeRecord, describeDamage, RecordType, type DamageContents } from './records.js';
import { CLEAN_SHUTDOWN } from './store.js';

/**
 * `petrel queue verify`: reads every record of every journal segment, as recovery would, and
 * says what it finds, without changing anything. It reads the files only, so it needs no running
 * server and is safe beside one (a segment compacted away meanwhile is noted, not an error).
 */

/** A damaged range as verify reports it. */
export interface RangeCheck {
  readonly start: number;
  readonly end: number;
  readonly bytes: number;
  readonly reason: string;
  /**
   * The end of the newest segment after an unclean stop (or while a server writes to it): cut
   * off at the next start, never acknowledged. Not counted as damage.
   */
  readonly tornTail: boolean;
  /** What is still legible in the damaged bytes. */
  readonly contents: DamageContents;
  /** Messages whose Message record is in the range and has no intact copy anywhere: lost. */
  readonly lostMessages: readonly string[];
  /** The copy recovery made of these bytes, when there is one. */
  readonly quarantine: string | null;
}

export interface SegmentCheck {
  readonly file: string;
  readonly bytes: number;
  /** Records that verify. */
  readonly records: number;
  readonly messages: number;
  readonly states: number;
  readonly holds: number;
  /** History records (the kept attempts a compaction carried forward). */
  readonly histories: number;
  /** Records of a type this version does not know (skipped by recovery too). */
  readonly other: number;
  readonly ranges: readonly RangeCheck[];
  /** Removed between listing and reading (compacted by a running server). */
  readonly vanished: boolean;
}

/** One queue part: a folder with a `journal/` (the queue folder itself, or a `part-N/` in it). */
export interface PartCheck {
  readonly dir: string;
  /** The last server to use it stopped cleanly (the clean-shutdown mark is there). */
  readonly cleanStop: boolean;
  readonly segments: readonly SegmentCheck[];
  /** Files set aside in `quarantine/` by earlier recoveries. */
  readonly quarantine: readonly string[];
}

export interface VerifyResult {
  readonly dir: string;
  readonly parts: readonly PartCheck[];
  /** Damaged ranges, torn tails not counted. */
  readonly damaged: number;
  readonly tornTails: number;
}

/**
 * The queue parts under a queue folder that have a journal (see parts.ts): the folder itself, and
 * each `part-<k>` subfolder (a queue split between workers), in part order.
 */
export async function findParts(dir: string): Promise<string[]> {
  return (await existingParts(dir)).map((k) => partDir(dir, k)).filter((p) => existsSync(join(p, 'journal')));
}

async function verifyPart(dir: string): Promise<PartCheck> {
  const journal = join(dir, 'journal');
  const cleanStop = existsSync(join(dir, CLEAN_SHUTDOWN));
  const numbers = await listSegments(journal);
  const intact = new Set<string>();
  const quarantine = join(dir, QUARANTINE_DIR);
  const scanned: { check: Omit<SegmentCheck, 'ranges'>; ranges: Omit<RangeCheck, 'lostMessages'>[] }[] = [];
  for (const n of numbers) {
    const file = join(journal, segmentName(n));
    const data = await readFile(file).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return null;
      throw err;
    });
    const counts = { messages: 0, states: 0, holds: 0, histories: 0, other: 0 };
    if (!data) {
      scanned.push({ check: { file, bytes: 0, records: 0, ...counts, vanished: true }, ranges: [] });
      continue;
    }
    const damage = scanSegment(data, n, {
      tornTailPossible: !cleanStop && n === numbers.at(-1),
      onRecord: (type, payload) => {
        const rec = decodeRecord(type, payload);
        if (typeof rec === 'string') return rec;
        if (rec.type === RecordType.Message) {
          counts.messages++;
          intact.add(rec.env.id);
        } else if (rec.type === RecordType.State) counts.states++;
        else if (rec.type === RecordType.Hold) counts.holds++;
        else if (rec.type === RecordType.History) counts.histories++;
        else counts.other++;
      },
    });
    const ranges = damage.map((d) => {
      const copy = join(quarantine, `${quarantineName(file, d.start)}.bin`);
      return {
        start: d.start,
        end: d.end,
        bytes: d.end - d.start,
        reason: d.reason,
        tornTail: d.tornTail,
        contents: describeDamage(data.subarray(d.start, d.end)),
        quarantine: existsSync(copy) ? copy : null,
      };
    });
    const records = counts.messages + counts.states + counts.holds + counts.histories + counts.other;
    scanned.push({ check: { file, bytes: data.length, records, ...counts, vanished: false }, ranges });
  }
  // Lost only when no intact copy exists in any segment (compaction writes copies forward).
  const segments = scanned.map(({ check, ranges }) => ({
    ...check,
    ranges: ranges.map((r) => ({ ...r, lostMessages: r.contents.messages.filter((id) => !intact.has(id)) })),
  }));
  return {
    dir,
    cleanStop,
    segments,
    quarantine: (await quarantined(quarantine)).map((f) => join(quarantine, f)),
  };
}

/** Checks every journal under a queue folder (see `findParts`). */
export async function verifyQueue(dir: string): Promise<VerifyResult> {
  const parts: PartCheck[] = [];
  for (const part of await findParts(dir)) parts.push(await verifyPart(part));
  const ranges = parts.flatMap((p) => p.segments.flatMap((s) => s.ranges));
  return {
    dir,
    parts,
    damaged: ranges.filter((r) => !r.tornTail).length,
    tornTails: ranges.filter((r) => r.tornTail).length,
  };
}

/** `petrel queue verify`'s exit status: clean (torn tails allowed), damage found, nothing to check. */
export const VERIFY_CLEAN = 0;
export const VERIFY_DAMAGED = 65; // EX_DATAERR
export const VERIFY_NO_JOURNAL = 66; // EX_NOINPUT

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** One line per segment, with an indented line per damaged range; then the verdict. */
export function describeVerify(result: VerifyResult): string[] {
  const lines: string[] = [];
  for (const part of result.parts) {
    const how = part.cleanStop
      ? 'stopped cleanly'
      : 'not stopped cleanly (a server is running, or the last one crashed)';
    lines.push(`${join(part.dir, 'journal')}: ${plural(part.segments.length, 'segment')}, ${how}`);
    for (const s of part.segments) {
      const name = basename(s.file);
      if (s.vanished) {
        lines.push(`  ${name}  removed while being read (compacted by the running server)`);
        continue;
      }
      const damaged = s.ranges.filter((r) => !r.tornTail).length;
      const counts = `${plural(s.records, 'record')}: ${plural(s.messages, 'message')}, ${s.states} state, ${s.holds} hold${s.histories ? `, ${s.histories} history` : ''}${s.other ? `, ${s.other} of unknown type` : ''}`;
      lines.push(`  ${name}  ${counts}; ${damaged ? plural(damaged, 'damaged range') : 'no damage'}`);
      for (const r of s.ranges) {
        const where = `bytes ${r.start}-${r.end} (${plural(r.bytes, 'byte')}): ${r.reason}`;
        if (r.tornTail) {
          lines.push(
            `    torn tail, ${where}: the last write of an unclean stop (or one in progress), never acknowledged; cut off at the next start`,
          );
          continue;
        }
        const c = r.contents;
        const lost = r.lostMessages.length
          ? `lost messages named: ${r.lostMessages.join(', ')}`
          : c.messages.length
            ? 'the messages in it have intact copies'
            : `no legible envelope among ${plural(c.headers, 'record header')}`;
        const states = c.states.length ? `; state of ${c.states.join(', ')}` : '';
        const holds = c.holds.length ? `; hold of ${c.holds.join(', ')}` : '';
        const histories = c.histories.length ? `; kept attempts of ${c.histories.join(', ')}` : '';
        const copy = r.quarantine
          ? `; set aside as ${r.quarantine}`
          : '; not set aside yet (the next start does it)';
        lines.push(`    damaged ${where}; ${lost}${states}${holds}${histories}${copy}`);
      }
    }
    if (part.quarantine.length)
      lines.push(
        `  quarantine: ${plural(part.quarantine.length, 'file')} in ${join(part.dir, QUARANTINE_DIR)}`,
      );
  }
  if (result.damaged)
    lines.push(
      `Damaged: ${plural(result.damaged, 'range')}. A message is named where its envelope is legible in the damaged bytes; others there are lost unnamed.`,
      'See "After a journal damage report" in docs/operations.md.',
    );
  else
    lines.push(
      `No damage${result.tornTails ? ` (${plural(result.tornTails, 'torn tail')}, cut off at the next start)` : ''}.`,
    );
  return lines;
}
