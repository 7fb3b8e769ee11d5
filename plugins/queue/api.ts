import {
  defineNote,
  defineToken,
  type NoteKey,
  type Address,
  type MailParams,
  type RecipientParams,
  type RecipientReply,
  type TransactionView,
} from '../../core/index.js';
import type { AttemptRecord, Origin } from './history.js';

/** A message a plugin puts into the queue itself (a bounce, a report). */
export interface Submission {
  /** Null for the null reverse-path `<>` (bounces are always sent with it). */
  readonly sender: Address | null;
  readonly recipients: readonly { readonly address: Address; readonly params?: RecipientParams }[];
  /** The whole message, headers included, with CRLF line ends. */
  readonly content: Buffer;
  readonly mailParams?: Partial<MailParams>;
  /**
   * The queue id of the message this one reports on (a delivery status notification): each
   * message's history then names the other (`petrel trace`).
   */
  readonly reportFor?: string;
}

export interface RecipientSummary {
  readonly address: string;
  /** The recipient as accepted, when this one is one of its targets (an alias, a forwarding). */
  readonly expandedFrom?: string;
  /** The envelope sender this recipient goes out with, when it is not the message's (SRS). */
  readonly sender?: string;
  readonly status: 'pending' | 'deferred' | 'delivered' | 'failed';
  readonly attempts: number;
  readonly nextAttemptAt: Date | null;
  readonly lastReply: RecipientReply | null;
  readonly lastAttemptAt: Date | null;
  /** The transport of the last attempt (`smtp`, `lmtp`, …); null before the first route. */
  readonly transport: string | null;
  /**
   * Held back until `nextAttemptAt` by a plugin's `postpone()` (an outbound rate, say), which
   * counts no attempt: `reason` as the plugin gave it, `by` the plugin. Gone at the next outcome.
   */
  readonly postponed?: { readonly reason: string; readonly by: string };
  /**
   * `get` only (not `list`): the attempts kept, oldest first — the first few and the latest
   * (`history.attempts` in the config); `omitted` counts those dropped between them.
   */
  readonly history?: readonly AttemptRecord[];
  readonly omitted?: number;
}

export interface MessageSummary {
  readonly id: string;
  readonly sender: string;
  readonly receivedAt: Date;
  readonly size: number;
  /** Held (by the administrator, or at acceptance): not attempted until released. */
  readonly held: boolean;
  /** Why a message held since its acceptance was held (see `HoldOnAccept`). */
  readonly heldReason?: string;
  /** A delivery attempt is in progress right now. */
  readonly attempting: boolean;
  /**
   * Present while the outcome of the attempt in progress cannot be written to disk (a full disk,
   * an I/O error): the error. The queue keeps retrying the record; until it succeeds the
   * recipients show their last recorded state, never the unrecorded outcome.
   */
  readonly unrecorded?: string;
  readonly recipients: readonly RecipientSummary[];
  /** `get` only: where the message came from, as recorded at acceptance (see history.ts). */
  readonly origin?: Origin;
  /** `get` only: the queue ids of the reports (DSNs) sent about it so far. */
  readonly reports?: readonly string[];
}

/** How the queue treats a message; other plugins read it here, not from the queue's config. */
export interface QueueSettings {
  /** How long a message may wait before its undelivered recipients fail, in milliseconds. */
  readonly lifetime: number;
  /** The delays between attempts, in milliseconds. */
  readonly retryDelays: readonly number[];
  /** Whether the last delay repeats until the lifetime runs out (`30m...`). */
  readonly repeatLast: boolean;
}

/** The queue as other plugins and the administration commands see it. */
export interface QueueService {
  /** The lifetime and retry schedule in force (for a report's Will-Retry-Until, say). */
  readonly settings: QueueSettings;
  /** Stores a new message durably (resolves after fsync) and schedules it now. Returns its id. */
  submit(message: Submission): Promise<string>;
  /**
   * Every message not yet final, oldest first. Messages outside the active window are read from
   * disk for this: with a large queue, prefer `petrel queue list`, which streams.
   */
  list(): Promise<MessageSummary[]>;
  /** One message, or null when no message has this id (read from disk when it is not loaded). */
  get(id: string): Promise<MessageSummary | null>;
  /**
   * Makes deferred recipients due now: one message, the messages with a recipient in `domain`, or
   * all. Resolves to how many were made due, once the queue knows every message it holds.
   */
  flush(target?: { id?: string; domain?: string }): Promise<number>;
  /**
   * Holds a message: it is not attempted (nor flushed) until released. Recorded durably; an
   * attempt in progress finishes. Resolves to the message, or null when no message has this id.
   */
  hold(id: string): Promise<MessageSummary | null>;
  /** Releases a held message: it is attempted again on its schedule (flush it to try now). */
  release(id: string): Promise<MessageSummary | null>;
  /**
   * Removes a message: its recipients not yet final fail with reason `deleted`, so that no
   * bounce is sent. Waits for an attempt in progress. Resolves to the message as it ended.
   */
  delete(id: string): Promise<MessageSummary | null>;
  /**
   * Returns a message to its sender: its recipients not yet final fail now (reason `refused`,
   * `550 5.0.0 Returned by the administrator`), so a bounce plugin sends a DSN.
   */
  bounce(id: string): Promise<MessageSummary | null>;
}

export const Queue = defineToken<QueueService>('queue.Queue');

/**
 * A transaction note asking the queue to store the message held (a quarantine): it gets its
 * `250` as usual, is kept durably, and is not delivered until an administrator releases it
 * (`petrel queue release <id>`) or deletes it. The hold is part of the stored envelope, so no
 * delivery attempt can start before it. Set it at `data_post` or earlier with `holdOnAccept`.
 */
export const HoldOnAccept: NoteKey<{ readonly reasons: readonly string[] }> =
  defineNote('queue.holdOnAccept');

/** Asks for the message of this transaction to be held at acceptance, adding a reason. */
export function holdOnAccept(notes: TransactionView['notes'], reason: string): void {
  const reasons = notes.get(HoldOnAccept)?.reasons ?? [];
  notes.set(HoldOnAccept, { reasons: [...reasons, reason] });
}
