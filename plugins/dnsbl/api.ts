/**
 * What the `dnsbl` plugin tells other plugins: `import { Dnsbl } from 'petrel/dnsbl'`.
 *
 * The plugin looks the client address up in its block and allow lists at connect and leaves the
 * answers as a session note, `session.notes.get(Dnsbl)`, at the latest when its `rcpt` hook
 * runs (list it before greylisting and rate limits). `allowed` is what those read: a client on
 * an allow list is exempt from them. The note is absent when the client was not looked up (it
 * came from one of the plugin's `trustedNetworks`).
 */
import { defineNote, type NoteKey } from '../../core/index.js';

/** One list's answer for one name. */
export interface ListResult {
  /** The list's name (its zone unless configured). */
  readonly list: string;
  readonly zone: string;
  /** `block` (DNSBL, RHSBL) or `allow` (DNSWL). */
  readonly kind: 'block' | 'allow';
  /** What was looked up: the client address, the HELO name or the sender domain. */
  readonly subject: string;
  /**
   * `listed`: a code the list's config maps to a listing; `clear`: no record (or only codes that
   * mean nothing here); `refused`: the list answered that it will not serve us (127.255.255.x,
   * outside 127.0.0.0/8, or a configured refusal code); `error`: no answer in time, or a DNS
   * failure. Only `listed` counts: the others fail open.
   */
  readonly status: 'listed' | 'clear' | 'refused' | 'error';
  /** The A records the list answered with. */
  readonly codes: readonly string[];
  /** The reasons the listing codes mean (`spam`, `exploit`); empty unless listed. */
  readonly reasons: readonly string[];
  /** The answer came from the State cache. */
  readonly cached: boolean;
}

/** The client's standing, by address. */
export interface DnsblClient {
  /** The client address looked up. */
  readonly ip: string;
  /** Every list of type `ip`: the allow lists, then the block lists, each in config order. */
  readonly lists: readonly ListResult[];
  /** The allow lists the client is on: when not empty, no block list applies to it. */
  readonly allowedBy: readonly string[];
  readonly allowed: boolean;
  /** The block lists the client address is on (whatever their action). */
  readonly listedBy: readonly string[];
}

/** The session note holding the client's standing. */
export const Dnsbl: NoteKey<DnsblClient> = defineNote('dnsbl.client');
