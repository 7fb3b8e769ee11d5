import type { RecipientReply } from '../../core/index.js';

/**
 * A message's history: where it came from (its origin, fixed at acceptance) and, per recipient,
 * its delivery attempts. Pure data and pure functions; the journal carries it while the message
 * is queued (records.ts), the history store keeps it after (history-store.ts).
 */

/** One delivery attempt of one recipient, or an administrator's end of it. */
export interface AttemptRecord {
  /** Epoch ms when the attempt ended. */
  readonly t: number;
  /** The attempt's number for this recipient, 1 for the first (absent for an administrator's action): a gap shows dropped ones. */
  readonly n?: number;
  /** What came of it. */
  readonly status: 'delivered' | 'deferred' | 'failed';
  /** The transport (`smtp`, `lmtp`, `maildir`, …); absent when no route was found or it was refused at routing. */
  readonly transport?: string;
  /** The route's key (a destination domain, a smarthost, a mailbox folder). */
  readonly route?: string;
  /** The reply: from the peer (then `remote` names it, and `tls` says how the connection was protected), or made up here. */
  readonly reply: RecipientReply;
  /**
   * `deleted`, `returned`: an administrator's `petrel queue delete` or `bounce`, not a delivery
   * attempt. `expired`: the lifetime ran out after this attempt, so the recipient failed.
   */
  readonly kind?: 'deleted' | 'returned' | 'expired';
}

/**
 * Where a message came from, as the queue learns it at acceptance (the `queue` hook), without
 * asking any plugin for more: the session, the transaction, and what plugins left on the
 * message. The rule for "which plugin decided what": a verdict is in the story when a plugin
 * made it visible at acceptance — a header field it added (`Authentication-Results:`,
 * `X-Spam-*`, …; `Received:` is left out, the rest of the origin says it), a hold it asked for
 * (`holdOnAccept`, with its reason), or an expansion (each stored recipient names the one it was
 * expanded from). Plugins that decided silently (`proceed()`) leave no trace here; their log
 * lines do.
 */
export interface Origin {
  /** The client's address and port; absent for a message a plugin submitted. */
  readonly client?: { readonly address: string; readonly port: number };
  /** The HELO/EHLO name the client gave. */
  readonly helo?: string;
  /** The AUTH user, when the client authenticated. */
  readonly user?: string;
  /** TLS protocol and cipher of the client's connection, e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384`. */
  readonly tls?: string;
  /** The listener's name and kind (`mx`, `submission`, …). */
  readonly listener?: string;
  /** The Message-ID header field's value, as the client sent it. */
  readonly messageId?: string;
  /** Header fields plugins added at acceptance (all but `Received:`), as `Name: value`, each cut at 1000 characters. */
  readonly verdicts?: readonly string[];
  /** A plugin submitted it (a bounce, a report): the plugin's submission, and what it reports on. */
  readonly submitted?: true;
  /** The queue id of the message this one reports on (a DSN). */
  readonly reportFor?: string;
}

/** How many attempts per recipient a queued message keeps: the first few and the latest. */
export interface AttemptLimits {
  readonly first: number;
  readonly last: number;
}

/** Longest reply text kept in a history, per line joined; the rest is cut (a reply is not a story). */
const MAX_TEXT = 1000;

/** An attempt as kept: the reply's text cut to a bound, so one chatty peer cannot grow a history. */
export function attemptRecord(a: AttemptRecord): AttemptRecord {
  const text = typeof a.reply.text === 'string' ? a.reply.text : a.reply.text.join(' ');
  if (text.length <= MAX_TEXT && typeof a.reply.text === 'string') return a;
  return { ...a, reply: { ...a.reply, text: text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}…` : text } };
}

/**
 * Adds an attempt to a recipient's kept attempts: the first `limits.first` stay for good, then
 * the latest `limits.last`; one between them is dropped (and counted) to make room.
 * Returns the new list and how many were dropped in all.
 */
export function keepAttempt(
  kept: readonly AttemptRecord[],
  omitted: number,
  add: AttemptRecord,
  limits: AttemptLimits,
): { kept: AttemptRecord[]; omitted: number } {
  // concat: an array of the exact length (kept for every queued recipient).
  const next = kept.concat([attemptRecord(add)]);
  const max = limits.first + limits.last;
  if (next.length <= max) return { kept: next, omitted };
  const drop = next.length - max;
  next.splice(limits.first, drop);
  return { kept: next, omitted: omitted + drop };
}

/** How a finished message ended, in one word: for `petrel trace` and the history store's index. */
export type Outcome = 'delivered' | 'bounced' | 'deleted' | 'expired' | 'partly-delivered';

/** The outcome of a message whose recipients are all final, from their last attempts. */
export function outcomeOf(
  rcpts: readonly { readonly status: string; readonly history: readonly AttemptRecord[] }[],
): Outcome {
  const delivered = rcpts.filter((r) => r.status === 'delivered').length;
  if (delivered === rcpts.length) return 'delivered';
  if (delivered > 0) return 'partly-delivered';
  const last = rcpts.map((r) => r.history.at(-1));
  if (last.every((a) => a?.kind === 'deleted')) return 'deleted';
  if (last.every((a) => a?.kind === 'expired')) return 'expired';
  return 'bounced';
}
