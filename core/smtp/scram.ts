import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

/**
 * SCRAM-SHA-256 (RFC 7677, the mechanism of RFC 5802) on the server side, as pure functions:
 * the messages in, the checks and the replies out. The session does the I/O; a plugin supplies
 * the stored credentials (salt, iteration count, StoredKey, ServerKey), never a password.
 * Channel binding (`-PLUS`) is not offered.
 */

/** What a server keeps for a user instead of the password (RFC 5802 §3). */
export interface ScramCredentials {
  readonly salt: Buffer;
  readonly iterations: number;
  readonly storedKey: Buffer;
  readonly serverKey: Buffer;
}

export interface ClientFirst {
  /** `n,,` or `y,,` (or with `a=`): echoed, base64, in the client's final message. */
  readonly gs2Header: string;
  readonly authzid: string;
  readonly username: string;
  readonly nonce: string;
  /** client-first-message-bare, part of the AuthMessage. */
  readonly bare: string;
}

/** RFC 5802 §5.1: `=2C` is `,` and `=3D` is `=` in a saslname; any other `=` is an error. */
function saslname(text: string): string | null {
  if (/=(?!2C|3D)/.test(text)) return null;
  return text.replace(/=2C/g, ',').replace(/=3D/g, '=');
}

const PRINTABLE = /^[\x21-\x2b\x2d-\x7e]+$/; // RFC 5802 §7: printable ASCII except ","

/** Parses client-first-message; a string describes what is wrong with it. */
export function parseClientFirst(text: string): ClientFirst | string {
  const m = /^([ny]|p=[^,]*),(a=[^,]*)?,(.*)$/.exec(text);
  if (!m) return 'expected a GS2 header';
  if (m[1]!.startsWith('p=')) return 'channel binding is not supported';
  const bare = m[3]!;
  const fields = bare.split(',');
  if (fields[0]?.startsWith('m=')) return 'mandatory extensions are not supported';
  const user = /^n=(.*)$/.exec(fields[0] ?? '');
  const nonce = /^r=(.*)$/.exec(fields[1] ?? '');
  if (!user || !nonce) return 'expected n= and r=';
  const username = saslname(user[1]!);
  const authzid = m[2] ? saslname(m[2].slice(2)) : '';
  if (username === null || username === '' || authzid === null) return 'bad user name';
  if (!PRINTABLE.test(nonce[1]!)) return 'bad nonce';
  return { gs2Header: `${m[1]},${m[2] ?? ''},`, authzid, username, nonce: nonce[1]!, bare };
}

/** server-first-message: the combined nonce, the salt and the iteration count (RFC 5802 §5.1). */
export function serverFirst(client: ClientFirst, creds: Pick<ScramCredentials, 'salt' | 'iterations'>) {
  const nonce = client.nonce + randomBytes(18).toString('base64');
  return { nonce, message: `r=${nonce},s=${creds.salt.toString('base64')},i=${creds.iterations}` };
}

const hmac = (key: Buffer, data: string): Buffer => createHmac('sha256', key).update(data).digest();

/**
 * Checks client-final-message against the credentials. Returns the server signature for
 * server-final-message when the proof is right, null otherwise (wrong password, or a message
 * that does not belong to this exchange). Comparison in constant time.
 */
export function checkClientFinal(
  text: string,
  client: ClientFirst,
  server: { nonce: string; message: string },
  creds: ScramCredentials,
): Buffer | null {
  const m = /^c=([^,]*),r=([^,]*)(?:,[^,]*)*?,p=([A-Za-z0-9+/]+={0,2})$/.exec(text);
  if (!m) return null;
  // c= is the GS2 header, base64 (RFC 5802 §5.1); r= must be the nonce this server made.
  if (m[1] !== Buffer.from(client.gs2Header).toString('base64') || m[2] !== server.nonce) return null;
  const withoutProof = text.slice(0, text.lastIndexOf(',p='));
  const authMessage = `${client.bare},${server.message},${withoutProof}`;
  const proof = Buffer.from(m[3]!, 'base64');
  if (proof.length !== 32 || creds.storedKey.length !== 32) return null;
  const signature = hmac(creds.storedKey, authMessage);
  const clientKey = Buffer.from(proof.map((b, i) => b ^ signature[i]!));
  const ok = timingSafeEqual(createHash('sha256').update(clientKey).digest(), creds.storedKey);
  return ok ? hmac(creds.serverKey, authMessage) : null;
}
