import { parseArgs } from 'node:util';
import { ConfigError, zodToConfigError } from '../config/errors.js';
import { loadConfig, type LoadedConfig } from '../config/load.js';
import { CommandError, UsageError } from '../cli/command.js';
import type { CommandApi, PluginCommand, PluginDefinition } from './define.js';
import { builtInNames, builtInPlugin, entryNamed, listPlugins, type ListedPlugin } from './loader.js';

/** Where a plugin command reads and writes; the real process's by default. */
export type CommandIo = Pick<CommandApi<unknown>, 'stdin' | 'stdout' | 'stderr' | 'cwd'>;

/** A command a plugin contributes, and who contributes it. */
export interface FoundCommand {
  readonly name: string;
  readonly command: PluginCommand;
  readonly plugin: PluginDefinition;
}

/** Thrown by `CommandApi.exit`: ends the command with its code. */
class CommandExit extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/**
 * The `--config FILE` (or `-c FILE`) among a plugin command's arguments: the core reads it to
 * find the config, and leaves it in the arguments for the command, whose usage names it too.
 */
export function configOption(args: readonly string[]): string | undefined {
  const { values } = parseArgs({
    args: [...args],
    strict: false,
    allowPositionals: true,
    options: { config: { type: 'string', short: 'c' } },
  });
  return typeof values.config === 'string' && values.config !== '' ? values.config : undefined;
}

/**
 * The commands of the plugins a config enables, in config order. Two plugins that contribute
 * the same name make the config ambiguous: a ConfigError naming both entries.
 */
export function configuredCommands(file: string, plugins: readonly ListedPlugin[]): FoundCommand[] {
  const found = new Map<string, FoundCommand & { key: string }>();
  for (const { definition, key } of plugins) {
    for (const [name, command] of Object.entries(definition.commands ?? {})) {
      const other = found.get(name);
      if (other) {
        throw ConfigError.one(
          file,
          `${key} (${definition.name})`,
          `expected one plugin per command; "${name}" is also a command of ${other.key} (${other.plugin.name})`,
        );
      }
      found.set(name, { name, command, plugin: definition, key });
    }
  }
  return [...found.values()].map(({ name, command, plugin }) => ({ name, command, plugin }));
}

/**
 * Finds the plugin that contributes command `name`: first among the plugins the config enables,
 * then among the built-in ones (so `petrel user add` works before the config names `users`; the
 * command learns from `entry` that it is not enabled). Loads plugins without running `setup`.
 */
export async function findCommand(
  name: string,
  file: string,
  plugins: readonly ListedPlugin[],
): Promise<FoundCommand | null> {
  const configured = configuredCommands(file, plugins).find((c) => c.name === name);
  if (configured) return configured;
  for (const builtIn of builtInNames()) {
    const plugin = await builtInPlugin(builtIn);
    const command = plugin.commands?.[name];
    if (command) return { name, command, plugin };
  }
  return null;
}

/**
 * Runs `petrel <argv[0]> …` for a command a plugin contributes, with the config found as
 * `petrel start` finds it. Resolves to the exit code, or null when no plugin has the command.
 * A bad config throws ConfigError (the CLI exits 78).
 */
export async function runPluginCommand(
  argv: readonly string[],
  io: CommandIo,
  inline?: ReadonlyMap<string, PluginDefinition>,
): Promise<number | null> {
  const [name, ...args] = argv;
  if (!name) return null;
  const loaded = await loadConfig({ file: configOption(args), cwd: io.cwd });
  const listed = await listPlugins({ ...loaded, inline });
  const found = await findCommand(name, loaded.file, listed);
  if (!found) return null;
  return runCommandOf(found.plugin, argv, io, { loaded, listed });
}

/**
 * What `plugin`'s command `argv[0]` receives (see CommandApi): the config found as `petrel start`
 * finds it, the plugin's entry in it validated by the plugin's schema; no `setup` runs.
 */
export async function commandApi<C>(
  plugin: PluginDefinition,
  argv: readonly string[],
  io: CommandIo,
  known?: { loaded: LoadedConfig; listed: readonly ListedPlugin[] },
): Promise<CommandApi<C>> {
  const [name = '', ...args] = argv;
  const loaded = known?.loaded ?? (await loadConfig({ file: configOption(args), cwd: io.cwd }));
  // The entry that enables the plugin (found by any name: a path, a package), else one naming it.
  const listed = known?.listed ?? (await listPlugins(loaded));
  const own = listed.find((p) => p.definition.name === plugin.name);
  const entry = own
    ? { key: own.key, enabled: true, config: own.config }
    : entryNamed(loaded.config, plugin.name);
  let config: unknown = entry?.config ?? {};
  if (plugin.config) {
    const parsed = plugin.config.safeParse(config);
    if (!parsed.success) {
      throw zodToConfigError(loaded.file, parsed.error, entry ? `${entry.key} (${plugin.name}).config` : '');
    }
    config = parsed.data;
  }
  return {
    command: name,
    args,
    stdin: io.stdin,
    stdout: io.stdout,
    stderr: io.stderr,
    cwd: io.cwd,
    configFile: loaded.file,
    baseDir: loaded.baseDir,
    petrel: loaded.config,
    config: config as C,
    entry: entry ? { key: entry.key, enabled: entry.enabled } : null,
    exit(code: number): never {
      throw new CommandExit(code);
    },
  };
}

/** Runs `plugin`'s command `argv[0]` with `argv`'s rest; resolves to the exit code. */
export async function runCommandOf(
  plugin: PluginDefinition,
  argv: readonly string[],
  io: CommandIo,
  known?: { loaded: LoadedConfig; listed: readonly ListedPlugin[] },
): Promise<number> {
  const name = argv[0] ?? '';
  const command = plugin.commands?.[name];
  if (!command) throw new TypeError(`plugin ${plugin.name} has no command "${name}"`);
  const api = await commandApi(plugin, argv, io, known);
  try {
    return await command.run(api);
  } catch (err) {
    if (err instanceof CommandExit) return err.code;
    if (err instanceof UsageError) {
      io.stderr.write(`petrel ${name}: ${err.message} (petrel ${name} --help)\n`);
      return 64;
    }
    if (err instanceof CommandError) {
      io.stderr.write(`petrel ${name}: ${err.message}\n`);
      return err.code;
    }
    throw err;
  }
}
