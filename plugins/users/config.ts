import { resolve } from 'node:path';
import { resolveGid, z } from '../../core/index.js';
import type { PasswdFileTarget } from './passwd-file.js';
import { parseAddressText } from './addresses.js';

/** The users plugin's config. Paths are relative to the config file's folder. */
export const usersConfigSchema = z
  .object({
    /** The users file (JSON), managed with `petrel user`. */
    usersFile: z.string().min(1).default('./users.json'),
    /**
     * A passwd-file for Dovecot, written from the users file whenever it changes (see
     * passwd-file.ts and docs/mailboxes.md); none by default.
     */
    passwdFile: z.string().min(1).optional(),
    /** Group that may read the passwd-file (a name or a number; Dovecot's auth runs as `dovecot`). */
    passwdFileGroup: z.union([z.string().min(1), z.number().int().min(0)]).optional(),
    /** An aliases file (YAML or JSON); none by default. */
    aliasesFile: z.string().min(1).optional(),
    /**
     * Where mail for `postmaster@` a local domain goes when that address has no user or alias of
     * its own (RFC 5321 §4.5.1); by default, wherever postmaster@ the first local domain goes.
     */
    postmaster: z
      .string()
      .refine((a) => parseAddressText(a) !== null, { message: 'expected an address such as bob@example.com' })
      .optional(),
    /** Characters that start a sub-address (`bob+tag@…`); empty turns sub-addressing off. */
    subaddressSeparator: z
      .string()
      .max(8)
      .regex(/^[-+=_#~&*^$/?{|}`']*$/, {
        message: 'expected separator characters such as "+" or "+-" (not ".", "%", "!" or "@")',
      })
      .default('+'),
    /**
     * SRS for forwarded copies (an alias to an address elsewhere): the envelope sender becomes an
     * address at `domain` that only this server can make, so SPF passes at the destination and a
     * bounce comes back here to be returned. See docs/forwarding.md.
     */
    srs: z
      .object({
        enabled: z.boolean().default(true),
        /** Where SRS addresses are made: a local domain whose SPF record names this server. Default: the first local domain. */
        domain: z
          .string()
          .min(1)
          .transform((d) => d.toLowerCase())
          .optional(),
        /** The secrets, one per line, newest first; created with a random one when missing. Default: `<spool.dir>/srs.secret`. */
        secretFile: z.string().min(1).optional(),
        /** Days an SRS address is honoured after it was made (RFC-less; libsrs2 uses 21). */
        maxAgeDays: z.number().int().min(1).max(1000).default(21),
      })
      .strict()
      .prefault({}),
    auth: z
      .object({
        /** Failed AUTH attempts from one client address within the window before it is locked out. */
        maxFailures: z.number().int().positive().default(5),
        windowSeconds: z.number().int().positive().default(900),
        /** How long a locked-out client is refused (`454 4.7.0`), even with the right password. */
        lockoutSeconds: z.number().int().positive().default(900),
        /** Added to every failed attempt before the reply, to slow down guessing. */
        delayMs: z.number().int().nonnegative().max(10_000).default(1000),
      })
      .strict()
      .prefault({}),
  })
  .strict();

export type UsersConfig = z.output<typeof usersConfigSchema>;

/**
 * Absolute paths of the users and aliases files, and the passwd-file with its group. Throws when
 * the group does not exist.
 */
export function directoryFiles(
  config: UsersConfig,
  baseDir: string,
): { usersFile: string; aliasesFile: string | null; passwd: PasswdFileTarget | null } {
  if (config.passwdFileGroup !== undefined && !config.passwdFile)
    throw new Error('passwdFileGroup is set but passwdFile is not');
  return {
    usersFile: resolve(baseDir, config.usersFile),
    aliasesFile: config.aliasesFile ? resolve(baseDir, config.aliasesFile) : null,
    passwd: config.passwdFile
      ? {
          file: resolve(baseDir, config.passwdFile),
          gid: config.passwdFileGroup === undefined ? undefined : resolveGid(config.passwdFileGroup),
        }
      : null,
  };
}
