import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import libmime from 'libmime';
import { decodeHeaderOctets, encodeAddressList, encodeHeaderLine, encodeParameters } from './headers.js';

/** A header line as the splitter holds it: one char per octet. */
const binary = (text: string, encoding: BufferEncoding = 'utf8'): string =>
  Buffer.from(text, encoding).toString('latin1');

function assertFolded(line: string): void {
  assert.ok(/^[\x00-\x7f]*$/.test(line), `ASCII only: ${line}`);
  for (const l of line.split('\r\n')) assert.ok(l.length <= 998);
  assert.ok(!/\r\n(?![ \t])/.test(line), 'every fold is followed by whitespace');
}

describe('encodeHeaderLine', () => {
  it('turns unstructured text into encoded words and folds long lines', () => {
    const subject = 'Grüße aus Köln — 你好，世界！ '.repeat(4).trim();
    const line = encodeHeaderLine(binary(`Subject: ${subject}`));
    assertFolded(line);
    assert.ok(line.split('\r\n').every((l) => l.length <= 78));
    assert.equal(libmime.decodeWords(line.replace(/\r\n/g, '').replace(/^Subject:\s*/, '')), subject);
  });

  it('keeps the first encoded word on the field line: no fold straight after the colon', () => {
    const subject = '你好'.repeat(40);
    for (const name of ['Subject', 'X-A-Rather-Long-Field-Name', 'X-'.padEnd(60, 'y')]) {
      const line = encodeHeaderLine(binary(`${name}: ${subject}`));
      assertFolded(line);
      const [first, ...rest] = line.split('\r\n');
      assert.ok(first!.startsWith(`${name}: =?UTF-8?Q?`), first);
      // RFC 2047 §2: 76 characters a line, unless the name alone leaves no room for a word.
      if (name.length < 30) assert.ok(first!.length <= 76, first);
      assert.ok(
        rest.every((l) => l.length <= 76 && /^ =\?UTF-8\?Q\?/.test(l)),
        line,
      );
      assert.equal(
        libmime.decodeWords(
          line
            .slice(name.length + 1)
            .replace(/\r\n/g, '')
            .trim(),
        ),
        subject,
      );
    }
    const from = encodeHeaderLine(
      binary('From: "Jörg Müller-Lüdenscheidt von und zu Überlingen" <jorg@crepes.test>'),
    );
    assert.match(from, /^From: =\?UTF-8\?Q\?J=C3=B6rg/);
  });

  it('reads octets that are not UTF-8 in the given charset, else as Windows-1252', () => {
    assert.equal(decodeHeaderOctets(Buffer.from('Grüße', 'latin1')), 'Grüße');
    assert.equal(decodeHeaderOctets(Buffer.from([0xc7, 0xc4, 0xd2]), 'koi8-r'), 'гдр');
    assert.equal(decodeHeaderOctets(Buffer.from([0x80]), 'x-unknown'), '€');
    assert.equal(decodeHeaderOctets(Buffer.from('中文')), '中文');
    const line = encodeHeaderLine(binary('Subject: Grüße', 'latin1'), 'iso-8859-1');
    assert.equal(line, 'Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=');
  });

  it('re-encodes Content-Type and Content-Disposition parameters as RFC 2231', () => {
    const line = encodeHeaderLine(binary('Content-Disposition: attachment; filename="Résumé 履历.pdf"'));
    assertFolded(line);
    const parsed = libmime.parseHeaderValue(line.replace(/^Content-Disposition: /, '').replace(/\r\n/g, ''));
    assert.equal(parsed.value, 'attachment');
    assert.equal(parsed.params.filename, 'Résumé 履历.pdf');
    assert.equal(encodeParameters('text/plain; charset=utf-8'), 'text/plain; charset=utf-8');
  });

  it('leaves a line without a colon 7-bit', () => {
    assert.equal(encodeHeaderLine(binary('broken ü')), 'broken ??');
  });
});

describe('encodeAddressList', () => {
  const decode = (s: string): string => libmime.decodeWords(s);

  it('encodes display names, quoted or not, and leaves ASCII mailboxes exactly as written', () => {
    const out = encodeAddressList(
      '"Müller, Hans" <hans@example.test>,  Plain <p@example.test>, 张三 <z@example.test>',
    );
    assert.equal(
      out,
      '=?UTF-8?Q?M=C3=BCller=2C_Hans?= <hans@example.test>,  Plain <p@example.test>, =?UTF-8?Q?=E5=BC=A0=E4=B8=89?= <z@example.test>',
    );
    assert.equal(decode(out.split(' <')[0]!), 'Müller, Hans');
  });

  it('keeps groups and encodes comments in place', () => {
    const out = encodeAddressList('Équipe: a@example.test, b@example.test (Bérénice);, c@example.test');
    assert.match(out, /^=\?UTF-8\?Q\?=C3=89quipe\?=: a@example\.test, b@example\.test \(=\?UTF-8\?Q\?B/);
    assert.match(out, /\);, c@example\.test$/);
  });

  it('writes an internationalised domain as punycode', () => {
    assert.equal(encodeAddressList('Ana <ana@bücher.test>'), 'Ana <ana@xn--bcher-kva.test>');
    assert.equal(encodeAddressList('ana@bücher.test'), 'ana@xn--bcher-kva.test');
  });

  it('turns a mailbox whose local part is not ASCII into an empty group that names it', () => {
    const out = encodeAddressList('李雷 <李雷@例子.test>, bob@example.test');
    assert.match(out, /^(=\?UTF-8\?Q\?[^ ]+\?= )+:;, bob@example\.test$/);
    assert.ok(/^[\x20-\x7e]*$/.test(out));
    assert.equal(decode(out.split(' :;')[0]!), '李雷 <李雷@例子.test>');
  });
});
