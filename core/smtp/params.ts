import type { MailParams, RecipientParams } from '../hooks/catalogue.js';

export type ParamResult<T> =
  { ok: true; value: T } | { ok: false; code: number; enhanced: string; text: string };

/** RFC 3461 §4: xtext, where `+XX` is a hex-encoded octet. */
export function decodeXtext(s: string): string | null {
  if (!/^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$/.test(s)) return null;
  return Buffer.from(
    s.replace(/\+([0-9A-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16))),
    'latin1',
  ).toString('utf8');
}

function splitParams(text: string): { key: string; value: string | null }[] | null {
  if (!text) return [];
  const out: { key: string; value: string | null }[] = [];
  for (const part of text.split(/ +/)) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const key = (eq < 0 ? part : part.slice(0, eq)).toUpperCase();
    if (!/^[A-Z0-9][A-Z0-9-]*$/.test(key)) return null;
    out.push({ key, value: eq < 0 ? null : part.slice(eq + 1) });
  }
  return out;
}

/**
 * Tracks which parameters a command has named. RFC 5321 §4.1.2 gives no rule for a parameter
 * named twice; a repeat with the same value changes nothing and is accepted, as Postfix and
 * Haraka do (Python's smtplib sends `SMTPUTF8` twice when the caller asked for it and the
 * message needs it too). A repeat with another value is a contradiction and is refused.
 * Keyword values (BODY, RET, NOTIFY) compare without case, like the keywords themselves.
 */
class SeenParams {
  readonly #values = new Map<string, string | null>();
  readonly #keywordValued: ReadonlySet<string>;
  constructor(keywordValued: ReadonlySet<string>) {
    this.#keywordValued = keywordValued;
  }

  /** 'new' the first time, 'same' for a harmless repeat, 'conflict' for a contradicting one. */
  check(key: string, value: string | null): 'new' | 'same' | 'conflict' {
    const v = value !== null && this.#keywordValued.has(key) ? value.toUpperCase() : value;
    if (!this.#values.has(key)) {
      this.#values.set(key, v);
      return 'new';
    }
    return this.#values.get(key) === v ? 'same' : 'conflict';
  }
}

const MAIL_KEYWORD_VALUED = new Set(['BODY', 'RET']);
const RCPT_KEYWORD_VALUED = new Set(['NOTIFY']);

const bad = (
  text: string,
  code = 501,
  enhanced = '5.5.4',
): { ok: false; code: number; enhanced: string; text: string } => ({
  ok: false,
  code,
  enhanced,
  text,
});

export function parseMailParams(
  text: string,
  opts: { maxSize: number; utf8Offered: boolean },
): ParamResult<MailParams> {
  const parts = splitParams(text);
  if (!parts) return bad('Syntax error in parameters');
  let size: number | undefined;
  let body: MailParams['body'];
  let smtputf8 = false;
  let ret: MailParams['ret'];
  let envid: string | undefined;
  let auth: string | undefined;
  const seen = new SeenParams(MAIL_KEYWORD_VALUED);
  for (const { key, value } of parts) {
    const repeat = seen.check(key, value);
    if (repeat === 'conflict') return bad(`Duplicate parameter ${key}`);
    if (repeat === 'same') continue;
    switch (key) {
      case 'SIZE': {
        if (value === null || !/^\d{1,20}$/.test(value)) return bad('SIZE needs a number of octets');
        size = Number(value);
        // RFC 1870 §6.2: a declared size over the limit is refused at MAIL.
        if (size > opts.maxSize) return bad('Message size exceeds fixed maximum message size', 552, '5.3.4');
        break;
      }
      case 'BODY': {
        const v = value?.toUpperCase();
        if (v === '7BIT' || v === '8BITMIME') body = v;
        else if (v === 'BINARYMIME') return bad('BINARYMIME is not supported', 555, '5.5.4');
        else return bad('BODY must be 7BIT or 8BITMIME');
        break;
      }
      case 'SMTPUTF8':
        if (value !== null) return bad('SMTPUTF8 takes no value');
        if (!opts.utf8Offered) return bad('SMTPUTF8 was not offered', 555, '5.5.4');
        smtputf8 = true;
        break;
      case 'RET': {
        const v = value?.toUpperCase();
        if (v !== 'FULL' && v !== 'HDRS') return bad('RET must be FULL or HDRS');
        ret = v;
        break;
      }
      case 'ENVID': {
        const decoded = value === null ? null : decodeXtext(value);
        if (decoded === null || value!.length > 100)
          return bad('ENVID must be xtext of at most 100 characters');
        envid = decoded;
        break;
      }
      case 'AUTH': {
        const decoded = value === null ? null : value === '<>' ? '<>' : decodeXtext(value);
        if (decoded === null) return bad('AUTH must be xtext or <>');
        auth = decoded;
        break;
      }
      default:
        return bad(`Unsupported parameter ${key}`, 555, '5.5.4');
    }
  }
  return { ok: true, value: { size, body, smtputf8, ret, envid, auth } };
}

const NOTIFY_VALUES = new Set(['NEVER', 'SUCCESS', 'FAILURE', 'DELAY']);

export function parseRcptParams(text: string): ParamResult<RecipientParams> {
  const parts = splitParams(text);
  if (!parts) return bad('Syntax error in parameters');
  let notify: RecipientParams['notify'];
  let orcpt: RecipientParams['orcpt'];
  const seen = new SeenParams(RCPT_KEYWORD_VALUED);
  for (const { key, value } of parts) {
    const repeat = seen.check(key, value);
    if (repeat === 'conflict') return bad(`Duplicate parameter ${key}`);
    if (repeat === 'same') continue;
    switch (key) {
      case 'NOTIFY': {
        const list = (value ?? '').toUpperCase().split(',');
        // RFC 3461 §4.1: NEVER stands alone; otherwise any of SUCCESS, FAILURE, DELAY.
        if (!list.every((v) => NOTIFY_VALUES.has(v)) || (list.includes('NEVER') && list.length > 1)) {
          return bad('NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY');
        }
        notify = list as ('NEVER' | 'SUCCESS' | 'FAILURE' | 'DELAY')[];
        break;
      }
      case 'ORCPT': {
        const semi = value?.indexOf(';') ?? -1;
        const decoded = semi > 0 ? decodeXtext(value!.slice(semi + 1)) : null;
        if (!decoded || value!.length > 500) return bad('ORCPT must be addr-type;xtext');
        orcpt = { type: value!.slice(0, semi).toLowerCase(), address: decoded };
        break;
      }
      default:
        return bad(`Unsupported parameter ${key}`, 555, '5.5.4');
    }
  }
  return { ok: true, value: { notify, orcpt } };
}
