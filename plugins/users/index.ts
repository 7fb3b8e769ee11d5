import { resolve as resolvePath } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  accept,
  defer,
  definePlugin,
  deny,
  expandTo,
  proceed,
  Tokens,
  type ScramExchange,
} from '../../core/index.js';
import { AuthThrottle, clientKey } from './auth-throttle.js';
import { userCommand } from './cli.js';
import { directoryFiles, usersConfigSchema } from './config.js';
import { DirectoryStore } from './directory-store.js';
import { Directory } from './directory.js';
import { createHmac, randomBytes } from 'node:crypto';
import {
  DUMMY_HASH,
  hashPassword,
  needsUpgrade,
  parseHash,
  SCRAM_ITERATIONS,
  verifyPassword,
} from './password.js';
import { syncPasswdFile, updateUsersFile, type UserFiles } from './users-update.js';
import { normalizeLogin } from './users-file.js';
import { Forwarding } from './forwarding.js';
import { asciiDomain } from './addresses.js';
import { loadSecrets, Srs } from './srs.js';

export { Directory, type DirectoryService } from './directory.js';

/** Made-up credentials differ per login but stay the same for it, as a real user's salt does. */
const FAKE_SALT_KEY = randomBytes(32);

/**
 * AUTH SCRAM-SHA-256: the exchange with the user's stored credentials. A user without them (an
 * unknown login, or an scrypt hash not yet upgraded) goes through the same exchange with made-up
 * ones, so that the client cannot tell which it was, and fails.
 */
async function verifyScram(
  scram: ScramExchange,
  login: string,
  stored: string | undefined,
): Promise<boolean> {
  const h = stored === undefined ? null : parseHash(stored);
  if (h?.scheme === 'SCRAM-SHA-256') return scram.verify(h);
  const salt = createHmac('sha256', FAKE_SALT_KEY).update(login).digest().subarray(0, 16);
  await scram.verify({
    salt,
    iterations: SCRAM_ITERATIONS,
    storedKey: randomBytes(32),
    serverKey: randomBytes(32),
  });
  return false;
}

/**
 * users — who is who. The user directory (a users file and an optional aliases file, read again
 * when they change), AUTH PLAIN/LOGIN against it with per-client throttling and lockout, and
 * RCPT for the local domains: a recipient there is accepted if it reaches a mailbox, else
 * `550 5.1.1`. Other plugins use the directory through the `Directory` token. At acceptance
 * (`expand`), an alias, a catch-all or an SRS address is replaced by where it goes; copies
 * forwarded elsewhere get an SRS envelope sender (see docs/forwarding.md).
 */
export default definePlugin({
  name: 'users',
  config: usersConfigSchema,
  commands: { user: userCommand },
  async setup({ config, log, baseDir, resolve, provide }) {
    const { localDomains, spool } = resolve(Tokens.Config);
    const files = directoryFiles(config, baseDir);
    const userFiles: UserFiles = { usersFile: files.usersFile, passwd: files.passwd };
    /** Rewrites the passwd-file from the users file when they differ (a hand edit, an old file). */
    const syncPasswd = async (): Promise<void> => {
      const { written, skipped } = await syncPasswdFile(userFiles);
      if (written) log.info({ file: files.passwd?.file }, 'passwd-file for Dovecot written');
      if (skipped.length > 0)
        log.warn(
          { file: files.passwd?.file, users: skipped },
          'users left out of the passwd-file: an scrypt hash Dovecot cannot check (upgraded at their next SMTP login) or a login with ":"',
        );
    };
    // At start a passwd-file that cannot be written stops the boot, as a bad users file does.
    if (files.passwd) await syncPasswd();
    const store = await DirectoryStore.open({
      usersFile: files.usersFile,
      aliasesFile: files.aliasesFile,
      ...(files.passwd
        ? {
            onReload: () =>
              void syncPasswd().catch((err: unknown) =>
                log.error({ err, file: files.passwd?.file }, 'passwd-file could not be written'),
              ),
          }
        : {}),
      localDomains,
      separators: config.subaddressSeparator,
      postmaster: config.postmaster,
      log,
    });
    provide(Directory, store);

    let srs: Srs | null = null;
    if (config.srs.enabled && localDomains.length > 0) {
      const domain = asciiDomain(config.srs.domain ?? localDomains[0]!);
      // Bounces must come back here: the SRS domain has to be one we receive mail for.
      if (!domain || !store.isLocalDomain(domain))
        throw new Error(`srs.domain: expected one of localDomains, got ${config.srs.domain}`);
      const secretFile = resolvePath(baseDir, config.srs.secretFile ?? resolvePath(spool.dir, 'srs.secret'));
      const secrets = await loadSecrets(secretFile);
      if (secrets.length === 0) throw new Error(`SRS secret file ${secretFile} holds no secret`);
      srs = new Srs({ secrets, domain, maxAgeDays: config.srs.maxAgeDays });
    }
    const forwarding = new Forwarding(store, srs, config.subaddressSeparator);

    const { maxFailures, windowSeconds, lockoutSeconds, delayMs } = config.auth;
    // The counts live in the State service: shared by every worker, kept across reloads.
    const throttle = new AuthThrottle(resolve(Tokens.State), {
      maxFailures,
      windowMs: windowSeconds * 1000,
      lockoutMs: lockoutSeconds * 1000,
    });

    /**
     * Replaces an older (scrypt) hash with the SCRAM-SHA-256 form once the password is known to be
     * right, under the users file's lock and only if the entry still holds the hash that was
     * checked (a `petrel user passwd` in between wins). The passwd-file follows, so Dovecot
     * accepts the same password from then on.
     */
    const upgrade = async (name: string, checked: string, password: string): Promise<void> => {
      const hash = await hashPassword(password);
      const { changed } = await updateUsersFile(userFiles, async (data) => {
        const entry = data.users?.[name];
        if (!entry || entry.password !== checked) return null;
        return { users: { ...data.users, [name]: { ...entry, password: hash } } };
      });
      if (changed) log.info({ user: name }, 'password hash upgraded from scrypt to SCRAM-SHA-256');
    };

    /** Slows a failed attempt down; cut short if the hook's time runs out. */
    const pause = (signal: AbortSignal): Promise<void> =>
      delayMs > 0 ? sleep(delayMs, undefined, { signal }).catch(() => undefined) : Promise.resolve();

    return {
      async auth(ctx) {
        const { session, username, authzid, signal } = ctx;
        const client = clientKey(session.remote.address);
        const fields = { session: session.id, remote: session.remote.address, user: username };
        const attempt = await throttle.begin(client);
        if (attempt === null) {
          log.info(fields, 'AUTH refused: client locked out');
          await pause(signal);
          // RFC 4954 §6: 454 4.7.0 is a temporary authentication failure; the client may retry later.
          return defer(454, '4.7.0', 'Too many failed authentication attempts, try again later');
        }
        const login = normalizeLogin(username);
        const user = (await store.current()).userByLogin(login);
        // An unknown login costs as much as a wrong password, so timing tells nothing.
        const passwordOk =
          ctx.mechanism === 'SCRAM-SHA-256'
            ? await verifyScram(ctx.scram, login, user?.password)
            : await verifyPassword(ctx.password, user?.password ?? DUMMY_HASH);
        // We do not let one user act for another (RFC 4616 §2): the authzid must be empty or the login.
        const authzOk = authzid === '' || normalizeLogin(authzid) === login;
        if (user && passwordOk && authzOk) {
          // This attempt was checked within the limit, so the login stands even if it cannot be
          // taken off the count; it then counts as one failure until the window ends.
          await throttle.succeeded(client, attempt).catch((err: unknown) => {
            log.warn({ ...fields, err }, 'AUTH attempt could not be uncounted');
          });
          log.info(fields, 'AUTH succeeded');
          if (ctx.password !== undefined && needsUpgrade(user.password)) {
            // The login stands whatever becomes of the upgrade; it is tried again next time.
            await upgrade(user.name, user.password, ctx.password).catch((err: unknown) => {
              log.warn({ ...fields, err }, 'password hash could not be upgraded');
            });
          }
          return accept();
        }
        const { failures, lockedOut } = await throttle.failed(client);
        const reason = !user
          ? 'unknown login'
          : !passwordOk
            ? ctx.mechanism === 'SCRAM-SHA-256' && needsUpgrade(user.password)
              ? 'no SCRAM credentials yet (scrypt hash; log in once with PLAIN or LOGIN)'
              : 'wrong password'
            : 'authzid not allowed';
        log.info({ ...fields, reason, failures }, 'AUTH failed');
        if (lockedOut)
          log.warn({ ...fields, lockoutSeconds }, 'client locked out after too many AUTH failures');
        await pause(signal);
        return deny(535, '5.7.8', 'Authentication credentials invalid');
      },

      // The engine hands `RCPT TO:<postmaster>` over as postmaster@ the first local domain, and
      // the directory sends postmaster@ any local domain to a mailbox (see README, RCPT).
      async rcpt({ session, recipient }) {
        if (recipient.literal || !store.isLocalDomain(recipient.domainAscii)) return proceed();
        if (forwarding.isSrs(recipient)) {
          // A bounce to a forwarded copy: returned to the original sender if we made this address.
          const check = forwarding.checkSrs(recipient);
          if (check.ok) return accept();
          log.info(
            { session: session.id, rcpt: recipient.address, reason: check.reason },
            'refused an SRS address we did not make (or made too long ago)',
          );
          return deny(550, '5.1.1', 'No such user here');
        }
        if (await store.isDeliverable(recipient)) return accept();
        return deny(550, '5.1.1', 'No such user here');
      },

      async expand({ sender, recipient }) {
        const targets = await forwarding.expand(sender, recipient.address);
        if (!targets) return proceed();
        log.info(
          {
            rcpt: recipient.address.address,
            targets: targets.map((t) => t.address.address),
            ...(targets.some((t) => t.sender) ? { srs: true } : {}),
          },
          'recipient expanded',
        );
        return expandTo(targets);
      },
    };
  },
});
