import { domainToASCII } from 'node:url';
import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

/** At most `max` events within any `per` (a sliding window: the last `per` before now). */
const rate = z
  .object({ max: z.number().int().min(1), per: duration.refine((ms) => ms >= 1000, 'at least 1s') })
  .strict();

export type Rate = z.infer<typeof rate>;

/** A destination domain as written in the config, kept as its lower-case A-label. */
const domainName = z.string().transform((s, ctx) => {
  const ascii = domainToASCII(s.trim().replace(/\.$/, '')).toLowerCase();
  if (!ascii || !ascii.includes('.') || ascii.length > 253) {
    ctx.addIssue({ code: 'custom', message: `"${s}" is not a domain name` });
    return z.NEVER;
  }
  return ascii;
});

/**
 * One outbound rate: at most `max` deliveries within any `per` to the recipients of these
 * domains, counted together (one provider's several domains share one rate).
 */
const outboundRate = z
  .object({
    domains: z.array(domainName).min(1),
    max: z.number().int().min(1),
    per: duration.refine((ms) => ms >= 1000, 'at least 1s'),
  })
  .strict()
  .superRefine((r, ctx) => {
    if (new Set(r.domains).size !== r.domains.length)
      ctx.addIssue({ code: 'custom', path: ['domains'], message: 'a domain is listed twice' });
  });

export type OutboundRate = z.infer<typeof outboundRate>;

export const limitConfig = z
  .object({
    /** Clients here are not limited at all. Default: loopback, like the relay plugin's. */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
    /**
     * What "one client" is for every per-client limit: the address's network of this prefix
     * length. IPv6 defaults to /64, since one host usually holds a whole /64 and could step
     * through it; IPv4 to the address itself. `{ ipv4: 24 }` counts a /24 as one client.
     */
    clientPrefix: z
      .object({
        ipv4: z.number().int().min(8).max(32).default(32),
        ipv6: z.number().int().min(16).max(128).default(64),
      })
      .strict()
      .default({ ipv4: 32, ipv6: 64 }),
    /** New connections per client: checked at connect, `421` and closed above it. */
    connections: rate.optional(),
    /**
     * Connections one client holds open at once, counted over every worker and machine sharing
     * the State store: `421` and closed above it. `lease` bounds how long a connection counts
     * without being seen (it is renewed at each command a hook sees): the count of a worker that
     * died comes back down by itself after it.
     */
    concurrency: z
      .object({
        max: z.number().int().min(1),
        lease: duration.refine((ms) => ms >= 1000, 'at least 1s').default(600_000),
      })
      .strict()
      .optional(),
    /** Messages (counted at MAIL FROM): `451 4.7.1` above a limit. */
    messages: z
      .object({
        perClient: rate.optional(),
        /** Per authenticated user, whatever address they connect from. */
        perUser: rate.optional(),
        /** Per envelope sender domain (the null sender `<>` is not counted). */
        perSenderDomain: rate.optional(),
      })
      .strict()
      .default({}),
    /** Recipients (counted at RCPT TO). */
    recipients: z
      .object({
        /** Recipients in one message: `452 4.5.3` above it (RFC 5321 §4.5.3.1.10). */
        perMessage: z.number().int().min(1).optional(),
        perClient: rate.optional(),
        perUser: rate.optional(),
      })
      .strict()
      .default({}),
    /**
     * Outbound throttling: deliveries to these domains over the rate are postponed in the queue
     * (no attempt counted, no delay notice) until the rate has room. A domain may be in one
     * entry only.
     */
    outbound: z.array(outboundRate).default([]),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.outbound.forEach((r, i) => {
      for (const d of r.domains) {
        if (seen.has(d))
          ctx.addIssue({
            code: 'custom',
            path: ['outbound', i, 'domains'],
            message: `${d} is in another outbound entry already`,
          });
        seen.add(d);
      }
    });
  });

export type LimitConfig = z.infer<typeof limitConfig>;
