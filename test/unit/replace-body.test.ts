import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SpooledBody } from '../../core/message/body.js';
import { ReceivedMessage } from '../../core/message/message.js';

const MESSAGE = 'Subject: Hello\r\nX-Tag: one\r\n\r\nThe old body.\r\nSecond line.\r\n';

async function received(
  threshold: number,
  dir: string,
  opts: { text?: string; maxBodySize?: number } = {},
): Promise<ReceivedMessage> {
  const body = new SpooledBody(dir, 'm.eml', threshold);
  const bytes = Buffer.from(opts.text ?? MESSAGE);
  // Small chunks, so the header block's end straddles chunk boundaries.
  for (let i = 0; i < bytes.length; i += 5) await body.write(bytes.subarray(i, i + 5));
  await body.end();
  let n = 0;
  return new ReceivedMessage(bytes, body, {
    scratch: () => new SpooledBody(dir, `m.body-${n++}`, threshold),
    maxBodySize: opts.maxBodySize ?? 1 << 20,
  });
}

async function read(m: ReceivedMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of m.streamRaw()) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

describe('replacing the body at data_post (replaceBody)', () => {
  for (const [where, threshold] of [
    ['in memory', 1 << 20],
    ['spilled to a file', 0],
  ] as const) {
    it(`${where}: the header block stays, the body is the new one, and size follows`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'petrel-replbody-'));
      try {
        const m = await received(threshold, dir);
        const r = m.replaceBody();
        await r.write(Buffer.from('New body, '));
        await r.write(Buffer.from('in two writes.\r\n'));
        assert.equal(await read(m), MESSAGE, 'readers see the old body until commit');
        await r.commit();
        const text = 'Subject: Hello\r\nX-Tag: one\r\n\r\nNew body, in two writes.\r\n';
        assert.equal(await read(m), text);
        assert.equal(m.size, Buffer.byteLength(text));
        // Header edits still find their fields after the body changed.
        await m.removeHeaders((f) => f.name === 'X-Tag');
        assert.equal(await read(m), 'Subject: Hello\r\n\r\nNew body, in two writes.\r\n');
        assert.deepEqual(readdirSync(dir).sort(), threshold === 0 ? ['m.eml'] : [], 'no scratch file left');
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  it('bare LF and CR become CRLF (even split across writes), and a last line gets its line end', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-replbody-'));
    try {
      const m = await received(1 << 20, dir);
      const r = m.replaceBody();
      await r.write(Buffer.from('one\ntwo\r'));
      await r.write(Buffer.from('\nthree\rfour'));
      await r.commit();
      assert.equal(await read(m), 'Subject: Hello\r\nX-Tag: one\r\n\r\none\r\ntwo\r\nthree\r\nfour\r\n');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a message without an empty line keeps all of its header and gains one before the new body', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-replbody-'));
    try {
      const m = await received(0, dir, { text: 'Subject: only a header\r\n' });
      const r = m.replaceBody();
      await r.write(Buffer.from('Body.\r\n'));
      await r.commit();
      assert.equal(await read(m), 'Subject: only a header\r\n\r\nBody.\r\n');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('over the size bound, or with a NUL, the write rejects and the message is unchanged; abort and release drop the copy', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-replbody-'));
    try {
      const m = await received(0, dir, { maxBodySize: 16 });
      const big = m.replaceBody();
      await big.write(Buffer.from('0123456789'));
      await assert.rejects(big.write(Buffer.from('0123456789')), RangeError);
      await assert.rejects(big.commit(), /already committed or aborted/);
      const nul = m.replaceBody();
      await assert.rejects(nul.write(Buffer.from('a\0b')), /NUL/);
      const dropped = m.replaceBody();
      await dropped.write(Buffer.from('never used\r\n'));
      await dropped.abort();
      const forgotten = m.replaceBody();
      await forgotten.write(Buffer.from('left open\r\n'));
      await m.release();
      assert.equal(await read(m), MESSAGE);
      assert.deepEqual(readdirSync(dir), ['m.eml']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
