import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { MessageCopy } from '../../core/index.js';

async function text(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('latin1');
}

describe('MessageCopy: a message read whole, to be read again', () => {
  const message = `Subject: big\r\nFrom: a@b.test\r\n\r\n${'x'.repeat(200_000)}\r\n`;
  const chunks = (size: number) =>
    Readable.from(
      (function* () {
        for (let i = 0; i < message.length; i += size)
          yield Buffer.from(message.slice(i, i + size), 'latin1');
      })(),
    );

  it('keeps the start in memory and the rest in a temporary file that is already gone from the folder', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-copy-'));
    try {
      const copy = await MessageCopy.of(chunks(4096), { memoryLimit: 65_536, tempDir: dir });
      assert.equal(copy.size, Buffer.byteLength(message, 'latin1'));
      assert.equal(copy.inMemoryOnly, false);
      assert.deepEqual(readdirSync(dir), [], 'unlinked as soon as it was opened');
      assert.equal(copy.headerBlock().toString(), 'Subject: big\r\nFrom: a@b.test\r\n\r\n');
      assert.equal(await text(Readable.from(copy.octets())), message, 'read again, exactly');
      assert.equal(await text(copy.stream(Buffer.from('X-Top: 1\r\n'))), `X-Top: 1\r\n${message}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('needs no file for a message within the memory limit', async () => {
    const copy = await MessageCopy.of(chunks(1000), { memoryLimit: 1_048_576, tempDir: '/nonexistent' });
    assert.equal(copy.inMemoryOnly, true);
    assert.equal(await text(copy.stream()), message);
  });
});
