/**
 * What the `spamassassin` plugin tells other plugins: `import { SpamAssassin } from 'petrel/spamassassin'`.
 *
 * The plugin scans each message at `data_post` and leaves spamd's answer as a transaction note,
 * `transaction.notes.get(SpamAssassin)`, for the hooks that run after it (later `data_post`
 * hooks, `queue`). The note is absent when the message was not scanned: exempt, too large, or
 * the scan failed.
 */
import { defineNote, type NoteKey } from '../../core/index.js';

export interface SpamAssassinResult {
  /** spamd's score for the message. */
  readonly score: number;
  /** spamd's own threshold (`required_score`). */
  readonly required: number;
  /** The rules that matched, as spamd names them (`GTUBE`, `NO_RELAYS`). */
  readonly symbols: readonly string[];
  /** What the plugin did: `reject` (550), `tag` (`X-Spam-Status: Yes`) or `pass`. */
  readonly action: 'reject' | 'tag' | 'pass';
}

/** The transaction note holding the scan result. */
export const SpamAssassin: NoteKey<SpamAssassinResult> = defineNote('spamassassin.result');
