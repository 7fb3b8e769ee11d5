import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

const headerName = z.string().regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name');

export const spamassassinConfig = z
  .object({
    /** Where spamd listens (its `-i` option). */
    host: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).default(783),
    /** The `User:` spamd scans as (per-user preferences); none by default. */
    user: z
      .string()
      .regex(/^[^\r\n]+$/, 'expected one line')
      .optional(),
    /** Total time for one scan: connect, send, spamd's answer. Not reset by each byte. */
    timeout: duration.default(30_000),
    /** Messages larger than this (octets, added headers included) are not scanned: accepted and logged. */
    maxSize: z.number().int().min(1).default(1_048_576),
    /**
     * What a failed scan (spamd down, too slow, an error answer) does: `open` accepts the message
     * (logged at error), `closed` refuses it for now with `451 4.3.0`.
     */
    fail: z.enum(['open', 'closed']).default('open'),
    /** Score from which the message is marked spam (`X-Spam-Status: Yes`). Default: spamd's own `required_score`. */
    tagAbove: z.number().optional(),
    /** Score from which the message is refused (`550 5.7.1`). */
    rejectAbove: z.number().default(15),
    /** The reply text of that refusal. */
    rejectMessage: z
      .string()
      .regex(/^[\x20-\x7e]+$/, 'expected printable ASCII')
      .default('Message looks like spam'),
    /** Sessions from these networks are not scanned. */
    trustedNetworks: z.array(network).default([]),
    /** Authenticated sessions (AUTH) are not scanned. */
    skipAuthenticated: z.boolean().default(false),
    /** The field with `Yes`/`No`, score, threshold and rules. */
    statusHeader: headerName.default('X-Spam-Status'),
    /** The field with the score alone. */
    scoreHeader: headerName.default('X-Spam-Score'),
  })
  .strict();

export type SpamassassinConfig = z.infer<typeof spamassassinConfig>;
