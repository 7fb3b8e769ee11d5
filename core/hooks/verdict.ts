import type { Address } from '../message/address.js';
import type { Postponement } from './catalogue.js';
/**
 * Verdicts are what a hook decides. The engine alone turns a verdict into a wire reply,
 * so a plugin never writes to the socket and never chooses the reply's shape.
 */

/** A reply a plugin may choose: basic code, RFC 3463 enhanced code, and text (one or more lines). */
export interface ReplySpec {
  readonly code: number;
  readonly enhanced: string;
  readonly text: string | readonly string[];
}

export type Verdict =
  | { readonly kind: 'proceed' }
  | { readonly kind: 'accept'; readonly reply?: Partial<ReplySpec> }
  | { readonly kind: 'deny'; readonly reply: ReplySpec }
  | { readonly kind: 'defer'; readonly reply: ReplySpec }
  | { readonly kind: 'disconnect'; readonly reply?: ReplySpec };

export type VerdictKind = Verdict['kind'];

const ENHANCED = /^[245]\.\d{1,3}\.\d{1,3}$/;

function checkReply(kind: string, lo: number, code: number, enhanced: string): void {
  if (!Number.isInteger(code) || code < lo || code > lo + 99) {
    throw new RangeError(`${kind}() needs a ${lo / 100}xx code, got ${code}`);
  }
  if (!ENHANCED.test(enhanced) || enhanced[0] !== String(code)[0]) {
    throw new RangeError(
      `${kind}() needs an enhanced code of class ${lo / 100} (like ${lo / 100}.0.0), got "${enhanced}"`,
    );
  }
}

/** Not my decision: the next plugin in config order is asked. */
export function proceed(): { readonly kind: 'proceed' } {
  return PROCEED;
}
const PROCEED = Object.freeze({ kind: 'proceed' } as const);

/** Decide yes. The rest of the chain is skipped. Code and text default per hook (250 2.x.x Ok). */
export function accept(reply?: Partial<ReplySpec>): Verdict {
  if (reply?.code !== undefined && (reply.code < 200 || reply.code > 399)) {
    throw new RangeError(`accept() needs a 2xx or 3xx code, got ${reply.code}`);
  }
  return reply ? { kind: 'accept', reply } : ACCEPT;
}
const ACCEPT: Verdict = Object.freeze({ kind: 'accept' });

/** Refuse permanently with a 5xx reply, e.g. `deny(550, '5.7.1', 'Relaying denied')`. */
export function deny(code = 550, enhanced = '5.0.0', text: string | readonly string[] = 'Denied'): Verdict {
  checkReply('deny', 500, code, enhanced);
  return { kind: 'deny', reply: { code, enhanced, text } };
}

/** Refuse for now with a 4xx reply; the client should try again later. */
export function defer(
  code = 451,
  enhanced = '4.0.0',
  text: string | readonly string[] = 'Try again later',
): Verdict {
  checkReply('defer', 400, code, enhanced);
  return { kind: 'defer', reply: { code, enhanced, text } };
}

/** Reply (421 4.7.0 by default) and close the connection. */
export function disconnect(
  code = 421,
  enhanced = '4.7.0',
  text: string | readonly string[] = 'Closing connection',
): Verdict {
  if (!Number.isInteger(code) || code < 400 || code > 599) {
    throw new RangeError(`disconnect() needs a 4xx or 5xx code, got ${code}`);
  }
  if (!ENHANCED.test(enhanced) || enhanced[0] !== String(code)[0]) {
    throw new RangeError(`disconnect() needs an enhanced code matching ${code}, got "${enhanced}"`);
  }
  return { kind: 'disconnect', reply: { code, enhanced, text } };
}

export function isDecisive(v: Verdict): boolean {
  return v.kind !== 'proceed';
}

export function isVerdict(v: unknown): v is Verdict {
  if (typeof v !== 'object' || v === null) return false;
  const kind = (v as { kind?: unknown }).kind;
  return (
    kind === 'proceed' || kind === 'accept' || kind === 'deny' || kind === 'defer' || kind === 'disconnect'
  );
}

/**
 * An answer for the `expand` hook: the recipient stands for these addresses (each with the
 * envelope sender to use for it, when that is not the message's own).
 */
export function expandTo(
  targets: readonly { readonly address: Address; readonly sender?: Address | null }[],
): { readonly kind: 'expand'; readonly targets: readonly { address: Address; sender?: Address | null }[] } {
  if (!Array.isArray(targets) || targets.length === 0)
    throw new TypeError('expandTo() needs at least one target');
  return { kind: 'expand', targets: targets.map((t) => ({ ...t })) };
}

/** A route decision for the `route` hook: deliver this recipient with `transport`. */
export function routeTo(
  transport: string,
  opts: { key?: string; data?: Record<string, unknown> } = {},
): {
  readonly kind: 'route';
  readonly route: { transport: string; key: string; data: Record<string, unknown> };
} {
  if (!/^[a-z0-9][a-z0-9-]*$/.test(transport))
    throw new TypeError(`routeTo(): bad transport name "${transport}"`);
  return { kind: 'route', route: { transport, key: opts.key ?? transport, data: opts.data ?? {} } };
}

/**
 * An answer for the `deliver` hook: do not deliver now, try again at `until` (a `Date` or epoch
 * milliseconds), for `reason`. No attempt is counted and no delay notice sent (see `Postponement`).
 */
export function postpone(until: Date | number, reason: string): Postponement {
  const at = new Date(until);
  if (Number.isNaN(at.getTime())) throw new RangeError('postpone() needs a valid time');
  if (typeof reason !== 'string' || !reason.trim()) throw new TypeError('postpone() needs a reason');
  return { kind: 'postpone', until: at, reason };
}
