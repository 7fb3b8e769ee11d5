import {
  createHash,
  createHmac,
  pbkdf2 as pbkdf2Cb,
  randomBytes,
  scrypt as scryptCb,
  timingSafeEqual,
  type ScryptOptions,
} from 'node:crypto';

/**
 * Password hashes in the users file. New and changed passwords are stored as SCRAM-SHA-256
 * credentials (RFC 7677, RFC 5802 §3) in the form Dovecot reads and checks natively:
 *
 *     {SCRAM-SHA-256}<iterations>,<salt base64>,<StoredKey base64>,<ServerKey base64>
 *
 * so one hash serves SMTP AUTH here and IMAP/POP3 logins in Dovecot (through the passwd-file
 * this plugin writes, see passwd-file.ts). The older form, scrypt (RFC 7914) as
 * `$scrypt$N=16384,r=8,p=1$<salt base64>$<hash base64>`, still verifies; the auth hook replaces
 * it with the SCRAM form on the user's next successful login, when the password is at hand.
 */
export const SCRAM_SCHEME = '{SCRAM-SHA-256}';
/**
 * PBKDF2-HMAC-SHA-256 rounds for new hashes. RFC 7677 §4 asks for at least 4096 (Dovecot's own
 * default); more makes a stolen file slower to guess at, at a cost on every login here and in
 * Dovecot (about 25 ms per login on a small server).
 */
export const SCRAM_ITERATIONS = 100_000;
const SCRAM_MIN_ITERATIONS = 4096;
// Refuse costs that would take a server down if a file were edited by mistake.
const SCRAM_MAX_ITERATIONS = 10_000_000;

export const DEFAULT_COST = { N: 16384, r: 8, p: 1 } as const;
const SALT_BYTES = 16;
const KEY_BYTES = 32;
const MAX_N = 1 << 20;
const MAX_R = 32;
const MAX_P = 16;

const SCRYPT_FORMAT = /^\$scrypt\$N=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})$/;
const B64 = '[A-Za-z0-9+/]+={0,2}';
const SCRAM_FORMAT = new RegExp(`^\\{SCRAM-SHA-256\\}(\\d+),(${B64}),(${B64}),(${B64})$`);

export interface ScryptHash {
  readonly scheme: 'scrypt';
  readonly N: number;
  readonly r: number;
  readonly p: number;
  readonly salt: Buffer;
  readonly hash: Buffer;
}

/** SCRAM-SHA-256 credentials (RFC 5802 §3): what a server keeps instead of the password. */
export interface ScramCredentials {
  readonly scheme: 'SCRAM-SHA-256';
  readonly iterations: number;
  readonly salt: Buffer;
  /** H(ClientKey): checks the client's proof. */
  readonly storedKey: Buffer;
  /** HMAC(SaltedPassword, "Server Key"): proves the server knows the credentials. */
  readonly serverKey: Buffer;
}

export type PasswordHash = ScryptHash | ScramCredentials;

function scrypt(password: string, salt: Buffer, keylen: number, cost: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scryptCb(password.normalize('NFC'), salt, keylen, cost, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

function scryptOptions(N: number, r: number, p: number): ScryptOptions {
  // Node refuses to use more than maxmem (32 MiB by default); scrypt needs about 128·N·r bytes.
  return { N, r, p, maxmem: 256 * N * r + 1024 * 1024 };
}

/**
 * SaltedPassword := Hi(password, salt, i) (RFC 5802 §3), which is PBKDF2 with HMAC-SHA-256. The
 * password's UTF-8 octets are used as given, as Dovecot does, so both sides agree on every
 * password (RFC 5802's SASLprep changes nothing for printable ASCII).
 */
export function saltedPassword(password: string, salt: Buffer, iterations: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    pbkdf2Cb(Buffer.from(password, 'utf8'), salt, iterations, 32, 'sha256', (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

export const hmacSha256 = (key: Buffer, data: string | Buffer): Buffer =>
  createHmac('sha256', key).update(data).digest();
export const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();

/** Parses a hash string; null when it is neither form, or its costs are outside the allowed range. */
export function parseHash(text: string): PasswordHash | null {
  const scram = SCRAM_FORMAT.exec(text);
  if (scram) {
    const iterations = Number(scram[1]);
    if (iterations < SCRAM_MIN_ITERATIONS || iterations > SCRAM_MAX_ITERATIONS) return null;
    const salt = Buffer.from(scram[2]!, 'base64');
    const storedKey = Buffer.from(scram[3]!, 'base64');
    const serverKey = Buffer.from(scram[4]!, 'base64');
    if (salt.length < 8 || storedKey.length !== 32 || serverKey.length !== 32) return null;
    return { scheme: 'SCRAM-SHA-256', iterations, salt, storedKey, serverKey };
  }
  const m = SCRYPT_FORMAT.exec(text);
  if (!m) return null;
  const [N, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const powerOfTwo = N > 1 && (N & (N - 1)) === 0;
  if (!powerOfTwo || N > MAX_N || r < 1 || r > MAX_R || p < 1 || p > MAX_P) return null;
  const salt = Buffer.from(m[4]!, 'base64');
  const hash = Buffer.from(m[5]!, 'base64');
  if (salt.length < 8 || hash.length < 16) return null;
  return { scheme: 'scrypt', N, r, p, salt, hash };
}

/** Hashes a password as SCRAM-SHA-256 credentials with a fresh random salt. */
export async function hashPassword(password: string, opts: { iterations?: number } = {}): Promise<string> {
  const iterations = opts.iterations ?? SCRAM_ITERATIONS;
  const salt = randomBytes(SALT_BYTES);
  const salted = await saltedPassword(password, salt, iterations);
  const storedKey = sha256(hmacSha256(salted, 'Client Key'));
  const serverKey = hmacSha256(salted, 'Server Key');
  const b64 = (b: Buffer): string => b.toString('base64');
  return `${SCRAM_SCHEME}${iterations},${b64(salt)},${b64(storedKey)},${b64(serverKey)}`;
}

/** The older scrypt form; new passwords are never stored this way (kept to check old hashes). */
export async function hashScrypt(
  password: string,
  cost: { N: number; r: number; p: number } = DEFAULT_COST,
): Promise<string> {
  const salt = randomBytes(SALT_BYTES);
  const key = await scrypt(password, salt, KEY_BYTES, scryptOptions(cost.N, cost.r, cost.p));
  return `$scrypt$N=${cost.N},r=${cost.r},p=${cost.p}$${salt.toString('base64')}$${key.toString('base64')}`;
}

/** Checks a password against a hash string in constant time; false for a malformed hash. */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const h = parseHash(stored);
  if (!h) return false;
  if (h.scheme === 'SCRAM-SHA-256') {
    const salted = await saltedPassword(password, h.salt, h.iterations);
    return timingSafeEqual(sha256(hmacSha256(salted, 'Client Key')), h.storedKey);
  }
  const key = await scrypt(password, h.salt, h.hash.length, scryptOptions(h.N, h.r, h.p));
  return timingSafeEqual(key, h.hash);
}

/** A stored hash that should be replaced by the current form once the password is known. */
export function needsUpgrade(stored: string): boolean {
  return parseHash(stored)?.scheme !== 'SCRAM-SHA-256';
}

/**
 * A hash of nothing anyone knows, verified when a login does not exist, so that an unknown login
 * takes as long to refuse as a wrong password (no user enumeration by timing).
 */
export const DUMMY_HASH = `${SCRAM_SCHEME}${SCRAM_ITERATIONS},${randomBytes(SALT_BYTES).toString('base64')},${randomBytes(32).toString('base64')},${randomBytes(32).toString('base64')}`;
