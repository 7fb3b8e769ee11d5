import type { Address, MailParams, RecipientParams, RecipientReply } from '../../core/index.js';
import type { DeliveryStatus } from '../../core/index.js';
import type { AttemptRecord, Origin } from './history.js';

/**
 * What the queue's journal records mean: the payload of each record type, read without ever
 * throwing. A record whose checksum verifies but whose payload does not read (a bug, or damage a
 * CRC-32 missed) is reported as a reason string, and recovery sets it aside like any damage.
 */

export const RecordType = { Message: 1, State: 2, Hold: 3, History: 4 } as const;

/** A recipient as stored: after expansion (see the `expand` hook), one per delivery target. */
export interface StoredRecipient {
  readonly address: Address;
  readonly params: RecipientParams;
  /** Present when this recipient is delivered with another envelope sender than the message's. */
  readonly sender?: Address | null;
  /** The recipient as accepted, when this one was expanded from it. */
  readonly expandedFrom?: Address;
}

/** The envelope as stored in a Message record. */
export interface StoredEnvelope {
  readonly id: string;
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  readonly recipients: readonly StoredRecipient[];
  readonly receivedAt: number;
  /** Octets of the whole stored message. */
  readonly size: number;
  /** Large messages: the added header text is here and the body is in `blobs/<id>.eml`. */
  readonly blob?: { readonly headers: string };
  /**
   * Held from the start (a plugin asked for it at acceptance, e.g. a quarantine), and why. A
   * later Hold record overrides it, as for any hold.
   */
  readonly hold?: { readonly reason: string };
  /** Where the message came from (see history.ts); absent in envelopes written before it existed. */
  readonly origin?: Origin;
}

export type RecipientStatus = 'pending' | DeliveryStatus;

/** What a State record says about one recipient. */
export interface StateUpdate {
  /** The recipient's index in the envelope. */
  readonly i: number;
  readonly s: RecipientStatus;
  /** Attempts so far. */
  readonly a: number;
  /** Epoch ms of the next attempt. */
  readonly n: number;
  readonly r?: RecipientReply;
  /** Epoch ms of the last attempt. */
  readonly t?: number;
  /**
   * The attempt (or administrator's action) that led to this state, for the message's history.
   * Absent in a snapshot, and in records written before histories were kept; a reader that does
   * not know it ignores it, so the record stays what it was.
   */
  readonly h?: AttemptRecord;
}

/** One recipient's kept attempts, in a History record. */
export interface HistoryEntry {
  /** The recipient's index in the envelope. */
  readonly i: number;
  /** The attempts kept (the first few and the latest, see history.ts). */
  readonly k: readonly AttemptRecord[];
  /** Attempts dropped between them. */
  readonly o: number;
}

export type DecodedRecord =
  | {
      readonly type: 1;
      readonly env: StoredEnvelope;
      /** Offset of the octets in the payload. */ readonly skip: number;
    }
  | { readonly type: 2; readonly id: string; readonly u: readonly StateUpdate[] }
  | { readonly type: 3; readonly id: string; readonly held: boolean }
  /** The kept attempts of some recipients, replacing what earlier records said (written by compaction). */
  | { readonly type: 4; readonly id: string; readonly h: readonly HistoryEntry[] }
  /** A record type this version does not know (written by a later one): skipped, not damage. */
  | { readonly type: 0 };

function json(bytes: Buffer): Record<string, unknown> | null {
  try {
    const v: unknown = JSON.parse(bytes.toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

const STATUSES = new Set(['pending', 'deferred', 'delivered', 'failed']);

/** Reads a record's payload, or says why it cannot be read. */
export function decodeRecord(type: number, payload: Buffer): DecodedRecord | string {
  if (type === RecordType.Message) {
    if (payload.length < 4) return 'message record shorter than its envelope length';
    const envLen = payload.readUInt32BE(0);
    if (envLen > payload.length - 4) return `envelope length ${envLen} runs past the record`;
    const env = json(payload.subarray(4, 4 + envLen));
    if (!env) return 'envelope is not a JSON object';
    if (typeof env.id !== 'string' || !env.id) return 'envelope has no id';
    if (!Array.isArray(env.recipients)) return 'envelope has no recipients';
    if (typeof env.receivedAt !== 'number') return 'envelope has no arrival time';
    return { type: 1, env: env as unknown as StoredEnvelope, skip: 4 + envLen };
  }
  if (type === RecordType.State) {
    const v = json(payload);
    if (!v || typeof v.id !== 'string' || !Array.isArray(v.u)) return 'state record is not { id, u }';
    const ok = (v.u as unknown[]).every((x) => {
      const u = x as Partial<StateUpdate> | null;
      return (
        typeof u === 'object' &&
        u !== null &&
        Number.isInteger(u.i) &&
        STATUSES.has(u.s as string) &&
        typeof u.a === 'number' &&
        typeof u.n === 'number'
      );
    });
    if (!ok) return 'state record has a malformed recipient update';
    return { type: 2, id: v.id, u: v.u as StateUpdate[] };
  }
  if (type === RecordType.Hold) {
    const v = json(payload);
    if (!v || typeof v.id !== 'string' || typeof v.held !== 'boolean')
      return 'hold record is not { id, held }';
    return { type: 3, id: v.id, held: v.held };
  }
  if (type === RecordType.History) {
    const v = json(payload);
    if (!v || typeof v.id !== 'string' || !Array.isArray(v.h)) return 'history record is not { id, h }';
    const ok = (v.h as unknown[]).every((x) => {
      const e = x as Partial<HistoryEntry> | null;
      return (
        typeof e === 'object' &&
        e !== null &&
        Number.isInteger(e.i) &&
        Array.isArray(e.k) &&
        typeof e.o === 'number' &&
        e.k.every((a) => typeof a === 'object' && a !== null && typeof a.t === 'number' && !!a.reply)
      );
    });
    if (!ok) return 'history record has a malformed recipient entry';
    return { type: 4, id: v.id, h: v.h as HistoryEntry[] };
  }
  return { type: 0 };
}

/** What can still be read in a damaged byte range: which records it held, as far as that shows. */
export interface DamageContents {
  /** Record headers that start in the range; a damaged header may hide more. */
  readonly headers: number;
  /** Queue ids of Message records whose envelope is still legible in the range. */
  readonly messages: readonly string[];
  /** Queue ids named by State records in the range. */
  readonly states: readonly string[];
  /** Queue ids named by Hold records in the range. */
  readonly holds: readonly string[];
  /** Queue ids named by History records in the range (a lost one costs attempts kept, not mail). */
  readonly histories: readonly string[];
}

const MAGIC = Buffer.from('PTRL', 'latin1');

/**
 * Looks for legible envelopes and state records in damaged bytes. Their JSON starts the same way
 * every time (`{"id":"…","sender":` for a Message's envelope, `{"id":"…","u":[` for State,
 * `{"id":"…","held":` for Hold, `{"id":"…","h":[` for History), so an id is found even when the record's header is gone.
 */
export function describeDamage(bytes: Buffer): DamageContents {
  let headers = 0;
  for (let at = bytes.indexOf(MAGIC); at >= 0; at = bytes.indexOf(MAGIC, at + 1)) {
    // A header: a known type, then the three zero bytes (the magic alone may be in a message).
    const type = bytes[at + 4];
    if (type !== undefined && type >= 1 && type <= 4 && !bytes[at + 5] && !bytes[at + 6] && !bytes[at + 7])
      headers++;
  }
  const text = bytes.toString('latin1');
  const ids = (re: RegExp): string[] => [...new Set([...text.matchAll(re)].map((m) => m[1]!))];
  return {
    headers,
    messages: ids(/\{"id":"([\w.-]{1,128})","sender":/g),
    states: ids(/\{"id":"([\w.-]{1,128})","u":\[/g),
    holds: ids(/\{"id":"([\w.-]{1,128})","held":/g),
    histories: ids(/\{"id":"([\w.-]{1,128})","h":\[/g),
  };
}
