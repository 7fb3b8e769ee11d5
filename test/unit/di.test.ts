import 'reflect-metadata';
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { buildContainer } from '../../core/di/root.js';
import { memoryState } from '../../core/testing/index.js';
import { resolveToken, Tokens } from '../../core/di/tokens.js';
import { validateConfig } from '../../core/config/load.js';

describe('composition root', () => {
  it('resolves every token', () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-di-'));
    try {
      const { config } = validateConfig(
        { listeners: [{ kind: 'smtp', port: 0 }], spool: { dir }, dns: { servers: ['127.0.0.1:5353'] } },
        '(test)',
        dir,
      );
      const state = memoryState();
      const c = buildContainer(config, { logger: pino({ level: 'silent' }), state });
      for (const [name, token] of Object.entries(Tokens)) {
        assert.ok(c.resolve(token) !== undefined, `Tokens.${name} resolves`);
      }
      assert.equal(c.resolve(Tokens.Config), config);
      assert.deepEqual(resolveToken(c, Tokens.Dns).servers(), ['127.0.0.1:5353']);
      assert.equal(c.resolve(Tokens.Clock), c.resolve(Tokens.Clock), 'services are singletons per container');
      assert.equal(resolveToken(c, Tokens.Spool).dir, dir);
      assert.equal(c.resolve(Tokens.State), state, 'the State store is the one shared across generations');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
