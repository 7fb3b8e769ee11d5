import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, readFile, writeFile, link, unlink, open } from 'node:fs/promises';
import { dirname } from 'node:path';
import { makeAddress, type Address } from '../../core/index.js';

/**
 * The Sender Rewriting Scheme, so that forwarded mail still passes SPF at its destination and its
 * bounces come back here to be returned to the original sender. The format is Shevek's (the one
 * libsrs2 and postsrsd use) with our own hash:
 *
 *     SRS0=HHHHHHHH=TT=example.org=alice@forwarder.test
 *     SRS1=HHHHHHHH=first.test==GGGGGGGG=TT=example.org=alice@forwarder.test
 *
 * - `TT`: the day the address was made, days since 1970 modulo 1024, two base32 characters.
 * - `HHHHHHHH`: the first 8 base32 characters (40 bits) of HMAC-SHA256 over `srs0=` or `srs1=`
 *   and the rest of the local part after the hash, lower-cased (relays may change the case of a
 *   local part; base32 is one case). The tag in the input keeps an SRS0 hash from passing as SRS1.
 * - SRS1 is what a second forwarder makes of an SRS0 address: it keeps the first forwarder's
 *   domain and that address's hash part, so a bounce goes back to the first forwarder, which
 *   alone can check its own hash. A forwarder passing an SRS1 address on re-hashes it only.
 *
 * Only an address whose hash verifies with one of the secrets and whose day is within `maxAge`
 * is accepted at RCPT: a forged one cannot turn this server into a relay.
 */

const BASE32 = 'abcdefghijklmnopqrstuvwxyz234567';
const HASH_LENGTH = 8;
const DAY = 86_400_000;

function base32(bytes: Buffer, length: number): string {
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5 && out.length < length) {
      out += BASE32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    if (out.length >= length) break;
  }
  return out;
}

function dayStamp(now: number): string {
  const day = Math.floor(now / DAY) % 1024;
  return BASE32[day >> 5]! + BASE32[day & 31]!;
}

/** Days since a stamp was made (0 today), or null when it is not a stamp. */
function stampAge(stamp: string, now: number): number | null {
  const s = stamp.toLowerCase();
  const hi = BASE32.indexOf(s[0] ?? '');
  const lo = BASE32.indexOf(s[1] ?? '');
  if (s.length !== 2 || hi < 0 || lo < 0) return null;
  const today = Math.floor(now / DAY) % 1024;
  return (today - ((hi << 5) | lo) + 1024) % 1024;
}

const SRS0 = /^srs0=([^=]+)=([^=]+)=([^=]+)=(.+)$/i;
const SRS1 = /^srs1=([^=]+)=([^=]+)=(=.+)$/i;

export type SrsCheck =
  | { readonly ok: true; readonly address: Address }
  | { readonly ok: false; readonly reason: 'hash' | 'expired' | 'malformed' };

export interface SrsOptions {
  /** Secrets, newest first: the first signs, every one verifies (for rotation). */
  readonly secrets: readonly string[];
  /** The domain SRS addresses are made at: a local domain whose SPF names this server. */
  readonly domain: string;
  /** Days an SRS address is honoured after it was made. */
  readonly maxAgeDays: number;
  readonly now?: () => number;
}

export class Srs {
  private readonly now: () => number;

  constructor(private readonly opts: SrsOptions) {
    if (opts.secrets.length === 0) throw new TypeError('SRS needs at least one secret');
    this.now = opts.now ?? Date.now;
  }

  get domain(): string {
    return this.opts.domain;
  }

  private hash(secret: string, tag: 'srs0' | 'srs1', rest: string): string {
    const mac = createHmac('sha256', secret).update(`${tag}=${rest.toLowerCase()}`).digest();
    return base32(mac, HASH_LENGTH);
  }

  private verify(tag: 'srs0' | 'srs1', hash: string, rest: string): boolean {
    const given = Buffer.from(hash.toLowerCase());
    return this.opts.secrets.some((s) => {
      const want = Buffer.from(this.hash(s, tag, rest));
      return want.length === given.length && timingSafeEqual(want, given);
    });
  }

  /** Whether a local part has the form of an SRS address (checked or not). */
  static looksLike(local: string): boolean {
    return /^srs[01]=/i.test(local);
  }

  /**
   * The envelope sender for a copy forwarded from `sender`: an SRS address at our domain. An
   * address that is already one of ours (our domain) is returned as it is.
   */
  forward(sender: Address): Address {
    const secret = this.opts.secrets[0]!;
    const domain = sender.domainAscii;
    if (domain === this.opts.domain) return sender;
    const srs1 = SRS1.exec(sender.local);
    if (srs1) {
      // Someone else's SRS1: keep its first hop and payload, hash it as ours.
      const rest = `${srs1[2]}=${srs1[3]}`;
      return makeAddress(`SRS1=${this.hash(secret, 'srs1', rest)}=${rest}`, this.opts.domain);
    }
    if (SRS0.test(sender.local)) {
      // Another forwarder's SRS0: point back at that forwarder, which can check its own hash.
      const rest = `${domain}=${sender.local.slice(4)}`;
      return makeAddress(`SRS1=${this.hash(secret, 'srs1', rest)}=${rest}`, this.opts.domain);
    }
    const rest = `${dayStamp(this.now())}=${domain}=${sender.local}`;
    return makeAddress(`SRS0=${this.hash(secret, 'srs0', rest)}=${rest}`, this.opts.domain);
  }

  /** The address an SRS local part (at our domain) stands for, if its hash and day check out. */
  reverse(local: string): SrsCheck {
    const srs0 = SRS0.exec(local);
    if (srs0) {
      const [, hash, stamp, domain, orig] = srs0 as unknown as [string, string, string, string, string];
      const rest = `${stamp}=${domain}=${orig}`;
      if (!this.verify('srs0', hash, rest)) return { ok: false, reason: 'hash' };
      const age = stampAge(stamp, this.now());
      if (age === null) return { ok: false, reason: 'malformed' };
      if (age > this.opts.maxAgeDays) return { ok: false, reason: 'expired' };
      return { ok: true, address: makeAddress(orig, domain) };
    }
    const srs1 = SRS1.exec(local);
    if (srs1) {
      const [, hash, hop, payload] = srs1 as unknown as [string, string, string, string];
      if (!this.verify('srs1', hash, `${hop}=${payload}`)) return { ok: false, reason: 'hash' };
      // The first forwarder checks its own hash and day; ours only says we made this address.
      return { ok: true, address: makeAddress(`SRS0${payload}`, hop) };
    }
    return { ok: false, reason: 'malformed' };
  }
}

/**
 * The secrets in `file`, one per line, newest first (blank lines and `#` comments ignored). A
 * missing file is created with one new random secret, mode 0600, atomically: when several
 * workers start at once, every one reads the secret the first one wrote.
 */
export async function loadSecrets(file: string): Promise<string[]> {
  const parse = (text: string): string[] =>
    text
      .split(/\r?\n/)
      .map((l) => l.trim())
      .filter((l) => l !== '' && !l.startsWith('#'));
  try {
    return parse(await readFile(file, 'utf8'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  await mkdir(dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  const text = `# SRS secrets, newest first: the first signs, every one is accepted.\n${randomBytes(32).toString('hex')}\n`;
  await writeFile(tmp, text, { mode: 0o600 });
  const fh = await open(tmp, 'r');
  await fh.sync().finally(() => fh.close());
  try {
    await link(tmp, file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  } finally {
    await unlink(tmp).catch(() => undefined);
  }
  return parse(await readFile(file, 'utf8'));
}
