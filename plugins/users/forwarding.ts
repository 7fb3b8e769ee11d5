import { makeAddress, type Address, type ExpandTarget } from '../../core/index.js';
import type { DirectoryService, Resolution, ResolvedTarget } from './directory.js';
import { Srs, type SrsCheck } from './srs.js';

/**
 * What an accepted recipient at a local domain stands for, as the `expand` hook answers it:
 *
 * - an SRS address of ours: the address it was made from (a bounce to forwarded mail goes back
 *   to the original sender);
 * - an alias, a catch-all, or an address a user has besides the primary one: the users' primary
 *   addresses (with the sub-address, so maildir still files it) and the addresses elsewhere it
 *   forwards to, those with an SRS envelope sender;
 * - a user's own primary address, with or without a sub-address: itself (null: no expansion).
 */
export class Forwarding {
  constructor(
    private readonly directory: DirectoryService,
    private readonly srs: Srs | null,
    /** The sub-address separators; a local target's tag is written back with the first one. */
    private readonly separators: string,
  ) {}

  /** Whether `address` is an SRS address at our SRS domain (checked or not). */
  isSrs(address: Address): boolean {
    return this.srs !== null && address.domainAscii === this.srs.domain && Srs.looksLike(address.local);
  }

  /** Checks an SRS address of ours (see `isSrs`). */
  checkSrs(address: Address): SrsCheck {
    return this.srs!.reverse(address.local);
  }

  async expand(sender: Address | null, recipient: Address): Promise<ExpandTarget[] | null> {
    if (this.isSrs(recipient)) {
      const back = this.checkSrs(recipient);
      return back.ok ? [this.remote(back.address, sender)] : null;
    }
    const found = await this.directory.resolve(recipient);
    if (!found || isItself(found, recipient, this.separators)) return null;
    return found.targets.map((t) =>
      t.kind === 'local'
        ? { address: makeAddress(localText(t, this.separators), t.domain) }
        : this.remote(parse(t.address), sender),
    );
  }

  /** A target elsewhere: forwarded with an SRS sender (a bounce keeps `<>`; our own senders stay). */
  private remote(address: Address, sender: Address | null): ExpandTarget {
    if (!sender || !this.srs || this.directory.isLocalDomain(sender.domainAscii)) return { address };
    return { address, sender: this.srs.forward(sender) };
  }
}

function localText(t: ResolvedTarget & { kind: 'local' }, separators: string): string {
  return t.tag !== null && separators ? `${t.local}${separators[0]}${t.tag}` : t.local;
}

/** Directory keys are `local@domain` with a lower-case local part and an ASCII domain. */
function parse(key: string): Address {
  const at = key.lastIndexOf('@');
  return makeAddress(key.slice(0, at), key.slice(at + 1));
}

/** The address is one user's primary address (its sub-address aside): nothing to expand. */
function isItself(found: Resolution, recipient: Address, separators: string): boolean {
  if (found.targets.length !== 1) return false;
  const t = found.targets[0]!;
  if (t.kind !== 'local' || t.domain !== recipient.domainAscii) return false;
  const local = recipient.local.toLowerCase();
  if (t.tag === null) return local === t.local;
  const sep = local.charAt(t.local.length);
  return (
    local.startsWith(t.local) &&
    separators.includes(sep) &&
    local.slice(t.local.length + 1) === t.tag.toLowerCase()
  );
}
