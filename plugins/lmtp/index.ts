/**
 * lmtp — delivery to an LMTP server (RFC 2033) such as Dovecot's: one transaction per message
 * and route, a result per recipient from the server's own replies. See README.md.
 */
import {
  definePlugin,
  type PluginApi,
  proceed,
  routeTo,
  Tokens,
  duration,
  type RecipientResult,
  localDomainMap,
  localDomainOf,
} from '../../core/index.js';
import { isAbsolute, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { z } from 'zod';
import {
  describeDestination,
  lmtpTransaction,
  NO_SMTPUTF8,
  type Destination,
  type LmtpReply,
} from './client.js';

export const configSchema = z
  .object({
    /** TCP destination: host name or IP address, with `port`. */
    host: z.string().min(1).optional(),
    port: z.number().int().min(1).max(65535).optional(),
    /** Unix socket destination (e.g. `/run/dovecot/lmtp`); relative to the config file's folder. */
    socket: z.string().min(1).optional(),
    /** Recipient domains delivered here; default: every one of the config's `localDomains`. */
    domains: z
      .array(
        z
          .string()
          .min(1)
          .transform((d) => d.toLowerCase()),
      )
      .optional(),
    /** The name given in LHLO; default: the server's `hostname`. */
    lhloName: z
      .string()
      .regex(/^(?:[A-Za-z0-9.-]+|\[[^\]\s]+\])$/, { message: 'expected a host name or an address literal' })
      .optional(),
    timeouts: z
      .object({
        connect: duration.default(10_000),
        command: duration.default(60_000),
        data: duration.default(60_000),
        /** Per reply after the final dot: the server delivers before it answers. */
        final: duration.default(600_000),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .refine((c) => (c.socket === undefined) !== (c.host === undefined && c.port === undefined), {
    message: 'expected either host and port, or socket',
  })
  .refine((c) => c.socket !== undefined || (c.host !== undefined && c.port !== undefined), {
    message: 'expected both host and port',
  });

export type LmtpConfig = z.output<typeof configSchema>;

/** A recipient's result from its reply: 2xx delivered, 4xx deferred, 5xx failed. */
function result(recipient: string, reply: LmtpReply, remote?: string): RecipientResult {
  const status = reply.code < 300 ? 'delivered' : reply.code < 500 ? 'deferred' : 'failed';
  const text = reply.lines.length === 1 ? reply.lines[0]! : reply.lines;
  const { code, enhanced } = reply;
  return { recipient, status, reply: remote ? { code, enhanced, text, remote } : { code, enhanced, text } };
}

export default definePlugin({
  name: 'lmtp',
  config: configSchema,
  setup(api: PluginApi<LmtpConfig>) {
    const { config, log } = api;
    const destination: Destination =
      config.socket !== undefined
        ? { path: isAbsolute(config.socket) ? config.socket : resolve(api.baseDir, config.socket) }
        : { host: config.host!, port: config.port! };
    const where = describeDestination(destination);
    const domains = localDomainMap(config.domains ?? api.resolve(Tokens.Config).localDomains);
    const lhlo = config.lhloName ?? api.hostname;

    return {
      async route({ recipient }) {
        if (!localDomainOf(recipient.address, domains)) return proceed();
        return routeTo('lmtp', { key: `lmtp:${where}` });
      },

      async deliver({ route, recipients, message, sender, signal }) {
        if (route.transport !== 'lmtp') return { kind: 'proceed' };
        let source: Readable | null = null;
        const outcome = await lmtpTransaction({
          destination,
          lhlo,
          timeouts: config.timeouts,
          signal,
          sender,
          mailParams: message.mailParams,
          size: message.size,
          recipients: recipients.map((r) => r.address),
          // Every transport runs the same transform chain; the peer says what it takes.
          content: (peer) => {
            source = message.stream();
            return api.hooks.transform({ message, route, peer, content: source });
          },
        }).finally(() => (source as Readable | null)?.destroy());
        if (outcome.error)
          log.warn({ queueId: message.id, lmtp: where, err: outcome.error }, 'LMTP transaction failed');
        // Whoever nothing decided is tried again; the client sees generic text, the log the cause.
        const undecided: LmtpReply = outcome.connected
          ? { code: 451, enhanced: '4.4.2', lines: ['Connection to the LMTP server failed'] }
          : { code: 451, enhanced: '4.4.1', lines: ['LMTP server not reachable'] };
        // Only a reply the server sent names it as `remote` (a bounce reports that as the
        // server's own words); what we decided for it does not.
        const results = recipients.map((r, i) => {
          const reply = outcome.replies[i];
          if (!reply) return result(r.address.address, undecided);
          return result(r.address.address, reply, reply === NO_SMTPUTF8 ? undefined : where);
        });
        return { kind: 'results', results };
      },
    };
  },
});
