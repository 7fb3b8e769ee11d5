import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { foldHeaderField } from '../../core/index.js';
import { Headers } from '../../core/message/headers.js';

/** The value a reader gets back: RFC 5322 §2.2.3 unfolding, as `Headers.parse` does it. */
const unfold = (field: string): string | undefined =>
  Headers.parse(Buffer.from(`${field}\r\n\r\n`)).list()[0]?.value;

describe('foldHeaderField', () => {
  it('folds before white space, within the width, and reads back exactly', () => {
    const value = Array.from({ length: 30 }, (_, i) => `word${i}`).join(' ') + '  two  spaces\tand a tab';
    const field = foldHeaderField('Subject', value);
    const lines = field.split('\r\n');
    assert.ok(lines.length > 1, field);
    assert.ok(
      lines.every((l) => l.length <= 76),
      field,
    );
    assert.ok(
      lines.slice(1).every((l) => /^[ \t]/.test(l) && /\S/.test(l)),
      field,
    );
    assert.equal(unfold(field), value);
  });

  it('never folds straight after the colon, even when the first word is longer than a line', () => {
    const word = `=?UTF-8?Q?${'=E4=BD=A0'.repeat(30)}?=`;
    const field = foldHeaderField('Subject', `${word} ${word}`);
    const [first, second] = field.split('\r\n');
    assert.equal(first, `Subject: ${word}`);
    assert.equal(second, ` ${word}`);
    assert.equal(foldHeaderField('X-Long-Name', 'short'), 'X-Long-Name: short');
  });

  it('leaves no line that is only white space (RFC 5322 §3.2.2)', () => {
    const value = `${'a'.repeat(70)}${' '.repeat(20)}${'b'.repeat(70)}`;
    const field = foldHeaderField('Comments', value);
    assert.ok(
      field.split('\r\n').every((l) => /\S/.test(l)),
      JSON.stringify(field),
    );
    assert.equal(unfold(field), value);
  });
});
