import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { ROOT } from '../harness/server.js';
import { NODE, petrel } from './cli.js';
import { describeRun, run } from './run.js';

describe('petrel plugin new, in a folder outside the repository', () => {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-plugin-new-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('creates NAME/index.ts, NAME/index.test.ts and NAME/README.md; the plugin imports only petrel', async () => {
    const r = await petrel(['plugin', 'new', 'no-spam'], dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /created .*no-spam/);
    for (const f of ['index.ts', 'index.test.ts', 'README.md'])
      assert.ok(existsSync(join(dir, 'no-spam', f)), f);
    const index = readFileSync(join(dir, 'no-spam', 'index.ts'), 'utf8');
    const specifiers = [...index.matchAll(/from '([^']+)'/g)].map((m) => m[1]);
    assert.deepEqual(specifiers, ['petrel']);
    assert.match(index, /name: 'no-spam'/);
    assert.match(
      readFileSync(join(dir, 'no-spam', 'README.md'), 'utf8'),
      /node --test no-spam\/index\.test\.ts/,
    );
  });

  it('its test passes at once, with petrel installed as a dependency of the project', async () => {
    // What `npm install petrel` (or `npm link petrel`) leaves: node_modules/petrel is the package.
    mkdirSync(join(dir, 'node_modules'));
    symlinkSync(ROOT, join(dir, 'node_modules', 'petrel'), 'dir');
    // Without the runner's NODE_TEST_CONTEXT the child reports as a person would see it.
    const { NODE_TEST_CONTEXT: _, ...env } = process.env;
    const r = await run(NODE, ['--test', '--test-reporter=tap', 'no-spam/index.test.ts'], {
      cwd: dir,
      env,
      timeoutMs: 60_000,
    });
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /# pass 2\b/);
    assert.match(r.stdout, /# fail 0\b/);
  });

  it('the server loads it from the config as it is (petrel config check)', async () => {
    const config = join(dir, 'petrel.config.yaml');
    writeFileSync(
      config,
      stringify({
        listeners: [{ kind: 'smtp', port: 0 }],
        plugins: [{ name: './no-spam/index.ts', config: { blockedDomains: ['spam.test'] } }],
      }),
    );
    const r = await petrel(['config', 'check'], dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /OK \(plugins: no-spam\)/);
  });

  it('refuses a name that exists (73) and a name that is not one (64), writing nothing', async () => {
    const before = readFileSync(join(dir, 'no-spam', 'index.ts'), 'utf8');
    let r = await petrel(['plugin', 'new', 'no-spam'], dir);
    assert.equal(r.code, 73, describeRun(r));
    assert.match(r.stderr, /^petrel plugin: .*no-spam already exists/);
    assert.equal(readFileSync(join(dir, 'no-spam', 'index.ts'), 'utf8'), before);
    r = await petrel(['plugin', 'new', '../Escape'], dir);
    assert.equal(r.code, 64, describeRun(r));
    assert.match(r.stderr, /lower-case letters, digits and dashes/);
    assert.ok(!existsSync(join(dir, '..', 'Escape')));
    r = await petrel(['plugin', 'new'], dir);
    assert.equal(r.code, 64, describeRun(r));
    assert.match(r.stderr, /new needs a name/);
  });
});
