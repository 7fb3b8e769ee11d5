import { stat } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { Address } from '../../core/index.js';
import { asciiDomain, keyOf, parseAddressText, type AddressKey } from './addresses.js';
import { NO_ALIASES, readAliasesFile, type Aliases } from './aliases-file.js';
import { DirectoryData } from './directory-data.js';
import type { DirectoryService, Resolution } from './directory.js';
import { normalizeLogin, readUsersFile, type UserRecord } from './users-file.js';

export interface DirectoryStoreOptions {
  readonly usersFile: string;
  readonly aliasesFile: string | null;
  readonly localDomains: readonly string[];
  readonly separators: string;
  /** Where postmaster@ a local domain goes when it reaches nothing of its own (address text). */
  readonly postmaster?: string | undefined;
  readonly log: Logger;
  /** Called after the files were read again because they changed (not at open). */
  readonly onReload?: () => void;
}

/** Identifies a version of a file: a rename (as `petrel user` does) changes the inode. */
async function stampOf(file: string): Promise<string> {
  try {
    const s = await stat(file);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    return `error:${(err as Error).message}`;
  }
}

function toKey(address: Address | string): AddressKey | null {
  if (typeof address !== 'string') {
    if (address.literal || address.domain === '') return null;
    return keyOf(address.local, address.domainAscii);
  }
  const at = address.lastIndexOf('@');
  if (at <= 0) return null;
  const domain = asciiDomain(address.slice(at + 1));
  return domain ? keyOf(address.slice(0, at), domain) : null;
}

/**
 * The directory service: the users and aliases files, read again when they change. Every call
 * first compares the files' identity (inode, size, mtime) with what it loaded; that costs a
 * `stat` per file and makes `petrel user add` effective at once, without a restart or SIGHUP.
 * A file that turns bad later is logged and the last good version stays in use.
 */
export class DirectoryStore implements DirectoryService {
  private data: DirectoryData;
  private stamps: [string, string];
  private refreshing: Promise<void> | null = null;
  private readonly domains: ReadonlySet<string>;

  private constructor(
    private readonly opts: DirectoryStoreOptions,
    data: DirectoryData,
    stamps: [string, string],
  ) {
    this.data = data;
    this.stamps = stamps;
    this.domains = domainSet(opts.localDomains);
  }

  /** Loads both files; throws (DirectoryFileError) when one is bad, so a typo stops the boot. */
  static async open(opts: DirectoryStoreOptions): Promise<DirectoryStore> {
    const stamps: [string, string] = [
      await stampOf(opts.usersFile),
      opts.aliasesFile ? await stampOf(opts.aliasesFile) : 'none',
    ];
    const data = await DirectoryStore.load(opts);
    if (stamps[0] === 'missing') {
      opts.log.warn({ file: opts.usersFile }, 'users file not found; no users until `petrel user add`');
    }
    return new DirectoryStore(opts, data, stamps);
  }

  private static async load(opts: DirectoryStoreOptions): Promise<DirectoryData> {
    const users: UserRecord[] = (await readUsersFile(opts.usersFile))?.users ?? [];
    const aliases: Aliases = opts.aliasesFile ? await readAliasesFile(opts.aliasesFile) : NO_ALIASES;
    const data = new DirectoryData(
      users,
      aliases,
      domainSet(opts.localDomains),
      opts.separators,
      postmasterFallbacks(opts),
    );
    for (const w of data.warnings()) opts.log.warn({ file: opts.aliasesFile }, w);
    return data;
  }

  /** The current data, after reloading the files if they changed since the last call. */
  async current(): Promise<DirectoryData> {
    this.refreshing ??= this.refresh().finally(() => (this.refreshing = null));
    await this.refreshing;
    return this.data;
  }

  private async refresh(): Promise<void> {
    const { usersFile, aliasesFile, log } = this.opts;
    const next: [string, string] = [
      await stampOf(usersFile),
      aliasesFile ? await stampOf(aliasesFile) : 'none',
    ];
    if (next[0] === this.stamps[0] && next[1] === this.stamps[1]) return;
    // Remember the attempt either way: a bad file is reported once, not on every lookup.
    this.stamps = next;
    if (next[0] === 'missing' || next[1] === 'missing') {
      log.error({ usersFile, aliasesFile }, 'users or aliases file disappeared; keeping the last good one');
      return;
    }
    try {
      this.data = await DirectoryStore.load(this.opts);
      log.info({ users: this.data.users.length }, 'users and aliases reloaded');
      this.opts.onReload?.();
    } catch (err) {
      log.error({ err: (err as Error).message }, 'users or aliases file is bad; keeping the last good one');
    }
  }

  isLocalDomain(domain: string): boolean {
    const ascii = asciiDomain(domain);
    return ascii !== null && this.domains.has(ascii);
  }

  async isDeliverable(address: Address | string): Promise<boolean> {
    return (await this.resolve(address)) !== null;
  }

  async resolve(address: Address | string): Promise<Resolution | null> {
    const key = toKey(address);
    if (!key) return null;
    return (await this.current()).resolveKey(key);
  }

  async sendersFor(login: string): Promise<readonly string[] | null> {
    const user = (await this.current()).userByLogin(normalizeLogin(login));
    return user ? user.addresses.map((a) => a.key) : null;
  }

  async maySendAs(login: string, sender: Address | string): Promise<boolean> {
    const key = toKey(sender);
    if (!key) return false;
    return (await this.current()).maySendAs(normalizeLogin(login), key);
  }
}

/** The configured postmaster, then postmaster@ the first local domain. */
function postmasterFallbacks(opts: DirectoryStoreOptions): AddressKey[] {
  const out: AddressKey[] = [];
  const configured = opts.postmaster ? parseAddressText(opts.postmaster) : null;
  if (configured) out.push(configured);
  const first = opts.localDomains[0];
  if (first) out.push(keyOf('postmaster', asciiDomain(first) ?? first));
  return out;
}

function domainSet(domains: readonly string[]): Set<string> {
  return new Set(domains.map((d) => asciiDomain(d) ?? d.toLowerCase()));
}
