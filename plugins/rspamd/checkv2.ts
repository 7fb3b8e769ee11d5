import { request } from 'node:http';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { RspamdSymbol } from './api.js';

/** rspamd's answer to `/checkv2`, the parts used here. */
export interface CheckAnswer {
  readonly action: string;
  readonly score: number;
  readonly required: number;
  readonly symbols: RspamdSymbol[];
  /** The new Subject, for `rewrite subject`. */
  readonly subject: string | null;
  readonly smtpMessage: string | null;
}

/** The answer is JSON with one entry per matched symbol: a few KB; this is far more. */
const MAX_ANSWER = 1024 * 1024;

/**
 * Header values go out as octets: an internationalised address (RFC 6531) is sent as its UTF-8
 * bytes, which is what rspamd reads, rather than refused by node:http.
 */
const octets = (v: string): string => Buffer.from(v, 'utf8').toString('latin1');

/**
 * One `POST /checkv2` to rspamd's normal worker: the envelope in request headers (`IP`, `Helo`,
 * `From`, one `Rcpt` per recipient, `Queue-Id`, `User`), the message as the body, streamed with
 * back-pressure under a `Content-Length` of `size` octets (rspamd needs no chunked decoding then).
 */
export async function checkv2(opts: {
  url: string;
  headers: Record<string, string | string[]>;
  message: Readable;
  size: number;
  signal: AbortSignal;
}): Promise<CheckAnswer> {
  const target = new URL('/checkv2', opts.url);
  const headers: Record<string, string | string[]> = { 'Content-Length': String(opts.size) };
  for (const [k, v] of Object.entries(opts.headers))
    headers[k] = Array.isArray(v) ? v.map(octets) : octets(v);
  const req = request(target, { method: 'POST', headers, signal: opts.signal });
  const response = new Promise<{ status: number; body: string }>((resolve, reject) => {
    req.on('error', reject);
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      let length = 0;
      res.on('data', (c: Buffer) => {
        length += c.length;
        if (length > MAX_ANSWER) req.destroy(new Error('rspamd: answer too long'));
        else chunks.push(c);
      });
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }),
      );
      res.on('error', reject);
    });
  });
  response.catch(() => undefined); // awaited below; a failure while sending must not go unhandled
  try {
    // node:http refuses a body longer than Content-Length, and a shorter one leaves rspamd waiting
    // until the timeout: the size given must be exact.
    await pipeline(opts.message, req);
    const { status, body } = await response;
    if (status !== 200) throw new Error(`rspamd: HTTP ${status} ${body.slice(0, 200)}`);
    return parseAnswer(body);
  } finally {
    req.destroy();
    opts.message.destroy();
  }
}

/** Reads the parts of rspamd's JSON answer used here; anything else in it is ignored. */
export function parseAnswer(body: string): CheckAnswer {
  const json = JSON.parse(body) as Record<string, unknown>;
  if (typeof json.error === 'string') throw new Error(`rspamd: ${json.error}`);
  const { action, score, required_score: required } = json;
  if (typeof action !== 'string' || typeof score !== 'number' || typeof required !== 'number')
    throw new Error(`rspamd: answer without action and score: ${body.slice(0, 200)}`);
  const symbols: RspamdSymbol[] = [];
  if (json.symbols && typeof json.symbols === 'object')
    for (const s of Object.values(json.symbols as Record<string, Record<string, unknown>>))
      if (typeof s?.name === 'string')
        symbols.push({
          name: s.name,
          score: typeof s.score === 'number' ? s.score : 0,
          options: Array.isArray(s.options)
            ? s.options.filter((o): o is string => typeof o === 'string')
            : [],
        });
  symbols.sort((a, b) => b.score - a.score || a.name.localeCompare(b.name));
  const messages = json.messages as Record<string, unknown> | undefined;
  return {
    action,
    score,
    required,
    symbols,
    subject: typeof json.subject === 'string' ? json.subject : null,
    smtpMessage: typeof messages?.smtp_message === 'string' ? messages.smtp_message : null,
  };
}
