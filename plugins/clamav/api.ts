/**
 * What the `clamav` plugin tells other plugins: `import { ClamAV } from 'petrel/clamav'`.
 *
 * The plugin scans each message at `data_post` and leaves the result as a transaction note,
 * `transaction.notes.get(ClamAV)`, for the `data_post` and `queue` hooks of plugins listed after
 * it. A message refused for a virus never reaches them; one that is accepted carries `clean`,
 * `infected` (quarantined), `skipped` or `error` (the scanner failed and `fail: open` let it in).
 */
import { defineNote, type NoteKey } from '../../core/index.js';

export interface ClamAVResult {
  /**
   * `clean`: clamd found nothing; `infected`: it named a signature; `skipped`: not scanned (the
   * client is in `trustedNetworks`, or the message is larger than `maxSize`); `error`: clamd
   * could not be reached, timed out or answered an error.
   */
  readonly status: 'clean' | 'infected' | 'skipped' | 'error';
  /** The signature clamd named (`Win.Test.EICAR_HDB-1`), when infected. */
  readonly signature: string | null;
  /** Why it was skipped or failed (`trusted network`, `too large`, `timeout`, clamd's error). */
  readonly reason: string | null;
  /** Octets sent to clamd (0 when not scanned). */
  readonly bytes: number;
  /** Milliseconds the scan took. */
  readonly ms: number;
}

/** The transaction note holding the scan result. */
export const ClamAV: NoteKey<ClamAVResult> = defineNote('clamav.result');
