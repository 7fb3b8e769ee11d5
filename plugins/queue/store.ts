import { createReadStream, existsSync } from 'node:fs';
import { mkdir, open, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type { QueuedMessageView, RecipientReply, Route } from '../../core/index.js';
import { syncDir } from './durable-fs.js';
import { Journal, listSegments, type DamageReport, type RecordRef } from './journal.js';
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
  lastReply?: RecipientReply;
  lastAttemptAt?: number;
  route?: Route;
  /** Set after an unclean stop for recipients that were not final: a delivery may have happened. */
  maybeDelivered: boolean;
  /**
   * Held back by a plugin's `postpone()` until `nextAttemptAt`, and why; cleared by the next
   * recorded outcome. In memory only (see `postpone`).
   */
  postponed?: { readonly reason: string; readonly by: string } | undefined;
  /** The attempts kept (the first few and the latest, see history.ts), oldest first. */
  history: readonly AttemptRecord[];
  /** Attempts dropped from `history` to keep it bounded. */
  omitted: number;
}

/**
 * How many queued messages keep their envelope parsed, at most (see `EnvelopeWindow`): by count,
 * and by the octets of those envelopes' JSON.
 */
export interface WindowLimits {
  readonly messages: number;
  readonly bytes: number;
}

export const DEFAULT_WINDOW: WindowLimits = { messages: 10_000, bytes: 16 * 1024 * 1024 };

/**
 * The active window: the queued messages whose envelopes are held as objects, the latest loaded
 * last. Every other message keeps its envelope as the JSON text of its Message record (one
 * string, about a third of the memory of the parsed objects: the addresses, parameters and origin
 * with their strings), parsed again when something next reads it (a delivery attempt, `petrel
 * queue show`). The envelope never changes once stored, so a copy parsed again is the same
 * envelope a restart would read. Beyond either bound the envelope loaded longest ago goes back to
 * text; one being used keeps its objects for whoever holds them.
 */
export class EnvelopeWindow {
  /** Entries whose envelope is parsed, in the order they were loaded, with their JSON's length. */
  private readonly loaded = new Map<Entry, number>();
  private bytes = 0;

  constructor(private readonly limits: WindowLimits = DEFAULT_WINDOW) {}

  /** Envelopes held parsed now. */
  get size(): number {
    return this.loaded.size;
  }

  /** Notes that an entry's envelope is parsed, and sends the oldest back to text beyond the limits. */
  add(entry: Entry, bytes: number): void {
    if (this.loaded.has(entry)) return;
    this.loaded.set(entry, bytes);
    this.bytes += bytes;
    while (this.loaded.size > this.limits.messages || this.bytes > this.limits.bytes) {
      const oldest = this.loaded.keys().next().value!;
      if (oldest === entry) break;
      this.remove(oldest);
      oldest.unload();
    }
  }

  /** Forgets an entry (it finished). */
  remove(entry: Entry): void {
    const bytes = this.loaded.get(entry);
    if (bytes === undefined) return;
    this.loaded.delete(entry);
    this.bytes -= bytes;
  }
}

/** A message not yet final, as the store keeps it. */
export class Entry {
  readonly id: string;
  /** The queue id of the message this one reports on (a DSN), kept out of the envelope for the engine's index. */
  readonly reportFor: string | undefined;
  /** The envelope's JSON, exactly as in the Message record. */
  readonly envelopeJson: string;
  /** The envelope as objects, while the message is in the active window. */
  private parsed: StoredEnvelope | null;
  /** Where the message octets are (inline messages). */
  location: RecordRef | null = null;
  /** Offset of the message octets inside the record's payload. */
  skip = 0;
  readonly rcpts: RecipientState[];
  /**
   * Segments holding records about this message: they stay until it is final. A few numbers,
   * replaced rather than grown (a grown array keeps room for 16 more).
   */
  segments: readonly number[] = [];
  /** A delivery attempt or an administrative change is in progress. */
  busy = false;
  /** Held by the administrator: never attempted until released. */
  held: boolean;
  /**
   * The message octets of a new inline message, kept in memory (within the store's budget) so that
   * its first delivery attempt need not read them back from disk; dropped when that attempt ends.
   */
  memory: { readonly chunks: readonly Buffer[]; readonly bytes: number } | null = null;

  constructor(
    private readonly window: EnvelopeWindow,
    env: StoredEnvelope,
    envelopeJson: string,
    /** Keep `env` parsed (a new message, about to be tried), or only its text (one read from the journal). */
    keep: boolean,
  ) {
    this.id = env.id;
    this.reportFor = env.origin?.reportFor;
    this.envelopeJson = envelopeJson;
    this.rcpts = freshStates(env);
    this.held = env.hold !== undefined;
    this.parsed = keep ? env : null;
    if (keep) window.add(this, envelopeJson.length);
  }

  /** The envelope (parsed again if it left the active window). */
  get env(): StoredEnvelope {
    if (this.parsed) return this.parsed;
    const env = JSON.parse(this.envelopeJson) as StoredEnvelope;
    this.parsed = env;
    this.window.add(this, this.envelopeJson.length);
    return env;
  }

  /** Back to text only (the window is full). */
  unload(): void {
    this.parsed = null;
  }
}

/** Present in the queue folder only after an orderly stop. */
export const CLEAN_SHUTDOWN = 'clean-shutdown';
/** Read size for stored messages. */
const HIGH_WATER = 256 * 1024;

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
    history: [],
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

/** A History record's payload: every recipient's kept attempts (for a compaction's copy). */
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

/**
 * The queue's contents: every message not yet final, with per-recipient state, rebuilt from the
 * journal at start. Bodies are written once (into the journal, or as a blob file for large
 * messages); every state change is a small record appended after them.
 *
 * Contract, for the engine (its only user):
 * - `add` resolves only once the message and its envelope are on stable storage; it rejects
 *   (nothing kept) on a write error, which the caller turns into a 4xx.
 * - `update` changes a recipient's recorded state only after the State record is on disk; on a
 *   write error it rejects and the entry is as before, so the caller retries. A message whose
 *   recipients are all final is forgotten then, but its files stay until `discard`.
 * - Records are applied in journal order at `open`; damaged ones are set aside (journal.ts), never
 *   dropped silently, and after damage every waiting recipient counts as maybe delivered.
 * - One process at a time: the engine holds the part's lock while the store is open.
 */
export class QueueStore {
  readonly entries = new Map<string, Entry>();
  /** Live entries per segment. */
  private readonly segmentRefs = new Map<number, number>();
  /** Segment files known to exist (from the start, and every segment written since). */
  private readonly onDisk = new Set<number>();
  private journal!: Journal;
  readonly blobDir: string;
  /** True when the last run did not stop cleanly (so deliveries may have happened unrecorded). */
  recoveredFromCrash = false;
  /** Octets of message bodies held in memory (`Entry.memory`), at most `memoryLimit`. */
  private memoryBytes = 0;
  /** The messages whose envelopes are held parsed. */
  readonly window: EnvelopeWindow;

  constructor(
    readonly dir: string,
    private readonly segmentSize: number,
    private readonly log: { warn(o: object, m: string): void; error(o: object, m: string): void },
    private readonly memoryLimit = 0,
    /** Told after each journal batch is durable (the queue's metrics). */
    private readonly onSync?: (seconds: number, records: number) => void,
    /** Attempts kept per recipient (see history.ts). */
    private readonly attemptLimits: AttemptLimits = { first: 3, last: 10 },
    /** Envelopes held parsed at most (see `EnvelopeWindow`). */
    window: WindowLimits = DEFAULT_WINDOW,
  ) {
    this.blobDir = join(dir, 'blobs');
    this.window = new EnvelopeWindow(window);
  }

  /**
   * Opens the queue. `finished` is given the messages whose recipients the journal shows all final
   * (the last run ended them, and a crash may have come before their history was stored): it
   * runs before their records are removed, so a history is never lost with them.
   */
  async open(finished?: (entries: readonly Entry[]) => Promise<void>): Promise<void> {
    await mkdir(this.blobDir, { recursive: true, mode: 0o700 });
    const cleanMarker = join(this.dir, CLEAN_SHUTDOWN);
    const journalDir = join(this.dir, 'journal');
    const cleanStop = existsSync(cleanMarker);
    this.recoveredFromCrash = existsSync(journalDir) && !cleanStop;
    const found: DamageReport[] = [];
    /** Ids of the Message records read intact (a damaged one may have an intact copy). */
    const intact = new Set<string>();
    /** Messages that finished in the journal, by id (a compaction copy may finish one twice). */
    const done = new Map<string, Entry>();
    this.journal = await Journal.open(journalDir, {
      segmentSize: this.segmentSize,
      cleanStop,
      quarantineDir: join(this.dir, QUARANTINE_DIR),
      onRecord: (type, payload, ref) => this.replay(type, payload, ref, intact, done),
      onDamage: (d) => found.push(d),
      describe: describeDamage,
      ...(this.onSync ? { onSync: this.onSync } : {}),
    });
    // Only now: a crash during recovery must not make the next start take a clean stop for a crash.
    await rm(cleanMarker, { force: true });
    const damaged = this.reportDamage(found, intact, cleanStop);
    // A blob without a Message record was written before a crash and never acknowledged; unless
    // the journal is damaged, when it may be the body of a message whose record was lost.
    for (const f of await readdir(this.blobDir)) {
      const id = f.replace(/\.(eml|tmp)$/, '');
      if (!f.endsWith('.tmp') && this.entries.get(id)?.env.blob) continue;
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
    if (finished && done.size) await finished([...done.values()]);
    // Finished messages leave no entry: their segments can go, except the one being written.
    for (const seg of await listSegments(journalDir)) {
      if (!this.segmentRefs.get(seg) && seg !== this.journal.currentSegment)
        await this.journal.removeSegment(seg);
      else this.onDisk.add(seg);
    }
    if (this.recoveredFromCrash) this.markMaybeDelivered();
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

  /** After a crash or damage: a waiting recipient may have been delivered without a record of it. */
  private markMaybeDelivered(): void {
    for (const e of this.entries.values()) {
      for (const r of e.rcpts) if (r.status === 'pending' || r.status === 'deferred') r.maybeDelivered = true;
    }
  }

  private ref(entry: Entry, segment: number): void {
    this.onDisk.add(segment);
    if (entry.segments.includes(segment)) return;
    entry.segments = entry.segments.concat(segment);
    this.segmentRefs.set(segment, (this.segmentRefs.get(segment) ?? 0) + 1);
  }

  /** Replays one record; answers why when it cannot be read (then it is damage). */
  private replay(
    type: number,
    payload: Buffer,
    ref: RecordRef,
    intact: Set<string>,
    done: Map<string, Entry>,
  ): string | void {
    const rec = decodeRecord(type, payload);
    if (typeof rec === 'string') return rec;
    if (rec.type === RecordType.Message) {
      const { env, skip } = rec;
      intact.add(env.id);
      const existing = this.entries.get(env.id);
      // The envelope is kept as its text: parsed again when the message is next looked at.
      const entry = existing ?? new Entry(this.window, env, payload.toString('utf8', 4, skip), false);
      // A relocated copy replaces the old location; the state carries over.
      entry.location = env.blob ? null : ref;
      entry.skip = skip;
      this.entries.set(env.id, entry);
      this.ref(entry, ref.segment);
    } else if (rec.type === RecordType.State) {
      const entry = this.entries.get(rec.id);
      if (!entry) return;
      this.applyUpdates(entry, rec.u);
      this.ref(entry, ref.segment);
      if (this.isFinal(entry)) {
        this.forget(entry);
        this.release(entry);
        done.set(entry.id, entry);
      }
    } else if (rec.type === RecordType.History) {
      const entry = this.entries.get(rec.id);
      if (!entry) return;
      for (const h of rec.h) {
        const r = entry.rcpts[h.i];
        if (!r) continue;
        r.history = h.k;
        r.omitted = h.o;
      }
      this.ref(entry, ref.segment);
    } else if (rec.type === RecordType.Hold) {
      const entry = this.entries.get(rec.id);
      if (!entry) return;
      entry.held = rec.held;
      this.ref(entry, ref.segment);
    }
  }

  private applyUpdates(entry: Entry, updates: readonly StateUpdate[]): void {
    for (const u of updates) {
      const r = entry.rcpts[u.i];
      if (!r) continue;
      r.status = u.s;
      r.attempts = u.a;
      r.nextAttemptAt = u.n;
      if (u.r) r.lastReply = u.r;
      if (u.t) r.lastAttemptAt = u.t;
      if (u.h)
        ({ kept: r.history, omitted: r.omitted } = keepAttempt(
          r.history,
          r.omitted,
          u.h,
          this.attemptLimits,
        ));
      // The record carries the last reply twice (as the state's and as the attempt's): one copy
      // is kept, as while the server ran.
      const last = r.history.at(-1)?.reply;
      if (u.h && last && r.lastReply && sameReply(last, r.lastReply)) r.lastReply = last;
    }
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
    for (const seg of entry.segments) {
      const n = (this.segmentRefs.get(seg) ?? 1) - 1;
      if (n > 0) this.segmentRefs.set(seg, n);
      else this.segmentRefs.delete(seg);
    }
    entry.segments = [];
  }

  /**
   * Stores a new message durably: an inline record for small messages, or a blob file (moved
   * from the receiving spool, fsynced) plus a record for large ones. Resolves after fsync.
   */
  async add(env: StoredEnvelope, body: { inline: Buffer[] } | { file: string }): Promise<Entry> {
    const envelopeJson = JSON.stringify(env);
    const head = envelopeParts(envelopeJson);
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
    const entry = new Entry(this.window, env, envelopeJson, true);
    entry.location = 'inline' in body ? ref : null;
    entry.skip = 4 + head[1].length;
    entry.memory = memory;
    this.entries.set(env.id, entry);
    this.ref(entry, ref.segment);
    return entry;
  }

  /**
   * Records new states of some recipients (by index) durably, and only then gives them to the
   * entry: when the State record cannot be written (a full disk, an I/O error), this rejects and
   * the entry still says what the disk says, so nothing looks finished that is not recorded so.
   * A message whose recipients are now all final is forgotten (true is returned); its files stay
   * until `discard`, so that the hooks told about the outcome can still read it. A crash in
   * between leaves nothing behind: at start, segments and blobs of final messages are removed.
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
    if (this.entries.get(entry.id) !== entry) return false;
    this.ref(entry, ref.segment);
    if (!this.isFinal(entry)) return false;
    this.forget(entry);
    return true;
  }

  /** Records that a message is held, or no longer held, durably. */
  async setHeld(entry: Entry, held: boolean): Promise<void> {
    const ref = await this.journal.append(RecordType.Hold, [
      Buffer.from(JSON.stringify({ id: entry.id, held }), 'utf8'),
    ]);
    entry.held = held;
    if (this.entries.get(entry.id) === entry) this.ref(entry, ref.segment);
  }

  /**
   * Marks a message as being worked on (a delivery attempt, an administrative change), or no
   * longer: compaction leaves a busy message's segments alone.
   */
  setBusy(entry: Entry, busy: boolean): void {
    entry.busy = busy;
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
   * which is no later (a compaction meanwhile may have copied `until` itself), and whoever
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
    if (entry.env.blob) await rm(join(this.blobDir, `${entry.id}.eml`), { force: true });
    await this.sweep();
  }

  /**
   * Removes every segment older than the one being written that no live message refers to. A
   * segment whose messages all finished while it was still current is caught here once the
   * journal has moved on (otherwise it would stay until the next start).
   */
  private async sweep(): Promise<void> {
    const current = this.journal.currentSegment;
    this.onDisk.add(current);
    for (const seg of [...this.onDisk]) {
      if (seg < current && !this.segmentRefs.get(seg)) {
        this.onDisk.delete(seg);
        await this.journal.removeSegment(seg);
      }
    }
  }

  /**
   * Moves live messages out of old segments that are mostly dead, so that one long-deferred
   * message does not pin a whole segment for days: a copy and a state snapshot are appended,
   * then the old segment is removed once nothing refers to it.
   */
  async compact(): Promise<void> {
    await this.sweep();
    const current = this.journal.currentSegment;
    const old = [...this.segmentRefs.keys()].filter((s) => s < current);
    for (const seg of old) {
      const live = [...this.entries.values()].filter((e) => e.segments.includes(seg));
      if (live.some((e) => e.busy)) continue;
      for (const entry of live) {
        const parts: Buffer[] = [];
        for await (const c of this.rawStream(entry)) parts.push(c as Buffer);
        const head = envelopeParts(entry.envelopeJson);
        const copy = await this.journal.append(
          RecordType.Message,
          entry.env.blob ? head : [...head, ...parts],
        );
        const st = await this.journal.append(RecordType.State, [statePayload(entry.id, allStates(entry))]);
        // The kept attempts must outlive the segments their State records were in.
        const kept = historyPayload(entry);
        const hist = kept ? await this.journal.append(RecordType.History, [kept]) : null;
        // The hold must outlive the segment its record was in; a release of a message held at
        // acceptance must too, or the copied envelope would hold it again.
        const hold =
          entry.held || entry.env.hold
            ? await this.journal.append(RecordType.Hold, [
                Buffer.from(JSON.stringify({ id: entry.id, held: entry.held }), 'utf8'),
              ])
            : null;
        if (!entry.env.blob) {
          entry.location = copy;
          entry.skip = 4 + head[1].length;
        }
        // A delivery that started while the copy was written may be reading the old place: then the
        // message keeps its old segments until it is final, and they are not removed under it.
        if (!entry.busy) {
          for (const s of entry.segments) {
            const n = (this.segmentRefs.get(s) ?? 1) - 1;
            if (n > 0) this.segmentRefs.set(s, n);
            else this.segmentRefs.delete(s);
          }
          entry.segments = [];
        }
        this.ref(entry, copy.segment);
        this.ref(entry, st.segment);
        if (hold) this.ref(entry, hold.segment);
        if (hist) this.ref(entry, hist.segment);
      }
      if (!this.segmentRefs.get(seg)) await this.journal.removeSegment(seg);
    }
  }

  /** The stored message octets (the body only for blobs). */
  private rawStream(entry: Entry): Readable {
    if (entry.memory) return memoryStream(entry.memory.chunks);
    if (entry.env.blob)
      return createReadStream(join(this.blobDir, `${entry.id}.eml`), { highWaterMark: HIGH_WATER });
    return this.journal.read(entry.location!, entry.skip);
  }

  /** The message as delivery hooks see it. */
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
   */
  async close(clean = true): Promise<void> {
    await this.journal.close();
    if (!clean) return;
    await writeFile(join(this.dir, CLEAN_SHUTDOWN), `${new Date().toISOString()}\n`);
    await syncDir(this.dir);
  }
}
