import { defineToken, type Address } from '../../core/index.js';

/** A mailbox on this server that an address resolved to. */
export interface LocalMailbox {
  readonly kind: 'local';
  /** The login name of the user who owns the mailbox (as in the users file). */
  readonly user: string;
  /** The user's primary address, local part and domain lower-case, the domain in ASCII form. */
  readonly local: string;
  readonly domain: string;
  /** The sub-address after the separator (`bob+lists@…` → `lists`), or null. */
  readonly tag: string | null;
}

/**
 * An alias target outside `localDomains`. The address is kept, not delivered here: forwarding
 * it is the outbound transport's job.
 */
export interface RemoteTarget {
  readonly kind: 'remote';
  /** The target address, lower-cased, domain in ASCII form. */
  readonly address: string;
  /** A sub-address carried over from the original recipient, or null. */
  readonly tag: string | null;
}

export type ResolvedTarget = LocalMailbox | RemoteTarget;

export interface Resolution {
  /** The address that was looked up, in key form (`local@domain`, lower-case, ASCII domain). */
  readonly address: string;
  /** Where mail for it goes: each mailbox and remote target once, in the order found. */
  readonly targets: readonly ResolvedTarget[];
}

/**
 * The user directory, as the users plugin provides it to other plugins (`api.resolve(Directory)`
 * inside a hook, or in setup when listed after `users`). Every answer reflects the users and
 * aliases files as they are on disk now: a changed file is read again on the next call.
 *
 * Addresses are compared case-insensitively, domains in ASCII form. An address may be given as
 * the engine's `Address` or as plain text (`bob@hamburger.edu`, no angle brackets).
 */
export interface DirectoryService {
  /** Whether a domain is one of the config's `localDomains` (either IDN form). */
  isLocalDomain(domain: string): boolean;
  /**
   * Whether mail to an address at a local domain has somewhere to go: a user's mailbox, an
   * alias, a sub-address of either, or a catch-all. False for addresses at other domains.
   */
  isDeliverable(address: Address | string): Promise<boolean>;
  /**
   * The mailboxes (and remote alias targets) an address at a local domain reaches, aliases
   * followed to the end; null when it reaches nothing or the domain is not local.
   */
  resolve(address: Address | string): Promise<Resolution | null>;
  /** The addresses a login may use as envelope sender (primary first); null for an unknown login. */
  sendersFor(login: string): Promise<readonly string[] | null>;
  /**
   * Whether a login may send as an address: one of its addresses, or a sub-address of one
   * (`bob+lists@…` for `bob@…`).
   */
  maySendAs(login: string, sender: Address | string): Promise<boolean>;
}

/** The token the users plugin provides its directory under. */
export const Directory = defineToken<DirectoryService>('users.Directory');
