/**
 * What the `hygiene` plugin tells other plugins: `import { Hygiene } from 'petrel/hygiene'`.
 *
 * The plugin checks the client's reverse DNS (FCrDNS) and its HELO name and leaves what it found
 * as a session note, `session.notes.get(Hygiene)`, at the latest when its `rcpt` hook runs (list
 * the readers after it). The note is absent when the client was not checked (it came from one of
 * the plugin's `trustedNetworks`).
 */
import { defineNote, type NoteKey } from '../../core/index.js';

/**
 * What a check can find. `fcrdns-fail`: no PTR name, or none resolves back to the client address;
 * `fcrdns-temperror`: the lookups failed or timed out; `helo-invalid`: not a domain name or an
 * address literal (RFC 5321 §4.1.1.1, §4.1.3); `helo-bare-ip`: an address without brackets;
 * `helo-ours`: one of our own names or an address literal of our own address;
 * `helo-literal-mismatch`: an address literal that is not the client's address; `helo-no-dot`: a
 * name with a single label.
 */
export type Finding =
  | 'fcrdns-fail'
  | 'fcrdns-temperror'
  | 'helo-invalid'
  | 'helo-bare-ip'
  | 'helo-ours'
  | 'helo-literal-mismatch'
  | 'helo-no-dot';

/** Forward-confirmed reverse DNS of the client address. */
export interface Fcrdns {
  /** `pass`: a PTR name resolves back; `fail`: no PTR, or none does; `temperror`: DNS failed. */
  readonly result: 'pass' | 'fail' | 'temperror';
  /** The PTR names of the client address (lower-cased, at most the first ten). */
  readonly names: readonly string[];
  /** The first PTR name that resolves back to the client address, or null. */
  readonly confirmed: string | null;
  /** Why, for logs: `no PTR`, `ETIMEOUT`, … */
  readonly detail: string;
}

export interface HygieneResults {
  /** The client address checked. */
  readonly ip: string;
  readonly fcrdns: Fcrdns;
  /** The HELO/EHLO name judged (the latest one), or null before HELO. */
  readonly helo: string | null;
  /** Every finding, FCrDNS and HELO, whatever its configured action. */
  readonly findings: readonly Finding[];
}

/** The session note holding the results. */
export const Hygiene: NoteKey<HygieneResults> = defineNote('hygiene.results');
