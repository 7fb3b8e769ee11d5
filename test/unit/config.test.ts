import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadConfig, validateConfig } from '../../core/config/load.js';
import { ConfigError } from '../../core/config/errors.js';

function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-config-'));
  return fn(dir).finally(() => rmSync(dir, { recursive: true, force: true }));
}

describe('configuration', () => {
  it('applies defaults and resolves relative paths against the config folder', () => {
    const { config } = validateConfig(
      { listeners: [{ kind: 'smtp', port: 2525 }], spool: { dir: './spool' } },
      '/etc/petrel/petrel.yaml',
      '/etc/petrel',
    );
    assert.equal(config.spool.dir, '/etc/petrel/spool');
    assert.equal(config.limits.maxMessageSize, 26_214_400);
    assert.equal(config.timeouts.command, 300_000);
    assert.equal(config.listeners[0]!.address, '127.0.0.1');
    assert.equal(config.smtp.bareLineEndings, 'reject');
    assert.deepEqual(config.state, { backend: 'sqlite' }, 'state defaults to <spool.dir>/state.sqlite');
    const { config: moved } = validateConfig(
      { listeners: [{ kind: 'smtp', port: 2525 }], state: { path: './shared/state.sqlite' } },
      '/etc/petrel/petrel.yaml',
      '/etc/petrel',
    );
    assert.equal(moved.state.path, '/etc/petrel/shared/state.sqlite');
  });

  it('reads a Redis State back end, with its defaults', () => {
    const { config } = validateConfig(
      {
        listeners: [{ kind: 'smtp', port: 2525 }],
        state: { backend: 'redis', redis: { url: 'redis://:secret@10.0.0.5:6379/2' } },
      },
      'f',
      '/',
    );
    assert.deepEqual(config.state, {
      backend: 'redis',
      redis: { url: 'redis://:secret@10.0.0.5:6379/2', prefix: 'petrel:', timeout: 2000 },
    });
    const { config: tuned } = validateConfig(
      {
        listeners: [{ kind: 'smtp', port: 2525 }],
        state: { backend: 'redis', redis: { url: 'rediss://h', prefix: 'mx1:', timeout: '500ms' } },
      },
      'f',
      '/',
    );
    assert.deepEqual(tuned.state.redis, { url: 'rediss://h', prefix: 'mx1:', timeout: 500 });
  });

  it('reads durations such as 30s and 5m', () => {
    const { config } = validateConfig(
      { listeners: [{ kind: 'smtp', port: 1 }], timeouts: { command: '5m', hook: '30s', data: 1500 } },
      'f',
      '/',
    );
    assert.equal(config.timeouts.command, 300_000);
    assert.equal(config.timeouts.hook, 30_000);
    assert.equal(config.timeouts.data, 1500);
  });

  it('names the file, the key and what was expected', () => {
    const cases: [unknown, RegExp][] = [
      [
        { listeners: [{ kind: 'smtp', port: 'abc' }] },
        /^petrel\.yaml: listeners\[0\]\.port: expected number/m,
      ],
      [
        { listeners: [{ kind: 'lmtp', port: 24 }] },
        /^petrel\.yaml: listeners\[0\]\.kind: expected one of "smtp", "submission", "submissions"/m,
      ],
      [{ listeners: [] }, /^petrel\.yaml: listeners: expected at least 1 item/m],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], limitz: {} },
        /^petrel\.yaml: \(top level\): unknown key "limitz"/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1, address: 'localhost' }] },
        /^petrel\.yaml: listeners\[0\]\.address: expected an IP address/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], timeouts: { command: 'soon' } },
        /^petrel\.yaml: timeouts\.command: expected a duration/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], smtp: { bareLineEndings: 'allow' } },
        /smtp\.bareLineEndings: expected one of "reject", "normalize"/,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], state: { backend: 'redis' } },
        /^petrel\.yaml: state\.redis: expected redis: \{ url \} with backend: redis/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], state: { redis: { url: 'redis://127.0.0.1' } } },
        /^petrel\.yaml: state\.backend: expected backend: redis to use redis/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], state: { backend: 'redis', redis: { url: 'http://h' } } },
        /^petrel\.yaml: state\.redis\.url: expected a URL such as redis:\/\/127\.0\.0\.1:6379/m,
      ],
      [
        {
          listeners: [{ kind: 'smtp', port: 1 }],
          state: { backend: 'redis', path: './s.sqlite', redis: { url: 'redis://h' } },
        },
        /^petrel\.yaml: state\.path: expected no path with backend: redis/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], group: 'petrel' },
        /^petrel\.yaml: group: expected user: with group:/m,
      ],
      [
        { listeners: [{ kind: 'smtp', port: 1 }], user: '' },
        /^petrel\.yaml: user: expected a non-empty string/m,
      ],
    ];
    for (const [raw, pattern] of cases) {
      assert.throws(
        () => validateConfig(raw, 'petrel.yaml', '/'),
        (err: unknown) => {
          assert.ok(err instanceof ConfigError);
          assert.match(err.message, pattern);
          return true;
        },
      );
    }
  });

  it('discovers petrel.config.yaml in the working folder', () =>
    withDir(async (dir) => {
      writeFileSync(
        join(dir, 'petrel.config.yaml'),
        'hostname: found.test\nlisteners:\n  - { kind: smtp, port: 2525 }\n',
      );
      const loaded = await loadConfig({ cwd: dir });
      assert.equal(loaded.file, join(dir, 'petrel.config.yaml'));
      assert.equal(loaded.config.hostname, 'found.test');
    }));

  it('discovers the petrel key of package.json', () =>
    withDir(async (dir) => {
      writeFileSync(
        join(dir, 'package.json'),
        JSON.stringify({
          name: 'x',
          petrel: { hostname: 'pkg.test', listeners: [{ kind: 'smtp', port: 25 }] },
        }),
      );
      const loaded = await loadConfig({ cwd: dir });
      assert.equal(loaded.config.hostname, 'pkg.test');
    }));

  it('loads a TypeScript config file, and reads it afresh each time', () =>
    withDir(async (dir) => {
      const file = join(dir, 'petrel.config.ts');
      const write = (h: string) =>
        writeFileSync(
          file,
          `const hostname: string = '${h}';\nexport default { hostname, listeners: [{ kind: 'smtp', port: 2525 }] };\n`,
        );
      write('one.test');
      assert.equal((await loadConfig({ cwd: dir })).config.hostname, 'one.test');
      write('two.test');
      assert.equal((await loadConfig({ file })).config.hostname, 'two.test');
    }));

  it('falls back to the embedded default when nothing is found', () =>
    withDir(async (dir) => {
      const loaded = await loadConfig({ cwd: dir });
      assert.match(loaded.file, /config\/petrel\.yaml$/);
      assert.deepEqual(
        loaded.config.listeners.map((l) => [l.kind, l.address, l.port]),
        [
          ['smtp', '127.0.0.1', 2525],
          ['submission', '127.0.0.1', 2587],
        ],
      );
    }));

  it('reports a YAML syntax error with the file name', () =>
    withDir(async (dir) => {
      const file = join(dir, 'bad.yaml');
      writeFileSync(file, 'listeners: [ { kind: smtp, port: 25 }\n');
      await assert.rejects(
        loadConfig({ file }),
        (err: unknown) => err instanceof ConfigError && err.message.startsWith(file),
      );
    }));

  it('reports a missing config file', () =>
    withDir(async (dir) => {
      await assert.rejects(
        loadConfig({ file: join(dir, 'nope.yaml') }),
        /nope\.yaml: \(file\): expected a config file/,
      );
    }));
});
