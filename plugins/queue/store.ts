import { createReadStream, existsSync } from 'node:fs';
import { mkdir, open, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type { QueuedMessageView, RecipientReply, Route } from '../../core/index.js';
import { syncDir } from './durable-fs.js';
import {
  Journal,
  listSegments,
  positionOf,
  segmentOf,
  type DamageReport,
  type RecordRef,
} from './journal.js';
import { QUARANTINE_DIR, quarantineBlob } from './quarantine.js';
import { keepAttempt, type AttemptLimits, type AttemptRecord } from './history.js';
import {
  decodeRecord,
  describeDamage,
  RecordType,
  type DamageContents,
  type RecipientStatus,
  type StateUpdate,
  type StoredEnvelope,
} from './records.js';

export { RecordType, type RecipientStatus, type StoredEnvelope } from './records.js';

export interface RecipientState {
  status: RecipientStatus;
  attempts: number;
  /** Epoch ms of the next attempt (pending/deferred). */
  nextAttemptAt: number;
  /** A detail: present only while the message is loaded (see `Entry`). */
  lastReply?: RecipientReply;
  /** A detail, as `lastReply`. */
  lastAttemptAt?: number;
  /** Set by the last attempt; in memory only (not recorded), and only while the message is loaded. */
  route?: Route;
  /** Set after an unclean stop for recipients that were not final: a delivery may have happened. */
  maybeDelivered: boolean;
  /**
   * Held back by a plugin's `postpone()` until `nextAttemptAt`, and why; cleared by the next
   * recorded outcome. In memory only (see `postpone`).
   */
  postponed?: { readonly reason: string; readonly by: string } | undefined;
  /** A detail: the attempts kept (the first few and the latest, see history.ts), oldest first. */
  history: readonly AttemptRecord[];
  /** A detail: attempts dropped from `history` to keep it bounded. */
  omitted: number;
}

/**
 * How many queued messages are held loaded at most (see `ActiveWindow`): by count, and by the
 * octets of their Message records' envelopes.
 */
export interface WindowLimits {
  readonly messages: number;
  readonly bytes: number;
}

export const DEFAULT_WINDOW: WindowLimits = { messages: 10_000, bytes: 16 * 1024 * 1024 };

/** A recipient's details while its message is not loaded. */
const NO_HISTORY: readonly AttemptRecord[] = Object.freeze([]);

/**
 * The active window: the queued messages held loaded (their envelope as objects, and each
 * recipient's last reply and kept attempts), the latest loaded last. Every other message is held
 * as its index entry only — a few numbers and shared strings (see `Entry`) — and loaded again
 * from the journal when something needs it (a delivery attempt, `petrel queue show`). Beyond
 * either bound the message loaded longest ago is unloaded, unless it is in use (`Entry.pins`).
 */
export class ActiveWindow {
  /** Loaded entries, in the order they were loaded, with their envelope's length. */
  private readonly loaded = new Map<Entry, number>();
  private bytes = 0;

  constructor(private readonly limits: WindowLimits = DEFAULT_WINDOW) {}

  /** Messages held loaded now. */
  get size(): number {
    return this.loaded.size;
  }

  /** Notes that an entry is loaded, and unloads the oldest beyond the limits. */
  add(entry: Entry, bytes: number): void {
    if (this.loaded.has(entry)) return;
    this.loaded.set(entry, bytes);
    this.bytes += bytes;
    this.trim(entry);
  }

  /**
   * Unloads the oldest entries while the window is beyond its limits, passing over those in use
   * (and `keep`, the one just loaded): one pass at most.
   */
  trim(keep?: Entry): void {
    const { limits } = this;
    for (const [oldest, size] of this.loaded) {
      if (this.loaded.size <= limits.messages && this.bytes <= limits.bytes) return;
      if (oldest.pins > 0 || oldest === keep) continue;
      this.loaded.delete(oldest);
      this.bytes -= size;
      oldest.unload();
    }
  }

  /** Forgets an entry (it finished): it stays loaded for whoever still holds it. */
  remove(entry: Entry): void {
    const bytes = this.loaded.get(entry);
    if (bytes === undefined) return;
    this.loaded.delete(entry);
    this.bytes -= bytes;
  }
}

/**
 * Strings many index entries share (a sender, a recipient domain, a message's list of domains),
 * kept once. Rebuilt from the live entries now and then (`QueueStore.compact`), so that strings
 * of finished messages do not stay.
 */
class Pool {
  private strings = new Map<string, string>();
  private lists = new Map<string, readonly string[]>();

  string(s: string): string {
    const known = this.strings.get(s);
    if (known !== undefined) return known;
    this.strings.set(s, s);
    return s;
  }

  list(items: readonly string[]): readonly string[] {
    const key = items.join('\u0000');
    const known = this.lists.get(key);
    if (known) return known;
    const list = Object.freeze(items.map((s) => this.string(s)));
    this.lists.set(key, list);
    return list;
  }

  get size(): number {
    return this.strings.size + this.lists.size;
  }

  rebuild(entries: Iterable<Entry>): void {
    this.strings = new Map();
    this.lists = new Map();
    for (const e of entries) {
      this.strings.set(e.sender, e.sender);
      for (const d of e.domains) this.strings.set(d, d);
      this.lists.set(e.domains.join('\u0000'), e.domains);
    }
  }
}

/** What a loaded message holds beyond its index entry. */
interface Loaded {
  readonly env: StoredEnvelope;
  /** The Message record (inline messages: where the octets are, after `skip`). */
  location: RecordRef | null;
  skip: number;
}

/**
 * A message not yet final, as the store keeps it. Always in memory: its index entry — the facts
 * scheduling and administration need without reading the disk (arrival, size, sender, each
 * recipient's domain, status, attempts and next attempt), and the journal positions of its
 * records. While it is loaded (the active window) also its envelope and each recipient's last
 * reply and kept attempts; `QueueStore.load` reads those back from the journal by replaying its
 * records, exactly as a restart would.
 */
export class Entry {
  readonly id: string;
  /** The queue id of the message this one reports on (a DSN), kept out of the envelope for the engine's index. */
  readonly reportFor: string | undefined;
  readonly receivedAt: number;
  /** Octets of the whole stored message. */
  readonly size: number;
  /** The envelope sender's address, '' for the null sender. */
  readonly sender: string;
  /** Each recipient's domain, lower case, by index. */
  readonly domains: readonly string[];
  /** The body is a file of its own (`blobs/<id>.eml`). */
  readonly blob: boolean;
  readonly rcpts: RecipientState[];
  /**
   * Journal positions (`positionOf`) of the records about this message, in journal order, its
   * Message record first: they are what `load` replays, and their segments stay until it is final.
   * Replaced rather than grown (a grown array keeps room for more).
   */
  records: readonly number[] = [];
  /** A delivery attempt or an administrative change is in progress. */
  busy = false;
  /** Held by the administrator: never attempted until released. */
  held: boolean;
  /** Read from the journal at start (not accepted by this run). */
  readonly recovered: boolean;
  /** Users of the loaded details (an attempt, a summary in progress): not unloaded while > 0. */
  pins = 0;
  /**
   * The message octets of a new inline message, kept in memory (within the store's budget) so that
   * its first delivery attempt need not read them back from disk; dropped when that attempt ends.
   */
  memory: { readonly chunks: readonly Buffer[]; readonly bytes: number } | null = null;
  private loaded: Loaded | null = null;

  constructor(env: StoredEnvelope, pool: Pool, recovered: boolean) {
    this.id = env.id;
    this.reportFor = env.origin?.reportFor;
    this.receivedAt = env.receivedAt;
    this.size = env.size;
    this.sender = pool.string(env.sender?.address ?? '');
    this.domains = pool.list(env.recipients.map((r) => r.address.domain.toLowerCase()));
    this.blob = env.blob !== undefined;
    this.rcpts = freshStates(env);
    this.held = env.hold !== undefined;
    this.recovered = recovered;
  }

  /** The envelope and recipients' details are in memory. */
  get isLoaded(): boolean {
    return this.loaded !== null;
  }

  /** The envelope; only while loaded (`QueueStore.load`). */
  get env(): StoredEnvelope {
    if (!this.loaded) throw new Error(`queue message ${this.id} is not loaded`);
    return this.loaded.env;
  }

  /** Where the octets of an inline message are; only while loaded. */
  get location(): { readonly ref: RecordRef | null; readonly skip: number } {
    if (!this.loaded) throw new Error(`queue message ${this.id} is not loaded`);
    return { ref: this.loaded.location, skip: this.loaded.skip };
  }

  attach(loaded: Loaded): void {
    this.loaded = loaded;
  }

  /** Back to the index entry alone (the window is full). */
  unload(): void {
    this.loaded = null;
    for (const r of this.rcpts) {
      r.lastReply = undefined;
      r.lastAttemptAt = undefined;
      r.route = undefined;
      r.history = NO_HISTORY;
      r.omitted = 0;
    }
  }

  /** The earliest next attempt of a recipient not yet final, or Infinity. */
  nextDue(): number {
    let next = Infinity;
    for (const r of this.rcpts) {
      if ((r.status === 'pending' || r.status === 'deferred') && r.nextAttemptAt < next)
        next = r.nextAttemptAt;
    }
    return next;
  }
}

/** Present in the queue folder only after an orderly stop. */
export const CLEAN_SHUTDOWN = 'clean-shutdown';
/** Read size for stored messages. */
const HIGH_WATER = 256 * 1024;
/**
 * A message with more records than this gets a snapshot (`QueueStore.checkpoint`) after its next
 * recorded change: loading it then reads a few records, not one per attempt of days of retries.
 */
const MAX_RECORDS = 8;
/** A segment whose records are less than this share live is compacted. */
const COMPACT_BELOW = 0.5;
/** Messages loaded at once by the store's own walks (compaction, the stories of finished ones). */
const LOAD_BATCH = 64;

/** A new message's recipients: all pending, due at arrival. */
function freshStates(env: StoredEnvelope): RecipientState[] {
  // Every field from the start: one shape for all, with the fields in the object itself (a field
  // added later costs a separate property store per recipient, for a million queued recipients).
  return env.recipients.map(() => ({
    status: 'pending',
    attempts: 0,
    nextAttemptAt: env.receivedAt,
    lastReply: undefined,
    lastAttemptAt: undefined,
    route: undefined,
    maybeDelivered: false,
    postponed: undefined,
    history: NO_HISTORY,
    omitted: 0,
  }));
}

/** The head of a Message record: the envelope's length, then the envelope as JSON. */
function envelopeParts(envelopeJson: string): [Buffer, Buffer] {
  const json = Buffer.from(envelopeJson, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(json.length);
  return [len, json];
}

/**
 * A State record's payload: the given states of some recipients (by index) of a message, each
 * with the attempt that led to it when there is one (`h`, for the history).
 */
function statePayload(
  id: string,
  states: ReadonlyMap<number, RecipientState>,
  attempts?: ReadonlyMap<number, AttemptRecord>,
): Buffer {
  const u: StateUpdate[] = [...states].map(([i, r]) => ({
    i,
    s: r.status,
    a: r.attempts,
    n: r.nextAttemptAt,
    r: r.lastReply,
    t: r.lastAttemptAt,
    ...(attempts?.has(i) ? { h: attempts.get(i)! } : {}),
  }));
  return Buffer.from(JSON.stringify({ id, u }), 'utf8');
}

/** A History record's payload: every recipient's kept attempts (for a snapshot). */
function historyPayload(entry: Entry): Buffer | null {
  const h = entry.rcpts
    .map((r, i) => ({ i, k: r.history, o: r.omitted }))
    .filter((e) => e.k.length > 0 || e.o > 0);
  return h.length ? Buffer.from(JSON.stringify({ id: entry.id, h }), 'utf8') : null;
}

/** Every recipient's state, for a snapshot. */
function allStates(entry: Entry): Map<number, RecipientState> {
  return new Map(entry.rcpts.map((r, i) => [i, r]));
}

/** Two replies that say the same (as parsed from one State record). */
function sameReply(a: RecipientReply, b: RecipientReply): boolean {
  return a === b || JSON.stringify(a) === JSON.stringify(b);
}

/**
 * Applies a State record's updates to recipients' states, as recovery and `load` do: with the
 * details (reply, attempt time, history) when `details`, else the index's fields alone.
 */
function applyUpdates(
  rcpts: RecipientState[],
  updates: readonly StateUpdate[],
  limits: AttemptLimits,
  details: boolean,
): void {
  for (const u of updates) {
    const r = rcpts[u.i];
    if (!r) continue;
    r.status = u.s;
    r.attempts = u.a;
    r.nextAttemptAt = u.n;
    if (!details) continue;
    if (u.r) r.lastReply = u.r;
    if (u.t) r.lastAttemptAt = u.t;
    if (u.h) ({ kept: r.history, omitted: r.omitted } = keepAttempt(r.history, r.omitted, u.h, limits));
    // The record carries the last reply twice (as the state's and as the attempt's): one copy
    // is kept, as while the server ran.
    const last = r.history.at(-1)?.reply;
    if (u.h && last && r.lastReply && sameReply(last, r.lastReply)) r.lastReply = last;
  }
}

/** A stream of buffers held in memory. */
function memoryStream(chunks: readonly Buffer[]): Readable {
  let next = 0;
  return new Readable({
    highWaterMark: HIGH_WATER,
    read() {
      while (next < chunks.length) if (!this.push(chunks[next++])) return;
      this.push(null);
    },
  });
}

/** Runs `fn` on every item, at most `n` at once. */
async function eachLimited<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
}

/**
 * The queue's contents: every message not yet final, with per-recipient state, rebuilt from the
 * journal at start. Bodies are written once (into the journal, or as a blob file for large
 * messages); every state change is a small record appended after them.
 *
 * Contract, for the engine (its only user):
 * - `open` resolves once new messages can be added; the journal's older records are read in the
 *   background, and `indexed` resolves when they all are. Until then `entries` holds what has
 *   been read so far, and nothing read from the journal may be delivered: a later record may say
 *   it was delivered already. New messages are not in the older records and can be delivered.
 * - `add` resolves only once the message and its envelope are on stable storage; it rejects
 *   (nothing kept) on a write error, which the caller turns into a 4xx.
 * - `update` changes a recipient's recorded state only after the State record is on disk; on a
 *   write error it rejects and the entry is as before, so the caller retries. A message whose
 *   recipients are all final is forgotten then, but its files stay until `discard`.
 * - An entry's envelope, replies and kept attempts are there only while it is loaded: `load` (or
 *   `use`) first; a pinned or busy entry is never unloaded.
 * - Records are applied in journal order at start; damaged ones are set aside (journal.ts), never
 *   dropped silently, and after damage every waiting recipient counts as maybe delivered.
 * - One process at a time: the engine holds the part's lock while the store is open.
 */
export class QueueStore {
  readonly entries = new Map<string, Entry>();
  /** Per segment: records that live messages (and finished ones not yet discarded) refer to. */
  private readonly liveRecords = new Map<number, number>();
  /** Per segment: every record in it, live or not (for compaction's choice). */
  private readonly allRecords = new Map<number, number>();
  /** Segment files known to exist (from the start, and every segment written since). */
  private readonly onDisk = new Set<number>();
  private journal!: Journal;
  readonly blobDir: string;
  /** True when the last run did not stop cleanly (so deliveries may have happened unrecorded). */
  recoveredFromCrash = false;
  /** Octets of message bodies held in memory (`Entry.memory`), at most `memoryLimit`. */
  private memoryBytes = 0;
  /** The messages held loaded. */
  readonly window: ActiveWindow;
  private readonly pool = new Pool();
  /** Loads in progress, so that two users of one message read it once. */
  private readonly loading = new Map<Entry, Promise<void>>();
  /** Resolves once every record of the journal as it was at start has been read. */
  indexed: Promise<void> = Promise.resolve();
  /** True once `indexed` has resolved. */
  isIndexed = false;
  /** How the reading of the journal went: seconds taken, messages it held. */
  indexing = { seconds: 0, messages: 0 };
  /** Segments written by this run (the older ones are read by the background indexing). */
  private firstNew = 0;
  private compacting = false;

  constructor(
    readonly dir: string,
    private readonly segmentSize: number,
    private readonly log: { warn(o: object, m: string): void; error(o: object, m: string): void },
    private readonly memoryLimit = 0,
    /** Told after each journal batch is durable (the queue's metrics). */
    private readonly onSync?: (seconds: number, records: number) => void,
    /** Attempts kept per recipient (see history.ts). */
    private readonly attemptLimits: AttemptLimits = { first: 3, last: 10 },
    /** Messages held loaded at most (see `ActiveWindow`). */
    window: WindowLimits = DEFAULT_WINDOW,
  ) {
    this.blobDir = join(dir, 'blobs');
    this.window = new ActiveWindow(window);
  }

  /**
   * Opens the queue for new messages, and starts reading the journal in the background
   * (`indexed`). `finished` is given the messages whose recipients the journal shows all final
   * (the last run ended them, and a crash may have come before their history was stored), loaded:
   * it runs before their records are removed, so a history is never lost with them. `indexed`
   * rejects when the journal cannot be read (an I/O error, not damage).
   */
  async open(finished?: (entries: readonly Entry[]) => Promise<void>): Promise<void> {
    await mkdir(this.blobDir, { recursive: true, mode: 0o700 });
    const cleanMarker = join(this.dir, CLEAN_SHUTDOWN);
    const journalDir = join(this.dir, 'journal');
    const cleanStop = existsSync(cleanMarker);
    this.recoveredFromCrash = existsSync(journalDir) && !cleanStop;
    this.journal = await Journal.start(journalDir, {
      segmentSize: this.segmentSize,
      ...(this.onSync ? { onSync: this.onSync } : {}),
    });
    this.firstNew = this.journal.currentSegment;
    this.onDisk.add(this.firstNew);
    // Only now: a crash during recovery must not make the next start take a clean stop for a crash.
    await rm(cleanMarker, { force: true });
    const started = performance.now();
    this.indexed = this.index(journalDir, cleanStop, finished).then(() => {
      this.isIndexed = true;
      this.indexing.seconds = (performance.now() - started) / 1000;
    });
    // Seen by whoever waits on it; not an unhandled rejection meanwhile.
    this.indexed.catch(() => undefined);
  }

  /** Reads the journal's older segments (see `open`). */
  private async index(
    journalDir: string,
    cleanStop: boolean,
    finished?: (entries: readonly Entry[]) => Promise<void>,
  ): Promise<void> {
    const found: DamageReport[] = [];
    /** Ids of the Message records read intact (a damaged one may have an intact copy). */
    const intact = new Set<string>();
    /** Messages that finished in the journal, by id (a compaction copy may finish one twice). */
    const done = new Map<string, Entry>();
    await this.journal.replay({
      cleanStop,
      quarantineDir: join(this.dir, QUARANTINE_DIR),
      onRecord: (type, payload, ref) => this.replay(type, payload, ref, intact, done),
      onDamage: (d) => found.push(d),
      describe: describeDamage,
    });
    // Closed before the journal was wholly read: nothing may be concluded from a part of it.
    if (this.journal.isClosed) throw new Error('the queue closed before its journal was read');
    const damaged = this.reportDamage(found, intact, cleanStop);
    // A blob without a Message record was written before a crash and never acknowledged; unless
    // the journal is damaged, when it may be the body of a message whose record was lost.
    for (const f of await readdir(this.blobDir)) {
      const id = f.replace(/\.(eml|tmp)$/, '');
      if (!f.endsWith('.tmp') && this.entries.get(id)?.blob) continue;
      const path = join(this.blobDir, f);
      // (A message whose record is intact and which finished leaves a blob that can go.)
      if (!damaged || !f.endsWith('.eml') || intact.has(id)) {
        await rm(path, { force: true });
        continue;
      }
      try {
        const kept = await quarantineBlob(join(this.dir, QUARANTINE_DIR), path, id);
        this.log.error(
          { queueId: id, quarantine: kept },
          'queue journal damaged: the body of a large message with no readable record is set aside in quarantine',
        );
      } catch (err) {
        // The damaged segments stay too, so that the next start finds the damage and tries again.
        for (const d of found) if (d.action !== 'cut') this.journal.keep(d.segment);
        this.log.error(
          { err, queueId: id, blob: path },
          'queue journal damaged: the body of a large message with no readable record could not be set aside; it stays where it is',
        );
      }
    }
    if (finished && done.size) {
      const ended = [...done.values()];
      for (let i = 0; i < ended.length; i += LOAD_BATCH) {
        const batch = ended.slice(i, i + LOAD_BATCH);
        const loaded: Entry[] = [];
        await eachLimited(batch, LOAD_BATCH, async (e) => {
          try {
            await this.load(e);
            loaded.push(e);
          } catch (err) {
            this.log.error(
              { err, queueId: e.id },
              'queue: the story of a finished message could not be read',
            );
          }
        });
        await finished(loaded);
      }
    }
    for (const e of done.values()) this.release(e);
    // Finished messages leave no entry: their segments can go.
    for (const seg of await listSegments(journalDir)) {
      if (seg >= this.firstNew) continue;
      if (!this.liveRecords.get(seg)) await this.journal.removeSegment(seg);
      else this.onDisk.add(seg);
    }
    if (this.recoveredFromCrash || damaged) this.markMaybeDelivered();
    let recovered = 0;
    for (const e of this.entries.values()) if (e.recovered) recovered++;
    this.indexing.messages = recovered;
  }

  /**
   * Logs what recovery found, one line per damaged range: a torn tail at warn, damage at error
   * with what it cost. A lost Message record is a lost message (named when its envelope is still
   * legible); a lost State record may have said that a recipient was delivered, so waiting
   * recipients are marked as maybe delivered (a possible duplicate, never a loss).
   * Returns true when there was damage (not just a torn tail).
   */
  private reportDamage(
    found: readonly DamageReport[],
    intact: ReadonlySet<string>,
    cleanStop: boolean,
  ): boolean {
    let damaged = false;
    for (const d of found) {
      const where = { segment: d.file, start: d.start, end: d.end, bytes: d.end - d.start, reason: d.reason };
      if (d.action === 'cut') {
        this.log.warn(
          { ...where, kind: 'torn-tail' },
          'queue journal: cut off a torn write at the end of the newest segment (an unclean stop; it was never acknowledged)',
        );
        continue;
      }
      damaged = true;
      const c: DamageContents = describeDamage(d.bytes);
      const live = (id: string): Entry | undefined => this.entries.get(id);
      const fields = {
        ...where,
        kind: 'damage',
        cleanStop,
        ...(d.quarantine ? { quarantine: d.quarantine } : {}),
        ...(d.alreadyQuarantined ? { alreadyQuarantined: true } : {}),
        ...(d.error ? { err: d.error } : {}),
        recordHeaders: c.headers,
        lostMessages: c.messages.filter((id) => !intact.has(id)),
        ...(c.messages.some((id) => intact.has(id))
          ? { intactCopy: c.messages.filter((id) => intact.has(id)) }
          : {}),
        mayBeRetried: c.states.filter((id) => live(id)),
        ...(c.holds.some((id) => live(id)) ? { holdMayBeLost: c.holds.filter((id) => live(id)) } : {}),
      };
      this.log.error(
        fields,
        d.action === 'quarantined'
          ? 'queue journal damaged: the damaged bytes are set aside in quarantine; the intact records after them are kept'
          : 'queue journal damaged and the quarantine copy failed: the segment is kept whole',
      );
    }
    // A lost State record may have said that a recipient was delivered, and one whose id is not
    // legible could be any message's: every waiting recipient is treated as after a crash.
    if (damaged) this.markMaybeDelivered();
    return damaged;
  }

  /** After a crash or damage: a waiting recipient read from the journal may have been delivered without a record of it. */
  private markMaybeDelivered(): void {
    for (const e of this.entries.values()) {
      if (!e.recovered) continue;
      for (const r of e.rcpts) if (r.status === 'pending' || r.status === 'deferred') r.maybeDelivered = true;
    }
  }

  /** Counts a record in its segment. */
  private counted(pos: number): void {
    const seg = segmentOf(pos);
    this.allRecords.set(seg, (this.allRecords.get(seg) ?? 0) + 1);
  }

  /** Adds a record to an entry's, and counts it live in its segment. */
  private ref(entry: Entry, pos: number): void {
    entry.records = entry.records.concat(pos);
    const seg = segmentOf(pos);
    this.liveRecords.set(seg, (this.liveRecords.get(seg) ?? 0) + 1);
  }

  /** Drops records' claim on their segments (`sweep` then removes those nothing else uses). */
  private unref(records: readonly number[]): void {
    for (const pos of records) {
      const seg = segmentOf(pos);
      const n = (this.liveRecords.get(seg) ?? 1) - 1;
      if (n > 0) this.liveRecords.set(seg, n);
      else this.liveRecords.delete(seg);
    }
  }

  /** Replays one record into the index; answers why when it cannot be read (then it is damage). */
  private replay(
    type: number,
    payload: Buffer,
    ref: RecordRef,
    intact: Set<string>,
    done: Map<string, Entry>,
  ): string | void {
    const rec = decodeRecord(type, payload);
    if (typeof rec === 'string') return rec;
    const pos = positionOf(ref);
    this.counted(pos);
    if (rec.type === RecordType.Message) {
      const { env } = rec;
      intact.add(env.id);
      // A compaction's copy of a message known already adds to its records; the state carries over.
      const entry = this.entries.get(env.id) ?? new Entry(env, this.pool, true);
      this.entries.set(env.id, entry);
      this.ref(entry, pos);
      return;
    }
    if (rec.type === 0) return;
    const entry = this.entries.get(rec.id);
    if (!entry) return;
    this.ref(entry, pos);
    if (rec.type === RecordType.State) {
      applyUpdates(entry.rcpts, rec.u, this.attemptLimits, false);
      if (this.isFinal(entry)) {
        this.forget(entry);
        done.set(entry.id, entry);
      }
    } else if (rec.type === RecordType.Hold) {
      entry.held = rec.held;
    }
    // A History record matters only to `load`, which replays it.
  }

  isFinal(entry: Entry): boolean {
    return entry.rcpts.every((r) => r.status === 'delivered' || r.status === 'failed');
  }

  /**
   * Drops a final entry. Its claim on segments stays until `release` (by `discard`): its records
   * are what a restart would rebuild its history from, should the history store not have it yet.
   */
  private forget(entry: Entry): void {
    this.entries.delete(entry.id);
    this.window.remove(entry);
  }

  /** Gives up a forgotten entry's claim on segments (`sweep` then removes those nothing else uses). */
  private release(entry: Entry): void {
    this.unref(entry.records);
    entry.records = [];
  }

  /**
   * Loads a message: reads its records back from the journal and replays them, as a restart
   * would, into its envelope and each recipient's last reply and kept attempts (the index's own
   * fields — status, attempts, next attempt, holds, and what is kept in memory only — are left as
   * they are). Rejects when a record cannot be read; the message stays as it was.
   */
  load(entry: Entry): Promise<void> {
    if (entry.isLoaded) return Promise.resolve();
    const known = this.loading.get(entry);
    if (known) return known;
    const p = this.read(entry).finally(() => this.loading.delete(entry));
    this.loading.set(entry, p);
    return p;
  }

  /** Runs `fn` on a loaded message that stays loaded until `fn` ends. */
  async use<T>(entry: Entry, fn: (entry: Entry) => T | Promise<T>): Promise<T> {
    entry.pins++;
    try {
      await this.load(entry);
      return await fn(entry);
    } finally {
      entry.pins--;
      // Loads while it was in use may have left the window beyond its limits.
      if (entry.pins === 0) this.window.trim();
    }
  }

  private async read(entry: Entry): Promise<void> {
    for (;;) {
      const records = entry.records;
      let read: Awaited<ReturnType<Journal['readRecord']>>[];
      try {
        read = await Promise.all(records.map((pos) => this.journal.readRecord(pos)));
      } catch (err) {
        // A snapshot meanwhile may have let a segment go: then read what is recorded now.
        if (entry.records !== records) continue;
        throw err;
      }
      // Changed meanwhile (an outcome recorded, a snapshot): read again what is recorded now.
      if (entry.records !== records) continue;
      if (entry.isLoaded) return;
      let loaded: Loaded | null = null;
      let octets: Buffer | null = null;
      const scratch = entry.rcpts.map(() => ({
        status: 'pending' as RecipientStatus,
        attempts: 0,
        nextAttemptAt: 0,
        lastReply: undefined as RecipientReply | undefined,
        lastAttemptAt: undefined as number | undefined,
        maybeDelivered: false,
        history: NO_HISTORY,
        omitted: 0,
      }));
      for (const { type, payload, ref } of read) {
        const rec = decodeRecord(type, payload);
        if (typeof rec === 'string')
          throw new Error(
            `queue message ${entry.id}: a record at ${ref.segment}:${ref.offset} does not read: ${rec}`,
          );
        if (rec.type === RecordType.Message) {
          loaded ??= { env: rec.env, location: null, skip: rec.skip };
          if (!entry.blob) {
            loaded.location = ref;
            loaded.skip = rec.skip;
            octets = payload.subarray(rec.skip);
          }
        } else if (rec.type === RecordType.State) {
          applyUpdates(scratch, rec.u, this.attemptLimits, true);
        } else if (rec.type === RecordType.History) {
          for (const h of rec.h) {
            const r = scratch[h.i];
            if (!r) continue;
            r.history = h.k;
            r.omitted = h.o;
          }
        }
      }
      if (!loaded) throw new Error(`queue message ${entry.id}: no Message record among its records`);
      entry.rcpts.forEach((r, i) => {
        const s = scratch[i]!;
        r.lastReply = s.lastReply;
        r.lastAttemptAt = s.lastAttemptAt;
        r.history = s.history;
        r.omitted = s.omitted;
      });
      entry.attach(loaded);
      // The octets were read anyway: the attempt this load is for (most often) need not read them again.
      if (octets && !entry.memory && this.memoryBytes + octets.length <= this.memoryLimit) {
        entry.memory = { chunks: [octets], bytes: octets.length };
        this.memoryBytes += octets.length;
      }
      if (this.entries.get(entry.id) === entry) this.window.add(entry, loaded.skip);
      return;
    }
  }

  /**
   * Stores a new message durably: an inline record for small messages, or a blob file (moved
   * from the receiving spool, fsynced) plus a record for large ones. Resolves after fsync.
   */
  async add(env: StoredEnvelope, body: { inline: Buffer[] } | { file: string }): Promise<Entry> {
    const head = envelopeParts(JSON.stringify(env));
    if ('file' in body) {
      const target = join(this.blobDir, `${env.id}.eml`);
      const fh = await open(body.file, 'r');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(body.file, target);
      await syncDir(this.blobDir);
    }
    const octets = 'inline' in body ? body.inline : [];
    // An inline message within the budget keeps its chunks in memory for its first attempt.
    const bytes = octets.reduce((n, c) => n + c.length, 0);
    const memory =
      octets.length && !env.hold && this.memoryBytes + bytes <= this.memoryLimit
        ? { chunks: octets, bytes }
        : null;
    if (memory) this.memoryBytes += bytes;
    let ref: RecordRef;
    try {
      ref = await this.journal.append(RecordType.Message, [...head, ...octets]);
    } catch (err) {
      if (memory) this.memoryBytes -= bytes;
      throw err;
    }
    const entry = new Entry(env, this.pool, false);
    const skip = 4 + head[1].length;
    entry.attach({ env, location: 'inline' in body ? ref : null, skip });
    entry.memory = memory;
    this.entries.set(env.id, entry);
    const pos = positionOf(ref);
    this.counted(pos);
    this.ref(entry, pos);
    this.window.add(entry, skip);
    return entry;
  }

  /**
   * Records new states of some recipients (by index) durably, and only then gives them to the
   * entry (which must be loaded: the attempts are kept with the details): when the State record
   * cannot be written (a full disk, an I/O error), this rejects and the entry still says what the
   * disk says, so nothing looks finished that is not recorded so. A message whose recipients are
   * now all final is forgotten (true is returned); its files stay until `discard`, so that the
   * hooks told about the outcome can still read it. A crash in between leaves nothing behind: at
   * start, segments and blobs of final messages are removed.
   */
  async update(
    entry: Entry,
    states: ReadonlyMap<number, RecipientState>,
    attempts?: ReadonlyMap<number, AttemptRecord>,
  ): Promise<boolean> {
    const ref = await this.journal.append(RecordType.State, [statePayload(entry.id, states, attempts)]);
    for (const [i, st] of states) {
      const r = Object.assign(entry.rcpts[i]!, st);
      const a = attempts?.get(i);
      if (a)
        ({ kept: r.history, omitted: r.omitted } = keepAttempt(r.history, r.omitted, a, this.attemptLimits));
    }
    const pos = positionOf(ref);
    this.counted(pos);
    if (this.entries.get(entry.id) !== entry) return false;
    this.ref(entry, pos);
    if (!this.isFinal(entry)) {
      if (entry.records.length > MAX_RECORDS)
        await this.checkpoint(entry, false).catch((err: unknown) =>
          // The outcome is recorded; only the snapshot is not (tried again after the next one).
          this.log.error({ err, queueId: entry.id }, 'queue: a snapshot of a message could not be written'),
        );
      return false;
    }
    this.forget(entry);
    return true;
  }

  /** Records that a message is held, or no longer held, durably. */
  async setHeld(entry: Entry, held: boolean): Promise<void> {
    const ref = await this.journal.append(RecordType.Hold, [
      Buffer.from(JSON.stringify({ id: entry.id, held }), 'utf8'),
    ]);
    entry.held = held;
    const pos = positionOf(ref);
    this.counted(pos);
    if (this.entries.get(entry.id) === entry) this.ref(entry, pos);
  }

  /**
   * Marks a message as being worked on (a delivery attempt, an administrative change), or no
   * longer: compaction leaves a busy message alone, and the window does not unload it.
   */
  setBusy(entry: Entry, busy: boolean): void {
    if (busy === entry.busy) return;
    entry.busy = busy;
    entry.pins += busy ? 1 : -1;
    if (entry.pins === 0) this.window.trim();
  }

  /**
   * Makes a message's deferred (and postponed) recipients due at `now` (an administrator's
   * flush). Not recorded: after a restart they are due on their recorded schedule again, which
   * is no later.
   */
  makeDue(entry: Entry, now: number): void {
    for (const r of entry.rcpts) if (r.status === 'deferred' || r.postponed) r.nextAttemptAt = now;
  }

  /**
   * Holds some recipients (by index) back until `until` without an attempt (a plugin's
   * `postpone()`). No record of its own: after a restart they are due at their recorded time,
   * which is no later (a snapshot meanwhile may have copied `until` itself), and whoever
   * postponed them is asked again.
   */
  postpone(
    entry: Entry,
    indices: readonly number[],
    until: number,
    postponed: RecipientState['postponed'],
  ): void {
    for (const i of indices) {
      const r = entry.rcpts[i]!;
      r.nextAttemptAt = until;
      r.postponed = postponed;
    }
  }

  /** Drops the in-memory copy of a message's octets: later reads come from disk. */
  dropMemory(entry: Entry): void {
    if (!entry.memory) return;
    this.memoryBytes -= entry.memory.bytes;
    entry.memory = null;
  }

  /** Removes the files of a message `update` forgot: its blob, and segments nothing else uses. */
  async discard(entry: Entry): Promise<void> {
    if (this.entries.get(entry.id) === entry) return;
    this.release(entry);
    this.dropMemory(entry);
    if (entry.blob) await rm(join(this.blobDir, `${entry.id}.eml`), { force: true });
    await this.sweep();
  }

  /**
   * Removes every segment older than the one being written that no live message refers to. A
   * segment whose messages all finished while it was still current is caught here once the
   * journal has moved on (otherwise it would stay until the next start). Segments the background
   * indexing has not read are not known here yet.
   */
  private async sweep(): Promise<void> {
    const current = this.journal.currentSegment;
    this.onDisk.add(current);
    for (const seg of [...this.onDisk]) {
      if (seg < current && !this.liveRecords.get(seg)) {
        this.onDisk.delete(seg);
        this.allRecords.delete(seg);
        await this.journal.removeSegment(seg);
      }
    }
  }

  /**
   * Appends a snapshot of a message — a State record with every recipient's state, a History
   * record with the kept attempts, a Hold record when it is held or was held at acceptance, and a
   * copy of its Message record when `copyMessage` — and makes those its records: the older ones
   * no longer keep their segments. Loading it afterwards reads these few records.
   */
  private async checkpoint(entry: Entry, copyMessage: boolean): Promise<void> {
    await this.use(entry, async () => {
      const records = entry.records;
      const first = records[0]!;
      const copy = copyMessage ? (await this.journal.readRecord(first)).payload : null;
      // All appended before any is awaited: one batch, in this order, so a restart replays the
      // copy (if any) before the state that follows it.
      const appends: Promise<RecordRef>[] = [];
      if (copy) appends.push(this.journal.append(RecordType.Message, [copy]));
      appends.push(this.journal.append(RecordType.State, [statePayload(entry.id, allStates(entry))]));
      // The kept attempts must outlive the segments their State records were in.
      const kept = historyPayload(entry);
      if (kept) appends.push(this.journal.append(RecordType.History, [kept]));
      // The hold must outlive the segment its record was in; a release of a message held at
      // acceptance must too, or the copied envelope would hold it again.
      if (entry.held || entry.env.hold)
        appends.push(
          this.journal.append(RecordType.Hold, [
            Buffer.from(JSON.stringify({ id: entry.id, held: entry.held }), 'utf8'),
          ]),
        );
      const refs = await Promise.all(appends);
      // Records added meanwhile (a hold) come after the snapshot's and are kept.
      const later = entry.records.slice(records.length);
      const positions = refs.map(positionOf);
      for (const p of positions) this.counted(p);
      if (this.entries.get(entry.id) !== entry) return;
      // The Message record stays where it is unless it was copied.
      this.unref(copy ? records : records.slice(1));
      entry.records = copy ? [] : [first];
      for (const p of positions) this.ref(entry, p);
      entry.records = entry.records.concat(later);
      if (copy && !entry.blob) {
        const loc = entry.location;
        entry.attach({ env: entry.env, location: refs[0]!, skip: loc.skip });
      }
    });
  }

  /**
   * Moves live messages out of old segments that are mostly dead (fewer than half their records
   * still needed; with `everything`, out of every older segment), so that one long-deferred
   * message does not pin a whole segment for days, and a large queue is not copied over and over:
   * a snapshot of each (`checkpoint`, with a copy of its Message record when that is in such a
   * segment) is appended, then the old segment is removed once nothing refers to it. Busy messages
   * are left for the next round. Runs in the background, a few messages at a time; waits for the
   * journal to be read first.
   */
  async compact(opts: { everything?: boolean } = {}): Promise<void> {
    if (this.compacting) return;
    this.compacting = true;
    try {
      await this.indexed.catch(() => undefined);
      if (!this.isIndexed) return;
      await this.sweep();
      const current = this.journal.currentSegment;
      const sparse = new Set<number>();
      for (const seg of this.onDisk) {
        if (seg >= current) continue;
        const all = this.allRecords.get(seg) ?? 0;
        const live = this.liveRecords.get(seg) ?? 0;
        if (all > 0 && (opts.everything || live / all < COMPACT_BELOW)) sparse.add(seg);
      }
      if (this.pool.size > 2 * this.entries.size + 1024) this.pool.rebuild(this.entries.values());
      if (!sparse.size) return;
      const movers: { entry: Entry; copy: boolean }[] = [];
      let walked = 0;
      for (const entry of this.entries.values()) {
        // A million messages: the event loop runs between every few thousand.
        if (++walked % 10_000 === 0) await new Promise((resolve) => setImmediate(resolve));
        const inSparse = entry.records.some((p) => sparse.has(segmentOf(p)));
        if (inSparse) movers.push({ entry, copy: sparse.has(segmentOf(entry.records[0]!)) });
      }
      await eachLimited(movers, LOAD_BATCH, async ({ entry, copy }) => {
        if (entry.busy || this.entries.get(entry.id) !== entry) return;
        try {
          await this.checkpoint(entry, copy);
        } catch (err) {
          this.log.error(
            { err, queueId: entry.id },
            'queue compaction: a message could not be moved; it stays where it is',
          );
        }
      });
      await this.sweep();
    } finally {
      this.compacting = false;
    }
  }

  /** The stored message octets (the body only for blobs). */
  private rawStream(entry: Entry): Readable {
    if (entry.memory) return memoryStream(entry.memory.chunks);
    if (entry.blob)
      return createReadStream(join(this.blobDir, `${entry.id}.eml`), { highWaterMark: HIGH_WATER });
    const { ref, skip } = entry.location;
    return this.journal.read(ref!, skip);
  }

  /** The message as delivery hooks see it (it must be loaded, and stay so while it is read). */
  view(entry: Entry): QueuedMessageView {
    const { env } = entry;
    const raw = (): Readable => this.rawStream(entry);
    return {
      id: env.id,
      sender: env.sender,
      mailParams: env.mailParams,
      receivedAt: new Date(env.receivedAt),
      size: env.size,
      stream(): Readable {
        if (!env.blob) return raw();
        const head = Buffer.from(env.blob.headers, 'utf8');
        const body = raw();
        return Readable.from(
          (async function* () {
            if (head.length) yield head;
            yield* body;
          })(),
          { objectMode: false },
        );
      },
    };
  }

  /**
   * Closes the journal and marks a clean stop, so the next start does not treat pending
   * deliveries as maybe done. `clean: false` (an outcome that could not be recorded) leaves the
   * mark out: the next start then tells the transports those recipients may have been delivered.
   * A stop before the journal was wholly read stops reading it; it leaves the mark out too when
   * the start was after a crash, so that the next start knows (the journal is read again then).
   */
  async close(clean = true): Promise<void> {
    await this.journal.close();
    await this.indexed.catch(() => undefined);
    if (!clean || (!this.isIndexed && this.recoveredFromCrash)) return;
    await writeFile(join(this.dir, CLEAN_SHUTDOWN), `${new Date().toISOString()}\n`);
    await syncDir(this.dir);
  }
}
