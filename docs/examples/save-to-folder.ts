/**
 * save-to-folder: accepts mail for a list of domains and stores each message as one file in a
 * folder, durably, before the client is told `250`.
 *
 * Use it as a mail sink for development, or as a simple archive. It is loaded straight from this
 * .ts file (Node strips the types), so it uses erasable TypeScript syntax only.
 *
 *   plugins:
 *     - name: ./save-to-folder.ts
 *       config:
 *         folder: ./mail
 *         domains: [example.test]
 *
 * It also adds a command, `petrel saved [--config FILE]`, that lists the saved messages.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { accept, CommandError, defer, definePlugin, deny, proceed, z } from 'petrel';

export default definePlugin({
  name: 'save-to-folder',
  config: z
    .object({
      /** Where messages go; a relative path is relative to the config file's folder. */
      folder: z.string().min(1),
      /** Domains this plugin accepts mail for (compared case-insensitively). */
      domains: z.array(z.string().min(1)).min(1),
      /**
       * Local parts accepted in those domains. When given, any other local part in one of the
       * domains is refused with `550 5.1.1` (except `postmaster`, which is always accepted);
       * when absent, every local part is accepted.
       */
      mailboxes: z.array(z.string().min(1)).optional(),
    })
    .strict(), // a misspelt key fails at boot instead of being ignored

  async setup({ config, log, baseDir }) {
    const folder = resolve(baseDir, config.folder);
    // Created at boot, so a folder that cannot be created stops startup with a config error.
    await mkdir(folder, { recursive: true });
    const domains = new Set(config.domains.map((d) => d.toLowerCase()));
    const mailboxes = config.mailboxes ? new Set(config.mailboxes.map((m) => m.toLowerCase())) : null;

    /** One of our domains (the core hands the bare `<postmaster>` over as postmaster@ the first local domain). */
    const isOurDomain = (domain: string, domainAscii: string): boolean =>
      domains.has(domain) || domains.has(domainAscii);

    return {
      async rcpt({ recipient }) {
        // Not ours: another plugin may accept it; if none does, the core refuses it (550 5.7.1).
        if (!isOurDomain(recipient.domain, recipient.domainAscii)) return proceed();
        const local = recipient.local.toLowerCase();
        // RFC 5321 §4.5.1: postmaster must be accepted for every domain we take mail for.
        if (mailboxes && local !== 'postmaster' && !mailboxes.has(local)) {
          return deny(550, '5.1.1', 'No such user here');
        }
        return accept();
      },

      async queue({ transaction, message, signal }) {
        // Taking the message means owning every recipient of it. If another plugin accepted
        // recipients we do not serve, leave the message to a queue that can deliver to them.
        if (!transaction.recipients.every((r) => isOurDomain(r.address.domain, r.address.domainAscii))) {
          return proceed();
        }

        const name = `${transaction.id}.eml`;
        const temp = join(folder, `.${name}.${randomBytes(4).toString('hex')}.tmp`);
        const final = join(folder, name);
        const sender = transaction.sender?.address ?? '';
        try {
          // 1. Write to a temporary name, so a reader never sees half a message.
          const file = await open(temp, 'wx', 0o640);
          try {
            // writeFile() writes every byte (it retries short writes) and stops when `signal`
            // aborts, that is when the hook's time is up and the client was already told 451.
            await file.writeFile(`Return-Path: <${sender}>\r\n`);
            await file.writeFile(message.stream(), { signal });
            // 2. fsync: the bytes are on the disk, not only in the page cache.
            await file.sync();
          } finally {
            await file.close();
          }
          signal.throwIfAborted();
          // 3. rename: the message appears under its final name, whole, or not at all.
          await rename(temp, final);
          // 4. fsync the folder: the new directory entry survives a crash too.
          const dir = await open(folder, 'r');
          try {
            await dir.sync();
          } finally {
            await dir.close();
          }
        } catch (err) {
          await rm(temp, { force: true });
          log.error({ err, tx: transaction.id }, 'could not save message');
          // Generic text for the client; the detail is in the log line above.
          return defer(451, '4.3.0', 'Message not saved, please try again later');
        }
        log.info({ tx: transaction.id, file: final, size: message.size }, 'message saved');
        // 5. Only now is the client told the message is ours.
        return accept({ code: 250, enhanced: '2.0.0', text: `Ok: saved as ${name}` });
      },
    };
  },

  // `petrel saved`: the command gets the same validated config as setup, but setup does not run.
  commands: {
    saved: {
      description: 'list the messages save-to-folder has saved (petrel saved [--config FILE])',
      async run({ config, baseDir, stdout }) {
        const folder = resolve(baseDir, config.folder);
        const names = await readdir(folder).catch((err: NodeJS.ErrnoException) => {
          if (err.code === 'ENOENT') return [] as string[];
          throw new CommandError(`cannot read ${folder}: ${err.message}`);
        });
        const saved = names.filter((n) => n.endsWith('.eml')).sort();
        for (const name of saved) stdout.write(`${name}\t${(await stat(join(folder, name))).size}\n`);
        stdout.write(`${saved.length} saved in ${folder}\n`);
        return 0;
      },
    },
  },
});
