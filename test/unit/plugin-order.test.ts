import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import { definePlugin } from '../../core/index.js';

/** Starts a server with these plugins in this order and returns its warning lines. */
async function warningsFor(order: readonly string[]): Promise<Record<string, unknown>[]> {
  const lines: Record<string, unknown>[] = [];
  const logger = pino(
    { level: 'warn' },
    new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        done();
      },
    }),
  );
  const plugins = [
    definePlugin({ name: 'acceptor', setup: () => ({}) }),
    definePlugin({ name: 'listing', setup: () => ({}) }),
    definePlugin({
      name: 'judge',
      order: {
        before: { plugins: ['acceptor'], reason: 'its rcpt hook accepts recipients' },
        after: { plugins: ['listing'], reason: 'it reads its note' },
      },
      setup: () => ({}),
    }),
  ];
  const app = await Petrel.start({
    config: { hostname: 'mx.test', listeners: [{ kind: 'smtp', port: 0 }], plugins: [...order] },
    plugins: plugins.filter((p) => order.includes(p.name)),
    logger,
  });
  await app.stop();
  return lines.filter((l) => l.plugin === 'judge');
}

describe('plugins declare their place in the config (definePlugin order)', () => {
  it('says nothing when the config follows it, or when the other plugin is not there', async () => {
    assert.deepEqual(await warningsFor(['listing', 'judge', 'acceptor']), []);
    assert.deepEqual(await warningsFor(['judge']), []);
  });

  it('warns for each plugin out of place, naming both and the reason', async () => {
    const lines = await warningsFor(['acceptor', 'judge', 'listing']);
    assert.deepEqual(
      lines.map((l) => l.msg),
      [
        'judge is listed after acceptor; list it before: its rcpt hook accepts recipients',
        'judge is listed before listing; list it after: it reads its note',
      ],
    );
  });
});
