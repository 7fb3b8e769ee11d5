import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Readable, Transform } from 'node:stream';
import pino from 'pino';
import { HOOK_NAMES, type HookName } from '../../core/hooks/catalogue.js';
import { HookRunner, type HookTable, type RegisteredHook } from '../../core/hooks/runner.js';
import { routeTo } from '../../core/hooks/verdict.js';

function runnerWith(transforms: RegisteredHook<'transform'>[]): HookRunner {
  const table = Object.fromEntries(
    HOOK_NAMES.map((h) => [h, [] as RegisteredHook<HookName>[]]),
  ) as unknown as {
    [K in HookName]: RegisteredHook<K>[];
  };
  table.transform.push(...transforms);
  return new HookRunner(table as HookTable, pino({ level: 'silent' }));
}

const upper = (): Transform =>
  new Transform({ transform: (c: Buffer, _e, cb) => cb(null, Buffer.from(c.toString().toUpperCase())) });

async function text(r: Readable): Promise<string> {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(c as Buffer);
  return Buffer.concat(parts).toString();
}

const base = {
  message: {
    id: 'Q1',
    sender: null,
    mailParams: { smtputf8: false },
    receivedAt: new Date(),
    size: 5,
    stream: () => Readable.from([Buffer.from('hello')]),
  },
  route: routeTo('outbound').route,
  peer: { eightBitMime: false, smtputf8: false },
};

describe('the transform chain', () => {
  it('passes the content through each plugin in config order', async () => {
    const runner = runnerWith([
      { plugin: 'upper', timeoutMs: 1000, fn: async ({ content }) => content.pipe(upper()) },
      {
        plugin: 'sign',
        timeoutMs: 1000,
        fn: async ({ content }) =>
          Readable.from(
            (async function* () {
              yield Buffer.from('X-Signed: yes\r\n');
              yield* content;
            })(),
          ),
      },
    ]);
    assert.equal(
      await text(await runner.transform({ ...base, content: base.message.stream() })),
      'X-Signed: yes\r\nHELLO',
    );
  });

  it('leaves the content alone without transform plugins', async () => {
    const content = base.message.stream();
    assert.equal(await runnerWith([]).transform({ ...base, content }), content);
  });

  it('fails the delivery rather than send a half-transformed message', async () => {
    const runner = runnerWith([
      { plugin: 'broken', timeoutMs: 1000, fn: async () => 'not a stream' as never },
    ]);
    await assert.rejects(
      runner.transform({ ...base, content: base.message.stream() }),
      /must return a readable stream/,
    );
  });
});
