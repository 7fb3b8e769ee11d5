import { randomBytes, scrypt as scryptCb, timingSafeEqual, type ScryptOptions } from 'node:crypto';

/**
 * Password hashes: scrypt (RFC 7914) with a random salt, in a self-describing string
 * `$scrypt$N=16384,r=8,p=1$<salt base64>$<hash base64>`, so the cost can be raised later and old
 * hashes still verify.
 */
export const DEFAULT_COST = { N: 16384, r: 8, p: 1 } as const;
const SALT_BYTES = 16;
const KEY_BYTES = 32;
// Refuse costs that would take a server down if a file were edited by mistake.
const MAX_N = 1 << 20;
const MAX_R = 32;
const MAX_P = 16;

const FORMAT = /^\$scrypt\$N=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})$/;

export interface ScryptHash {
  readonly N: number;
  readonly r: number;
  readonly p: number;
  readonly salt: Buffer;
  readonly hash: Buffer;
}

function scrypt(password: string, salt: Buffer, keylen: number, cost: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scryptCb(password.normalize('NFC'), salt, keylen, cost, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

function options(N: number, r: number, p: number): ScryptOptions {
  // Node refuses to use more than maxmem (32 MiB by default); scrypt needs about 128·N·r bytes.
  return { N, r, p, maxmem: 256 * N * r + 1024 * 1024 };
}

/** Parses a hash string; null when it is not a well-formed scrypt hash within the allowed costs. */
export function parseHash(text: string): ScryptHash | null {
  const m = FORMAT.exec(text);
  if (!m) return null;
  const [N, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const powerOfTwo = N > 1 && (N & (N - 1)) === 0;
  if (!powerOfTwo || N > MAX_N || r < 1 || r > MAX_R || p < 1 || p > MAX_P) return null;
  const salt = Buffer.from(m[4]!, 'base64');
  const hash = Buffer.from(m[5]!, 'base64');
  if (salt.length < 8 || hash.length < 16) return null;
  return { N, r, p, salt, hash };
}

/** Hashes a password with a fresh random salt. */
export async function hashPassword(
  password: string,
  cost: { N: number; r: number; p: number } = DEFAULT_COST,
): Promise<string> {
  const salt = randomBytes(SALT_BYTES);
  const key = await scrypt(password, salt, KEY_BYTES, options(cost.N, cost.r, cost.p));
  return `$scrypt$N=${cost.N},r=${cost.r},p=${cost.p}$${salt.toString('base64')}$${key.toString('base64')}`;
}

/** Checks a password against a hash string in constant time; false for a malformed hash. */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const h = parseHash(stored);
  if (!h) return false;
  const key = await scrypt(password, h.salt, h.hash.length, options(h.N, h.r, h.p));
  return timingSafeEqual(key, h.hash);
}

/**
 * A hash of nothing anyone knows, verified when a login does not exist, so that an unknown login
 * takes as long to refuse as a wrong password (no user enumeration by timing).
 */
export const DUMMY_HASH = `$scrypt$N=${DEFAULT_COST.N},r=${DEFAULT_COST.r},p=${DEFAULT_COST.p}$${randomBytes(SALT_BYTES).toString('base64')}$${randomBytes(KEY_BYTES).toString('base64')}`;
