import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

/** `reject` 550 5.7.1, `defer` 451 4.7.1, `tag` a header field, `ignore` a log line only. */
const action = z.enum(['reject', 'defer', 'tag', 'ignore']);

/** The default action of each finding: conservative, refusing only what no real server sends. */
export const DEFAULT_ACTIONS = {
  'fcrdns-fail': 'tag',
  'fcrdns-temperror': 'ignore',
  'helo-invalid': 'reject',
  'helo-bare-ip': 'tag',
  'helo-ours': 'reject',
  'helo-literal-mismatch': 'tag',
  'helo-no-dot': 'ignore',
} as const;

export const hygieneConfig = z
  .object({
    /** What each finding does; the most severe action of a decision's findings wins. */
    actions: z
      .object({
        'fcrdns-fail': action.default(DEFAULT_ACTIONS['fcrdns-fail']),
        'fcrdns-temperror': action.default(DEFAULT_ACTIONS['fcrdns-temperror']),
        'helo-invalid': action.default(DEFAULT_ACTIONS['helo-invalid']),
        'helo-bare-ip': action.default(DEFAULT_ACTIONS['helo-bare-ip']),
        'helo-ours': action.default(DEFAULT_ACTIONS['helo-ours']),
        'helo-literal-mismatch': action.default(DEFAULT_ACTIONS['helo-literal-mismatch']),
        'helo-no-dot': action.default(DEFAULT_ACTIONS['helo-no-dot']),
      })
      .strict()
      .default(DEFAULT_ACTIONS),
    /**
     * Where the findings are acted on: `helo`, `mail` or `rcpt` (default: `postmaster@` stays
     * reachable, RFC 5321 §4.5.1).
     */
    applyAt: z.enum(['helo', 'mail', 'rcpt']).default('rcpt'),
    /** Local parts accepted at RCPT from a client that would be refused (RFC 5321 §4.5.1, RFC 2142). */
    reachable: z
      .array(z.string().min(1).max(64))
      .default(['postmaster', 'abuse'])
      .transform((a) => a.map((l) => l.toLowerCase())),
    /** Clients here are not checked. Default: loopback, like the relay plugin's. */
    trustedNetworks: z.array(network).default(['127.0.0.0/8', '::1/128']),
    /** Time for the whole FCrDNS check (PTR, then A/AAAA); what has not answered is a temperror. */
    timeout: duration.default(5000),
    /** The field `tag` adds. */
    tagHeader: z
      .string()
      .regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name')
      .default('X-Hygiene'),
  })
  .strict();

export type HygieneConfig = z.output<typeof hygieneConfig>;
export type Action = z.output<typeof action>;
