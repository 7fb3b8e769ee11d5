import {
  defineToken,
  type Address,
  type MailParams,
  type RecipientParams,
  type RecipientReply,
} from '../../core/index.js';

/** A message a plugin puts into the queue itself (a bounce, a report). */
export interface Submission {
  /** Null for the null reverse-path `<>` (bounces are always sent with it). */
  readonly sender: Address | null;
  readonly recipients: readonly { readonly address: Address; readonly params?: RecipientParams }[];
  /** The whole message, headers included, with CRLF line ends. */
  readonly content: Buffer;
  readonly mailParams?: Partial<MailParams>;
}

export interface RecipientSummary {
  readonly address: string;
  readonly status: 'pending' | 'deferred' | 'delivered' | 'failed';
  readonly attempts: number;
  readonly nextAttemptAt: Date | null;
  readonly lastReply: RecipientReply | null;
  readonly lastAttemptAt: Date | null;
}

export interface MessageSummary {
  readonly id: string;
  readonly sender: string;
  readonly receivedAt: Date;
  readonly size: number;
  readonly held: boolean;
  readonly recipients: readonly RecipientSummary[];
}

/** The queue as other plugins and the administration commands see it. */
export interface QueueService {
  /** Stores a new message durably (resolves after fsync) and schedules it now. Returns its id. */
  submit(message: Submission): Promise<string>;
  /** Every message not yet final. */
  list(): MessageSummary[];
  get(id: string): MessageSummary | null;
  /** Makes deferred recipients due now: one message, the messages with a recipient in `domain`, or all. */
  flush(target?: { id?: string; domain?: string }): number;
}

export const Queue = defineToken<QueueService>('queue.Queue');
