import type { Readable, Writable } from 'node:stream';
import type { Logger } from 'pino';
import type { z } from 'zod';
import type { Hooks } from '../hooks/catalogue.js';
import type { Token } from '../di/tokens.js';
import type { HookRunner } from '../hooks/runner.js';
import type { PetrelConfig } from '../config/schema.js';

/** What a plugin's `setup` receives. */
export interface PluginApi<C> {
  /** The plugin's name (as in the config). */
  readonly name: string;
  /** Its config, validated by its schema (defaults applied). */
  readonly config: C;
  /** A child logger tagged with the plugin's name. */
  readonly log: Logger;
  /** The server's hostname from the config. */
  readonly hostname: string;
  /** The folder of the config file: resolve a plugin's relative paths against it. */
  readonly baseDir: string;
  /** A core service (`Tokens.Dns`, `Tokens.Clock`, …) or one a plugin provided, by token. */
  resolve<T>(token: Token<T>): T;
  /**
   * Offers a service to the plugins of this config generation (see `defineToken`). Plugins
   * listed later can resolve it in their setup; any plugin can resolve it inside hooks.
   */
  provide<T>(token: Token<T>, value: T): void;
  /** Runs hooks of this plugin set: for plugins that drive delivery (the queue). */
  readonly hooks: PluginHooks;
  /** Runs when this plugin set is retired (reload or shutdown), after its last session ended. */
  onClose(fn: () => void | Promise<void>): void;
}

/** The hook runner calls a plugin may make on its own plugin set (see HookRunner). */
export interface PluginHooks {
  /** Settles once every plugin of the set is set up: deliveries must wait for it. */
  readonly ready: Promise<void>;
  expand: HookRunner['expand'];
  route: HookRunner['route'];
  transform: HookRunner['transform'];
  deliver: HookRunner['deliver'];
  notify: HookRunner['notify'];
}

/**
 * What a plugin's command handler receives: `petrel <command> …` run by a person at a shell.
 * The config is the one `petrel start` would use (`--config FILE`, else found in the working
 * directory, else the embedded default), validated, with the plugin's own entry validated by its
 * schema; the plugin's `setup` does not run, so a command never opens what a running server holds.
 */
export interface CommandApi<C> {
  /** The command's name as typed (`queue` in `petrel queue list`). */
  readonly command: string;
  /** The arguments after the command's name, as typed, `--config FILE` included. */
  readonly args: readonly string[];
  /** Standard input; a terminal has `isTTY` and `setRawMode` (to read a password without echo). */
  readonly stdin: Readable & { isTTY?: boolean; setRawMode?: (mode: boolean) => unknown };
  readonly stdout: Writable;
  readonly stderr: Writable;
  /** The working directory the command was run in. */
  readonly cwd: string;
  /** The config file in use (the embedded default's path when none was found). */
  readonly configFile: string;
  /** The config file's folder: resolve the plugin's relative paths against it, as `setup` does. */
  readonly baseDir: string;
  /** The core's config, validated, defaults applied. */
  readonly petrel: PetrelConfig;
  /**
   * The plugin's config, validated by its schema: its entry's `config`, or the schema's defaults
   * when the config file does not list the plugin (see `entry`).
   */
  readonly config: C;
  /** Where the config lists this plugin (`plugins[2]`) and whether it is enabled; null if it does not. */
  readonly entry: { readonly key: string; readonly enabled: boolean } | null;
  /** Ends the command at once with this exit code (nothing more is printed). */
  exit(code: number): never;
}

/**
 * A subcommand a plugin adds to `petrel`. `run` resolves to the exit code (0 done; 64 bad usage
 * and 78 bad config, as the BSD sysexits). A `UsageError` or `CommandError` it throws is printed
 * as `petrel <command>: <message>` with exit 64 or the error's code (`runSubcommand` also prints
 * the command's usage on a UsageError).
 */
export interface PluginCommand<C = unknown> {
  /** One line for `petrel --help`. */
  readonly description: string;
  run(cli: CommandApi<C>): Promise<number>;
}

/** The names the core keeps for its own commands. */
export const CORE_COMMANDS: readonly string[] = ['start', 'config', 'help', 'plugin'];

const BRAND = Symbol.for('petrel.plugin');

export interface PluginDefinition<S extends z.ZodType = z.ZodType> {
  readonly name: string;
  readonly config?: S;
  /**
   * This plugin's own default time limit per hook call, in ms, for plugins whose work is
   * slow by nature (a transport talking to remote servers). A config entry's `timeout` still wins.
   */
  readonly hookTimeout?: number;
  /**
   * Where this plugin's `transform` runs in the chain: every `rewrite` transform (a 7-bit
   * downgrade, a footer) before every `sign` transform (DKIM, an ARC seal), whatever the config
   * order; config order holds within a phase. Default `rewrite`.
   */
  readonly transformPhase?: TransformPhase;
  /**
   * Where this plugin belongs in the config's list, relative to others, when they are there too:
   * `before` names plugins it must precede (a plugin that refuses recipients comes before `relay`
   * and `users`, whose accepting `rcpt` hooks end the chain), `after` plugins it must follow (one
   * whose note it reads). A config that breaks it starts, with a warning naming both entries and
   * the reason.
   */
  readonly order?: PluginOrder;
  setup(api: PluginApi<z.output<S>>): Hooks | Promise<Hooks>;
  /** Subcommands of `petrel` this plugin contributes, by name (`petrel <name> …`). */
  readonly commands?: Readonly<Record<string, PluginCommand<z.output<S>>>>;
  readonly [BRAND]: true;
}

/** See `PluginDefinition.order`. */
export interface PluginOrder {
  readonly before?: { readonly plugins: readonly string[]; readonly reason: string };
  readonly after?: { readonly plugins: readonly string[]; readonly reason: string };
}

/** The phases of the transform chain, in the order they run. */
export const TRANSFORM_PHASES = ['rewrite', 'sign'] as const;
export type TransformPhase = (typeof TRANSFORM_PHASES)[number];

/**
 * Declares a plugin. The config schema (zod, re-exported as `z` from `petrel`) is checked at boot;
 * `setup` runs once per plugin set and returns the hooks, as data, for the core to validate.
 *
 * ```ts
 * export default definePlugin({
 *   name: 'no-example',
 *   config: z.object({ message: z.string().default('No mail for example.com') }),
 *   setup({ config }) {
 *     return {
 *       async rcpt({ recipient }) {
 *         return recipient.domain === 'example.com' ? deny(550, '5.7.1', config.message) : proceed();
 *       },
 *     };
 *   },
 * });
 * ```
 *
 * `commands` adds subcommands to `petrel` (`petrel <name> …`), each a one-line description and an
 * async handler that receives a `CommandApi`; see docs/plugins.md, "Commands from plugins".
 */
export function definePlugin<S extends z.ZodType = z.ZodType<Record<string, never>>>(def: {
  name: string;
  config?: S;
  hookTimeout?: number;
  transformPhase?: TransformPhase;
  order?: PluginOrder;
  setup(api: PluginApi<z.output<S>>): Hooks | Promise<Hooks>;
  commands?: Record<string, PluginCommand<z.output<S>>>;
}): PluginDefinition<S> {
  if (typeof def?.name !== 'string' || !/^[a-z0-9][a-z0-9-_.]*$/i.test(def.name)) {
    throw new TypeError(`definePlugin: name must be a simple identifier, got ${JSON.stringify(def?.name)}`);
  }
  if (typeof def.setup !== 'function')
    throw new TypeError(`definePlugin(${def.name}): setup must be a function`);
  if (def.transformPhase !== undefined && !TRANSFORM_PHASES.includes(def.transformPhase)) {
    throw new TypeError(
      `definePlugin(${def.name}): transformPhase must be one of ${TRANSFORM_PHASES.join(', ')}, got ${JSON.stringify(def.transformPhase)}`,
    );
  }
  for (const [command, spec] of Object.entries(def.commands ?? {})) {
    const where = `definePlugin(${def.name}): command "${command}"`;
    if (!/^[a-z][a-z0-9-]*$/.test(command))
      throw new TypeError(`${where}: a name must be lower-case letters, digits and dashes`);
    if (CORE_COMMANDS.includes(command))
      throw new TypeError(`${where}: the name is one of petrel's own (${CORE_COMMANDS.join(', ')})`);
    if (typeof spec?.description !== 'string' || !/^[^\n]+$/.test(spec.description))
      throw new TypeError(`${where}: description must be one line of text`);
    if (typeof spec.run !== 'function') throw new TypeError(`${where}: run must be a function`);
  }
  return Object.freeze({ ...def, [BRAND]: true as const });
}

export function isPluginDefinition(v: unknown): v is PluginDefinition {
  return typeof v === 'object' && v !== null && (v as Record<symbol, unknown>)[BRAND] === true;
}
