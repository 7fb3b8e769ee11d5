/**
 * Who `petrel start` runs as. Started as root, the primary binds its listeners and then becomes
 * the configured `user`/`group` for good, before it writes a file or forks a worker: every process
 * that runs plugin code (the workers, their sandboxes) is its child and never holds root.
 *
 * Promises:
 * - Root without `user` is refused unless the operator said so (`--run-as-root`).
 * - The drop is, in this order: the user's supplementary groups (initgroups, which is setgroups
 *   from the group database), the group id, the user id. As root, setuid sets the real, effective
 *   and saved ids, so it cannot be undone; it is checked.
 * - Nothing needs root afterwards. A reload re-reads the config as the service user; a listener
 *   added to the config needs a restart (it would need root to bind a port below 1024).
 * - Files a run as root left in the spool are named, with the command that fixes them, before
 *   anything tries to open them.
 */
import { execFileSync } from 'node:child_process';
import { lstatSync, readdirSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { ConfigError } from '../config/errors.js';
import type { LoadedConfig } from '../config/load.js';
import { statePath } from '../di/root.js';

/** An account from the system's user and group databases (NSS: /etc/passwd, LDAP, …). */
export interface Account {
  readonly user: string;
  readonly uid: number;
  readonly group: string;
  readonly gid: number;
}

/** What `petrel start` was told on its command line. */
export interface PrivilegeOptions {
  /** `--run-as-root`: keep root when started as root without `user`. */
  readonly runAsRoot?: boolean;
}

const isRoot = (): boolean => process.getuid?.() === 0;

/**
 * Decides, before anything is bound, what the primary will do: the account to drop to (null: stay
 * as it is). Throws a ConfigError when it must not start: root without `user` and without
 * `--run-as-root`, an account that does not exist, or a non-root start as another user.
 */
export function planPrivileges(loaded: LoadedConfig, opts: PrivilegeOptions): Account | null {
  const { config, file } = loaded;
  if (config.user === undefined) {
    if (isRoot() && !opts.runAsRoot)
      throw ConfigError.one(
        file,
        'user',
        'expected the unprivileged account to run as: Petrel was started as root, binds its listeners, ' +
          'then becomes "user" (and "group"); set user: (an account such as petrel), ' +
          'or start with --run-as-root to keep root (not recommended)',
      );
    return null;
  }
  const account = lookupAccount(file, config.user, config.group);
  if (account.uid === 0)
    throw ConfigError.one(file, 'user', `expected an unprivileged account, not "${account.user}" (uid 0)`);
  if (!isRoot() && process.getuid?.() !== account.uid)
    throw ConfigError.one(
      file,
      'user',
      `expected to be started as root or as "${account.user}" (uid ${account.uid}); ` +
        `this process runs as uid ${String(process.getuid?.())} and cannot change user`,
    );
  return account;
}

/**
 * Becomes `account` for good: supplementary groups, then group, then user. Logs the result;
 * a no-op (beyond the log) when already that user.
 */
export function dropPrivileges(account: Account, log?: Logger): void {
  if (isRoot()) {
    // initgroups(3) is setgroups(2) with the user's groups from the group database, plus `gid`
    // (Node has it on POSIX systems; its type declarations leave it out).
    (process as unknown as { initgroups(user: string, extraGroup: number): void }).initgroups(
      account.user,
      account.gid,
    );
    process.setgid!(account.gid);
    process.setuid!(account.uid);
    let regained = false;
    try {
      process.setuid!(0);
      regained = true;
    } catch {
      // Expected: root is gone.
    }
    if (regained || process.getuid!() !== account.uid || process.getgid!() !== account.gid)
      throw new Error(`could not drop privileges to ${account.user}:${account.group}`);
  }
  log?.info(
    {
      user: account.user,
      uid: process.getuid!(),
      group: account.group,
      gid: process.getgid!(),
      groups: process.getgroups!(),
    },
    'running as the service user',
  );
}

/** The warning `--run-as-root` earns, once, in the log. */
export function warnRunningAsRoot(log: Logger): void {
  if (!isRoot()) return;
  log.warn(
    'running as root (--run-as-root): every plugin runs with root privileges; set "user" in the config to drop them after binding',
  );
}

/**
 * Looks an account up through the system's name service (`getent`, so LDAP and sssd users work
 * too). `user` and `group` may be names or numbers; without `group`, the user's primary group.
 */
export function lookupAccount(file: string, user: string, group?: string): Account {
  const pw = getent('passwd', user);
  if (!pw)
    throw ConfigError.one(
      file,
      'user',
      `expected an account on this system: no user "${user}" (create one with useradd --system --no-create-home --shell /usr/sbin/nologin ${user})`,
    );
  const [name = user, , uid = '', gid = ''] = pw.split(':');
  const gr = getent('group', group ?? gid);
  if (!gr)
    throw ConfigError.one(
      file,
      group === undefined ? 'user' : 'group',
      group === undefined
        ? `expected the primary group ${gid} of "${name}" to exist`
        : `expected a group on this system: no group "${group}"`,
    );
  const [groupName = '', , groupId = ''] = gr.split(':');
  return { user: name, uid: Number(uid), group: groupName, gid: Number(groupId) };
}

function getent(db: 'passwd' | 'group', key: string): string | null {
  try {
    const out = execFileSync('getent', [db, key], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    return out.split('\n')[0] || null;
  } catch (err) {
    // Exit code 2: no such key. Anything else (no getent at all): say so.
    if ((err as { status?: number }).status === 2) return null;
    throw new Error(`cannot look up ${db} entry "${key}" with getent: ${(err as Error).message}`, {
      cause: err,
    });
  }
}

/** At most this many foreign files are named; one is enough to stop. */
const MAX_NAMED = 3;

/**
 * Every file and folder under `spool.dir` (and the state file) must belong to the user Petrel runs
 * as: one left by a run as root cannot be written, and would fail later in a queue or a plugin
 * with a bare EACCES. Walks the spool (one lstat per entry; symbolic links are not followed) and
 * throws a ConfigError naming what is foreign and the `chown` that fixes it. Skipped for root.
 */
export function checkOwnership(loaded: LoadedConfig, account: Account | null): void {
  const uid = process.getuid?.();
  if (uid === undefined || uid === 0) return;
  const { config, file } = loaded;
  const foreign: { path: string; stat: Stats }[] = [];
  const visit = (path: string): void => {
    if (foreign.length >= MAX_NAMED) return;
    let stat: Stats;
    try {
      stat = lstatSync(path);
    } catch {
      return; // not there (yet): whoever needs it creates it as us
    }
    if (stat.uid !== uid) {
      foreign.push({ path, stat });
      return;
    }
    if (!stat.isDirectory()) return;
    let names: string[];
    try {
      names = readdirSync(path);
    } catch {
      return; // ours but unreadable (mode 0): opening it says so
    }
    for (const name of names) visit(join(path, name));
  };
  visit(config.spool.dir);
  if (config.state.backend === 'sqlite' && config.state.path) {
    for (const suffix of ['', '-wal', '-shm']) visit(statePath(config) + suffix);
  }
  if (!foreign.length) return;
  const who = account ? `${account.user}:${account.group}` : `${uid}:${String(process.getgid?.())}`;
  const owners = foreign.map((f) => `${f.path} (owner uid ${f.stat.uid})`).join(', ');
  const targets = [config.spool.dir, ...(config.state.path ? [config.state.path] : [])];
  throw ConfigError.one(
    file,
    'spool.dir',
    `expected every file under ${config.spool.dir} to belong to the user Petrel runs as (${who}, uid ${uid}); ` +
      `${owners} ${foreign.length > 1 ? 'do' : 'does'} not — left by an earlier run as root? ` +
      `Fix: chown -R ${who} ${targets.join(' ')}`,
  );
}
