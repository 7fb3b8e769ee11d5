/**
 * What the `mailauth` plugin tells other plugins: `import { MailAuth, MailAuthSpf } from 'petrel/mailauth'`.
 *
 * - `transaction.notes.get(MailAuthSpf)`: the SPF results, set by the plugin's `mail` hook, so
 *   every `rcpt` hook (greylisting, rate limits) and every later hook of the transaction can read
 *   them, whatever the plugins' order. Cleared with the transaction (RSET, a new MAIL).
 * - `transaction.notes.get(MailAuth)`: everything, once the message is judged after DATA
 *   (`data_post`), for plugins listed after it at `data_post` and for every plugin at `queue` (a
 *   spam filter, a sieve, an ARC sealer).
 *
 * Both are absent when the transaction was not judged: the client authenticated, or came from
 * one of the plugin's `trustedNetworks` — or the plugin is not enabled. A reader treats absence
 * as "not known", never as a result.
 */
import { defineNote, type NoteKey } from '../../core/index.js';

/** RFC 8601 §2.7 result keywords, as the checks give them. */
export type AuthResult =
  'pass' | 'fail' | 'softfail' | 'neutral' | 'none' | 'temperror' | 'permerror' | 'policy';

/** What the plugin does about a message (see the README's policy table). */
export type AuthAction = 'reject' | 'defer' | 'quarantine' | 'tag' | 'ignore';

/** One SPF check (RFC 7208): of the MAIL FROM identity, or of the HELO identity. */
export interface SpfCheck {
  readonly result: AuthResult;
  /** The domain checked (the MAIL FROM domain; for `<>` and the HELO check, the HELO name). */
  readonly domain: string;
  /** The RFC 8601 result for the header, e.g. `spf=pass (…) smtp.mailfrom=a@example.test`. */
  readonly info: string;
  /** The text the domain publishes with `exp=` for a fail (third-party text: never trust it). */
  readonly explanation?: string;
}

/** One DKIM-Signature and what came of it (RFC 6376). */
export interface DkimCheck {
  readonly result: AuthResult;
  /** `d=` */
  readonly domain: string;
  /** `s=` */
  readonly selector: string;
  /** `a=`, e.g. `rsa-sha256`. */
  readonly algorithm: string;
  /** Why, for anything but a pass (`body hash did not verify`, `no key`, …). */
  readonly comment?: string;
  /** The RFC 8601 result for the header. */
  readonly info: string;
}

/** The DMARC evaluation (RFC 7489; the DNS tree walk of its successor, RFC 9989). */
export interface DmarcCheck {
  readonly result: AuthResult;
  /** The author domain (of the `From:` field). */
  readonly from: string;
  /** The policy in force for this message: `p=`, `sp=` or `np=` as applies, lowered by `t=y`. */
  readonly policy: 'none' | 'quarantine' | 'reject';
  /** The aligned SPF and DKIM domains, if any. */
  readonly alignment: { readonly spf?: string; readonly dkim?: string };
  /** The RFC 8601 result for the header. */
  readonly info: string;
}

/** The ARC chain validation (RFC 8617 §5.2). */
export interface ArcCheck {
  readonly result: AuthResult;
  /** The instance of the newest ARC set, or null without a chain. */
  readonly instance: number | null;
  /** The RFC 8601 result for the header. */
  readonly info: string;
}

/** The SPF checks of one transaction, made at MAIL. */
export interface SpfResults {
  /** The client address the checks were made for. */
  readonly ip: string;
  /** The MAIL FROM identity (for the null sender `<>`, RFC 7208 §2.4: `postmaster@<HELO>`). */
  readonly mailFrom: SpfCheck;
  /**
   * The HELO identity (RFC 7208 §2.3); null when HELO gave an address literal, and for `<>`
   * (whose MAIL FROM check is the HELO check).
   */
  readonly helo: SpfCheck | null;
}

/** Everything the plugin found about one message, and what it did. */
export interface MailAuthResults {
  /** The authserv-id of the `Authentication-Results` field. */
  readonly authservId: string;
  readonly spf: SpfResults;
  /** Every DKIM signature, in message order; one `none` entry for an unsigned message. */
  readonly dkim: readonly DkimCheck[];
  /** Null when the message has no single author domain (no `From:`, or several domains). */
  readonly dmarc: DmarcCheck | null;
  readonly arc: ArcCheck;
  /**
   * The value of the `Authentication-Results` field added to the message (without the field
   * name): what an ARC sealer puts in its ARC-Authentication-Results (RFC 8617 §4.1.1).
   */
  readonly header: string;
  /** The action taken, and the findings that led to it (`dmarc=fail policy=reject`, …). */
  readonly action: AuthAction;
  readonly reasons: readonly string[];
}

/** The transaction note holding a judged message's results. */
export const MailAuth: NoteKey<MailAuthResults> = defineNote('mailauth.results');

/** The transaction note holding the SPF results, from MAIL on. */
export const MailAuthSpf: NoteKey<SpfResults> = defineNote('mailauth.spf');
