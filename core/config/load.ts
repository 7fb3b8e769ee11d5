import { existsSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { cosmiconfig, type Loader } from 'cosmiconfig';
import { parse as parseYaml } from 'yaml';
import { readFile } from 'node:fs/promises';
import { configSchema, type PetrelConfig } from './schema.js';
import { ConfigError, zodToConfigError } from './errors.js';

export interface LoadedConfig {
  readonly config: PetrelConfig;
  /** The file it came from (absolute), or a label such as `(inline)`. */
  readonly file: string;
  /** Relative paths in the config are relative to this folder. */
  readonly baseDir: string;
  /**
   * The config as read, before validation: what a supervisor hands its workers, so that every
   * worker (and a replacement started later) runs the config the primary accepted, not whatever
   * the file says by then.
   */
  readonly input: unknown;
}

/** Where `petrel start` looks, in this order, from the working directory. */
export const SEARCH_PLACES = [
  'package.json',
  'petrel.config.yaml',
  'petrel.config.yml',
  'petrel.config.json',
  'petrel.config.ts',
  'petrel.config.mjs',
  '.petrelrc',
  '.petrelrc.yaml',
  '.petrelrc.yml',
  '.petrelrc.json',
];

/** The embedded default config that `npm start` runs when nothing else is found. */
export const EMBEDDED_CONFIG = fileURLToPath(new URL('../../../config/petrel.yaml', import.meta.url));

// Module configs are imported with a cache-busting query, so that a SIGHUP reload reads the
// file again instead of Node's module cache.
const importFresh: Loader = async (filepath) => {
  const mod = (await import(`${pathToFileURL(filepath).href}?v=${Date.now()}`)) as { default?: unknown };
  return mod.default ?? mod;
};

const loadYaml: Loader = async (filepath) => parseYaml(await readFile(filepath, 'utf8')) as unknown;

const explorer = cosmiconfig('petrel', {
  searchPlaces: SEARCH_PLACES,
  searchStrategy: 'none',
  ignoreEmptySearchPlaces: false,
  cache: false,
  loaders: {
    '.ts': importFresh,
    '.mjs': importFresh,
    '.js': importFresh,
    '.yaml': loadYaml,
    '.yml': loadYaml,
    noExt: loadYaml,
  },
});

/**
 * Loads and validates the config: `file` when given, else the first of SEARCH_PLACES in `cwd`,
 * else the embedded default. Throws ConfigError naming file, key and expectation.
 */
export async function loadConfig(opts: { file?: string; cwd?: string } = {}): Promise<LoadedConfig> {
  const cwd = opts.cwd ?? process.cwd();
  let filepath: string;
  let raw: unknown;
  try {
    if (opts.file) {
      filepath = resolve(cwd, opts.file);
      if (!existsSync(filepath))
        throw ConfigError.one(filepath, '(file)', 'expected a config file at this path');
      const result = await explorer.load(filepath);
      raw = result?.config;
    } else {
      const found = await explorer.search(cwd);
      if (found && (found.isEmpty || found.config == null)) {
        throw ConfigError.one(found.filepath, '(top level)', 'expected a config object, found an empty file');
      }
      if (found) {
        filepath = found.filepath;
        raw = found.config;
      } else {
        filepath = EMBEDDED_CONFIG;
        raw = (await explorer.load(filepath))?.config;
      }
    }
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    const where = (err as { filepath?: string }).filepath ?? opts.file ?? cwd;
    throw ConfigError.one(
      where,
      '(file)',
      `expected a readable YAML, JSON or module config: ${(err as Error).message}`,
    );
  }
  return validateConfig(raw, filepath, dirname(filepath));
}

/** Validates a config object and resolves its relative paths against `baseDir`. */
export function validateConfig(raw: unknown, file: string, baseDir: string): LoadedConfig {
  if (raw === undefined || raw === null)
    throw ConfigError.one(file, '(top level)', 'expected a config object, found an empty file');
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) throw zodToConfigError(file, parsed.error);
  const config = parsed.data;
  const abs = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
  config.spool.dir = abs(config.spool.dir);
  if (config.state.path) config.state.path = abs(config.state.path);
  if (config.tls) {
    config.tls.cert = abs(config.tls.cert);
    config.tls.key = abs(config.tls.key);
    for (const pair of Object.values(config.tls.sni)) {
      pair.cert = abs(pair.cert);
      pair.key = abs(pair.key);
    }
  }
  config.listeners.forEach((l, i) => {
    if (l.kind === 'submissions' && !config.tls) {
      throw ConfigError.one(
        file,
        `listeners[${i}].kind`,
        'expected a tls section (cert and key): submissions is implicit TLS',
      );
    }
  });
  const names = new Set<string>();
  config.listeners.forEach((l, i) => {
    l.name ??= l.port === 0 ? `${l.kind}#${i}` : `${l.kind}:${l.port}`;
    if (names.has(l.name))
      throw ConfigError.one(
        file,
        `listeners[${i}].name`,
        `expected a unique name, "${l.name}" is used twice`,
      );
    names.add(l.name);
  });
  return { config, file, baseDir, input: raw };
}
