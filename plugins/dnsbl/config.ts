import { isIPv4 } from 'node:net';
import { cidrProblem, duration, z } from '../../core/index.js';
import { isRefusalCode } from './codes.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

const zoneName = z
  .string()
  .regex(/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$/, 'expected a DNS zone such as zen.spamhaus.org')
  .transform((z) => z.toLowerCase());

/** A return code: an IPv4 address in 127.0.0.0/8 that is not one of the "refused" codes. */
const listingCode = z.string().superRefine((code, ctx) => {
  if (!isIPv4(code) || !code.startsWith('127.'))
    ctx.addIssue({ code: 'custom', message: `expected a return code in 127.0.0.0/8, got "${code}"` });
  else if (isRefusalCode(code, []))
    ctx.addIssue({
      code: 'custom',
      message: `${code} is how lists say they refuse to answer (127.255.255.x): it cannot mean a listing`,
    });
});

const anyCode = z.string().refine((c) => isIPv4(c), 'expected an IPv4 address such as 127.0.0.255');

/** What every list has, block or allow. */
const listShape = {
  /** The DNS zone queried: `<reversed address>.<zone>` or `<domain>.<zone>`. */
  zone: zoneName,
  /** The name in replies and log lines. Default: the zone. */
  name: z
    .string()
    .regex(/^[\x21-\x7e]+( [\x21-\x7e]+)*$/, 'expected printable text')
    .max(64)
    .optional(),
  /**
   * Return codes that are a listing, each with the reason it means (`127.0.0.2: spam`). Absent:
   * every code in 127.0.0.0/8 is a listing (reason `listed`), except the refused ones.
   */
  codes: z.record(listingCode, z.string().min(1).max(64)).optional(),
  /**
   * Codes this list uses to say it will not answer us, besides 127.255.255.x and anything outside
   * 127.0.0.0/8 (which every list is read with): e.g. `127.0.0.255` for dnswl.org. Never a listing.
   */
  refused: z.array(anyCode).default([]),
};

const blockList = z
  .object({
    ...listShape,
    /** `ip`: the client address (DNSBL); `domain`: names (RHSBL, and URI lists such as SURBL). */
    type: z.enum(['ip', 'domain']).default('ip'),
    /**
     * For a domain list: which names are looked up: the HELO name, the sender domain, and the
     * domains of the URLs in the message body (`body`, judged after DATA; see `body`).
     */
    check: z
      .array(z.enum(['helo', 'sender', 'body']))
      .min(1)
      .default(['helo', 'sender']),
    /** What a listing does. */
    action: z.enum(['reject', 'defer', 'tag', 'ignore']).default('reject'),
    /**
     * Added to the reply text, e.g. a page where the listing is explained; `{subject}` stands for
     * the address or domain that is listed.
     */
    message: z
      .string()
      .regex(/^[\x20-\x7e]*$/, 'expected printable ASCII')
      .max(200)
      .optional(),
  })
  .strict();

const allowList = z.object(listShape).strict();

export const dnsblConfig = z
  .object({
    /** Block lists (DNSBL for addresses, RHSBL for domains). */
    block: z.array(blockList).default([]),
    /** Allow lists of client addresses (DNSWL): a listed client is exempt from every block list. */
    allow: z.array(allowList).default([]),
    /**
     * Where a listing is acted on, at the earliest: `connect` (`554` greeting), `mail`, or `rcpt`
     * (default: `postmaster@` and `abuse@` stay reachable). A HELO name is judged no earlier
     * than HELO, a sender domain no earlier than MAIL.
     */
    applyAt: z.enum(['connect', 'mail', 'rcpt']).default('rcpt'),
    /** Local parts accepted at RCPT from a listed client (RFC 5321 §4.5.1, RFC 2142). */
    reachable: z
      .array(z.string().min(1).max(64))
      .default(['postmaster', 'abuse'])
      .transform((a) => a.map((l) => l.toLowerCase())),
    /** Clients here are not looked up. Default: loopback, like the relay plugin's. */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
    /** Time for the lookups of one step (connect, HELO, MAIL, the body's domains); a list that has not answered fails open. */
    timeout: duration.default(5000),
    /** Answers kept in the State service: the answer's TTL within [minTtl, maxTtl]; NXDOMAIN for negativeTtl. */
    cache: z
      .object({
        minTtl: duration.default(60_000),
        maxTtl: duration.default(3_600_000),
        negativeTtl: duration.default(300_000),
      })
      .strict()
      .default({ minTtl: 60_000, maxTtl: 3_600_000, negativeTtl: 300_000 }),
    /** How the message body is read for the domain lists with `check: [body]`. */
    body: z
      .object({
        /** Messages larger than this (octets as received) are not scanned, and logged so. */
        maxSize: z.number().int().positive().default(1_048_576),
        /**
         * Distinct domains looked up per message (each in every body list); reading stops at the
         * limit. SpamAssassin's `uridnsbl_max_domains` is 20 too.
         */
        maxDomains: z.number().int().min(1).max(1000).default(20),
        /**
         * The name looked up for a URL's host: `registered`, the registered domain by the Public
         * Suffix List (`www.shop.example.co.uk` → `example.co.uk`: what SURBL, URIBL and Spamhaus
         * DBL expect), or `host`, the host as it is.
         */
        lookup: z.enum(['registered', 'host']).default('registered'),
      })
      .strict()
      .default({ maxSize: 1_048_576, maxDomains: 20, lookup: 'registered' }),
    /** The field `tag` adds. */
    tagHeader: z
      .string()
      .regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name')
      .default('X-DNSBL'),
  })
  .strict()
  .superRefine((c, ctx) => {
    // Results name their list; two lists of one name could not be told apart in replies or logs.
    const seen = new Set<string>();
    for (const [kind, lists] of [
      ['block', c.block],
      ['allow', c.allow],
    ] as const)
      lists.forEach((l, i) => {
        const name = l.name ?? l.zone;
        if (seen.has(name))
          ctx.addIssue({
            code: 'custom',
            path: [kind, i, l.name ? 'name' : 'zone'],
            message: `another list is already called "${name}": give this one its own name`,
          });
        seen.add(name);
      });
  });

export type DnsblConfig = z.output<typeof dnsblConfig>;
export type BlockListConfig = DnsblConfig['block'][number];
export type AllowListConfig = DnsblConfig['allow'][number];
