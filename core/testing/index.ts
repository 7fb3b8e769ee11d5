/**
 * A harness for plugin authors: set a plugin up and run one of its hooks with a made-up context,
 * no server and no sockets. `import { runHook, session, transaction, address } from 'petrel/testing'`.
 */
import { deepFreeze, SessionViewOf, TransactionViewOf } from '../smtp/views.js';
import 'reflect-metadata';
import pino, { type Logger } from 'pino';
import type { z } from 'zod';
import { buildContainer } from '../di/root.js';
import { resolveToken, type Token } from '../di/tokens.js';
import { validateConfig } from '../config/load.js';
import type {
  HookContext,
  HookName,
  HookResult,
  Hooks,
  SessionView,
  TransactionView,
} from '../hooks/catalogue.js';
import { parsePath, type Address } from '../message/address.js';
import { Notes } from '../message/notes.js';
import type { CommandApi, PluginDefinition } from '../plugins/define.js';
import { commandApi as buildCommandApi, runCommandOf, type CommandIo } from '../plugins/commands.js';
import type { StateStore } from '../services/state.js';
import { SqliteState } from '../services/state-sqlite.js';

/** Parses an address as the engine would (`'bob@example.test'`, UTF-8 allowed). */
export function address(text: string): Address {
  const r = parsePath(`<${text}>`, { utf8: true, allowNull: false, allowPostmaster: true });
  if (!r.ok || !r.address) throw new TypeError(`not a valid address: ${text}`);
  return r.address;
}

/**
 * A session as plugins see it — the same read-only view the engine hands hooks, so a plugin that
 * assigns to it fails here as it would in a server; override any field.
 */
export function session(over: Partial<SessionView> = {}): SessionView {
  const remote = over.remote ?? { address: '192.0.2.10', port: 40000 };
  return new SessionViewOf({
    id: 'TESTSESSION',
    local: { address: '127.0.0.1', port: 25 },
    listener: { kind: 'smtp', name: 'smtp:25' },
    helo: { verb: 'EHLO', hostname: 'client.test' },
    tls: null,
    user: null,
    startedAt: new Date(),
    notes: new Notes(),
    ...over,
    remote,
    remoteName: over.remoteName ?? null,
    peer: over.peer ?? remote,
    proxy: over.proxy ?? null,
  });
}

/** A transaction as plugins see it (a read-only view); `sender` and `recipients` take address text. */
export function transaction(
  over: { sender?: string | null; recipients?: string[] } & Partial<TransactionView> = {},
): TransactionView {
  const { sender = 'alice@crepes.test', recipients = [], ...rest } = over;
  const state = {
    id: 'TESTTX',
    sender: sender === null ? null : address(sender),
    mailParams: { smtputf8: false },
    recipients: recipients.map((r) => ({ address: address(r), params: {} })),
    notes: new Notes(),
    ...rest,
  };
  return new TransactionViewOf({ ...state, acceptedRecipients: deepFreeze([...state.recipients]) });
}

/**
 * A State store of its own for a test (SQLite in memory, nothing on disk), on the given clock so
 * a test can let keys expire without waiting. Hand it to `setupPlugin` with
 * `services: new Map([[Tokens.State, store]])` to share it between several set-ups.
 */
export function memoryState(opts: { now?: () => number } = {}): StateStore {
  return new SqliteState({ path: ':memory:', now: opts.now });
}

export interface SetupOptions<S extends z.ZodType> {
  /** The plugin's config as it would appear in the config file (validated by its schema). */
  config?: z.input<S>;
  hostname?: string;
  baseDir?: string;
  /** Services to hand out from `resolve()`, by token, instead of the defaults. */
  services?: ReadonlyMap<Token<unknown>, unknown>;
  /** The plugin's `log`, to check what it logs; silent by default. */
  logger?: Logger;
}

/** Sets a plugin up as the loader would (schema-checked config) and returns its hooks. */
export async function setupPlugin<S extends z.ZodType>(
  plugin: PluginDefinition<S>,
  opts: SetupOptions<S> = {},
): Promise<Hooks> {
  const parsed = plugin.config ? plugin.config.parse(opts.config ?? {}) : (opts.config ?? {});
  const { config } = validateConfig(
    { hostname: opts.hostname ?? 'mx.test', listeners: [{ kind: 'smtp', port: 0 }] },
    '(test)',
    opts.baseDir ?? process.cwd(),
  );
  const log = opts.logger ?? pino({ level: 'silent' });
  let container: ReturnType<typeof buildContainer> | null = null;
  return plugin.setup({
    name: plugin.name,
    config: parsed as z.output<S>,
    log,
    hostname: config.hostname,
    baseDir: opts.baseDir ?? process.cwd(),
    resolve: <T>(token: Token<T>): T => {
      if (opts.services?.has(token)) return opts.services.get(token) as T;
      container ??= buildContainer(config, { logger: log, state: memoryState() });
      return resolveToken(container, token);
    },
    provide: () => undefined,
    hooks: {
      ready: Promise.resolve(),
      expand: async () => null,
      route: async () => ({ verdict: { kind: 'proceed' }, plugin: null }),
      transform: async (ctx) => ctx.content,
      deliver: async () => ({ results: [], plugin: null }),
      notify: async () => undefined,
    },
    onClose: () => undefined,
  });
}

/**
 * Runs one hook of a plugin with the given context (a `signal` is added). Throws if the plugin
 * does not implement the hook.
 */
export async function runHook<S extends z.ZodType, K extends HookName>(
  plugin: PluginDefinition<S>,
  hook: K,
  ctx: Omit<HookContext<K>, 'signal'>,
  opts: SetupOptions<S> = {},
): Promise<HookResult<K>> {
  const hooks = await setupPlugin(plugin, opts);
  const fn = hooks[hook] as ((c: HookContext<K>) => Promise<HookResult<K>>) | undefined;
  if (!fn) throw new Error(`plugin ${plugin.name} has no ${hook} hook`);
  return fn({ ...ctx, signal: new AbortController().signal } as HookContext<K>);
}

/** Streams and folder for `runCommand`; any left out are the process's own. */
export type CommandOptions = Partial<CommandIo>;

function commandIo(opts: CommandOptions): CommandIo {
  return {
    stdin: opts.stdin ?? process.stdin,
    stdout: opts.stdout ?? process.stdout,
    stderr: opts.stderr ?? process.stderr,
    cwd: opts.cwd ?? process.cwd(),
  };
}

/**
 * Runs a plugin's command in this process as `petrel <argv…>` would (`argv[0]` is the command's
 * name): the config found from `cwd` or `--config`, the plugin's entry validated, no setup.
 * Resolves to the exit code; what it prints goes to the given streams.
 */
export function runCommand(
  plugin: PluginDefinition,
  argv: readonly string[],
  opts: CommandOptions = {},
): Promise<number> {
  return runCommandOf(plugin, argv, commandIo(opts));
}

/** The `CommandApi` a plugin's command `argv[0]` would receive, to test a part of a command. */
export function commandApi<C>(
  plugin: PluginDefinition,
  argv: readonly string[],
  opts: CommandOptions = {},
): Promise<CommandApi<C>> {
  return buildCommandApi<C>(plugin, argv, commandIo(opts));
}
