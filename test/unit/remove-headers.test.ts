import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SpooledBody } from '../../core/message/body.js';
import { ReceivedMessage } from '../../core/message/message.js';
import { scanHeaderFields } from '../../core/message/headers.js';

const MESSAGE = [
  'Authentication-Results: mx.test; dkim=pass',
  'Subject: Hello',
  'Authentication-Results: mx.test;',
  '\tspf=pass',
  'X-Other: kept',
  '',
  'Authentication-Results: in the body, not a field',
  '',
].join('\r\n');

async function received(threshold: number, dir: string, text = MESSAGE): Promise<ReceivedMessage> {
  const body = new SpooledBody(dir, `m${threshold}`, threshold);
  // Small chunks, so a removed field straddles chunk boundaries.
  const bytes = Buffer.from(text);
  for (let i = 0; i < bytes.length; i += 7) await body.write(bytes.subarray(i, i + 7));
  await body.end();
  return new ReceivedMessage(bytes.subarray(0, bytes.indexOf('\r\n\r\n') + 4), body, {
    scratch: () => new SpooledBody(dir, `m${threshold}.body`, threshold),
    maxBodySize: 1 << 20,
  });
}

async function read(m: ReceivedMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of m.stream()) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

describe('removing received header fields (data_post removeHeaders)', () => {
  for (const [where, threshold] of [
    ['in memory', 1 << 20],
    ['spilled to a file', 0],
  ] as const) {
    it(`takes the fields out of the stored octets, folded lines and all, leaving the body (${where})`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'petrel-remove-'));
      try {
        const m = await received(threshold, dir);
        const removed = await m.removeHeaders((f) => f.name.toLowerCase() === 'authentication-results');
        assert.deepEqual(removed, [
          { name: 'Authentication-Results', value: 'mx.test; dkim=pass' },
          { name: 'Authentication-Results', value: 'mx.test;\tspf=pass' },
        ]);
        m.prepend('Authentication-Results', 'mx.test; none');
        const expected =
          'Authentication-Results: mx.test; none\r\nSubject: Hello\r\nX-Other: kept\r\n\r\n' +
          'Authentication-Results: in the body, not a field\r\n';
        assert.equal(await read(m), expected);
        assert.equal(
          m.size,
          Buffer.byteLength(expected) - 'Authentication-Results: mx.test; none\r\n'.length,
        );
        assert.deepEqual(
          m.headers.list().map((f) => f.name),
          ['Subject', 'X-Other'],
        );
        assert.equal(m.removedHeaders.length, 2);
        if (threshold === 0) assert.equal(await read(m), expected, 'the file itself was rewritten');
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  it('leaves a field the header capture did not hold whole', () => {
    const fields = scanHeaderFields(Buffer.from('A: 1\r\nB: 2\r\n C'));
    assert.deepEqual(
      fields.map((f) => [f.name, f.complete]),
      [
        ['A', true],
        ['B', false],
      ],
    );
  });
});
