import { type Address } from '../../core/index.js';
import type { Resolution } from '../users/directory.js';

/** A final mailbox: the user's folder under the domain, and a sub-address tag when one was given. */
export interface Mailbox {
  readonly user: string;
  readonly domain: string;
  readonly tag?: string;
}

/**
 * A name that may stand for one folder level: no separator, no NUL, not `.`/`..` or hidden
 * (a quoted local part may hold `/` or start with a dot), at most 255 octets.
 */
export function isSafeComponent(name: string): boolean {
  return (
    name.length > 0 && !name.startsWith('.') && !/[/\\\0\r\n]/.test(name) && Buffer.byteLength(name) <= 255
  );
}

/**
 * Tags that become a Maildir++ folder `.tag`: ASCII letters, digits, `_` and `-` only, so that the
 * name needs no modified-UTF-7 encoding, holds no hierarchy separator (`.`) and no IMAP wildcard.
 */
export function isFolderTag(tag: string): boolean {
  return /^[a-z0-9_-]{1,64}$/i.test(tag);
}

/**
 * Without a directory: the mailbox is the local part, lower-cased (as Dovecot's default
 * `auth_username_format = %Lu`), with a sub-address tag split off at the first delimiter.
 * Returns null when the local part cannot be a folder name.
 */
export function ownMailbox(address: Address, domain: string, delimiter: string): Mailbox | null {
  const local = address.local.toLowerCase();
  const at = delimiter ? local.indexOf(delimiter) : -1;
  const user = at > 0 ? local.slice(0, at) : local;
  const tag = at > 0 ? local.slice(at + delimiter.length) : '';
  if (!isSafeComponent(user)) return null;
  return tag ? { user, domain, tag } : { user, domain };
}

/**
 * The mailboxes of a directory's answer: its local targets, each folder named after the user's
 * primary address (`{domain}/{user}` is `hamburger.edu/bob`, as Dovecot's `%d/%n` for that login).
 * Remote alias targets are not maildir's to deliver; they are returned apart.
 */
export function directoryMailboxes(resolution: Resolution | null): {
  mailboxes: Mailbox[];
  remote: string[];
} {
  const mailboxes: Mailbox[] = [];
  const remote: string[] = [];
  for (const t of resolution?.targets ?? []) {
    if (t.kind === 'local')
      mailboxes.push(
        t.tag ? { user: t.local, domain: t.domain, tag: t.tag } : { user: t.local, domain: t.domain },
      );
    else remote.push(t.address);
  }
  return { mailboxes: checkMailboxes(mailboxes), remote };
}

/** Checks what a directory (or a stored route) says before it becomes a path. */
export function checkMailboxes(value: unknown): Mailbox[] {
  if (!Array.isArray(value)) throw new TypeError('expected a list of mailboxes');
  return value.map((m: unknown) => {
    const { user, domain, tag } = (m ?? {}) as Record<string, unknown>;
    if (typeof user !== 'string' || !isSafeComponent(user))
      throw new TypeError(`unusable mailbox user ${JSON.stringify(user)}`);
    if (typeof domain !== 'string' || !isSafeComponent(domain))
      throw new TypeError(`unusable mailbox domain ${JSON.stringify(domain)}`);
    if (tag !== undefined && tag !== null && typeof tag !== 'string')
      throw new TypeError(`unusable mailbox tag ${JSON.stringify(tag)}`);
    return tag ? { user, domain, tag } : { user, domain };
  });
}

/** One route key per set of mailboxes: recipients grouped under a key share the route's data. */
export function routeKey(mailboxes: readonly Mailbox[]): string {
  // Percent-encoded parts, so that two different sets can never spell the same key.
  const e = encodeURIComponent;
  return `maildir:${mailboxes.map((m) => `${e(m.user)}@${e(m.domain)}${m.tag ? `+${e(m.tag)}` : ''}`).join(',')}`;
}
