/*
 * Which messages an administrator means (`petrel queue list --domain D`, `delete --from S`, …):
 * a Selection, tested against what the queue knows of a message without reading the disk (its
 * brief). Pure: no I/O, no clock of its own.
 */

/** What the queue knows of a message without reading the disk (its index entry). */
export interface MessageBrief {
  readonly id: string;
  /** The envelope sender, '' for the null sender <>. */
  readonly sender: string;
  /** Epoch ms. */
  readonly receivedAt: number;
  readonly size: number;
  readonly held: boolean;
  readonly attempting: boolean;
  /** Domains of the recipients not yet final, lower case, each once. */
  readonly domains: readonly string[];
  /** Recipients not yet final. */
  readonly waiting: number;
  /** Earliest next attempt of a waiting recipient (epoch ms), or null. */
  readonly nextAttemptAt: number | null;
  /** Some waiting recipient has been tried at least once. */
  readonly deferred: boolean;
}

export const MESSAGE_STATES = ['held', 'deferred', 'pending'] as const;
export type MessageState = (typeof MESSAGE_STATES)[number];

/** Which messages: every field given must match. */
export interface Selection {
  readonly id?: string;
  /** held: held messages; deferred: not held, tried at least once; pending: not held, never tried yet. */
  readonly state?: MessageState;
  /** A recipient not yet final in this domain (case-insensitive). */
  readonly domain?: string;
  /**
   * The envelope sender, case-insensitive; '<>' is the null sender. A leading '@' means any
   * sender in that domain ('@example.com').
   */
  readonly sender?: string;
  /** Received at least this many ms ago. */
  readonly olderThan?: number;
  /** Received at most this many ms ago. */
  readonly newerThan?: number;
}

/** A message's state, as `Selection.state` names it. */
export function stateOf(b: MessageBrief): MessageState {
  if (b.held) return 'held';
  return b.deferred ? 'deferred' : 'pending';
}

/** True when a selection names no field: it means every message. */
export function selectsAll(sel: Selection): boolean {
  return Object.values(sel).every((v) => v === undefined);
}

/**
 * Compiles a selection into a test of briefs, at `now` (epoch ms) for the ages. Compiled once
 * per walk: a walk over a million briefs lower-cases the selection once, not a million times.
 */
export function matcher(sel: Selection, now: number): (b: MessageBrief) => boolean {
  const domain = sel.domain?.toLowerCase();
  const sender = sel.sender?.toLowerCase();
  const senderDomain = sender?.startsWith('@') ? sender.slice(1) : undefined;
  const exactSender =
    sender === undefined || senderDomain !== undefined ? undefined : sender === '<>' ? '' : sender;
  return (b) => {
    if (sel.id !== undefined && b.id !== sel.id) return false;
    if (sel.state !== undefined && stateOf(b) !== sel.state) return false;
    if (domain !== undefined && !b.domains.includes(domain)) return false;
    if (exactSender !== undefined && b.sender.toLowerCase() !== exactSender) return false;
    if (senderDomain !== undefined && domainOf(b.sender) !== senderDomain) return false;
    if (sel.olderThan !== undefined && now - b.receivedAt < sel.olderThan) return false;
    if (sel.newerThan !== undefined && now - b.receivedAt > sel.newerThan) return false;
    return true;
  };
}

/** The domain of an address, lower case ('' for the null sender, the whole text without an '@'). */
export function domainOf(address: string): string {
  const at = address.lastIndexOf('@');
  return (at < 0 ? address : address.slice(at + 1)).toLowerCase();
}
