import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

/** A domain name, compared in lower case. */
const domain = z
  .string()
  .regex(/^[A-Za-z0-9.-]+$/, 'expected a domain such as example.com')
  .transform((d) => d.toLowerCase().replace(/\.$/, ''));

/** `user@domain` (that address) or `domain` (every address at it), compared in lower case. */
const recipient = z
  .string()
  .regex(/^([^@\s]+@)?[A-Za-z0-9.-]+$/, 'expected an address (postmaster@example.com) or a domain')
  .transform((r) => r.toLowerCase());

/**
 * The defaults are Postgrey's: a retry is accepted from 5 minutes after the first attempt, for up
 * to 2 days; a triplet that got through is remembered for 35 days after its last use; a client
 * network with 5 triplets through is let in without greylisting.
 */
export const greylistConfig = z
  .object({
    /** How long after the first attempt a retry is accepted. */
    delay: duration.default(300_000),
    /** How long after the first attempt a retry is still accepted; later, it starts over. */
    retryWindow: duration.default(2 * 86_400_000),
    /** How long a triplet that got through is remembered after its last use. */
    expire: duration.default(35 * 86_400_000),
    /**
     * Distinct triplets from one client network that get through (within `expire`) after which the
     * whole network passes without greylisting, for `autoAllowFor`. 0 turns this off.
     */
    autoAllowAfter: z.number().int().min(0).default(5),
    /** How long an auto-allowed network passes, renewed by each message it sends. */
    autoAllowFor: duration.default(35 * 86_400_000),
    /** Prefix length of the client network for IPv4 clients (a sender's pool of outgoing servers). */
    ipv4Prefix: z.number().int().min(8).max(32).default(24),
    /** Prefix length for IPv6 clients: one site usually has a /64. */
    ipv6Prefix: z.number().int().min(16).max(128).default(64),
    /** Clients here are never greylisted. Default: loopback, like the other plugins'. */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
    /** Mail from these sender domains (and their subdomains) is never greylisted. */
    exemptSenderDomains: z.array(domain).default([]),
    /** Recipients never greylisted: an address, or a domain for every address at it. */
    exemptRecipients: z.array(recipient).default([]),
    /**
     * Mail whose MAIL FROM domain publishes SPF that passes for the client (RFC 7208 §2.6.3) is
     * never greylisted. The result is the `mailauth` plugin's (`MailAuthSpf`, set at MAIL): without
     * that plugin, or for a transaction it does not judge, this exemption does not apply.
     */
    exemptSpfPass: z.boolean().default(true),
  })
  .strict()
  .refine((c) => c.retryWindow > c.delay, {
    message: 'retryWindow must be longer than delay',
    path: ['retryWindow'],
  });

export type GreylistConfig = z.output<typeof greylistConfig>;
