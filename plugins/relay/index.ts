import { domainToASCII } from 'node:url';
import {
  accept,
  cidrProblem,
  compileCidrs,
  definePlugin,
  deny,
  proceed,
  Tokens,
  z,
} from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

export const relayConfigSchema = z
  .object({
    /** Clients in these networks may send to any domain without AUTH. */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
  })
  .strict();

function ascii(domain: string): string {
  return (/[^\x00-\x7f]/.test(domain) ? domainToASCII(domain) : '') || domain.toLowerCase();
}

/**
 * relay — who may send to a domain that is not ours. A recipient in `localDomains` is not this
 * plugin's business (the users plugin decides whether the mailbox exists); any other recipient
 * is accepted only from an authenticated client or a trusted network, else `554 5.7.1`.
 *
 * The engine has already parsed the address: the domain is the one after the last `@` (a
 * quoted local part cannot hide one), lower-cased; a source route (`@a,@b:`) is dropped. So
 * `user%remote@ours` and `remote!user@ours` are local recipients (and unknown users), and
 * `@ours:user@remote` is a remote one.
 */
export default definePlugin({
  name: 'relay',
  config: relayConfigSchema,
  setup({ config, log, resolve }) {
    const local = new Set(resolve(Tokens.Config).localDomains.map(ascii));
    const trusted = compileCidrs(config.trustedNetworks);
    return {
      async rcpt({ session, recipient }) {
        // `<postmaster>` without a domain (RFC 5321 §4.5.1) is addressed to this server.
        if (recipient.domain === '') return proceed();
        if (!recipient.literal && local.has(recipient.domainAscii)) return proceed();
        if (session.user !== null || trusted(session.remote.address)) return accept();
        log.info(
          { session: session.id, remote: session.remote.address, rcpt: recipient.address },
          'relay refused',
        );
        return deny(554, '5.7.1', 'Relaying denied');
      },
    };
  },
});
