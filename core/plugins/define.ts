import type { Logger } from 'pino';
import type { z } from 'zod';
import type { Hooks } from '../hooks/catalogue.js';
import type { Token } from '../di/tokens.js';
import type { HookRunner } from '../hooks/runner.js';

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
  route: HookRunner['route'];
  transform: HookRunner['transform'];
  deliver: HookRunner['deliver'];
  notify: HookRunner['notify'];
}

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
  setup(api: PluginApi<z.output<S>>): Hooks | Promise<Hooks>;
  readonly [BRAND]: true;
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
 */
export function definePlugin<S extends z.ZodType = z.ZodType<Record<string, never>>>(def: {
  name: string;
  config?: S;
  hookTimeout?: number;
  transformPhase?: TransformPhase;
  setup(api: PluginApi<z.output<S>>): Hooks | Promise<Hooks>;
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
  return Object.freeze({ ...def, [BRAND]: true as const });
}

export function isPluginDefinition(v: unknown): v is PluginDefinition {
  return typeof v === 'object' && v !== null && (v as Record<symbol, unknown>)[BRAND] === true;
}
