import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';

export interface StoreOptions {
  /** Mode of message files (umask does not apply). */
  readonly fileMode: number;
  /** Mode of folders this store creates. */
  readonly dirMode: number;
  /** Owner given to everything this store creates; unchanged when absent. */
  readonly uid?: number;
  readonly gid?: number;
  /** Create a missing mailbox; when false, a missing one is a MailboxGoneError. */
  readonly createMailboxes: boolean;
  /**
   * The folder holding the mailboxes: existing folders below it on the way to a mailbox are
   * checked for the configured owner and mode (it is not checked itself; the operator owns it).
   */
  readonly root?: string;
  /** Told what an ownership check found; see `checkOwnership`. */
  readonly report?: (finding: OwnershipFinding) => void;
}

/** Existing mailbox folders or files whose owner or mode differs from the configuration. */
export interface OwnershipFinding {
  readonly folder: string;
  /** Up to ten of the paths that differed, for the log. */
  readonly paths: readonly string[];
  readonly count: number;
  /** True when they were changed to the configured owner and mode; false when that was refused. */
  readonly fixed: boolean;
  readonly error?: string;
}

/** Where one copy goes: the mailbox's top Maildir, and the Maildir++ folder inside it (or the top). */
export interface MaildirTarget {
  readonly mailbox: string;
  readonly folder: string;
}

/** The mailbox does not exist and may not be created: the recipient is gone. */
export class MailboxGoneError extends Error {
  constructor(readonly path: string) {
    super(`mailbox ${path} does not exist`);
    this.name = 'MailboxGoneError';
  }
}

/**
 * A stable key for one recipient of one queued message. It is part of every file name written
 * for that pair, so a later attempt can tell whether an earlier one already delivered.
 */
export function deliveryKey(queueId: string, recipient: string): string {
  return createHash('sha256').update(queueId).update('\0').update(recipient).digest('hex').slice(0, 16);
}

// cr.yp.to/proto/maildir.html: `/` and `:` in the host name become \057 and \072; `,` starts
// Dovecot's `,S=` fields, so it is escaped the same way.
const HOST = hostname().replace(/\//g, '\\057').replace(/:/g, '\\072').replace(/,/g, '\\054');
let deliveries = 0;

/**
 * `<seconds>.M<microseconds>P<pid>Q<deliveries by this process>K<delivery key>.<host>` — the
 * Maildir unique name, with a `K` field of ours carrying the delivery key.
 */
export function uniqueName(key: string): string {
  const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  deliveries += 1;
  return `${Math.floor(micros / 1e6)}.M${micros % 1e6}P${process.pid}Q${deliveries}K${key}.${HOST}`;
}

function code(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | null)?.code;
}

async function syncDir(path: string): Promise<void> {
  const fh = await fs.open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

const ignore = (): void => undefined;

/**
 * Writes messages into Maildirs the way the Maildir spec asks: a new file in `tmp/`, written and
 * fsynced, then renamed into `new/` under its final name (with `,S=<size>`), then `new/` fsynced.
 * A reader never sees a partial file, and a `250` is only given for bytes on stable storage.
 */
export class MaildirStore {
  /** Folders whose ownership was checked by this store (once each, on the first delivery). */
  private readonly checked = new Set<string>();

  constructor(private readonly opts: StoreOptions) {}

  /**
   * Delivers `content` (streamed, never held whole) and returns the path of the new file. Folders
   * are created on first use (`ENOENT` is the signal, so the common case costs no `stat`).
   */
  async deliver(
    target: MaildirTarget,
    key: string,
    content: AsyncIterable<Uint8Array>,
    signal: AbortSignal,
  ): Promise<string> {
    await this.checkOwnership(target);
    const base = uniqueName(key);
    const tmp = join(target.folder, 'tmp', base);
    const fh = await this.retryAfterCreating(target, () => fs.open(tmp, 'wx', this.opts.fileMode));
    let size = 0;
    try {
      await fh.chmod(this.opts.fileMode);
      if (this.opts.uid !== undefined || this.opts.gid !== undefined)
        await fh.chown(this.opts.uid ?? -1, this.opts.gid ?? -1);
      await fh.writeFile(
        (async function* () {
          for await (const chunk of content) {
            size += chunk.length;
            yield chunk;
          }
        })(),
        { signal },
      );
      await fh.sync();
    } catch (err) {
      await fh.close().catch(ignore);
      await fs.unlink(tmp).catch(ignore);
      throw err;
    }
    await fh.close();
    const final = join(target.folder, 'new', `${base},S=${size}`);
    try {
      signal.throwIfAborted();
      await this.retryAfterCreating(target, () => fs.rename(tmp, final));
    } catch (err) {
      await fs.unlink(tmp).catch(ignore);
      throw err;
    }
    try {
      await syncDir(join(target.folder, 'new'));
    } catch (err) {
      // Not known to be durable: take it back, so the deferral the caller reports is the truth.
      await fs.unlink(final).catch(ignore);
      throw err;
    }
    return final;
  }

  /**
   * Looks in `new/` and `cur/` for a file an earlier attempt wrote for this delivery key (a reader
   * may have moved it to `cur/` and added flags, but keeps the unique part). Reads only names.
   */
  async findCopy(target: MaildirTarget, key: string): Promise<string | null> {
    const mark = `K${key}.`;
    for (const sub of ['new', 'cur']) {
      const dir = join(target.folder, sub);
      let entries: AsyncIterable<{ name: string }>;
      try {
        entries = await fs.opendir(dir);
      } catch (err) {
        if (code(err) === 'ENOENT') continue;
        throw err;
      }
      for await (const entry of entries) {
        if (entry.name.includes(mark)) {
          // The earlier attempt may have stopped before its directory fsync.
          await syncDir(dir);
          return join(dir, entry.name);
        }
      }
    }
    return null;
  }

  /**
   * The first delivery to a folder (per store, so again after a reload) checks what already
   * exists of it: the folders from below the root down to it with its `cur/`, `new/` and `tmp/`,
   * and the messages in `new/` and `cur/`. Whatever does not have the configured owner and mode
   * (folders made by an earlier run as root without `uid`, say, which Dovecot refuses to open) is
   * changed to it and reported; when it cannot be changed, that is reported and delivery goes on.
   * Without a configured owner there is nothing to check.
   */
  private async checkOwnership(target: MaildirTarget): Promise<void> {
    const { uid, gid, dirMode, fileMode, root, report } = this.opts;
    if ((uid === undefined && gid === undefined) || this.checked.has(target.folder)) return;
    const wrong: { path: string; mode: number }[] = [];
    const differs = (st: { uid: number; gid: number; mode: number }, mode: number): boolean =>
      (uid !== undefined && st.uid !== uid) ||
      (gid !== undefined && st.gid !== gid) ||
      (st.mode & 0o777) !== mode;
    const dirs: string[] = [];
    for (let d = target.folder; ; d = dirname(d)) {
      dirs.unshift(d);
      const up = dirname(d);
      if (up === d || up === root || root === undefined || !up.startsWith(`${root}/`)) break;
    }
    for (const sub of ['cur', 'new', 'tmp']) dirs.push(join(target.folder, sub));
    for (const d of dirs) {
      const st = await fs.stat(d).catch((err: unknown) => {
        if (code(err) === 'ENOENT') return null; // made with the right owner when needed
        throw err;
      });
      if (st && differs(st, dirMode)) wrong.push({ path: d, mode: dirMode });
    }
    const files = [join(target.folder, 'maildirfolder')];
    for (const sub of ['new', 'cur']) {
      const names = await fs.readdir(join(target.folder, sub)).catch(() => [] as string[]);
      for (const name of names) files.push(join(target.folder, sub, name));
    }
    for (const f of files) {
      const st = await fs.lstat(f).catch(() => null);
      if (st?.isFile() && differs(st, fileMode)) wrong.push({ path: f, mode: fileMode });
    }
    if (wrong.length > 0) {
      let error: string | undefined;
      try {
        for (const w of wrong) {
          await fs.chown(w.path, uid ?? -1, gid ?? -1);
          await fs.chmod(w.path, w.mode);
        }
      } catch (err) {
        error = (err as Error).message;
      }
      report?.({
        folder: target.folder,
        paths: wrong.slice(0, 10).map((w) => w.path),
        count: wrong.length,
        fixed: error === undefined,
        ...(error === undefined ? {} : { error }),
      });
    }
    this.checked.add(target.folder);
  }

  private async retryAfterCreating<T>(target: MaildirTarget, op: () => Promise<T>): Promise<T> {
    try {
      return await op();
    } catch (err) {
      if (code(err) !== 'ENOENT') throw err;
    }
    await this.create(target);
    return op();
  }

  /** Creates what is missing of the mailbox, the folder, and their `cur/`, `new/` and `tmp/`. */
  private async create(target: MaildirTarget): Promise<void> {
    if (!this.opts.createMailboxes) {
      try {
        await fs.stat(target.mailbox);
      } catch (err) {
        if (code(err) === 'ENOENT') throw new MailboxGoneError(target.mailbox);
        throw err;
      }
    }
    await this.mkdirWithParents(target.mailbox);
    if (target.folder !== target.mailbox) {
      // Maildir++: a folder is marked by an empty `maildirfolder` file.
      if (await this.mkdir(target.folder)) {
        const marker = join(target.folder, 'maildirfolder');
        await fs.writeFile(marker, '', { mode: this.opts.fileMode });
        await this.own(marker);
      }
    }
    for (const sub of ['cur', 'new', 'tmp']) await this.mkdir(join(target.folder, sub));
  }

  private async mkdirWithParents(path: string): Promise<void> {
    try {
      await this.mkdir(path);
    } catch (err) {
      if (code(err) !== 'ENOENT' || dirname(path) === path) throw err;
      await this.mkdirWithParents(dirname(path));
      await this.mkdir(path);
    }
  }

  /** Makes one folder with the configured mode and owner; false when it was already there. */
  private async mkdir(path: string): Promise<boolean> {
    try {
      await fs.mkdir(path, { mode: this.opts.dirMode });
    } catch (err) {
      if (code(err) === 'EEXIST') return false;
      throw err;
    }
    await fs.chmod(path, this.opts.dirMode);
    await this.own(path);
    await syncDir(dirname(path));
    return true;
  }

  private async own(path: string): Promise<void> {
    if (this.opts.uid !== undefined || this.opts.gid !== undefined)
      await fs.chown(path, this.opts.uid ?? -1, this.opts.gid ?? -1);
  }
}
