#!/usr/bin/env node
import 'reflect-metadata';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { Petrel } from '../app.js';
import { Supervisor } from '../process/primary.js';
import { dropPrivileges, lookupAccount } from '../process/privileges.js';
import { ConfigError } from '../config/errors.js';
import { EMBEDDED_CONFIG, loadConfig } from '../config/load.js';
import { CORE_COMMANDS } from '../plugins/define.js';
import { configOption, configuredCommands, runPluginCommand } from '../plugins/commands.js';
import { listPlugins } from '../plugins/loader.js';
import { runSubcommand, UsageError } from './command.js';
import { PLUGIN_NEW_USAGE, pluginNew } from './plugin-new.js';

const USAGE = `Usage: petrel <command> [options]

Commands:
  start [--config FILE] [--run-as-root]
                                 run the server (SIGHUP reloads the config, SIGTERM stops it);
                                 started as root it drops to the config's "user" after binding,
                                 and without one refuses to run unless given --run-as-root
  config check [--config FILE]   validate the config and print the effective one
  plugin new NAME                create the folder NAME with a plugin, its README and its test
  help                           this text, with the commands of the configured plugins

Without --config, Petrel looks in the working directory for petrel.config.{yaml,yml,json,ts,mjs},
.petrelrc[.yaml|.yml|.json] or a "petrel" key in package.json, then uses the embedded default.
Plugins add commands of their own (petrel user, petrel queue, ...): they are listed below.`;

/**
 * The usage text, then the commands the configured plugins contribute, each with its one line.
 * A config that cannot be read does not hide the usage: it says why the list is missing.
 */
async function usage(configFile: string | undefined): Promise<string> {
  let section: string;
  try {
    const loaded = await loadConfig({ file: configFile });
    const commands = configuredCommands(loaded.file, await listPlugins(loaded));
    const width = Math.max(31, ...commands.map((c) => c.name.length + 2));
    const lines = commands.map((c) => `  ${c.name.padEnd(width)}${c.command.description} [${c.plugin.name}]`);
    section = `Commands from the plugins of ${loaded.file}:\n${lines.join('\n') || '  (none)'}`;
  } catch (err) {
    const why = err instanceof ConfigError ? err.message : (err as Error).message;
    section = `Commands from plugins: none listed, the config could not be read:\n${why}`;
  }
  return `${USAGE}\n\n${section}`;
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

/** On the embedded default, say what is running and how to take the first steps. */
function welcome(app: Supervisor): void {
  const ports = app.listeners.map((l) => `  ${l.kind.padEnd(11)} ${l.address}:${l.port}`).join('\n');
  const domains = app.config.localDomains.join(', ');
  process.stderr.write(
    [
      `Petrel is running on the embedded default config (${EMBEDDED_CONFIG}).`,
      ports,
      `It takes mail for ${domains} into var/mail/<domain>/<user>/Maildir.`,
      '',
      'Add a user (asks for a password):',
      '  npm run petrel -- user add bob@example.test',
      'Send a first message (needs swaks):',
      '  swaks --server 127.0.0.1 --port 2525 --from alice@localhost --to bob@example.test',
      'Submit as bob, with AUTH over STARTTLS (a self-signed certificate was generated):',
      '  swaks --server 127.0.0.1 --port 2587 --tls --auth-user bob@example.test --from bob@example.test --to bob@example.test',
      'The message lands in var/mail/example.test/bob/Maildir/new/. Ctrl-C stops the server.',
      '',
    ].join('\n'),
  );
}

/**
 * Runs the primary: it binds the listeners and keeps `workers` worker processes serving them
 * (core/process/primary.ts). Signals arrive here and are passed on to every worker.
 */
async function start(configFile: string | undefined, runAsRoot: boolean): Promise<void> {
  // Listening for signals before the start: one that arrives while the workers start up (or just
  // after `petrel started` is logged) stops the server once it runs, rather than killing the
  // primary outright and leaving its workers to notice.
  let app: Supervisor | null = null;
  let pending: string | null = null;
  let stopping = false;
  const stop = (signal: string): void => {
    if (!app) {
      pending ??= signal;
      return;
    }
    if (stopping) return;
    stopping = true;
    const running = app;
    running.log.info({ signal }, 'signal received');
    running.stop().then(
      () => process.exit(process.exitCode ?? 0),
      (err: unknown) => {
        running.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGHUP', () => {
    void app?.reload(); // a refused reload is logged; the old config keeps running
  });
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  const started = await Supervisor.start({ configFile, runAsRoot });
  app = started;
  if (started.configFile === EMBEDDED_CONFIG) welcome(started);
  if (pending) stop(pending);
  // A bug in the primary must not leave workers unsupervised: log it, stop them, and let the
  // service manager restart us (the durable queue is what guarantees nothing is lost).
  process.on('uncaughtException', (err) => {
    started.log.fatal({ err }, 'uncaught exception');
    process.exitCode = 70;
    stop('uncaughtException');
  });
  process.on('unhandledRejection', (err) => {
    started.log.error({ err }, 'unhandled promise rejection');
  });
}

/** Validates the config and every plugin's config against its schema (no setup runs), then prints it. */
async function configCheck(configFile: string | undefined): Promise<void> {
  const loaded = await loadConfig({ file: configFile });
  const { user, group } = loaded.config;
  // `user` must exist; as root, check as that user, as the server runs: no plugin module is
  // loaded as root, and a certificate that user cannot read fails here rather than at the start.
  if (user !== undefined) {
    const account = lookupAccount(loaded.file, user, group);
    if (process.getuid?.() === 0) dropPrivileges(account);
  }
  const plugins = await Petrel.check(loaded);
  process.stdout.write(`# ${loaded.file}: OK (plugins: ${plugins.join(', ') || 'none'})\n`);
  process.stdout.write(stringify(withoutSecrets(loaded.config)));
}

const SECRET_KEY = /^(password|pass|secret|secrets|token)$/i;

/**
 * The config as `config check` prints it: a secret never reaches a terminal or a log that
 * captured the output — the value of a key such as `password` or `secret`, and the password in a
 * URL (`redis://user:password@host`) are replaced with `[redacted]`.
 */
function withoutSecrets(value: unknown, key = ''): unknown {
  if (SECRET_KEY.test(key) && value !== undefined && value !== null) return '[redacted]';
  if (typeof value === 'string') {
    return value.replace(/^([a-z][a-z0-9+.-]*:\/\/[^/@:\s]*:)[^/@\s]+@/i, '$1[redacted]@');
  }
  if (Array.isArray(value)) return value.map((v) => withoutSecrets(v));
  if (value && typeof value === 'object')
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, withoutSecrets(v, k)]));
  return value;
}

// `petrel config check | head` closes the pipe early: that is not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err;
});

/** `petrel plugin new NAME`. */
async function plugin(args: readonly string[]): Promise<number> {
  const [sub, ...rest] = args;
  return runSubcommand('plugin', PLUGIN_NEW_USAGE, process.stderr, async () => {
    if (sub === '--help' || sub === '-h') {
      process.stdout.write(`${PLUGIN_NEW_USAGE}\n`);
      return 0;
    }
    if (sub !== 'new') throw new UsageError(sub ? `unknown command "${sub}"` : 'missing command');
    const dir = await pluginNew(rest, process.cwd());
    process.stdout.write(`created ${dir}: index.ts, index.test.ts and README.md (see its README)\n`);
    return 0;
  });
}

async function main(argv: string[]): Promise<number> {
  const [first] = argv;
  if (first === 'plugin') return plugin(argv.slice(1));
  // A name the core does not know is a plugin's command: it parses its own arguments.
  if (first && !first.startsWith('-') && !CORE_COMMANDS.includes(first)) {
    const io = { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr, cwd: process.cwd() };
    const code = await runPluginCommand(argv, io);
    if (code !== null) return code;
    process.stderr.write(
      `petrel: unknown command "${argv.join(' ')}"\n\n${await usage(configOption(argv.slice(1)))}\n`,
    );
    return 64;
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
        'run-as-root': { type: 'boolean' },
      },
    });
  } catch (err) {
    process.stderr.write(`petrel: ${(err as Error).message}\n\n${USAGE}\n`);
    return 64; // EX_USAGE
  }
  const { values, positionals } = parsed;
  if (values.version) {
    process.stdout.write(`${version()}\n`);
    return 0;
  }
  const [cmd, sub] = positionals;
  if (values.help || !cmd || cmd === 'help') {
    process.stdout.write(`${await usage(values.config)}\n`);
    return cmd || values.help ? 0 : 64;
  }
  if (cmd === 'start') {
    await start(values.config, values['run-as-root'] ?? false);
    return -1; // keeps running
  }
  if (cmd === 'config' && sub === 'check') {
    await configCheck(values.config);
    return 0;
  }
  process.stderr.write(`petrel: unknown command "${positionals.join(' ')}"\n\n${USAGE}\n`);
  return 64;
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof ConfigError) {
      process.stderr.write(`petrel: invalid configuration\n${err.message}\n`);
      process.exitCode = 78; // EX_CONFIG
    } else {
      process.stderr.write(`petrel: ${(err as Error).stack ?? String(err)}\n`);
      process.exitCode = 1;
    }
  },
);
