import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import libqp from 'libqp';
import {
  Base64Encoder,
  Base64Repair,
  QuotedPrintableEncoder,
  QuotedPrintableRepair,
  SevenBitScanner,
  maskEightBit,
  type ChunkCoder,
} from './encoders.js';

/** Feeds `input` to a fresh coder in random slices (sometimes one octet at a time). */
function code(make: () => ChunkCoder, input: Buffer, maxSlice = 200): Buffer {
  const coder = make();
  const out: Buffer[] = [];
  for (let i = 0; i < input.length;) {
    const n = Math.min(input.length - i, randomInt(0, maxSlice) === 0 ? 1 : randomInt(1, maxSlice + 1));
    out.push(Buffer.from(coder.update(input.subarray(i, i + n))));
    i += n;
  }
  out.push(coder.end());
  return Buffer.concat(out);
}

/** Text-like data: words, whitespace at line ends, hyphens, '=', UTF-8, every line break form. */
function textLike(size: number): Buffer {
  const pieces = [
    'word',
    ' ',
    '\t',
    '-',
    '--',
    '=',
    '.',
    'Grüße',
    '中文',
    '\r\n',
    '\n',
    '\r',
    ' \r\n',
    '\t\n',
  ];
  const parts: Buffer[] = [];
  let n = 0;
  while (n < size) {
    const p = Buffer.from(pieces[randomInt(pieces.length)]!.repeat(randomInt(1, 4)));
    parts.push(p);
    n += p.length;
  }
  return Buffer.concat(parts);
}

const canonical = (b: Buffer): Buffer =>
  Buffer.from(b.toString('latin1').replace(/\r\n|\r|\n/g, '\r\n'), 'latin1');

function lines(out: Buffer): string[] {
  const s = out.toString('latin1');
  assert.ok(!/\r(?!\n)|(?<!\r)\n/.test(s), 'only CRLF line breaks');
  return s.split('\r\n');
}

describe('QuotedPrintableEncoder', () => {
  it('decodes back to the text, with canonical CRLF line breaks, however the input is split', () => {
    for (let round = 0; round < 50; round++) {
      const input = round % 5 === 0 ? randomBytes(2000) : textLike(3000);
      const out = code(() => new QuotedPrintableEncoder(), input);
      assert.ok(libqp.decode(out.toString('latin1')).equals(canonical(input)), `round ${round}`);
      // The same output for any split.
      assert.ok(code(() => new QuotedPrintableEncoder(), input, 7).equals(out));
      for (const line of lines(out)) {
        assert.ok(line.length <= 76, `line of ${line.length}`);
        assert.ok(!line.startsWith('-'), 'no line starts with a hyphen');
        assert.ok(!/[ \t]$/.test(line), 'no whitespace at a line end');
        assert.ok(/^[\x21-\x7e \t]*$/.test(line), 'printable ASCII only');
      }
    }
  });

  it('keeps the escapes of one UTF-8 character on one line', () => {
    const text = Buffer.from('一二三四五六七八九十'.repeat(40) + '🙂'.repeat(50));
    const out = code(() => new QuotedPrintableEncoder(), text);
    for (const line of lines(out)) {
      const bytes = libqp.decode(line.replace(/=$/, ''));
      assert.doesNotThrow(() => new TextDecoder('utf-8', { fatal: true }).decode(bytes), line);
    }
  });

  it('escapes whitespace that ends the part and a hyphen that starts a line', () => {
    const encode = (s: string): string => code(() => new QuotedPrintableEncoder(), Buffer.from(s)).toString();
    assert.equal(encode('a \r\n--b\r\nc\t'), 'a=20\r\n=2D-b\r\nc=09');
    assert.equal(encode('x = 1'), 'x =3D 1');
    assert.equal(encode('ü\r'), '=C3=BC\r\n');
  });
});

describe('Base64Encoder', () => {
  it('writes 76-character lines of the standard alphabet, however the input is split', () => {
    for (let round = 0; round < 30; round++) {
      const input = randomBytes(randomInt(0, 5000));
      const out = code(() => new Base64Encoder(), input);
      const expected = input.toString('base64').replace(/.{76}(?=.)/g, '$&\r\n');
      assert.equal(out.toString(), expected);
    }
  });

  it('ends with CRLF when asked (a body that ends the message)', () => {
    assert.equal(code(() => new Base64Encoder(true), Buffer.from('hi')).toString(), 'aGk=\r\n');
    assert.equal(code(() => new Base64Encoder(true), Buffer.alloc(0)).toString(), '');
  });
});

describe('the repairs of parts labelled base64 or quoted-printable', () => {
  it('hand clean input back as it is', () => {
    const b64 = Buffer.from(randomBytes(3000).toString('base64').replace(/.{76}/g, '$&\r\n'));
    const repair = new Base64Repair();
    assert.equal(repair.update(b64), b64);
    const qp = Buffer.from('Gr=C3=BC=C3=9Fe, soft=\r\nbreak\r\n');
    const qpRepair = new QuotedPrintableRepair();
    assert.equal(qpRepair.update(qp), qp);
  });

  it('base64: drop 8-bit octets and NULs, break lines past 998, decode the same', () => {
    const data = randomBytes(6000);
    const dirty = Buffer.from(data.toString('base64'), 'latin1');
    for (let i = 0; i < dirty.length; i += 1234) dirty[i] = 0xff; // overwrite: those chars become noise
    const noisy = Buffer.concat([dirty.subarray(0, 500), Buffer.from([0xc3, 0x00]), dirty.subarray(500)]);
    const out = code(() => new Base64Repair(), noisy);
    assert.ok(lines(out).every((l) => l.length <= 998 && /^[A-Za-z0-9+/=]*$/.test(l)));
    const readerSees = Buffer.from(noisy.toString('latin1').replace(/[^A-Za-z0-9+/=]/g, ''), 'base64');
    assert.ok(Buffer.from(out.toString(), 'base64').equals(readerSees));
  });

  it('quoted-printable: escape raw octets, soft-break long lines outside escapes, decode the same', () => {
    for (let round = 0; round < 30; round++) {
      const pieces = ['abc', '=C3=BC', '=', '=4', ' ', 'ü', '\u0000', '=\r\n', '\r\n', 'x'.repeat(700)];
      const input = Buffer.from(
        Array.from({ length: 200 }, () => pieces[randomInt(pieces.length)]).join(''),
        'utf8',
      );
      const out = code(() => new QuotedPrintableRepair(), input);
      assert.ok(lines(out).every((l) => l.length <= 998 && /^[\x20-\x7e\t]*$/.test(l)));
      assert.ok(libqp.decode(out.toString('latin1')).equals(libqp.decode(input)), `round ${round}`);
    }
  });
});

describe('SevenBitScanner and maskEightBit', () => {
  it('finds 8-bit octets, NULs and lines longer than 998 octets across chunks', () => {
    const scan = (...chunks: string[]): boolean => {
      const s = new SevenBitScanner();
      for (const c of chunks) s.update(Buffer.from(c, 'latin1'));
      return s.unsafe;
    };
    assert.equal(scan('plain\r\n', 'text\r\n'), false);
    assert.equal(scan('plain', '\u00e9'), true);
    assert.equal(scan('nul \u0000'), true);
    assert.equal(scan('x'.repeat(998), '\r\n', 'y'.repeat(998)), false);
    assert.equal(scan('x'.repeat(500), 'x'.repeat(499)), true);
    const headersOnly = new SevenBitScanner(true);
    headersOnly.update(Buffer.from('x'.repeat(2000) + '\u0000'));
    assert.equal(headersOnly.unsafe, false);
  });

  it('masks 8-bit octets with ?', () => {
    const clean = Buffer.from('clean');
    assert.equal(maskEightBit(clean), clean);
    assert.equal(maskEightBit(Buffer.from('Grüße')).toString(), 'Gr????e');
  });
});
