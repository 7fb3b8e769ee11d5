import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { MailParams, Recipient } from '../../core/hooks/catalogue.js';
import { makeAddress, type Address } from '../../core/message/address.js';
import { envelopeEdits, type EditableEnvelope } from '../../core/smtp/envelope-edits.js';

function envelope(smtputf8 = false): EditableEnvelope {
  let recipients: readonly Recipient[] = [{ address: makeAddress('bob', 'example.com'), params: {} }];
  return {
    mailParams: { smtputf8 } satisfies MailParams,
    sender: makeAddress('alice', 'example.test') as Address | null,
    get recipients() {
      return recipients;
    },
    setRecipients(list) {
      recipients = Object.freeze([...list]);
    },
  };
}

const opts = { maxRecipients: 3, localDomains: ['local.test'] };
const addresses = (env: EditableEnvelope): string[] => env.recipients.map((r) => r.address.address);

describe('envelope edits at data_post', () => {
  it('changes the sender, to an address or to <>, and refuses one that does not parse, changing nothing', () => {
    const env = envelope();
    const e = envelopeEdits(env, opts);
    e.setSender('other@Example.TEST');
    assert.equal(env.sender?.address, 'other@example.test');
    assert.throws(() => e.setSender('not an address'), TypeError);
    assert.throws(() => e.setSender('jörg@example.test'), TypeError, 'non-ASCII without SMTPUTF8');
    assert.equal(env.sender?.address, 'other@example.test');
    e.setSender('');
    assert.equal(env.sender, null);
  });

  it('adds recipients once each, up to maxRecipients; postmaster alone is the first local domain’s', () => {
    const env = envelope();
    const e = envelopeEdits(env, opts);
    assert.equal(e.addRecipient('carol@example.com'), true);
    assert.equal(e.addRecipient('Carol@EXAMPLE.com'), true, 'the local part is exact');
    assert.equal(e.addRecipient('carol@EXAMPLE.COM'), false, 'the domain is in any case');
    assert.throws(() => e.addRecipient('postmaster'), RangeError);
    assert.deepEqual(addresses(env), ['bob@example.com', 'carol@example.com', 'Carol@example.com']);
    e.removeRecipient('Carol@example.com');
    assert.equal(e.addRecipient('postmaster'), true);
    assert.equal(addresses(env).at(-1), 'postmaster@local.test');
    assert.throws(() => e.addRecipient('<x@y>'), TypeError);
  });

  it('removes every recipient equal to the address, and counts them', () => {
    const env = envelope();
    const e = envelopeEdits(env, opts);
    assert.equal(e.removeRecipient('nobody@example.com'), 0);
    assert.equal(e.removeRecipient('bob@EXAMPLE.com'), 1);
    assert.deepEqual(addresses(env), []);
  });
});
