import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';

/**
 * Who may use the console, and the proof that a form came from a console page.
 *
 * - Login: the configured token, compared as SHA-256 digests with `timingSafeEqual` (the time
 *   does not depend on where the strings differ, nor on the token's length); the primary keeps
 *   only the digest. The primary runs no plugin code, so the users plugin's file is not read here.
 * - A login is a random 256-bit session id in a cookie (`HttpOnly`, `SameSite=Strict`, `Path=/console/`,
 *   `Secure` when configured); it ends after `idleMs` without a request, at logout, or when the
 *   primary stops. At most MAX_SESSIONS at once: the longest idle goes first.
 * - Each session has its own random CSRF token, put in every form; a POST without it is refused
 *   with 403 even with a valid cookie (SameSite=Strict already keeps other sites' forms out; the
 *   token keeps it so for a browser that ignores SameSite).
 * - Failed logins: at most MAX_FAILURES per minute in all, then 429 until the minute ends, so the
 *   token cannot be guessed at the speed of the network.
 */
export interface ConsoleSession {
  readonly id: string;
  readonly csrf: string;
  lastSeen: number;
}

export const COOKIE = 'petrel_console';
const MAX_SESSIONS = 32;
const MAX_FAILURES = 10;
const FAILURE_WINDOW_MS = 60_000;

export class ConsoleAuth {
  private readonly expected: Buffer;
  private readonly sessions = new Map<string, ConsoleSession>();
  private failures: { since: number; count: number } = { since: 0, count: 0 };

  constructor(
    token: string,
    private readonly idleMs: number,
    private readonly secureCookie: boolean,
    private readonly now: () => number = Date.now,
  ) {
    this.expected = digest(token);
  }

  /** False while too many logins failed this minute. */
  mayTry(): boolean {
    const t = this.now();
    if (t - this.failures.since >= FAILURE_WINDOW_MS) this.failures = { since: t, count: 0 };
    return this.failures.count < MAX_FAILURES;
  }

  /** A new session when the token is right; null (counted as a failure) otherwise. */
  login(given: string): ConsoleSession | null {
    if (!timingSafeEqual(digest(given), this.expected)) {
      this.failures.count++;
      return null;
    }
    this.sweep();
    if (this.sessions.size >= MAX_SESSIONS) {
      const oldest = [...this.sessions.values()].sort((a, b) => a.lastSeen - b.lastSeen)[0]!;
      this.sessions.delete(oldest.id);
    }
    const s: ConsoleSession = { id: random(), csrf: random(), lastSeen: this.now() };
    this.sessions.set(s.id, s);
    return s;
  }

  /** The request's live session (renewed), or null. */
  session(req: IncomingMessage): ConsoleSession | null {
    const id = cookie(req.headers.cookie, COOKIE);
    if (!id) return null;
    const s = this.sessions.get(id);
    if (!s) return null;
    if (this.now() - s.lastSeen > this.idleMs) {
      this.sessions.delete(id);
      return null;
    }
    s.lastSeen = this.now();
    return s;
  }

  logout(s: ConsoleSession): void {
    this.sessions.delete(s.id);
  }

  /** True when the form's CSRF field is the session's token. */
  csrfOk(s: ConsoleSession, given: string | undefined): boolean {
    return given !== undefined && timingSafeEqual(digest(given), digest(s.csrf));
  }

  /** The Set-Cookie value that carries a session (or, with null, clears it). */
  cookie(s: ConsoleSession | null): string {
    const attrs = ['Path=/console/', 'HttpOnly', 'SameSite=Strict', ...(this.secureCookie ? ['Secure'] : [])];
    return s
      ? [`${COOKIE}=${s.id}`, ...attrs, `Max-Age=${Math.ceil(this.idleMs / 1000)}`].join('; ')
      : [`${COOKIE}=`, ...attrs, 'Max-Age=0'].join('; ');
  }

  private sweep(): void {
    const t = this.now();
    for (const [id, s] of this.sessions) if (t - s.lastSeen > this.idleMs) this.sessions.delete(id);
  }
}

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

function random(): string {
  return randomBytes(32).toString('base64url');
}

/** A cookie's value from a Cookie header (RFC 6265 §5.4: `name=value` pairs separated by `; `). */
function cookie(header: string | undefined, name: string): string | null {
  for (const part of (header ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}
