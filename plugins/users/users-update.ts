import { renderPasswdFile, writePasswdFile, type PasswdFileTarget } from './passwd-file.js';
import {
  parseUsersFile,
  readUsersFile,
  withUsersFileLock,
  writeUsersFile,
  type UsersFileData,
} from './users-file.js';

/** Where the users are kept: the users file, and the passwd-file derived from it when configured. */
export interface UserFiles {
  readonly usersFile: string;
  readonly passwd: PasswdFileTarget | null;
}

/**
 * Changes the users file under its lock: reads it, lets `change` return the new content (or null
 * for no change), writes it, then the passwd-file. Returns what `change` returned, and the logins
 * the passwd-file leaves out.
 */
export async function updateUsersFile(
  files: UserFiles,
  change: (data: UsersFileData) => Promise<UsersFileData | null>,
): Promise<{ changed: boolean; skipped: readonly string[] }> {
  return withUsersFileLock(files.usersFile, async () => {
    const data = (await readUsersFile(files.usersFile))?.data ?? { users: {} };
    const next = await change(data);
    if (next) await writeUsersFile(files.usersFile, next);
    const skipped = files.passwd ? await syncPasswd(files, next) : [];
    return { changed: next !== null, skipped };
  });
}

/** Brings the passwd-file in line with the users file (after a hand edit, or at start). */
export async function syncPasswdFile(
  files: UserFiles,
): Promise<{ written: boolean; skipped: readonly string[] }> {
  if (!files.passwd) return { written: false, skipped: [] };
  return withUsersFileLock(files.usersFile, async () => {
    const users = (await readUsersFile(files.usersFile))?.users ?? [];
    const { text, skipped } = renderPasswdFile(users, files.usersFile);
    return { written: await writePasswdFile(files.passwd!, text), skipped };
  });
}

async function syncPasswd(files: UserFiles, written: UsersFileData | null): Promise<readonly string[]> {
  const users = written
    ? parseUsersFile(JSON.stringify(written), files.usersFile).users
    : ((await readUsersFile(files.usersFile))?.users ?? []);
  const { text, skipped } = renderPasswdFile(users, files.usersFile);
  await writePasswdFile(files.passwd!, text);
  return skipped;
}
