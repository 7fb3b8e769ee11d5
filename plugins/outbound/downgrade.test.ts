import 'reflect-metadata';
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { simpleParser } from 'mailparser';
import mime7bit from '../mime-7bit/index.js';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { FAST, freePortOn, smtpPeer, startSender } from './test-support.js';

/**
 * Bodies must survive 7-bit-only peers: through the queue, the transform chain and outbound, a
 * peer without 8BITMIME receives a 7-bit clean message that decodes to exactly what was sent.
 */
describe('outbound with mime-7bit: a peer without 8BITMIME', () => {
  it('receives a 7-bit clean body that decodes to the same text and attachments', async (t) => {
    const ip = '127.0.0.6';
    const port = await freePortOn([ip]);
    const dns = await startDnsmasq(t, {
      mx: [{ domain: 'seven.test', host: 'mx.seven.test', preference: 10 }],
      hosts: [{ name: 'mx.seven.test', addresses: [ip] }],
    });
    if (!dns) return;
    const peer = await smtpPeer(t, ip, port, { hide8BITMIME: true, hideSMTPUTF8: true });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST },
      before: [mime7bit],
    });
    const binary = randomBytes(3000);
    const latin1 = Buffer.from('Voil\xe0 un caf\xe9 cr\xe8me, s\xfbr.\r\n', 'latin1');
    const original = Buffer.concat([
      Buffer.from(
        [
          'From: "Zo\u00e9 M\u00fcller" <alice@petrel.test>',
          'To: bob@seven.test',
          'Subject: \u4f60\u597d, caf\u00e9',
          'MIME-Version: 1.0',
          'Content-Type: multipart/mixed; boundary="b1"',
          '',
          '--b1',
          'Content-Type: text/plain; charset=utf-8',
          'Content-Transfer-Encoding: 8bit',
          '',
          '\u4e2d\u6587\u5185\u5bb9\uff0c\u4e00\u5207\u987a\u5229\u3002',
          '--b1',
          'Content-Type: text/plain; charset=iso-8859-1',
          'Content-Transfer-Encoding: 8bit',
          '',
          '',
        ].join('\r\n'),
        'utf8',
      ),
      latin1,
      Buffer.from(
        '--b1\r\nContent-Type: application/octet-stream; name="data.bin"\r\nContent-Disposition: attachment; filename="data.bin"\r\nContent-Transfer-Encoding: binary\r\n\r\n',
      ),
      binary,
      Buffer.from('\r\n--b1--\r\n'),
    ]);
    const id = await sender.submit(['bob@seven.test'], original);
    const [outcome] = await sender.settled(id, 1);
    assert.equal(outcome!.status, 'delivered', JSON.stringify(outcome));
    assert.deepEqual(sender.peers.at(-1), { eightBitMime: false, smtputf8: false });
    const received = peer.messages.at(-1)!;
    assert.equal(received.mailArgs.BODY, undefined, 'no BODY=8BITMIME to a peer that does not offer it');
    for (const [i, byte] of received.data.entries()) {
      if (byte > 127 || byte === 0) assert.fail(`8-bit octet ${byte} at ${i} reached the 7-bit peer`);
    }
    assert.ok(
      received.data
        .toString('latin1')
        .split('\r\n')
        .every((l) => l.length <= 998),
    );
    const [a, b] = await Promise.all([simpleParser(original), simpleParser(received.data)]);
    assert.equal(b.subject, a.subject);
    assert.equal(b.from?.text, a.from?.text);
    assert.equal(b.text, a.text);
    assert.equal(b.attachments.length, a.attachments.length);
    for (const [i, att] of a.attachments.entries()) {
      assert.equal(b.attachments[i]!.filename, att.filename);
      assert.ok(b.attachments[i]!.content.equals(att.content), `attachment ${i} is byte-identical`);
    }
    assert.match(b.text ?? '', /\u4e2d\u6587\u5185\u5bb9/);
    assert.match(b.text ?? '', /Voil\u00e0 un caf\u00e9 cr\u00e8me/);
  });
});
