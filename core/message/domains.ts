import { domainToASCII } from 'node:url';
import type { Address } from './address.js';

/**
 * Maps both spellings of each local domain (as configured, and its A-label) to the A-label, so
 * that an address is matched whichever spelling it uses and its domain is named one way (the form
 * the users directory gives: a mailbox's folder is the same with or without a directory).
 */
export function localDomainMap(domains: readonly string[]): ReadonlyMap<string, string> {
  const map = new Map<string, string>();
  for (const d of domains) {
    const ascii = domainToASCII(d) || d;
    map.set(d, ascii);
    map.set(ascii, ascii);
  }
  return map;
}

/** The local domain (A-label) an address belongs to, or null. */
export function localDomainOf(address: Address, domains: ReadonlyMap<string, string>): string | null {
  return domains.get(address.domain) ?? domains.get(address.domainAscii) ?? null;
}
