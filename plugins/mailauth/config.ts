import { cidrProblem, duration, z } from '../../core/index.js';

const action = z.enum(['reject', 'defer', 'quarantine', 'tag', 'ignore']);

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

/** An object of actions with per-key defaults, itself defaulting to those defaults. */
function actions<K extends string>(defaults: Record<K, z.infer<typeof action>>) {
  const shape = Object.fromEntries(Object.entries(defaults).map(([k, v]) => [k, action.default(v as never)]));
  return z
    .object(shape as { [P in K]: z.ZodDefault<typeof action> })
    .strict()
    .default(defaults as never);
}

export const mailauthConfig = z
  .object({
    /** The authserv-id of `Authentication-Results` (RFC 8601 §2.5). Default: the server's hostname. */
    authservId: z
      .string()
      .regex(/^[A-Za-z0-9.-]+$/, 'expected a host name such as mx.example.com')
      .optional(),
    /**
     * Clients here are not judged, and their `Authentication-Results` fields are kept: another
     * part of this mail system (a filter host) may have added them. Default: loopback, like the
     * relay plugin's.
     */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
    /** The field `tag` adds. */
    tagHeader: z
      .string()
      .regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name')
      .default('X-Mailauth-Warning'),
    /**
     * mailauth's strict mode: every check follows its RFC to the letter (a DKIM body hash
     * mismatch is `fail`, not `neutral`; rsa-sha1 signatures are `policy`, RFC 8301).
     */
    strict: z.boolean().default(false),
    /** DNS queries a message may cost after DATA (DKIM keys, ARC keys, the DMARC tree walk). */
    maxLookups: z.number().int().min(1).max(1000).default(30),
    /**
     * Time for one SPF evaluation before it is `temperror` (RFC 7208 §4.6.4: at least 20 s). The
     * MAIL FROM and HELO checks run side by side.
     */
    spfTimeout: duration.default(20_000),
    /** Time after DATA in which the DNS queries of one message may start; later ones are `temperror`. */
    lookupTimeout: duration.default(15_000),
    /** SPF of the MAIL FROM identity (RFC 7208 §8): applied at RCPT. */
    spf: actions({
      fail: 'reject',
      softfail: 'tag',
      neutral: 'ignore',
      none: 'ignore',
      temperror: 'defer',
      permerror: 'tag',
    }),
    /** Each DKIM signature (RFC 6376 §6.3: a failed signature is as no signature; DMARC decides). */
    dkim: actions({
      fail: 'ignore',
      neutral: 'ignore',
      policy: 'ignore',
      temperror: 'ignore',
      permerror: 'ignore',
    }),
    /**
     * DMARC: `reject`, `quarantine` and `none` are for a failing message, by the policy the
     * domain asks for (RFC 7489 §6.3); the others are for a DMARC evaluation that went wrong.
     */
    dmarc: actions({
      reject: 'reject',
      quarantine: 'quarantine',
      none: 'ignore',
      temperror: 'defer',
      permerror: 'ignore',
    }),
    /** ARC chain validation (RFC 8617 §5.2). */
    arc: actions({ fail: 'ignore' }),
    /**
     * ARC sealing of forwarded mail (RFC 8617 §5.1): a message judged here on arrival that leaves
     * through one of `transports` gets an ARC set signed with this key. Off when absent.
     */
    arcSeal: z
      .object({
        /** The signing domain (`d=`): a domain of ours with the public key at `<selector>._domainkey`. */
        domain: z
          .string()
          .regex(/^[A-Za-z0-9.-]+$/, 'expected a domain name')
          .transform((d) => d.toLowerCase()),
        selector: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'expected a selector such as arc2026'),
        /** The RSA private key (PEM), relative to the config file's folder. */
        keyFile: z.string().min(1),
        /** Deliveries through these transports are sealed: the ones that hand mail to other servers. */
        transports: z.array(z.string().min(1)).default(['outbound']),
        /** Octets of a message held in memory while it is sealed; the rest waits in a temporary file. */
        memoryLimit: z.number().int().min(65_536).default(1_048_576),
        /** Where that temporary file is made (unlinked at once). Default: the system's temporary folder. */
        tempDir: z.string().min(1).optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

export type MailauthConfig = z.output<typeof mailauthConfig>;
export type Action = z.infer<typeof action>;
