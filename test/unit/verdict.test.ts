import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { accept, defer, deny, disconnect, proceed } from '../../core/hooks/verdict.js';
import { formatReply } from '../../core/smtp/reply.js';

describe('verdict helpers', () => {
  it('build the verdicts with their replies', () => {
    assert.deepEqual(proceed(), { kind: 'proceed' });
    assert.deepEqual(deny(550, '5.7.1', 'Relaying denied'), {
      kind: 'deny',
      reply: { code: 550, enhanced: '5.7.1', text: 'Relaying denied' },
    });
    const d = defer();
    assert.ok(d.kind === 'defer' && d.reply.code === 451 && d.reply.enhanced === '4.0.0');
    assert.equal(accept({ text: 'fine' }).kind, 'accept');
    assert.equal(disconnect().kind, 'disconnect');
  });

  it('refuse a code of the wrong class, so a typo fails where it is written', () => {
    assert.throws(() => deny(450, '4.0.0', 'x'), /5xx/);
    assert.throws(() => deny(550, '4.7.1', 'x'), /class 5/);
    assert.throws(() => defer(550, '5.0.0', 'x'), /4xx/);
    assert.throws(() => deny(550, '5.7', 'x'), /enhanced/);
    assert.throws(() => accept({ code: 550 }), /2xx/);
  });
});

describe('reply formatting', () => {
  it('formats multi-line replies with the enhanced code on each line', () => {
    assert.equal(formatReply(250, '2.0.0', ['one', 'two']), '250-2.0.0 one\r\n250 2.0.0 two\r\n');
    assert.equal(formatReply(220, null, 'hi'), '220 hi\r\n');
  });

  it('turns a line break inside plugin text into separate reply lines, never a forged reply', () => {
    assert.equal(formatReply(550, '5.7.1', 'no\r\n250 ok'), '550-5.7.1 no\r\n550 5.7.1 250 ok\r\n');
  });
});
