import { randomBytes } from 'node:crypto';
import { definePlugin, deny, proceed, Tokens, z, type SessionView, rfc5322Date } from '../../core/index.js';
import { Directory, type DirectoryService } from '../users/directory.js';

export const submissionConfigSchema = z
  .object({
    /** The envelope sender must be one of the authenticated user's addresses. */
    enforceSender: z.boolean().default(true),
    /** Allow `MAIL FROM:<>` (no sender, as in a bounce) from authenticated users. */
    allowNullSender: z.boolean().default(false),
    /** Add `Message-ID:` and `Date:` to submitted mail that lacks them (RFC 6409 §8.2, §8.3). */
    addMissingHeaders: z.boolean().default(true),
  })
  .strict();

/** Mail from a user's own client: on a submission listener, or after AUTH on any listener. */
export function isSubmission(session: SessionView): boolean {
  return session.listener.kind !== 'smtp' || session.user !== null;
}

/**
 * submission — mail submitted by authenticated users (RFC 6409). The envelope sender must be an
 * address the user owns (per the users plugin's directory), and a message that lacks
 * `Message-ID:` or `Date:` gets one.
 */
export default definePlugin({
  name: 'submission',
  config: submissionConfigSchema,
  setup({ config, log, hostname, resolve }) {
    const clock = resolve(Tokens.Clock);
    // The directory comes from the users plugin; resolved on first use, so the order of the two
    // in the config does not matter. Without it every submission fails closed (451 4.3.0).
    let directory: DirectoryService | null = null;
    const dir = (): DirectoryService => {
      if (directory) return directory;
      try {
        directory = resolve(Directory);
      } catch {
        throw new Error('submission needs the users plugin (its Directory) in the same config');
      }
      return directory;
    };

    return {
      async mail({ session, sender }) {
        if (!isSubmission(session) || !config.enforceSender) return proceed();
        const user = session.user;
        // The engine refuses MAIL before AUTH on submission listeners; this is a second lock.
        if (user === null) return deny(530, '5.7.0', 'Authentication required');
        if (sender === null) {
          if (config.allowNullSender) return proceed();
        } else if (await dir().maySendAs(user, sender)) {
          return proceed();
        }
        log.info(
          { session: session.id, user, from: sender?.address ?? '<>' },
          'sender address not owned by the authenticated user',
        );
        return deny(553, '5.7.1', 'Sender address not owned by user');
      },

      async data_post({ session, transaction, message, prependHeader }) {
        if (!isSubmission(session) || !config.addMissingHeaders) return proceed();
        const has = (name: string): boolean =>
          message.headers.has(name) || message.addedHeaders.some((h) => h.name.toLowerCase() === name);
        // RFC 6409 §8.3: a submission server may add a missing Message-ID; §8.2: a missing Date.
        if (!has('message-id')) {
          prependHeader('Message-ID', `<${transaction.id}.${randomBytes(6).toString('hex')}@${hostname}>`);
        }
        if (!has('date')) prependHeader('Date', rfc5322Date(clock.now()));
        return proceed();
      },
    };
  },
});
