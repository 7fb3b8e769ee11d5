import { duration } from '../../core/index.js';
import { z } from 'zod';

/** A TLS policy: `none` never asks, `opportunistic` uses STARTTLS when offered, `require` insists and verifies. */
export const tlsPolicy = z.enum(['none', 'opportunistic', 'require']);
export type TlsPolicy = z.output<typeof tlsPolicy>;

const hostName = z
  .string()
  .regex(/^(?:[A-Za-z0-9.-]+|\[[^\]\s]+\])$/, { message: 'expected a host name or an address literal' });

/** Time limits per stage (RFC 5321 §4.5.3.2 and Postfix's defaults). */
export const timeoutsSchema = z
  .object({
    /** Establishing the TCP connection (to one address). */
    connect: duration.default(30_000),
    /** The 220 greeting (RFC 5321 §4.5.3.2.1: 5 minutes). */
    greeting: duration.default(300_000),
    /** The reply to EHLO or HELO. */
    ehlo: duration.default(300_000),
    /** The reply to STARTTLS and the TLS handshake. */
    starttls: duration.default(300_000),
    /** Each reply during AUTH (smarthost). */
    auth: duration.default(300_000),
    /** The reply to MAIL FROM (§4.5.3.2.2: 5 minutes). */
    mail: duration.default(300_000),
    /** Each reply to RCPT TO (§4.5.3.2.3: 5 minutes). */
    rcpt: duration.default(300_000),
    /** The 354 reply to DATA (§4.5.3.2.4: 2 minutes). */
    data: duration.default(120_000),
    /** Each wait for the peer to take more of the message (§4.5.3.2.5: 3 minutes). */
    block: duration.default(180_000),
    /** The reply after the final dot (§4.5.3.2.6: 10 minutes). */
    final: duration.default(600_000),
    /** The reply to RSET before a connection is used again. */
    rset: duration.default(20_000),
    /** The reply to QUIT (the result is known by then; this only bounds the wait). */
    quit: duration.default(5_000),
    /** Waiting for one of a destination's connections when all are busy. */
    wait: duration.default(300_000),
  })
  .strict();

export const smarthostSchema = z
  .object({
    /** Host name or IP address of the relay. */
    host: z.string().min(1),
    port: z.number().int().min(1).max(65535).default(25),
    /** Credentials for AUTH PLAIN or LOGIN, only ever sent over TLS. */
    auth: z
      .object({ user: z.string().min(1), pass: z.string() })
      .strict()
      .optional(),
    /** `require` (default): STARTTLS with a verified certificate for `host`; `opportunistic`: when offered. */
    tls: z.enum(['require', 'opportunistic']).default('require'),
  })
  .strict();

export const configSchema = z
  .object({
    /** The port of remote MX hosts (25; tests use high ports). */
    port: z.number().int().min(1).max(65535).default(25),
    /** The name given in EHLO/HELO; default: the server's `hostname`. */
    heloName: hostName.optional(),
    /** Address families to connect over, in order of preference. */
    addressFamilies: z
      .array(z.enum(['ipv6', 'ipv4']))
      .min(1)
      .default(['ipv6', 'ipv4']),
    /** Addresses tried (over all MX hosts) in one delivery attempt before deferring. */
    maxAddresses: z.number().int().positive().default(10),
    /** Recipients of one message per SMTP transaction; more go in further transactions. */
    maxRecipientsPerTransaction: z.number().int().positive().default(100),
    /** Connections open at once to one destination (a domain, or the smarthost). */
    maxConnectionsPerDestination: z.number().int().positive().default(20),
    /** Messages sent over one connection before it is closed. */
    maxMessagesPerConnection: z.number().int().positive().default(100),
    /** How long an unused connection stays open for the next message to its destination. */
    idleTimeout: duration.default(5_000),
    /** Consecutive attempts that could not reach a destination before it is backed off. */
    backoffAfter: z.number().int().positive().default(3),
    /** How long a backed-off destination's messages are deferred without connecting. */
    backoffTime: duration.default(300_000),
    /**
     * TLS policy per recipient domain; `*` sets the default (`opportunistic`), and a key that
     * starts with a dot (`.bank.test`) covers every subdomain.
     */
    tls: z
      .record(
        z
          .string()
          .min(1)
          .transform((d) => d.toLowerCase()),
        tlsPolicy,
      )
      .default({}),
    /** Extra trusted CA certificates (PEM file) for verified TLS; relative to the config file's folder. */
    tlsCa: z.string().min(1).optional(),
    /**
     * MTA-STS (RFC 8461): fetch and cache each destination domain's policy and apply it. See
     * README.md for the trust anchors of the policy fetch and of MX certificate checks.
     */
    mtaSts: z
      .object({
        enabled: z.boolean().default(true),
        /** Time limit for fetching one policy file over HTTPS. */
        timeout: duration.default(30_000),
      })
      .strict()
      .prefault({}),
    /**
     * DANE (RFC 7672): honour TLSA records the configured DNS servers validated (AD bit). Off by
     * default: it needs a validating resolver on a trusted path (README.md).
     */
    dane: z
      .object({ enabled: z.boolean().default(false) })
      .strict()
      .prefault({}),
    /** Send every remote message to this relay instead of the recipients' MX hosts. */
    smarthost: smarthostSchema.optional(),
    timeouts: timeoutsSchema.prefault({}),
  })
  .strict();

export type OutboundConfig = z.output<typeof configSchema>;
export type OutboundTimeouts = z.output<typeof timeoutsSchema>;
export type Smarthost = z.output<typeof smarthostSchema>;

/** The TLS policy for a recipient domain: exact key, then `.parent` keys, then `*`. */
export function tlsPolicyFor(policies: Readonly<Record<string, TlsPolicy>>, domain: string): TlsPolicy {
  const d = domain.toLowerCase();
  const exact = policies[d];
  if (exact) return exact;
  for (let i = d.indexOf('.'); i !== -1; i = d.indexOf('.', i + 1)) {
    const p = policies[d.slice(i)];
    if (p) return p;
  }
  return policies['*'] ?? 'opportunistic';
}
