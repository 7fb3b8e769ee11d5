import type { DataPostContext, MailParams, Recipient } from '../hooks/catalogue.js';
import { makeAddress, parsePath, type Address } from '../message/address.js';
import { deepFreeze } from './views.js';

/** The envelope of a transaction, as the session lets `data_post` edit it. */
export interface EditableEnvelope {
  readonly mailParams: MailParams;
  sender: Address | null;
  readonly recipients: readonly Recipient[];
  /** Replaces the recipient list (frozen here first: hooks hold it through the view). */
  setRecipients(list: readonly Recipient[]): void;
}

/**
 * RFC 5321 §4.5.1: `<postmaster>` without a domain is the postmaster of the first local domain,
 * so that plugins, routes and transports see an ordinary address; null when there is none.
 */
export function homePostmaster(localDomains: readonly string[]): Address | null {
  const home = localDomains[0];
  return home ? makeAddress('postmaster', home) : null;
}

/** Parses an address given without angle brackets, with the checks of MAIL FROM or RCPT TO. */
function parse(address: string, utf8: boolean, role: 'sender' | 'recipient'): Address | null {
  const path = parsePath(`<${address}>`, {
    utf8,
    allowNull: role === 'sender',
    allowPostmaster: role === 'recipient',
  });
  if (!path.ok || path.rest !== '')
    throw new TypeError(
      `bad ${role} address ${JSON.stringify(address.slice(0, 300))}: ${path.ok ? 'unexpected text' : path.message}`,
    );
  return path.address;
}

/**
 * The envelope edits of `data_post` (`setSender`, `addRecipient`, `removeRecipient`; their
 * contracts are in the hook catalogue). Each checks first and changes nothing when it throws.
 */
export function envelopeEdits(
  env: EditableEnvelope,
  opts: { readonly maxRecipients: number; readonly localDomains: readonly string[] },
): Pick<DataPostContext, 'setSender' | 'addRecipient' | 'removeRecipient'> {
  const utf8 = env.mailParams.smtputf8;
  return {
    setSender(address) {
      env.sender = deepFreeze(parse(address, utf8, 'sender'));
    },
    addRecipient(address, params = {}) {
      let a = parse(address, utf8, 'recipient')!;
      if (a.domain === '') {
        const home = homePostmaster(opts.localDomains);
        if (!home) throw new TypeError('cannot add <postmaster>: localDomains is empty');
        a = home;
      }
      if (env.recipients.some((r) => r.address.address === a.address)) return false;
      if (env.recipients.length >= opts.maxRecipients)
        throw new RangeError(`cannot add a recipient past limits.maxRecipients (${opts.maxRecipients})`);
      env.setRecipients([...env.recipients, { address: a, params: { ...params } }]);
      return true;
    },
    removeRecipient(address) {
      // Matching only: any address that could be in the list parses.
      let a = parse(address, true, 'recipient')!;
      if (a.domain === '') a = homePostmaster(opts.localDomains) ?? a;
      const kept = env.recipients.filter((r) => r.address.address !== a.address);
      const removed = env.recipients.length - kept.length;
      if (removed > 0) env.setRecipients(kept);
      return removed;
    },
  };
}
