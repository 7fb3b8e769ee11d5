import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ContentReceiver, HeaderCapture } from '../../core/smtp/content.js';

interface Options {
  dotStuffed: boolean;
  normalize: boolean;
  stripNul?: boolean;
}

/** Feeds the chunks; for BDAT (not dot-stuffed) the content then ends, as at `BDAT … LAST`. */
function run(chunks: string[], opts: Options = { dotStuffed: true, normalize: false }) {
  const r = new ContentReceiver({ stripNul: false, ...opts });
  const out: Buffer[] = [];
  let done = false;
  let rest: Buffer | null = null;
  for (const c of chunks) {
    const res = r.feed(Buffer.from(c, 'latin1'));
    out.push(...res.out);
    if (res.done) {
      done = true;
      rest = res.rest;
      break;
    }
  }
  if (!opts.dotStuffed) out.push(...r.end());
  return {
    text: Buffer.concat(out).toString('latin1'),
    done,
    rest: rest?.toString('latin1') ?? null,
    bare: r.bareLineEnding,
    nul: r.nul,
  };
}

describe('DATA content: dot-unstuffing and the end of data', () => {
  it('ends at CRLF.CRLF and returns what follows', () => {
    const r = run(['a\r\nb\r\n.\r\nQUIT\r\n']);
    assert.deepEqual(r, { text: 'a\r\nb\r\n', done: true, rest: 'QUIT\r\n', bare: false, nul: false });
  });

  it('ends on an empty message', () => {
    assert.deepEqual(run(['.\r\n']), { text: '', done: true, rest: null, bare: false, nul: false });
  });

  it('removes the stuffed dot at the start of a line (RFC 5321 §4.5.2)', () => {
    assert.equal(run(['..hidden\r\n...two\r\n.\r\n']).text, '.hidden\r\n..two\r\n');
  });

  it('finds the end whatever the segmentation', () => {
    const msg = 'Subject: x\r\n\r\n.dot\r\nline\r\n.\r\n';
    for (let size = 1; size <= 5; size++) {
      const chunks: string[] = [];
      for (let i = 0; i < msg.length; i += size) chunks.push(msg.slice(i, i + size));
      const r = run(chunks);
      assert.equal(r.text, 'Subject: x\r\n\r\ndot\r\nline\r\n', `segment size ${size}`);
      assert.ok(r.done);
      assert.equal(r.bare, false);
    }
  });

  it('never ends at a dot after a bare LF, and flags it', () => {
    const r = run(['a\n.\r\nb\r\n.\r\n']);
    assert.ok(r.done);
    assert.equal(r.text, 'a\n.\r\nb\r\n');
    assert.equal(r.bare, true);
  });

  it('flags a bare CR, even at the end of a segment', () => {
    assert.equal(run(['a\rb\r\n.\r\n']).bare, true);
    assert.equal(run(['a\r', 'b\r\n.\r\n']).bare, true);
    assert.equal(run(['a\r', '\nb\r\n.\r\n']).bare, false);
  });

  it('normalises bare LF and CR to CRLF when asked', () => {
    const r = run(['a\nb\rc\r', 'd\r\n.\r\n'], { dotStuffed: true, normalize: true });
    assert.equal(r.text, 'a\r\nb\r\nc\r\nd\r\n');
  });

  it('passes BDAT content through without looking for dots', () => {
    const r = run(['.\r\n..x\r\n'], { dotStuffed: false, normalize: false });
    assert.deepEqual(r, { text: '.\r\n..x\r\n', done: false, rest: null, bare: false, nul: false });
  });

  it('flags a bare CR as the very last octet of BDAT content, as DATA would', () => {
    assert.equal(run(['line\r\nlast\r'], { dotStuffed: false, normalize: false }).bare, true);
    assert.equal(run(['line\r\nlast\r', ''], { dotStuffed: false, normalize: false }).bare, true);
    // A CRLF split between two chunks is a line end, not a bare CR.
    assert.equal(run(['last\r', '\n'], { dotStuffed: false, normalize: false }).bare, false);
  });

  it('completes a final bare CR of BDAT content to CRLF when normalising', () => {
    const r = run(['last\r'], { dotStuffed: false, normalize: true });
    assert.equal(r.text, 'last\r\n');
  });
});

describe('NUL in content', () => {
  it('flags a NUL and keeps the content as received when not stripping', () => {
    const r = run(['a\0b\r\n.\r\n']);
    assert.equal(r.nul, true);
    assert.equal(r.text, 'a\0b\r\n');
  });

  it('strips NULs when asked, in DATA and BDAT alike', () => {
    const data = run(['\0a\0b\r\n', 'c\0\r\n.\r\n'], { dotStuffed: true, normalize: false, stripNul: true });
    assert.equal(data.text, 'ab\r\nc\r\n');
    assert.equal(data.nul, true);
    const bdat = run(['\0a\0b\r\n', 'c\0\r\n'], { dotStuffed: false, normalize: false, stripNul: true });
    assert.equal(bdat.text, 'ab\r\nc\r\n');
  });

  it('never makes an end of data out of a line that only a NUL kept from being one', () => {
    const r = run(['a\r\n\0.\r\nMAIL FROM:<evil@example.test>\r\n.\r\n'], {
      dotStuffed: true,
      normalize: false,
      stripNul: true,
    });
    assert.ok(r.done);
    assert.equal(r.rest, null);
    assert.equal(r.text, 'a\r\n.\r\nMAIL FROM:<evil@example.test>\r\n');
  });
});

describe('header capture', () => {
  it('stops at the blank line even when it is split across chunks', () => {
    const h = new HeaderCapture(1 << 20);
    for (const part of ['Subject: a\r', '\n', '\r', '\nbody that is not kept\r\n']) h.add(Buffer.from(part));
    assert.equal(h.bytes().toString(), 'Subject: a\r\n\r\nbody that is not kept\r\n');
    h.add(Buffer.from('more'));
    assert.ok(!h.bytes().toString().includes('more'), 'nothing is kept after the header block');
  });

  it('does linear work for many tiny chunks (a body of ".." lines cannot stall the server)', () => {
    // Count the bytes copied by Buffer.concat: joining everything on each chunk is quadratic.
    const original = Buffer.concat;
    let copied = 0;
    Buffer.concat = ((list: readonly Uint8Array[], total?: number) => {
      copied += list.reduce((n, b) => n + b.length, 0);
      return original(list, total);
    }) as typeof Buffer.concat;
    try {
      const h = new HeaderCapture(1 << 20);
      const chunk = Buffer.from('.\r\n');
      for (let i = 0; i < 100_000; i++) h.add(chunk);
      assert.equal(h.bytes().length, 300_000);
    } finally {
      Buffer.concat = original;
    }
    // Linear: a few bytes of overlap per chunk plus one final join (quadratic would be ~1.5e10).
    assert.ok(copied < 2_000_000, `copied ${copied} bytes`);
  });
});
