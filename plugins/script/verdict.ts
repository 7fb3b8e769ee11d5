import { accept, defer, deny, proceed, z, type Verdict } from '../../core/index.js';

/**
 * What a script returns, checked in Petrel's process (never trusted as it arrives): one of the
 * words `'continue'`, `'accept'`, `'reject'`, `'defer'`, or an object with that `action` and,
 * for `reject` and `defer`, an optional reply.
 */
export const ACTIONS = ['continue', 'accept', 'reject', 'defer'] as const;
export type Action = (typeof ACTIONS)[number];

/** Reply text goes on the wire: one line of printable ASCII, so it cannot inject a reply. */
const replyText = z
  .string()
  .min(1)
  .max(200)
  .regex(/^[\x20-\x7e]+$/, { message: 'expected one line of printable ASCII' });

const replyFields = {
  code: z.number().int().optional(),
  enhanced: z
    .string()
    .regex(/^[45]\.\d{1,3}\.\d{1,3}$/, { message: 'expected an enhanced status code like 5.7.1' })
    .optional(),
  text: replyText.optional(),
};

/** Codes a script may choose: RFC 5321 §4.2.2 policy replies, permanent and temporary. */
const RANGES = { reject: [550, 559], defer: [450, 459] } as const;
const DEFAULTS = {
  reject: { code: 550, enhanced: '5.7.1', text: 'Message refused by policy' },
  defer: { code: 451, enhanced: '4.7.1', text: 'Try again later' },
} as const;

export interface ScriptDecision {
  readonly action: Action;
  readonly code?: number;
  readonly enhanced?: string;
  readonly text?: string;
}

function checkReply(d: ScriptDecision, ctx: z.RefinementCtx): void {
  if (d.action === 'continue' || d.action === 'accept') {
    if (d.code !== undefined || d.enhanced !== undefined || d.text !== undefined)
      ctx.addIssue({ code: 'custom', message: `"${d.action}" takes no code, enhanced or text` });
    return;
  }
  const [lo, hi] = RANGES[d.action];
  if (d.code !== undefined && (d.code < lo || d.code > hi))
    ctx.addIssue({ code: 'custom', message: `"${d.action}" needs a code from ${lo} to ${hi}` });
  const cls = d.action === 'reject' ? '5' : '4';
  if (d.enhanced !== undefined && d.enhanced[0] !== cls)
    ctx.addIssue({ code: 'custom', message: `"${d.action}" needs an enhanced code of class ${cls}` });
}

/** A script's result: the words alone, or an object. */
export const scriptDecision = z
  .union([
    z.enum(ACTIONS).transform((action): ScriptDecision => ({ action })),
    z.object({ action: z.enum(ACTIONS), ...replyFields }).strict(),
  ])
  .superRefine(checkReply);

/** The verdict Petrel gives when a script fails (config `onFailure`): a reject or a defer. */
export const failureDecision = z
  .object({ action: z.enum(['reject', 'defer']), ...replyFields })
  .strict()
  .superRefine(checkReply);

/** Turns a checked decision into a Petrel verdict, filling in the reply defaults. */
export function toVerdict(d: ScriptDecision): Verdict {
  switch (d.action) {
    case 'continue':
      return proceed();
    case 'accept':
      return accept();
    case 'reject': {
      const r = DEFAULTS.reject;
      return deny(d.code ?? r.code, d.enhanced ?? r.enhanced, d.text ?? r.text);
    }
    case 'defer': {
      const r = DEFAULTS.defer;
      return defer(d.code ?? r.code, d.enhanced ?? r.enhanced, d.text ?? r.text);
    }
  }
}
