import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { ROOT } from '../harness/server.js';

/** Every .ts file under a folder of the repository. */
function sources(dir: string): string[] {
  return readdirSync(join(ROOT, dir), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => join(ROOT, dir, f));
}

/** The module specifiers a file imports: static, side-effect, re-export and dynamic imports. */
function specifiers(text: string): string[] {
  const found = [
    ...text.matchAll(/^\s*(?:import|export)\s[^;]*?from\s*['"]([^'"]+)['"]/gms),
    ...text.matchAll(/^\s*import\s*['"]([^'"]+)['"]/gm),
    ...text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g),
  ];
  return found.map((m) => m[1]!);
}

describe('layering', () => {
  it('no file under core/ imports from plugins/ (the core knows nothing of plugins)', () => {
    const plugins = join(ROOT, 'plugins') + sep;
    const offenders: string[] = [];
    const files = sources('core');
    assert.ok(
      files.some((f) => f.endsWith(join('core', 'cli', 'main.ts'))),
      'the scan sees the core',
    );
    for (const file of files) {
      for (const spec of specifiers(readFileSync(file, 'utf8'))) {
        const target = spec.startsWith('.') ? resolve(dirname(file), spec) : '';
        if (target.startsWith(plugins) || spec.startsWith('petrel-plugin-'))
          offenders.push(`${relative(ROOT, file)} imports ${spec}`);
      }
    }
    assert.deepEqual(offenders, []);
  });

  it('the scan finds an import of plugins/ where there is one', () => {
    const text =
      "import { x } from '../../plugins/queue/index.js';\nconst y = await import('../../plugins/users/cli.js');";
    assert.deepEqual(specifiers(text), ['../../plugins/queue/index.js', '../../plugins/users/cli.js']);
  });
});
