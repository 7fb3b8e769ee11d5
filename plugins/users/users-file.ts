import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from '../../core/index.js';
import { parseAddressText, type AddressKey } from './addresses.js';
import { parseHash } from './password.js';

/**
 * The users file: JSON, written by `petrel user` (it may be edited by hand too).
 *
 * ```json
 * {
 *   "users": {
 *     "bob@hamburger.edu": {
 *       "password": "{SCRAM-SHA-256}100000,<salt>,<StoredKey>,<ServerKey>",
 *       "addresses": ["robert@hamburger.edu"]
 *     }
 *   }
 * }
 * ```
 *
 * The key is the login name. `address` is the primary address (default: the login, which must
 * then be an address); `addresses` are more addresses the user receives mail at and may send as.
 * `password` is a hash in one of the forms of password.ts (older files hold scrypt hashes).
 */
const entrySchema = z
  .object({
    password: z.string().refine((p) => parseHash(p) !== null, {
      message:
        'expected a password hash "{SCRAM-SHA-256}<iterations>,<salt>,<StoredKey>,<ServerKey>" or "$scrypt$N=…,r=…,p=…$<salt>$<hash>" (use `petrel user passwd`)',
    }),
    address: z.string().optional(),
    addresses: z.array(z.string()).default([]),
  })
  .strict();

const fileSchema = z.object({ users: z.record(z.string(), entrySchema).default({}) }).strict();

export type UsersFileData = z.input<typeof fileSchema>;
export type UserEntry = z.input<typeof entrySchema>;

/** A user as the directory uses it. */
export interface UserRecord {
  /** The login as written in the file. */
  readonly name: string;
  /** The login in the form it is compared in (lower-case; an address's domain in ASCII form). */
  readonly login: string;
  readonly password: string;
  /** Primary address first, then the others, each once. */
  readonly addresses: readonly AddressKey[];
}

/** A users or aliases file that cannot be used; the message names the file and the entry. */
export class DirectoryFileError extends Error {
  override readonly name = 'DirectoryFileError';
}

/** The form a login is compared in: an address's key, or the text lower-cased. */
export function normalizeLogin(login: string): string {
  return parseAddressText(login.normalize('NFC'))?.key ?? login.normalize('NFC').toLowerCase();
}

function fail(file: string, where: string, what: string): never {
  throw new DirectoryFileError(`${file}: ${where}: ${what}`);
}

/** Parses and checks the users file's text. Throws DirectoryFileError naming file and entry. */
export function parseUsersFile(text: string, file: string): { data: UsersFileData; users: UserRecord[] } {
  let raw: unknown;
  try {
    raw = text.trim() === '' ? {} : JSON.parse(text);
  } catch (err) {
    fail(file, '(file)', `expected JSON: ${(err as Error).message}`);
  }
  const parsed = fileSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const where = issue.path
      .map((p, i) => {
        if (typeof p === 'number') return `[${p}]`;
        const name = String(p);
        if (!/^[A-Za-z_][\w]*$/.test(name)) return `[${JSON.stringify(name)}]`;
        return i === 0 ? name : `.${name}`;
      })
      .join('');
    fail(file, where || '(top level)', issue.message);
  }
  const users: UserRecord[] = [];
  const logins = new Map<string, string>();
  const owners = new Map<string, string>();
  for (const [name, entry] of Object.entries(parsed.data.users)) {
    const where = `users[${JSON.stringify(name)}]`;
    if (name.trim() === '' || /[\s\0]/.test(name)) fail(file, where, 'expected a login without spaces');
    const login = normalizeLogin(name);
    const twin = logins.get(login);
    if (twin !== undefined) fail(file, where, `the same login as ${JSON.stringify(twin)}`);
    logins.set(login, name);
    const primaryText = entry.address ?? name;
    const list: AddressKey[] = [];
    for (const [i, text] of [primaryText, ...entry.addresses].entries()) {
      const key = parseAddressText(text);
      const at = i === 0 ? (entry.address === undefined ? '(login)' : '.address') : `.addresses[${i - 1}]`;
      if (!key) fail(file, `${where}${at}`, `expected an address such as bob@example.com, got "${text}"`);
      if (list.some((k) => k.key === key.key)) continue;
      const owner = owners.get(key.key);
      if (owner !== undefined && owner !== name)
        fail(file, `${where}${at}`, `${key.key} already belongs to ${JSON.stringify(owner)}`);
      owners.set(key.key, name);
      list.push(key);
    }
    users.push({ name, login, password: entry.password, addresses: list });
  }
  return { data: parsed.data, users };
}

/** Reads and parses the users file; null when it does not exist. */
export async function readUsersFile(
  file: string,
): Promise<{ data: UsersFileData; users: UserRecord[] } | null> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new DirectoryFileError(`${file}: cannot read: ${(err as Error).message}`);
  }
  return parseUsersFile(text, file);
}

/**
 * Replaces the users file atomically: the new content goes to a temporary file in the same
 * folder (mode 0600, flushed to disk), which is then renamed over the old one. A reader sees the
 * old file or the new one, never half of one.
 */
export async function writeUsersFile(file: string, data: UsersFileData): Promise<void> {
  const sorted: UsersFileData = {
    users: Object.fromEntries(Object.entries(data.users ?? {}).sort(([a], [b]) => a.localeCompare(b))),
  };
  const text = `${JSON.stringify(sorted, null, 2)}\n`;
  parseUsersFile(text, file); // never write a file the server would refuse
  // The first user, before the server ever ran: the folder is made private.
  await mkdir(dirname(file), { recursive: true, mode: 0o700 });
  await replaceFile(file, text, { mode: 0o600 });
}

/**
 * Writes `text` to `file` atomically (a flushed temporary file in the same folder renamed over
 * it, the folder flushed after), with `mode` whatever the umask and, when given, group `gid`.
 */
export async function replaceFile(
  file: string,
  text: string,
  opts: { mode: number; gid?: number | undefined },
): Promise<void> {
  const dir = dirname(file);
  const tmp = join(dir, `.${basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(text, 'utf8');
    if (opts.gid !== undefined) await fh.chown(-1, opts.gid);
    await fh.chmod(opts.mode); // whatever the umask, and only once the group is right
    await fh.sync();
  } catch (err) {
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  // Make the rename itself durable.
  const d = await open(dir, 'r');
  try {
    await d.sync();
  } catch {
    // Some file systems refuse fsync on a directory; the rename is still atomic.
  } finally {
    await d.close();
  }
}

const LOCK_STALE_MS = 60_000;
const LOCK_WAIT_MS = 15_000;

/**
 * Runs `fn` holding `<file>.lock`, the lock every writer of the users file takes (`petrel user`
 * and the server when it upgrades a hash or rewrites the passwd-file), so that no writer works
 * from a version another has just replaced. A lock older than a minute is taken to be left by a
 * process that died, and removed.
 */
export async function withUsersFileLock<T>(file: string, fn: () => Promise<T>): Promise<T> {
  const lock = `${file}.lock`;
  const deadline = Date.now() + LOCK_WAIT_MS;
  await mkdir(dirname(file), { recursive: true, mode: 0o700 });
  for (;;) {
    try {
      const fh = await open(lock, 'wx', 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const age = await stat(lock).then(
      (s) => Date.now() - s.mtimeMs,
      () => 0,
    );
    if (age > LOCK_STALE_MS) {
      await rm(lock, { force: true });
      continue;
    }
    if (Date.now() > deadline) throw new DirectoryFileError(`${file}: locked by another writer (${lock})`);
    await new Promise((r) => setTimeout(r, 50));
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { force: true });
  }
}
