import type { Notes } from '../message/notes.js';
import type { Address } from '../message/address.js';
import type { MailParams, Recipient, SessionView, TlsInfo, TransactionView } from '../hooks/catalogue.js';

/** What a session view reads; the session keeps it, and hooks never see it. */
export interface SessionState {
  readonly id: string;
  readonly startedAt: Date;
  readonly notes: Notes;
  readonly remote: SessionView['remote'];
  readonly local: SessionView['local'];
  readonly remoteName: string | null;
  readonly peer: SessionView['peer'];
  readonly proxy: SessionView['proxy'];
  readonly listener: SessionView['listener'];
  readonly helo: SessionView['helo'];
  readonly tls: TlsInfo | null;
  readonly user: string | null;
}

/**
 * The session as hooks see it: getters over the session's state, which it holds in a private
 * field (`#`, which JavaScript enforces, unlike TypeScript's `private`). There is nothing to set
 * and nothing else to reach: the object is frozen, so an assignment such as `session.user = …`
 * throws a TypeError (plugins are modules, which run in strict mode) and becomes the hook's
 * failure, `451 4.3.0`. What a plugin may change, it changes through explicit methods (notes).
 */
export class SessionViewOf implements SessionView {
  readonly #s: SessionState;

  constructor(state: SessionState) {
    this.#s = state;
    Object.freeze(this);
  }

  get id(): string {
    return this.#s.id;
  }
  get startedAt(): Date {
    return new Date(this.#s.startedAt.getTime());
  }
  get notes(): Notes {
    return this.#s.notes;
  }
  get remote(): SessionView['remote'] {
    return this.#s.remote;
  }
  get local(): SessionView['local'] {
    return this.#s.local;
  }
  get remoteName(): string | null {
    return this.#s.remoteName;
  }
  get peer(): SessionView['peer'] {
    return this.#s.peer;
  }
  get proxy(): SessionView['proxy'] {
    return this.#s.proxy;
  }
  get listener(): SessionView['listener'] {
    return this.#s.listener;
  }
  get helo(): SessionView['helo'] {
    return this.#s.helo;
  }
  get tls(): TlsInfo | null {
    return this.#s.tls;
  }
  get user(): string | null {
    return this.#s.user;
  }

  /** For logs: the facts, not the object. */
  toJSON(): object {
    return {
      id: this.id,
      remote: this.remote,
      ...(this.remoteName ? { remoteName: this.remoteName } : {}),
      ...(this.peer !== this.remote ? { peer: this.peer } : {}),
      ...(this.proxy ? { proxy: this.proxy } : {}),
      helo: this.helo,
      tls: this.tls,
      user: this.user,
    };
  }
}

/** What a transaction view reads. */
export interface TransactionState {
  readonly id: string;
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  readonly notes: Notes;
  /** The accepted recipients, frozen (a new array each time one is added). */
  readonly acceptedRecipients: readonly Recipient[];
}

/** The transaction as hooks see it: the same discipline as `SessionViewOf`. */
export class TransactionViewOf implements TransactionView {
  readonly #t: TransactionState;

  constructor(state: TransactionState) {
    this.#t = state;
    Object.freeze(this);
  }

  get id(): string {
    return this.#t.id;
  }
  get sender(): Address | null {
    return this.#t.sender;
  }
  get mailParams(): MailParams {
    return this.#t.mailParams;
  }
  get recipients(): readonly Recipient[] {
    return this.#t.acceptedRecipients;
  }
  get notes(): Notes {
    return this.#t.notes;
  }

  toJSON(): object {
    return { id: this.id, sender: this.sender?.address ?? null, recipients: this.recipients.length };
  }
}

/** Freezes an object and every object inside it (addresses, parameters), once, before hooks see it. */
export function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value as object)) deepFreeze(v);
  }
  return value;
}
