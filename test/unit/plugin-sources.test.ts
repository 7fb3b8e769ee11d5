import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import { ConfigError } from '../../core/config/errors.js';
import { SmtpClient } from '../harness/smtp-client.js';

const PLUGIN_JS = `import { definePlugin, deny, z } from 'petrel';
export default definePlugin({
  name: 'greylist-lite',
  config: z.object({ text: z.string() }),
  setup: ({ config }) => ({ mail: async () => deny(550, '5.7.1', config.text) }),
});
`;

function project(): string {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-pkg-'));
  const pkg = join(dir, 'node_modules', 'petrel-plugin-greylist-lite');
  mkdirSync(pkg, { recursive: true });
  writeFileSync(
    join(pkg, 'package.json'),
    JSON.stringify({ name: 'petrel-plugin-greylist-lite', type: 'module', main: 'index.js' }),
  );
  writeFileSync(join(pkg, 'index.js'), PLUGIN_JS);
  return dir;
}

const base = (dir: string) => ({
  hostname: 'mx.test',
  listeners: [{ kind: 'smtp' as const, port: 0 }],
  spool: { dir: join(dir, 'spool') },
});

describe('where plugins come from', () => {
  it('loads an installed npm package petrel-plugin-<name> by its short name', async () => {
    const dir = project();
    const app = await Petrel.start({
      cwd: dir,
      config: { ...base(dir), plugins: [{ name: 'greylist-lite', config: { text: 'From a package' } }] },
      logger: pino({ level: 'silent' }),
    });
    try {
      assert.equal(app.generation.plugins.plugins[0]!.source, 'package');
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^550 5\.7\.1 From a package/);
      c.close();
    } finally {
      await app.stop(500);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('names the entry when a plugin cannot be found, has no definePlugin export, or names an unknown hook', async () => {
    const dir = project();
    writeFileSync(join(dir, 'plain.mjs'), 'export default { name: "plain" };\n');
    writeFileSync(
      join(dir, 'typo.mjs'),
      'import { definePlugin, proceed } from "petrel";\nexport default definePlugin({ name: "typo", setup: () => ({ rcpt_to: async () => proceed() }) });\n',
    );
    writeFileSync(
      join(dir, 'throws.mjs'),
      'import { definePlugin } from "petrel";\nexport default definePlugin({ name: "throws", setup: () => { throw new Error("no database"); } });\n',
    );
    const cases: [string, RegExp][] = [
      [
        'nonexistent',
        /plugins\[0\]: expected a built-in plugin, an installed package "petrel-plugin-nonexistent"/,
      ],
      [
        './plain.mjs',
        /plugins\[0\]: expected "\.\/plain\.mjs" to have a default export made with definePlugin\(\)/,
      ],
      ['./typo.mjs', /plugins\[0\] \(typo\): unknown hook "rcpt_to"; expected one of connect, helo/],
      ['./throws.mjs', /plugins\[0\] \(throws\): expected setup to succeed, but it threw: no database/],
      ['./missing.ts', /plugins\[0\]: expected a plugin file at .*missing\.ts/],
    ];
    try {
      for (const [entry, pattern] of cases) {
        await assert.rejects(
          Petrel.start({
            cwd: dir,
            config: { ...base(dir), plugins: [entry] },
            logger: pino({ level: 'silent' }),
          }),
          (err: unknown) =>
            err instanceof ConfigError &&
            pattern.test(err.message) &&
            err.message.startsWith('(inline config)'),
          entry,
        );
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('hook time limits', () => {
  it('a plugin may declare its own default, and a config entry still overrides it', async () => {
    const { definePlugin } = await import('../../core/plugins/define.js');
    const { proceed } = await import('../../core/hooks/verdict.js');
    const slow = definePlugin({
      name: 'slow-by-nature',
      hookTimeout: 400,
      setup: () => ({ mail: () => new Promise((r) => setTimeout(() => r(proceed()), 200)) }),
    });
    const dir = mkdtempSync(join(tmpdir(), 'petrel-timeout-'));
    try {
      for (const [entry, expected] of [
        ['slow-by-nature', /^250 /],
        [{ name: 'slow-by-nature', timeout: 100 }, /^451 4\.3\.0 /],
      ] as const) {
        const app = await Petrel.start({
          config: { ...base(dir), timeouts: { hook: 50 }, plugins: [entry] },
          plugins: [slow],
          logger: pino({ level: 'silent' }),
        });
        try {
          const c = await SmtpClient.connect(app.port());
          await c.expect(/^220 /);
          await c.ehlo();
          await c.cmd('MAIL FROM:<a@example.test>', expected);
          c.close();
        } finally {
          await app.stop(500);
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
