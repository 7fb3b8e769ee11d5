import { keyOf, looksLikeRouting, type AddressKey } from './addresses.js';
import type { Aliases } from './aliases-file.js';
import type { LocalMailbox, RemoteTarget, Resolution, ResolvedTarget } from './directory.js';
import type { UserRecord } from './users-file.js';

/** Aliases pointing at aliases are followed this deep at most. */
const MAX_DEPTH = 16;
/** An address never expands to more targets than this (a list is a job for a list server). */
const MAX_TARGETS = 1000;

/**
 * One consistent view of the users and aliases files, with the lookups the directory answers.
 * Immutable: a changed file gives a new one.
 */
export class DirectoryData {
  private readonly byLogin = new Map<string, UserRecord>();
  private readonly byAddress = new Map<string, UserRecord>();

  constructor(
    readonly users: readonly UserRecord[],
    private readonly aliases: Aliases,
    private readonly localDomains: ReadonlySet<string>,
    /** Each character separates a sub-address (`+` in `bob+tag`); empty turns sub-addressing off. */
    private readonly separators: string,
    /**
     * Where `postmaster@` a local domain goes when that address reaches nothing of its own, tried
     * in order: RFC 5321 §4.5.1 requires the postmaster of every domain the server takes mail for.
     */
    private readonly postmasters: readonly AddressKey[] = [],
  ) {
    for (const u of users) {
      this.byLogin.set(u.login, u);
      for (const a of u.addresses) this.byAddress.set(a.key, u);
    }
  }

  userByLogin(login: string): UserRecord | undefined {
    return this.byLogin.get(login);
  }

  isLocalDomain(asciiDomain: string): boolean {
    return this.localDomains.has(asciiDomain);
  }

  /** Problems worth a warning when the files are loaded (they do not stop the server). */
  warnings(): string[] {
    const out: string[] = [];
    for (const [key] of this.aliases.exact) {
      if (this.byAddress.has(key)) out.push(`alias ${key} is also a user's address; the user gets the mail`);
    }
    const aliasTargets = [...this.aliases.exact, ...this.aliases.catchAll];
    for (const [key, targets] of aliasTargets) {
      for (const t of targets) {
        if (this.localDomains.has(t.domain) && !this.resolveKey(t)) {
          out.push(
            `alias ${key.includes('@') ? key : `@${key}`} points at ${t.key}, which reaches no mailbox`,
          );
        }
      }
    }
    for (const domain of this.aliases.catchAll.keys()) {
      if (!this.localDomains.has(domain))
        out.push(`catch-all @${domain} is not in localDomains; it is never used`);
    }
    for (const domain of this.localDomains) {
      if (!this.resolveKey(keyOf('postmaster', domain))) {
        out.push(
          `postmaster@${domain} reaches no mailbox, so RCPT TO it is refused (RFC 5321 §4.5.1 requires it): ` +
            "give it a user or an alias, or set the users plugin's `postmaster`",
        );
      }
    }
    return out;
  }

  /**
   * Where an address at a local domain goes; null when nowhere (or the domain is not local).
   * `postmaster@` a local domain that reaches nothing of its own goes where the first of the
   * postmaster fallbacks goes.
   */
  resolveKey(addr: AddressKey): Resolution | null {
    if (!this.localDomains.has(addr.domain)) return null;
    let targets = this.targetsOf(addr);
    if (targets.length === 0 && addr.local === 'postmaster') {
      for (const fallback of this.postmasters) {
        if (fallback.key === addr.key) continue;
        targets = this.targetsOf(fallback);
        if (targets.length) break;
      }
    }
    return targets.length ? { address: addr.key, targets } : null;
  }

  private targetsOf(addr: AddressKey): ResolvedTarget[] {
    const targets: ResolvedTarget[] = [];
    const seen = new Set<string>();
    this.lookup(addr.local, addr.domain, null, 0, new Set(), (t) => {
      const id = t.kind === 'local' ? `local:${t.user}` : `remote:${t.address}`;
      if (seen.has(id) || targets.length >= MAX_TARGETS) return;
      seen.add(id);
      targets.push(t);
    });
    return targets;
  }

  /**
   * Lookup order, as Postfix's virtual tables do it: the exact address (a user, else an alias),
   * then the address without its sub-address, then the domain's catch-all. Returns whether the
   * address was known at all (an alias whose targets all lead nowhere still counts as known).
   */
  private lookup(
    local: string,
    domain: string,
    tag: string | null,
    depth: number,
    path: Set<string>,
    emit: (t: ResolvedTarget) => void,
  ): boolean {
    const key = `${local}@${domain}`;
    if (!this.localDomains.has(domain)) {
      emit({ kind: 'remote', address: key, tag } satisfies RemoteTarget);
      return true;
    }
    // RFC 5321 §3.6.1: no source routing through a local part. Nothing here has such a name
    // (the files refuse them), and no rule below may match one: `user%elsewhere`,
    // `elsewhere!user` and `"user@elsewhere"` are unknown users, never routes.
    if (looksLikeRouting(local)) return false;
    if (depth > MAX_DEPTH || path.has(key)) return true; // a loop: this branch adds nothing
    const user = this.byAddress.get(key);
    if (user) {
      const primary = user.addresses[0]!;
      emit({
        kind: 'local',
        user: user.name,
        local: primary.local,
        domain: primary.domain,
        tag,
      } satisfies LocalMailbox);
      return true;
    }
    const here = new Set(path).add(key);
    const expand = (targets: readonly AddressKey[], t: string | null): boolean => {
      for (const target of targets) this.lookup(target.local, target.domain, t, depth + 1, here, emit);
      return true;
    };
    const alias = this.aliases.exact.get(key);
    if (alias) return expand(alias, tag);
    const cut = this.separatorIndex(local);
    if (cut > 0) {
      const base = keyOf(local.slice(0, cut), domain);
      const own = local.slice(cut + 1);
      if (this.lookupExact(base.local, domain, own, depth, here, emit)) return true;
    }
    const catchAll = this.aliases.catchAll.get(domain);
    if (catchAll) return expand(catchAll, tag);
    return false;
  }

  /** A user or an alias for exactly this address, no catch-all (for the base of a sub-address). */
  private lookupExact(
    local: string,
    domain: string,
    tag: string | null,
    depth: number,
    path: Set<string>,
    emit: (t: ResolvedTarget) => void,
  ): boolean {
    const key = `${local}@${domain}`;
    if (!this.byAddress.has(key) && !this.aliases.exact.has(key)) return false;
    return this.lookup(local, domain, tag, depth, path, emit);
  }

  private separatorIndex(local: string): number {
    if (!this.separators) return -1;
    for (let i = 0; i < local.length; i++) if (this.separators.includes(local[i]!)) return i;
    return -1;
  }

  /** Whether a login may use an address as sender: its own, or a sub-address of its own. */
  maySendAs(login: string, addr: AddressKey): boolean {
    const user = this.byLogin.get(login);
    if (!user) return false;
    if (user.addresses.some((a) => a.key === addr.key)) return true;
    if (looksLikeRouting(addr.local)) return false;
    const cut = this.separatorIndex(addr.local);
    if (cut <= 0) return false;
    const base = `${addr.local.slice(0, cut)}@${addr.domain}`;
    return user.addresses.some((a) => a.key === base);
  }
}
