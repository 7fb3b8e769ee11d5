/**
 * maildir — local delivery: recipients in the local domains are written into Maildirs, one file
 * per recipient and mailbox, with Return-Path and Delivered-To on top. See README.md.
 */
import {
  definePlugin,
  type PluginApi,
  deny,
  proceed,
  routeTo,
  Tokens,
  type Address,
  type DeliveryRecipient,
  type QueuedMessageView,
  type RecipientReply,
  type RecipientResult,
  type PeerCapabilities,
  type Route,
  localDomainMap,
  localDomainOf,
  primaryGid,
  resolveGid,
  resolveUid,
} from '../../core/index.js';
import { mkdirSync, chownSync, statSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { addAbortSignal, type Readable } from 'node:stream';
import { z } from 'zod';
import { Directory, type DirectoryService } from '../users/directory.js';
import {
  checkMailboxes,
  directoryMailboxes,
  isFolderTag,
  ownMailbox,
  routeKey,
  type Mailbox,
} from './mailboxes.js';
import { deliveryKey, MailboxGoneError, MaildirStore, type MaildirTarget } from './store.js';

const PLACEHOLDERS = ['{root}', '{domain}', '{user}'];

const mode = z
  .string()
  .regex(/^0?[0-7]{3}$/, { message: 'expected an octal mode such as "0600"' })
  .transform((s) => parseInt(s, 8));

/** A user or group: a number, or a name looked up in /etc/passwd or /etc/group at start. */
const id = z.union([z.number().int().min(0).max(0xfffffffe), z.string().min(1)]);

export const configSchema = z
  .object({
    /** The folder that holds every mailbox; relative to the config file's folder. */
    root: z.string().min(1).default('./var/mail'),
    /** Where a mailbox's Maildir is. */
    template: z
      .string()
      .default('{root}/{domain}/{user}/Maildir')
      .refine((t) => t.includes('{user}'), { message: 'expected the template to contain {user}' })
      .refine((t) => (t.match(/\{[^}]*\}/g) ?? []).every((p) => PLACEHOLDERS.includes(p)), {
        message: `expected only the placeholders ${PLACEHOLDERS.join(', ')}`,
      }),
    /** Mode of message files, as an octal string. */
    fileMode: mode.default(0o600),
    /** Mode of folders the plugin creates, as an octal string. */
    dirMode: mode.default(0o700),
    /**
     * Owner (uid, gid) of everything written, as numbers or names (`vmail`); needs Petrel to run
     * as root. A named `uid` without `gid` brings that user's primary group.
     */
    uid: id.optional(),
    gid: id.optional(),
    /** Sub-addressed mail (`bob+lists@`) goes to the Maildir++ folder `.lists` of bob's mailbox. */
    subaddressFolders: z.boolean().default(false),
    /** Separates user and tag in a local part when there is no directory; empty: no sub-addressing. */
    recipientDelimiter: z.string().max(1).default('+'),
    /** Create a mailbox on its first message; when false, mail for a missing one fails (550 5.1.1). */
    createMailboxes: z.boolean().default(true),
  })
  .strict();

export type MaildirConfig = z.output<typeof configSchema>;

function reply(code: number, enhanced: string, text: string): RecipientReply {
  return { code, enhanced, text };
}

/** Return-Path and Delivered-To (RFC 5321 §4.4), CR and LF removed so no header can be injected. */
function traceHeaders(sender: Address | null, recipient: DeliveryRecipient): Buffer {
  const clean = (s: string): string => s.replace(/[\r\n]/g, '');
  // As Postfix does: X-Original-To names the address the mail was sent to, when an alias (or a
  // catch-all, or a user's other address) led it to this mailbox.
  const original = recipient.expandedFrom
    ? `X-Original-To: ${clean(recipient.expandedFrom.address)}\r\n`
    : '';
  return Buffer.from(
    `Return-Path: <${clean(sender?.address ?? '')}>\r\n${original}Delivered-To: ${clean(recipient.address.address)}\r\n`,
  );
}

/** A mailbox takes any octets: 8-bit content and UTF-8 headers (RFC 6152, RFC 6531) as stored. */
const MAILBOX: PeerCapabilities = Object.freeze({ eightBitMime: true, smtputf8: true });

/**
 * The trace headers, then the message as the transform chain makes it (every transport runs the
 * same chain); a stalled read ends when the hook's time is up. The stored stream is closed
 * whatever becomes of the copy.
 */
async function* withHeaders(
  headers: Buffer,
  message: QueuedMessageView,
  transformed: (content: Readable) => Promise<Readable>,
  signal: AbortSignal,
): AsyncIterable<Uint8Array> {
  const source = message.stream();
  try {
    const content = await transformed(source);
    yield headers;
    yield* addAbortSignal(signal, content) as AsyncIterable<Uint8Array>;
  } finally {
    source.destroy();
  }
}

/**
 * The result for an error: temporary unless the mailbox is gone. The text stays generic; the
 * detail goes to the log.
 */
export function resultForError(recipient: string, err: unknown): RecipientResult {
  if (err instanceof MailboxGoneError)
    return { recipient, status: 'failed', reply: reply(550, '5.1.1', 'Mailbox unavailable') };
  switch ((err as NodeJS.ErrnoException | null)?.code) {
    case 'EDQUOT':
      return { recipient, status: 'deferred', reply: reply(452, '4.2.2', 'Mailbox full') };
    case 'ENOSPC':
      return { recipient, status: 'deferred', reply: reply(452, '4.3.1', 'Insufficient system storage') };
    default:
      return { recipient, status: 'deferred', reply: reply(451, '4.3.0', 'Temporary local problem') };
  }
}

/** The configured owner as numbers (names looked up); throws naming a user or group that does not exist. */
export function mailOwner(config: MaildirConfig): { uid?: number; gid?: number } {
  const uid = config.uid === undefined ? undefined : resolveUid(config.uid);
  let gid = config.gid === undefined ? undefined : resolveGid(config.gid);
  if (gid === undefined && typeof config.uid === 'string' && !/^\d+$/.test(config.uid))
    gid = primaryGid(config.uid) ?? undefined;
  return { ...(uid === undefined ? {} : { uid }), ...(gid === undefined ? {} : { gid }) };
}

function checkOwner(owner: { uid?: number }, log: PluginApi<MaildirConfig>['log']): void {
  const self = process.getuid?.();
  if (self === 0 && owner.uid === undefined) {
    // Folders made now would belong to root with mode 0700: Dovecot, which never runs mail
    // processes as root, could not open them.
    log.warn(
      'Petrel runs as root and maildir has no mailbox owner: mailboxes will belong to root, which Dovecot cannot open; set uid (and gid) to the mail user, e.g. uid: vmail',
    );
  }
  if (owner.uid === undefined || self === undefined || self === 0 || self === owner.uid) return;
  throw new Error(`uid ${owner.uid} is set, but Petrel runs as uid ${self}: only root can give files away`);
}

/** Warns when the configured owner could not pass through an existing root (not changed here). */
function checkRootReachable(
  root: string,
  owner: { uid?: number; gid?: number },
  log: PluginApi<MaildirConfig>['log'],
): void {
  if (owner.uid === undefined) return;
  const st = statSync(root);
  const bit = st.uid === owner.uid ? 0o100 : st.gid === owner.gid ? 0o010 : 0o001;
  if ((st.mode & bit) === 0)
    log.warn(
      { root, owner: st.uid, group: st.gid, mode: (st.mode & 0o777).toString(8) },
      `the mailbox owner (uid ${owner.uid}) cannot enter root, so Dovecot cannot open the mailboxes below it; give it to the mail user or allow it to pass (chmod o+x)`,
    );
}

export default definePlugin({
  name: 'maildir',
  config: configSchema,
  setup(api: PluginApi<MaildirConfig>) {
    const { config, log } = api;
    const owner = mailOwner(config);
    checkOwner(owner, log);
    const root = resolve(api.baseDir, config.root);
    // A root made here belongs to the mail owner; an existing one is left as the operator set it.
    const made = mkdirSync(root, { recursive: true, mode: config.dirMode });
    if (made && (owner.uid !== undefined || owner.gid !== undefined))
      chownSync(root, owner.uid ?? -1, owner.gid ?? -1);
    else checkRootReachable(root, owner, log);
    const domains = localDomainMap(api.resolve(Tokens.Config).localDomains);
    const store = new MaildirStore({
      fileMode: config.fileMode,
      dirMode: config.dirMode,
      createMailboxes: config.createMailboxes,
      ...owner,
      root,
      report: (f) => {
        if (f.fixed)
          log.warn(
            { folder: f.folder, count: f.count, paths: f.paths },
            'existing mailbox folders or files had another owner or mode; changed to the configured ones',
          );
        else
          log.error(
            { folder: f.folder, count: f.count, paths: f.paths, error: f.error },
            'existing mailbox folders or files have another owner or mode and could not be changed; the mail reader may not open them (chown -R them to the mail user)',
          );
      },
    });

    /** The users directory when the users plugin is in this plugin set, else null. */
    const directory = (): DirectoryService | null => {
      try {
        return api.resolve(Directory);
      } catch {
        return null;
      }
    };

    const target = (m: Mailbox): MaildirTarget => {
      // Replacer functions: a `$&` in a local part is text, not a replacement pattern.
      let mailbox = config.template
        .replaceAll('{root}', () => root)
        .replaceAll('{domain}', () => m.domain)
        .replaceAll('{user}', () => m.user);
      if (!isAbsolute(mailbox)) mailbox = resolve(api.baseDir, mailbox);
      const folder =
        config.subaddressFolders && m.tag && isFolderTag(m.tag)
          ? join(mailbox, `.${m.tag.toLowerCase()}`)
          : mailbox;
      return { mailbox, folder };
    };

    const deliverOne = async (
      message: QueuedMessageView,
      sender: Address | null,
      route: Route,
      recipient: DeliveryRecipient,
      mailboxes: readonly Mailbox[],
      signal: AbortSignal,
    ): Promise<RecipientResult> => {
      const transformed = (content: Readable): Promise<Readable> =>
        api.hooks.transform({ message, route, peer: MAILBOX, content });
      const rcpt = recipient.address.address;
      const key = deliveryKey(message.id, rcpt);
      // A retry may follow an attempt that wrote some copies (a crash, or a later mailbox of an
      // alias that failed): look for them first. A first attempt has nothing to find.
      const lookFirst = recipient.maybeDelivered || recipient.attempts > 0;
      const headers = traceHeaders(sender, recipient);
      try {
        for (const mailbox of mailboxes) {
          const where = target(mailbox);
          const earlier = lookFirst ? await store.findCopy(where, key) : null;
          if (earlier) {
            log.info({ queueId: message.id, rcpt, file: earlier }, 'already delivered, not writing again');
            continue;
          }
          const file = await store.deliver(
            where,
            key,
            withHeaders(headers, message, transformed, signal),
            signal,
          );
          log.debug({ queueId: message.id, rcpt, file }, 'delivered');
        }
        return { recipient: rcpt, status: 'delivered', reply: reply(250, '2.0.0', 'Delivered') };
      } catch (err) {
        const result = resultForError(rcpt, err);
        log.warn({ queueId: message.id, rcpt, err, status: result.status }, 'maildir delivery failed');
        return result;
      }
    };

    return {
      async route({ recipient, message }) {
        const domain = localDomainOf(recipient.address, domains);
        if (!domain) return proceed();
        const dir = directory();
        let mailboxes: Mailbox[];
        if (dir) {
          const found = directoryMailboxes(await dir.resolve(recipient.address));
          if (found.remote.length > 0) {
            // A route sends a recipient to one transport: forwarding is not maildir's to do.
            if (found.mailboxes.length === 0) return proceed();
            log.warn(
              { queueId: message.id, rcpt: recipient.address.address, remote: found.remote },
              'alias targets outside the local domains are not delivered by maildir',
            );
          }
          mailboxes = found.mailboxes;
        } else {
          const own = ownMailbox(recipient.address, domain, config.recipientDelimiter);
          mailboxes = own ? [own] : [];
        }
        if (mailboxes.length === 0) return deny(550, '5.1.1', 'Mailbox unavailable');
        return routeTo('maildir', { key: routeKey(mailboxes), data: { mailboxes } });
      },

      async deliver({ route, recipients, message, sender, signal }) {
        if (route.transport !== 'maildir') return { kind: 'proceed' };
        const mailboxes = checkMailboxes(route.data.mailboxes);
        const results: RecipientResult[] = [];
        for (const r of recipients)
          results.push(await deliverOne(message, sender, route, r, mailboxes, signal));
        return { kind: 'results', results };
      },
    };
  },
});
