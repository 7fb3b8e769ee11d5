import { readFileSync } from 'node:fs';

/**
 * System accounts by name, from /etc/passwd and /etc/group (NSS sources beyond the files are
 * not consulted; a number is taken as it is). Used where a config names the owner of files, so
 * that `uid: vmail` works as well as `uid: 5000`.
 */
function lookup(file: string, name: string, field: 2 | 3): number | null {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f[0] === name && f[field] !== undefined && /^\d+$/.test(f[field])) return Number(f[field]);
  }
  return null;
}

/** A user id from a number or a user name; throws naming what was not found. */
export function resolveUid(user: number | string): number {
  if (typeof user === 'number') return user;
  if (/^\d+$/.test(user)) return Number(user);
  const uid = lookup('/etc/passwd', user, 2);
  if (uid === null) throw new Error(`no user named "${user}" in /etc/passwd`);
  return uid;
}

/** A group id from a number or a group name; throws naming what was not found. */
export function resolveGid(group: number | string): number {
  if (typeof group === 'number') return group;
  if (/^\d+$/.test(group)) return Number(group);
  const gid = lookup('/etc/group', group, 2);
  if (gid === null) throw new Error(`no group named "${group}" in /etc/group`);
  return gid;
}

/** The primary group of a user named in /etc/passwd (field 4); null when unknown. */
export function primaryGid(user: string): number | null {
  return lookup('/etc/passwd', user, 3);
}
