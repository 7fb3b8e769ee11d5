import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { z } from 'zod';
import { definePlugin } from '../../core/plugins/define.js';
import { deny, proceed } from '../../core/hooks/verdict.js';
import { runHook, session, transaction, address } from '../../core/testing/index.js';

const noExample = definePlugin({
  name: 'no-example',
  config: z.object({ domain: z.string(), message: z.string().default('No mail for that domain') }),
  setup: ({ config }) => ({
    rcpt: async ({ recipient }) =>
      recipient.domain === config.domain ? deny(550, '5.7.1', config.message) : proceed(),
  }),
});

describe('the plugin harness (petrel/testing)', () => {
  it('runs one hook with a made-up context and the plugin config validated by its schema', async () => {
    const ctx = { session: session(), transaction: transaction(), params: {} };
    const refused = await runHook(
      noExample,
      'rcpt',
      { ...ctx, recipient: address('x@Example.COM') },
      { config: { domain: 'example.com' } },
    );
    assert.deepEqual(refused, deny(550, '5.7.1', 'No mail for that domain'));
    const passed = await runHook(
      noExample,
      'rcpt',
      { ...ctx, recipient: address('x@other.test') },
      { config: { domain: 'example.com' } },
    );
    assert.equal(passed.kind, 'proceed');
  });

  it('refuses a config the schema refuses, and a hook the plugin lacks', async () => {
    const ctx = {
      session: session(),
      transaction: transaction(),
      params: {},
      recipient: address('a@b.test'),
    };
    await assert.rejects(runHook(noExample, 'rcpt', ctx, { config: {} as never }), /domain/);
    await assert.rejects(
      runHook(noExample, 'connect', { session: session() }, { config: { domain: 'x' } }),
      /no connect hook/,
    );
  });
});
