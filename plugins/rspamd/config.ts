import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

const headerName = z.string().regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name');
const replyText = z.string().regex(/^[\x20-\x7e]+$/, 'expected printable ASCII');

/** What the plugin does for an rspamd action. */
export const verdict = z.enum(['reject', 'defer', 'quarantine', 'rewrite-subject', 'add-header', 'accept']);
export type RspamdVerdict = z.infer<typeof verdict>;

/** rspamd's six standard actions (and `quarantine`, which an rspamd config may define). */
export const DEFAULT_ACTIONS: Readonly<Record<string, RspamdVerdict>> = {
  reject: 'reject',
  'soft reject': 'defer',
  'rewrite subject': 'rewrite-subject',
  'add header': 'add-header',
  greylist: 'defer',
  'no action': 'accept',
  quarantine: 'quarantine',
};

export const rspamdConfig = z
  .object({
    /** rspamd's normal worker (its `bind_socket`, port 11333 by default); `/checkv2` is asked there. */
    url: z.url().default('http://127.0.0.1:11333'),
    /** Sent as rspamd's `Password` header, when the worker wants one. */
    password: z
      .string()
      .regex(/^[^\r\n]+$/, 'expected one line')
      .optional(),
    /** Total time for one scan: connect, send, rspamd's answer. Not reset by each byte. */
    timeout: duration.default(30_000),
    /** Messages larger than this (octets, added headers included) are not scanned: accepted and logged. */
    maxSize: z.number().int().min(1).default(1_048_576),
    /**
     * What a failed scan (rspamd down, too slow, an error answer) does: `open` accepts the message
     * (logged at error), `closed` refuses it for now with `451 4.3.0`.
     */
    fail: z.enum(['open', 'closed']).default('open'),
    /**
     * rspamd's action → what is done, merged over the defaults (`reject` → reject, `soft reject`
     * and `greylist` → defer, `rewrite subject`, `add header`, `no action` → accept,
     * `quarantine` → quarantine). An action not in the map is accepted, with a warning.
     */
    actions: z.record(z.string(), verdict).default({}),
    /** The text of the `550 5.7.1` refusal. */
    rejectMessage: replyText.default('Message looks like spam'),
    /** The text of the `451 4.7.1` deferral (`soft reject`, `greylist`). */
    deferMessage: replyText.default('Try again later'),
    /** The field `add-header` adds, and its value. */
    spamHeader: z
      .object({ name: headerName, value: z.string().regex(/^[\x20-\x7e]+$/, 'expected printable ASCII') })
      .strict()
      .default({ name: 'X-Spam', value: 'Yes' }),
    /** Put before the Subject by `rewrite-subject` when rspamd does not say what the new subject is. */
    subjectPrefix: z.string().default('***SPAM*** '),
    /** The field with rspamd's action, score, required score and symbols. */
    resultHeader: headerName.default('X-Spamd-Result'),
    /** The field with the score alone. */
    scoreHeader: headerName.default('X-Rspamd-Score'),
    /** Sessions from these networks are not scanned. */
    trustedNetworks: z.array(network).default([]),
    /** Authenticated sessions (AUTH) are not scanned. */
    skipAuthenticated: z.boolean().default(false),
  })
  .strict();

export type RspamdConfig = z.infer<typeof rspamdConfig>;
