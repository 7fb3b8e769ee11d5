/**
 * What the `rspamd` plugin tells other plugins: `import { Rspamd } from 'petrel/rspamd'`.
 *
 * The plugin scans each message at `data_post` and leaves rspamd's answer as a transaction note,
 * `transaction.notes.get(Rspamd)`, for the hooks that run after it (later `data_post` hooks,
 * `queue`). The note is absent when the message was not scanned: exempt, too large, or the
 * scan failed.
 */
import { defineNote, type NoteKey } from '../../core/index.js';

export interface RspamdSymbol {
  readonly name: string;
  readonly score: number;
  /** What the rule matched on, when it says (a URL, a domain). */
  readonly options: readonly string[];
}

export interface RspamdResult {
  /** rspamd's action: `reject`, `soft reject`, `rewrite subject`, `add header`, `greylist`, `no action`, or one its config defines. */
  readonly action: string;
  /** What the plugin did about it (the `actions` map). */
  readonly verdict: 'reject' | 'defer' | 'quarantine' | 'rewrite-subject' | 'add-header' | 'accept';
  readonly score: number;
  /** The score of rspamd's `reject` action. */
  readonly required: number;
  readonly symbols: readonly RspamdSymbol[];
  /** The reply rspamd suggests (`messages.smtp_message`), if any. */
  readonly smtpMessage: string | null;
}

/** The transaction note holding the scan result. */
export const Rspamd: NoteKey<RspamdResult> = defineNote('rspamd.result');
