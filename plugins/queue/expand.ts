import type { Address, MailParams, PluginHooks, Recipient, RecipientParams } from '../../core/index.js';
import type { StoredRecipient } from './records.js';

/**
 * Expansion at acceptance. Before a message is stored, each accepted recipient is offered to the
 * `expand` hook (the users plugin answers for aliases, catch-alls and SRS addresses); a recipient
 * that expands is replaced by its targets, so the envelope on disk lists where the message goes,
 * one recipient per target, and every later step (routing, delivery, retries, reports) treats a
 * forwarded copy like any other recipient. As with Postfix's virtual aliases, the aliases in force
 * when the message is accepted decide.
 *
 * Each target keeps the accepted recipient's NOTIFY and gets its ORCPT (RFC 3461 §4.2: the
 * original recipient, unless the client already gave one), so a report names the address the
 * sender used. A target already in the envelope with the same envelope sender is delivered once.
 * A hook failure throws: where the message would go is unknown, so it must not be stored.
 */
export async function expandRecipients(
  hooks: Pick<PluginHooks, 'expand'>,
  envelope: {
    readonly sender: Address | null;
    readonly mailParams: MailParams;
    readonly recipients: readonly Recipient[];
  },
): Promise<StoredRecipient[]> {
  const out: StoredRecipient[] = [];
  const seen = new Set<string>();
  const add = (r: StoredRecipient): void => {
    const sender = r.sender === undefined ? envelope.sender : r.sender;
    const key = `${r.address.address.toLowerCase()}\u0000${sender?.address.toLowerCase() ?? ''}`;
    if (seen.has(key)) return;
    seen.add(key);
    out.push(r);
  };
  for (const recipient of envelope.recipients) {
    const expanded = await hooks.expand({
      sender: envelope.sender,
      mailParams: envelope.mailParams,
      recipient,
    });
    if (!expanded) {
      add({ address: recipient.address, params: recipient.params });
      continue;
    }
    const params = targetParams(recipient);
    for (const t of expanded.targets) {
      const differs =
        t.sender !== undefined && (t.sender?.address ?? null) !== (envelope.sender?.address ?? null);
      add({
        address: t.address,
        params,
        ...(differs ? { sender: t.sender } : {}),
        expandedFrom: recipient.address,
      });
    }
  }
  return out;
}

/** The DSN parameters a target inherits from the recipient it was expanded from. */
function targetParams(parent: Recipient): RecipientParams {
  const original = parent.address.address;
  // RFC 6533 §3: a non-ASCII original recipient is typed utf-8, an ASCII one rfc822.
  const orcpt = parent.params.orcpt ?? {
    type: /[^\x00-\x7f]/.test(original) ? 'utf-8' : 'rfc822',
    address: original,
  };
  return { ...(parent.params.notify ? { notify: parent.params.notify } : {}), orcpt };
}

/** What administration shows about a stored recipient's expansion (nothing for a plain one). */
export function expansionOf(r: StoredRecipient): { expandedFrom?: string; sender?: string } {
  return {
    ...(r.expandedFrom ? { expandedFrom: r.expandedFrom.address } : {}),
    ...(r.sender !== undefined ? { sender: r.sender?.address ?? '' } : {}),
  };
}
