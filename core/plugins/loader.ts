import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire, registerHooks } from 'node:module';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Logger } from 'pino';
import type { DependencyContainer } from 'tsyringe';
import { ConfigError, zodToConfigError } from '../config/errors.js';
import type { PetrelConfig, PluginEntry } from '../config/schema.js';
import { HOOK_NAMES, isHookName, type HookName, type Hooks } from '../hooks/catalogue.js';
import { HOOK_LATENCY, HookRunner, type RegisteredHook } from '../hooks/runner.js';
import { isPluginDefinition, TRANSFORM_PHASES, type PluginDefinition } from './define.js';
import { resolveToken, Tokens, type Token } from '../di/tokens.js';

export type PluginSource = 'built-in' | 'package' | 'file' | 'inline';

export interface LoadedPlugin {
  readonly name: string;
  readonly source: PluginSource;
  /** Path or URL it was loaded from. */
  readonly location: string;
  readonly hooks: readonly HookName[];
}

const SELF = new URL('../index.js', import.meta.url).href;
const SELF_TESTING = new URL('../testing/index.js', import.meta.url).href;
/**
 * The published service contracts of built-in plugins (package.json `exports`): what another
 * plugin imports to use the queue or the user directory, as `petrel/queue` and `petrel/users`,
 * or to read another's results, as `petrel/mailauth`.
 */
const SUBPATHS: Readonly<Record<string, string>> = {
  'petrel/testing': SELF_TESTING,
  'petrel/queue': new URL('../../plugins/queue/api.js', import.meta.url).href,
  'petrel/users': new URL('../../plugins/users/directory.js', import.meta.url).href,
  'petrel/mailauth': new URL('../../plugins/mailauth/api.js', import.meta.url).href,
  'petrel/dnsbl': new URL('../../plugins/dnsbl/api.js', import.meta.url).href,
  'petrel/hygiene': new URL('../../plugins/hygiene/api.js', import.meta.url).href,
  'petrel/clamav': new URL('../../plugins/clamav/api.js', import.meta.url).href,
  'petrel/rspamd': new URL('../../plugins/rspamd/api.js', import.meta.url).href,
  'petrel/spamassassin': new URL('../../plugins/spamassassin/api.js', import.meta.url).href,
};
const BUILT_IN_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
let resolutionInstalled = false;
const firstSeen = new Map<string, number>();

/**
 * The URL to import a plugin file by. The first load uses the plain URL, so a module that another
 * plugin imports by path is the same instance (shared note keys and tokens match). When the file
 * has changed since, a reload imports it under its modification time instead, to get the new code.
 */
function fileUrl(path: string): string {
  const mtime = statSync(path).mtimeMs;
  const seen = firstSeen.get(path);
  if (seen === undefined) firstSeen.set(path, mtime);
  const href = pathToFileURL(path).href;
  return seen === undefined || seen === mtime ? href : `${href}?mtime=${mtime}`;
}

/** Finds an installed package's ESM entry from `baseDir` (createRequire misses import-only exports). */
function resolvePackage(pkg: string, baseDir: string): string | null {
  try {
    return createRequire(join(baseDir, 'package.json')).resolve(pkg);
  } catch {
    // fall through: try the package's own exports/main
  }
  for (let dir = baseDir; ; dir = dirname(dir)) {
    const root = join(dir, 'node_modules', pkg);
    const manifest = join(root, 'package.json');
    if (existsSync(manifest)) {
      const meta = JSON.parse(readFileSync(manifest, 'utf8')) as { exports?: unknown; main?: string };
      const dot = (e: unknown): unknown =>
        typeof e === 'object' && e !== null && '.' in e ? (e as Record<string, unknown>)['.'] : e;
      const pick = (e: unknown): string | undefined => {
        if (typeof e === 'string') return e;
        if (typeof e !== 'object' || e === null) return undefined;
        const o = e as Record<string, unknown>;
        return pick(o.import) ?? pick(o.node) ?? pick(o.default);
      };
      const entry = pick(dot(meta.exports)) ?? meta.main ?? 'index.js';
      const path = resolve(root, entry);
      return existsSync(path) ? path : null;
    }
    if (dirname(dir) === dir) return null;
  }
}

/**
 * Makes `import … from 'petrel'` in a plugin file anywhere on disk resolve to this running
 * server's own API module, so the plugin shares its types, helpers and `z` with the core.
 */
export function installPetrelResolution(): void {
  if (resolutionInstalled) return;
  resolutionInstalled = true;
  registerHooks({
    resolve(specifier, context, nextResolve) {
      if (specifier === 'petrel') return { url: SELF, format: 'module', shortCircuit: true };
      const sub = SUBPATHS[specifier];
      if (sub) return { url: sub, format: 'module', shortCircuit: true };
      return nextResolve(specifier, context);
    },
  });
}

/**
 * The plugins of one config generation and the runner for their hooks. Sessions retain the set
 * they started with; after a reload the old set closes once its last session has released it.
 */
export class PluginSet {
  private refs = 0;
  private retired = false;
  private closed = false;

  constructor(
    readonly runner: HookRunner,
    readonly plugins: readonly LoadedPlugin[],
    private readonly closers: readonly { plugin: string; fn: () => void | Promise<void> }[],
    private readonly log: Logger,
  ) {}

  retain(): void {
    this.refs++;
  }

  release(): void {
    this.refs--;
    if (this.retired && this.refs === 0) void this.close();
  }

  /** No new sessions will use this set; close it when the last one ends. */
  async retire(): Promise<void> {
    this.retired = true;
    if (this.refs === 0) await this.close();
  }

  private async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const c of [...this.closers].reverse()) {
      try {
        await c.fn();
      } catch (err) {
        this.log.error({ plugin: c.plugin, err }, 'plugin close failed');
      }
    }
  }
}

interface Located {
  definition: PluginDefinition;
  source: PluginSource;
  location: string;
}

function entryParts(entry: PluginEntry): {
  ref: string;
  config: unknown;
  timeout?: number;
  enabled: boolean;
} {
  if (typeof entry === 'string') return { ref: entry, config: undefined, enabled: true };
  return { ref: entry.name, config: entry.config, timeout: entry.timeout, enabled: entry.enabled };
}

function looksLikePath(ref: string): boolean {
  return ref.startsWith('.') || isAbsolute(ref) || /\.(c|m)?(t|j)s$/.test(ref);
}

async function importDefinition(
  url: string,
  file: string,
  key: string,
  ref: string,
): Promise<PluginDefinition> {
  let mod: { default?: unknown };
  try {
    mod = (await import(url)) as { default?: unknown };
  } catch (err) {
    throw ConfigError.one(
      file,
      key,
      `expected plugin "${ref}" to load, but it failed: ${(err as Error).message}`,
    );
  }
  if (!isPluginDefinition(mod.default)) {
    throw ConfigError.one(file, key, `expected "${ref}" to have a default export made with definePlugin()`);
  }
  return mod.default;
}

async function locate(
  ref: string,
  baseDir: string,
  file: string,
  key: string,
  inline: ReadonlyMap<string, PluginDefinition>,
): Promise<Located> {
  const given = inline.get(ref);
  if (given) return { definition: given, source: 'inline', location: '(inline)' };
  if (looksLikePath(ref)) {
    const path = resolve(baseDir, ref);
    if (!existsSync(path)) throw ConfigError.one(file, key, `expected a plugin file at ${path}`);
    return {
      definition: await importDefinition(fileUrl(path), file, key, ref),
      source: 'file',
      location: path,
    };
  }
  if (/^[a-z0-9][a-z0-9-]*$/.test(ref)) {
    const builtIn = join(BUILT_IN_DIR, ref, 'index.js');
    if (existsSync(builtIn)) {
      return {
        definition: await importDefinition(pathToFileURL(builtIn).href, file, key, ref),
        source: 'built-in',
        location: builtIn,
      };
    }
  }
  const pkg = ref.startsWith('petrel-plugin-') || ref.startsWith('@') ? ref : `petrel-plugin-${ref}`;
  const resolved = resolvePackage(pkg, baseDir);
  if (!resolved) {
    throw ConfigError.one(
      file,
      key,
      `expected a built-in plugin, an installed package "${pkg}", or a path to a .ts/.js file; found none for "${ref}"`,
    );
  }
  return {
    definition: await importDefinition(pathToFileURL(resolved).href, file, key, ref),
    source: 'package',
    location: resolved,
  };
}

export interface BuildOptions {
  readonly config: PetrelConfig;
  readonly file: string;
  readonly baseDir: string;
  readonly container: DependencyContainer;
  readonly log: Logger;
  /** Plugin definitions given in code, by the name a config entry uses (tests, embedding). */
  readonly inline?: ReadonlyMap<string, PluginDefinition>;
}

/**
 * Loads, validates and sets up every enabled plugin of a config, in config order. Any problem —
 * a missing plugin, a schema error, an unknown hook, a throwing setup — is a ConfigError naming
 * the file, the entry and what was expected; plugins already set up are closed again.
 */
export async function buildPluginSet(opts: BuildOptions): Promise<PluginSet> {
  installPetrelResolution();
  const { config, file, baseDir, container, log } = opts;
  const table = Object.fromEntries(
    HOOK_NAMES.map((h) => [h, [] as RegisteredHook<HookName>[]]),
  ) as unknown as {
    [K in HookName]: RegisteredHook<K>[];
  };
  const loaded: LoadedPlugin[] = [];
  const closers: { plugin: string; fn: () => void | Promise<void> }[] = [];
  const seen = new Set<string>();
  const definitions: PluginDefinition[] = [];
  // Once the build has failed, a setup still running (one that missed its deadline) may yet
  // register something to close: it is closed at once, so a refused reload leaves nothing open.
  let abandoned = false;
  const closeLate = (plugin: string, fn: () => void | Promise<void>): void => {
    void (async () => fn())().catch((err: unknown) => log.error({ plugin, err }, 'plugin close failed'));
  };
  const runner = new HookRunner(table, log);
  const hookLatency = resolveToken(container, Tokens.Metrics).histogram(HOOK_LATENCY);
  const partial = new PluginSet(runner, loaded, closers, log);
  let markReady!: () => void;
  const ready = new Promise<void>((resolve) => (markReady = resolve));
  const pluginHooks = {
    ready,
    expand: runner.expand.bind(runner),
    route: runner.route.bind(runner),
    transform: runner.transform.bind(runner),
    deliver: runner.deliver.bind(runner),
    notify: runner.notify.bind(runner),
  };
  try {
    for (const [i, entry] of config.plugins.entries()) {
      const { ref, config: pluginConfig, timeout, enabled } = entryParts(entry);
      const key = `plugins[${i}]`;
      if (!enabled) continue;
      const { definition, source, location } = await locate(
        ref,
        baseDir,
        file,
        key,
        opts.inline ?? new Map(),
      );
      const name = definition.name;
      const label = `${key} (${name})`;
      if (definition.transformPhase !== undefined && !TRANSFORM_PHASES.includes(definition.transformPhase))
        throw ConfigError.one(
          file,
          label,
          `expected transformPhase to be one of ${TRANSFORM_PHASES.join(', ')}`,
        );
      if (seen.has(name))
        throw ConfigError.one(file, label, `expected each plugin once; "${name}" is listed twice`);
      seen.add(name);

      let validConfig: unknown = pluginConfig ?? {};
      if (definition.config) {
        const parsed = definition.config.safeParse(validConfig);
        if (!parsed.success) throw zodToConfigError(file, parsed.error, `${label}.config`);
        validConfig = parsed.data;
      }
      const pluginLog = log.child({ plugin: name });
      let hooks: Hooks;
      try {
        const started = definition.setup({
          name,
          config: validConfig,
          log: pluginLog,
          hostname: config.hostname,
          baseDir,
          resolve: <T>(token: Token<T>): T => resolveToken(container, token),
          provide: <T>(token: Token<T>, value: T): void => {
            container.register(token, { useValue: value });
          },
          hooks: pluginHooks,
          onClose: (fn) => {
            if (abandoned) closeLate(name, fn);
            else closers.push({ plugin: name, fn });
          },
        });
        hooks = await withDeadline(started, config.timeouts.setup, () =>
          ConfigError.one(
            file,
            label,
            `expected setup to finish within ${config.timeouts.setup} ms (timeouts.setup), but it did not`,
          ),
        );
      } catch (err) {
        if (err instanceof ConfigError) throw err;
        throw ConfigError.one(
          file,
          label,
          `expected setup to succeed, but it threw: ${(err as Error).message}`,
        );
      }
      if (typeof hooks !== 'object' || hooks === null) {
        throw ConfigError.one(file, label, 'expected setup to return an object of hooks');
      }
      const names: HookName[] = [];
      for (const [hookName, fn] of Object.entries(hooks)) {
        if (!isHookName(hookName)) {
          throw ConfigError.one(
            file,
            label,
            `unknown hook "${hookName}"; expected one of ${HOOK_NAMES.join(', ')}`,
          );
        }
        if (typeof fn !== 'function')
          throw ConfigError.one(file, `${label}.${hookName}`, 'expected an async function');
        (table[hookName] as RegisteredHook<HookName>[]).push({
          plugin: name,
          fn: fn as never,
          timeoutMs: timeout ?? definition.hookTimeout ?? config.timeouts.hook,
          latency: hookLatency.labels(name, hookName),
        });
        names.push(hookName);
      }
      loaded.push({ name, source, location, hooks: names });
      definitions.push(definition);
    }
  } catch (err) {
    abandoned = true;
    await partial.retire();
    throw err;
  }
  warnOrder(definitions, log);
  // Transforms run by phase (rewrite before sign), in config order within a phase: a signer can
  // never see a message that a later transform would still change. The sort is stable.
  const phaseOf = new Map(
    definitions.map((d) => [d.name, TRANSFORM_PHASES.indexOf(d.transformPhase ?? 'rewrite')]),
  );
  (table.transform as RegisteredHook<'transform'>[]).sort(
    (a, b) => (phaseOf.get(a.plugin) ?? 0) - (phaseOf.get(b.plugin) ?? 0),
  );
  markReady();
  return new PluginSet(runner, loaded, closers, log);
}

/** `promise`, or the error `late()` makes once `ms` have passed without it settling. */
async function withDeadline<T>(promise: Promise<T> | T, ms: number, late: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(late()), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Finds and loads every enabled plugin of a config and validates its config by its schema, the
 * way `buildPluginSet` does, but runs no `setup`: checking a config has no side effects (it must
 * not, say, open the queue of a server that is running). Returns the plugin names.
 */
export async function checkPlugins(opts: {
  config: PetrelConfig;
  file: string;
  baseDir: string;
  inline?: ReadonlyMap<string, PluginDefinition>;
}): Promise<string[]> {
  installPetrelResolution();
  const names: string[] = [];
  for (const [i, entry] of opts.config.plugins.entries()) {
    const { ref, config: pluginConfig, enabled } = entryParts(entry);
    if (!enabled) continue;
    const key = `plugins[${i}]`;
    const { definition } = await locate(ref, opts.baseDir, opts.file, key, opts.inline ?? new Map());
    const label = `${key} (${definition.name})`;
    if (names.includes(definition.name)) {
      throw ConfigError.one(
        opts.file,
        label,
        `expected each plugin once; "${definition.name}" is listed twice`,
      );
    }
    if (definition.config) {
      const parsed = definition.config.safeParse(pluginConfig ?? {});
      if (!parsed.success) throw zodToConfigError(opts.file, parsed.error, `${label}.config`);
    }
    names.push(definition.name);
  }
  return names;
}

/** One plugin a config lists, found and loaded but not set up. */
export interface ListedPlugin {
  readonly definition: PluginDefinition;
  /** Its entry's key, `plugins[2]`. */
  readonly key: string;
  readonly enabled: boolean;
  /** Its entry's `config`, not yet validated. */
  readonly config: unknown;
}

/**
 * Finds and loads the plugins a config lists, in config order, and runs no `setup`. Disabled
 * entries are loaded only if `disabled` is set (a disabled entry may name a file that is gone).
 */
export async function listPlugins(opts: {
  config: PetrelConfig;
  file: string;
  baseDir: string;
  inline?: ReadonlyMap<string, PluginDefinition>;
}): Promise<ListedPlugin[]> {
  installPetrelResolution();
  const listed: ListedPlugin[] = [];
  for (const [i, entry] of opts.config.plugins.entries()) {
    const { ref, config, enabled } = entryParts(entry);
    if (!enabled) continue;
    const key = `plugins[${i}]`;
    const { definition } = await locate(ref, opts.baseDir, opts.file, key, opts.inline ?? new Map());
    listed.push({ definition, key, enabled, config });
  }
  return listed;
}

/** The config entry that names plugin `name` (a built-in's name), enabled or not, if any. */
export function entryNamed(
  config: PetrelConfig,
  name: string,
): { key: string; enabled: boolean; config: unknown } | null {
  for (const [i, entry] of config.plugins.entries()) {
    const { ref, config: raw, enabled } = entryParts(entry);
    if (ref === name) return { key: `plugins[${i}]`, enabled, config: raw };
  }
  return null;
}

/** The names of the built-in plugins (the folders of plugins/ with an index). */
export function builtInNames(): string[] {
  return readdirSync(BUILT_IN_DIR)
    .filter((n) => /^[a-z0-9][a-z0-9-]*$/.test(n) && existsSync(join(BUILT_IN_DIR, n, 'index.js')))
    .sort();
}

/** Loads a built-in plugin by name (no setup). */
export async function builtInPlugin(name: string): Promise<PluginDefinition> {
  installPetrelResolution();
  const path = join(BUILT_IN_DIR, name, 'index.js');
  return importDefinition(pathToFileURL(path).href, path, 'plugin', name);
}

/**
 * Checks each plugin's declared place (`order`) against the config's list, and warns for every
 * pair out of place: the server runs, but the plugin cannot do all it says it does.
 */
function warnOrder(definitions: readonly PluginDefinition[], log: Logger): void {
  const at = new Map(definitions.map((d, i) => [d.name, i] as const));
  for (const [i, d] of definitions.entries()) {
    for (const other of d.order?.before?.plugins ?? []) {
      const j = at.get(other);
      if (j !== undefined && j < i)
        log.warn(
          { plugin: d.name, listedAfter: other, reason: d.order!.before!.reason },
          `${d.name} is listed after ${other}; list it before: ${d.order!.before!.reason}`,
        );
    }
    for (const other of d.order?.after?.plugins ?? []) {
      const j = at.get(other);
      if (j !== undefined && j > i)
        log.warn(
          { plugin: d.name, listedBefore: other, reason: d.order!.after!.reason },
          `${d.name} is listed before ${other}; list it after: ${d.order!.after!.reason}`,
        );
    }
  }
}
