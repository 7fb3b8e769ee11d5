import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import v8 from 'node:v8';
import vm from 'node:vm';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Splitter, type SplitterChunk } from '@zone-eu/mailsplit';
import { routeTo } from '../../core/index.js';
import { runHook } from '../../core/testing/index.js';
import mime7bit from './index.js';

const MB = 1024 * 1024;
const TEXT_LINE = Buffer.from(
  'Grüße aus Köln – 中文也可以 – naïve café, ½ × ÿ; plain ASCII words follow here.\r\n',
);
const BLOCK = randomBytes(64 * 1024);

/**
 * A generated ~20 MB 8-bit message (a 12 MB 8bit text part, an 8 MB binary attachment), with a
 * count of how much of it was read so far and hashes of what the parts hold.
 */
function bigMessage(): { stream: Readable; read: () => number; size: number; text: string; binary: string } {
  const head = Buffer.from(
    [
      'From: "Jöhn" <john@example.test>',
      'To: bob@example.test',
      'Subject: Großes Paket',
      'MIME-Version: 1.0',
      'Content-Type: multipart/mixed; boundary="big"',
      '',
      '--big',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      '',
    ].join('\r\n'),
  );
  const middle = Buffer.from(
    '\r\n--big\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=big.bin\r\nContent-Transfer-Encoding: binary\r\n\r\n',
  );
  const tail = Buffer.from('\r\n--big--\r\n');
  const textLines = Math.ceil((12 * MB) / TEXT_LINE.length);
  const textBlock = Buffer.concat(Array.from({ length: 500 }, () => TEXT_LINE));
  const binaryBlocks = (8 * MB) / BLOCK.length;

  const text = createHash('sha256');
  const binary = createHash('sha256');
  for (let i = 0; i < textLines; i += 500)
    text.update(i + 500 <= textLines ? textBlock : TEXT_LINE.toString().repeat(textLines - i));
  for (let i = 0; i < binaryBlocks; i++) binary.update(BLOCK);

  let read = 0;
  function* chunks(): Generator<Buffer> {
    yield head;
    for (let i = 0; i < textLines; i += 500) {
      yield i + 500 <= textLines ? textBlock : Buffer.from(TEXT_LINE.toString().repeat(textLines - i));
    }
    yield middle;
    for (let i = 0; i < binaryBlocks; i++) yield BLOCK;
    yield tail;
  }
  const counted = (function* () {
    for (const c of chunks()) {
      read += c.length;
      yield c;
    }
  })();
  const size =
    head.length + middle.length + tail.length + textLines * TEXT_LINE.length + binaryBlocks * BLOCK.length;
  return {
    stream: Readable.from(counted, { objectMode: false }),
    read: () => read,
    size,
    text: text.digest('hex'),
    binary: binary.digest('hex'),
  };
}

/**
 * What is alive after a full garbage collection: V8 heap plus Buffer memory. (RSS would count
 * garbage not yet collected and memory the allocator keeps for reuse.)
 */
function liveMemory(): number {
  v8.setFlagsFromString('--expose-gc');
  (vm.runInNewContext('gc') as () => void)();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

function transform(content: Readable): Promise<Readable> {
  return runHook(mime7bit, 'transform', {
    message: {
      id: 'QBIG',
      sender: null,
      mailParams: { smtputf8: false },
      receivedAt: new Date(),
      size: 0,
      stream: () => content,
    },
    route: routeTo('smtp').route,
    peer: { eightBitMime: false, smtputf8: false },
    content,
  });
}

describe('mime-7bit: a 20 MB 8-bit message streams', () => {
  it('gives its first output long before the input is read, in bounded memory, all 7-bit', async () => {
    const msg = bigMessage();
    assert.ok(msg.size > 19 * MB);
    // Load every module the rewrite uses first, so that only the message is measured.
    const warm = await transform(Readable.from([Buffer.from('Subject: ü\r\n\r\nü\r\n')]));
    for await (const _ of warm);
    const before = liveMemory();
    let peak = before;
    let readAtFirstOutput = -1;
    let written = 0;
    let column = 0;
    let bad = 0;
    const out = await transform(msg.stream);
    await pipeline(
      out,
      new Writable({
        write(chunk: Buffer, _encoding, callback) {
          if (readAtFirstOutput < 0) readAtFirstOutput = msg.read();
          for (let i = 0; i < chunk.length; i++) {
            const b = chunk[i]!;
            if (b >= 0x80 || b === 0) bad++;
            if (b === 0x0a) column = 0;
            else if (b !== 0x0d && ++column > 998) bad++;
          }
          // Every 2 MB of output, see what the whole pipeline holds.
          if (Math.floor((written + chunk.length) / (2 * MB)) > Math.floor(written / (2 * MB))) {
            peak = Math.max(peak, liveMemory());
          }
          written += chunk.length;
          callback();
        },
      }),
    );
    assert.equal(bad, 0, 'every octet 7-bit, every line at most 998 octets');
    assert.equal(msg.read(), msg.size);
    assert.ok(readAtFirstOutput < 2 * MB, `first output after ${readAtFirstOutput} octets of input`);
    assert.ok(written > msg.size, 'quoted-printable and base64 are larger than 8-bit');
    const growth = peak - before;
    if (process.env.MIME7BIT_VERBOSE) console.log(`live memory grew by ${(growth / MB).toFixed(2)} MB`);
    // What the stream buffers hold (a few chunks per stage), whatever the size of the message.
    assert.ok(growth < 8 * MB, `live memory grew by ${(growth / MB).toFixed(1)} MB`);
  });

  it('stops reading its input while nobody reads its output', async () => {
    const msg = bigMessage();
    const out = await transform(msg.stream);
    out.once('readable', () => undefined);
    await sleep(300);
    const stalled = msg.read();
    assert.ok(stalled < 4 * MB, `read ${stalled} octets with no reader`);
    out.destroy();
  });

  it('decodes to the very same text and attachment', async () => {
    const msg = bigMessage();
    const out = await transform(msg.stream);
    const hashes: string[] = [];
    let current: { hash: ReturnType<typeof createHash>; decoder: NodeJS.ReadWriteStream } | null = null;
    const finish = async (): Promise<void> => {
      if (!current) return;
      const { hash, decoder } = current;
      current = null;
      const done = new Promise<void>((resolve) => decoder.once('end', resolve));
      decoder.end();
      await done;
      hashes.push(hash.digest('hex'));
    };
    await pipeline(
      out,
      new Splitter(),
      new Writable({
        objectMode: true,
        write(chunk: SplitterChunk, _encoding, callback) {
          (async () => {
            if (chunk.type === 'node') {
              await finish();
              if (!chunk.multipart) {
                const hash = createHash('sha256');
                const decoder = chunk.getDecoder();
                decoder.on('data', (d: Buffer) => hash.update(d));
                current = { hash, decoder };
              }
            } else if (chunk.type === 'body' && current) {
              current.decoder.write(chunk.value);
            } else if (chunk.type === 'data') {
              await finish();
            }
          })().then(() => callback(), callback);
        },
        final(callback) {
          finish().then(() => callback(), callback);
        },
      }),
    );
    assert.deepEqual(hashes, [msg.text, msg.binary]);
  });
});
