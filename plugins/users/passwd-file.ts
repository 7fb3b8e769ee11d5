import { readFile } from 'node:fs/promises';
import { parseHash } from './password.js';
import { replaceFile, type UserRecord } from './users-file.js';

/**
 * The passwd-file: the users file's logins and SCRAM-SHA-256 hashes in the format Dovecot's
 * `passwd-file` driver reads (one `user:password:uid:gid:gecos:home:shell:extra` line per entry;
 * doc.dovecot.org, "Passwd-file"), so that Dovecot checks IMAP and POP3 logins against the
 * same passwords as SMTP AUTH here. Written whenever the users file is (by `petrel user` and by
 * the server after a hash upgrade or a hand edit), never read by Petrel itself.
 *
 * ```
 * bob@hamburger.edu:{SCRAM-SHA-256}100000,<salt>,<StoredKey>,<ServerKey>::::::
 * alice:{SCRAM-SHA-256}…::::::user=alice@hamburger.edu
 * alice@hamburger.edu:{SCRAM-SHA-256}…::::::
 * ```
 *
 * Logins are written in the form they are compared in (lower-case), so Dovecot needs
 * `auth_username_format = %Lu`. A login that is not the user's primary address gets
 * `user=<primary>` (Dovecot then names the mailbox after the address, as maildir does) and the
 * primary address gets a line of its own, which LMTP delivery looks up. A user whose hash is still
 * scrypt, which Dovecot cannot check, is left out until the next successful SMTP login upgrades it.
 */
export interface PasswdFileTarget {
  readonly file: string;
  /** Group that may read the file (Dovecot's auth process runs as `dovecot`): mode 0640, else 0600. */
  readonly gid?: number | undefined;
}

export interface PasswdRendering {
  readonly text: string;
  /** Logins left out: their hash is not one Dovecot checks (scrypt), or the login holds a `:`. */
  readonly skipped: readonly string[];
}

export function renderPasswdFile(users: readonly UserRecord[], source: string): PasswdRendering {
  const lines = [
    `# Written by Petrel from ${source.replace(/[\r\n]/g, '')}; change it with \`petrel user\`.`,
  ];
  const skipped: string[] = [];
  for (const u of [...users].sort((a, b) => a.login.localeCompare(b.login))) {
    const primary = u.addresses[0]?.key;
    const scram = parseHash(u.password)?.scheme === 'SCRAM-SHA-256';
    // A field separator or a line break in a name would make another entry (hand-edited logins).
    if (!scram || /[:\r\n]/.test(u.login) || (primary && /[:\r\n\s]/.test(primary))) {
      skipped.push(u.name);
      continue;
    }
    if (!primary || primary === u.login) {
      lines.push(`${u.login}:${u.password}::::::`);
    } else {
      lines.push(`${u.login}:${u.password}::::::user=${primary}`);
      lines.push(`${primary}:${u.password}::::::`);
    }
  }
  return { text: `${lines.join('\n')}\n`, skipped };
}

/** Writes the passwd-file when its content differs from `text`; true when it wrote. */
export async function writePasswdFile(target: PasswdFileTarget, text: string): Promise<boolean> {
  const current = await readFile(target.file, 'utf8').catch(() => null);
  if (current === text) return false;
  await replaceFile(target.file, text, {
    mode: target.gid === undefined ? 0o600 : 0o640,
    gid: target.gid,
  });
  return true;
}
