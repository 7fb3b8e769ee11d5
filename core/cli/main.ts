#!/usr/bin/env node
import 'reflect-metadata';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { Petrel } from '../app.js';
import { Supervisor } from '../process/primary.js';
import { ConfigError } from '../config/errors.js';
import { EMBEDDED_CONFIG, loadConfig } from '../config/load.js';
import { runQueueCommand } from './queue.js';
import { runUserCommand } from './user.js';

const USAGE = `Usage: petrel <command> [options]

Commands:
  start [--config FILE]          run the server (SIGHUP reloads the config, SIGTERM stops it)
  config check [--config FILE]   validate the config and print the effective one
  user add|passwd|remove|list    manage the users plugin's users (petrel user --help)
  queue list|show|flush|...      the running server's queue: why mail waits (petrel queue --help)
  help                           this text

Without --config, Petrel looks in the working directory for petrel.config.{yaml,yml,json,ts,mjs},
.petrelrc[.yaml|.yml|.json] or a "petrel" key in package.json, then uses the embedded default.`;

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
async function start(configFile: string | undefined): Promise<void> {
  const app = await Supervisor.start({ configFile });
  if (app.configFile === EMBEDDED_CONFIG) welcome(app);
  let stopping = false;
  process.on('SIGHUP', () => {
    void app.reload(); // a refused reload is logged; the old config keeps running
  });
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    app.log.info({ signal }, 'signal received');
    app.stop().then(
      () => process.exit(process.exitCode ?? 0),
      (err: unknown) => {
        app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // A bug in the primary must not leave workers unsupervised: log it, stop them, and let the
  // service manager restart us (the durable queue is what guarantees nothing is lost).
  process.on('uncaughtException', (err) => {
    app.log.fatal({ err }, 'uncaught exception');
    process.exitCode = 70;
    stop('uncaughtException');
  });
  process.on('unhandledRejection', (err) => {
    app.log.error({ err }, 'unhandled promise rejection');
  });
}

/** Validates the config and every plugin's config against its schema (no setup runs), then prints it. */
async function configCheck(configFile: string | undefined): Promise<void> {
  const loaded = await loadConfig({ file: configFile });
  const plugins = await Petrel.check(loaded);
  process.stdout.write(`# ${loaded.file}: OK (plugins: ${plugins.join(', ') || 'none'})\n`);
  process.stdout.write(stringify(loaded.config));
}

// `petrel config check | head` closes the pipe early: that is not an error.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err;
});

async function main(argv: string[]): Promise<number> {
  // `user` has options of its own; it parses its arguments itself.
  if (argv[0] === 'user') return runUserCommand(argv.slice(1));
  if (argv[0] === 'queue') return runQueueCommand(argv.slice(1));
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
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
    process.stdout.write(`${USAGE}\n`);
    return cmd || values.help ? 0 : 64;
  }
  if (cmd === 'start') {
    await start(values.config);
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
