import type { Readable } from 'node:stream';
import { parseArgs } from 'node:util';
import {
  CommandError,
  runSubcommand,
  UsageError,
  type CommandApi,
  type PluginCommand,
} from '../../core/index.js';
import { parseAddressText } from './addresses.js';
import { directoryFiles, type UsersConfig } from './config.js';
import { hashPassword } from './password.js';
import type { PasswdFileTarget } from './passwd-file.js';
import { DirectoryFileError, normalizeLogin, readUsersFile, type UsersFileData } from './users-file.js';
import { updateUsersFile } from './users-update.js';

export const USER_USAGE = `Usage: petrel user <command> [--config FILE]

Commands:
  add <address> [--address EXTRA]...   add a user (login and primary address); EXTRA: more
                                       addresses the user receives mail at and may send as
  passwd <address>                     set a user's password
  remove <address>                     remove a user
  list                                 list the users and their addresses

The password is asked for without echo on a terminal, or read from the first line of standard
input otherwise (echo 'pass' | petrel user add bob@example.com). The users file is the one the
config's "users" plugin entry names (usersFile, default ./users.json next to the config file).`;

type UserCommandIo = Pick<CommandApi<UsersConfig>, 'stdin' | 'stdout' | 'stderr'>;

/** The users file a config uses, and what the command should warn about. */
export interface UsersFileLocation {
  readonly usersFile: string;
  /** The passwd-file for Dovecot written beside it, when the config names one. */
  readonly passwd: PasswdFileTarget | null;
  readonly configFile: string;
  /** The config lists the users plugin (and it is enabled). */
  readonly enabled: boolean;
  readonly localDomains: readonly string[];
}

/**
 * Finds the users file from the config's `users` plugin entry (its `usersFile`, relative to the
 * config file's folder). Without such an entry, the plugin's default next to the config file.
 */
export function locateUsersFile(
  cli: Pick<CommandApi<UsersConfig>, 'config' | 'baseDir' | 'configFile' | 'entry' | 'petrel'>,
): UsersFileLocation {
  let files;
  try {
    files = directoryFiles(cli.config, cli.baseDir);
  } catch (err) {
    throw new CommandError((err as Error).message);
  }
  return {
    usersFile: files.usersFile,
    passwd: files.passwd,
    configFile: cli.configFile,
    enabled: cli.entry?.enabled ?? false,
    localDomains: cli.petrel.localDomains,
  };
}

/** Reads a line without echoing it (a terminal in raw mode). */
function promptHidden(io: UserCommandIo, prompt: string): Promise<string> {
  const { stdin, stderr } = io;
  stderr.write(prompt);
  stdin.setRawMode?.(true);
  stdin.setEncoding('utf8');
  stdin.resume();
  return new Promise((resolve, reject) => {
    let value = '';
    const finish = (err: Error | null): void => {
      stdin.off('data', onData);
      stdin.off('end', onEnd);
      stdin.setRawMode?.(false);
      stdin.pause();
      stderr.write('\n');
      if (err) reject(err);
      else resolve(value);
    };
    const onData = (chunk: string): void => {
      for (const ch of chunk) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') return finish(null);
        if (ch === '\u0003') return finish(new CommandError('cancelled'));
        if (ch === '\u007f' || ch === '\b') value = Array.from(value).slice(0, -1).join('');
        else if (ch >= ' ') value += ch;
      }
    };
    const onEnd = (): void => finish(null);
    stdin.on('data', onData);
    stdin.once('end', onEnd);
  });
}

/** The first line of standard input (a pipe or a file), without its line ending. */
async function firstLine(stdin: Readable): Promise<string> {
  let text = '';
  for await (const chunk of stdin) {
    text += typeof chunk === 'string' ? chunk : (chunk as Buffer).toString('utf8');
    if (text.includes('\n') || text.length > 4096) break;
  }
  return text.split('\n')[0]!.replace(/\r$/, '');
}

async function readNewPassword(io: UserCommandIo): Promise<string> {
  let password: string;
  if (io.stdin.isTTY) {
    password = await promptHidden(io, 'Password: ');
    const again = await promptHidden(io, 'Password again: ');
    if (again !== password) throw new CommandError('the passwords do not match');
  } else {
    password = await firstLine(io.stdin);
  }
  if (password === '') throw new CommandError('empty password');
  if (password.length > 1024) throw new CommandError('password longer than 1024 characters');
  return password;
}

function findLogin(data: UsersFileData, login: string): string | undefined {
  const want = normalizeLogin(login);
  return Object.keys(data.users ?? {}).find((name) => normalizeLogin(name) === want);
}

function checkAddress(text: string, what: string): string {
  if (!parseAddressText(text)) {
    throw new UsageError(`${what} must be an address such as bob@example.com, got "${text}"`);
  }
  return text;
}

/**
 * `petrel user add|passwd|remove|list`. Resolves to the exit code: 0 done, 1 refused (an existing
 * user, an unknown one, a bad password), 64 bad usage.
 */
export const userCommand: PluginCommand<UsersConfig> = {
  description: "add, change, remove and list the users plugin's users (petrel user --help)",
  run: (cli) => runSubcommand('user', USER_USAGE, cli.stderr, () => user(cli)),
};

async function user(io: CommandApi<UsersConfig>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...io.args],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        address: { type: 'string', short: 'a', multiple: true },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  const [sub, login, ...extra] = positionals;
  if (values.help) {
    io.stdout.write(`${USER_USAGE}\n`);
    return 0;
  }
  if (!sub) throw new UsageError('missing command');
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (sub !== 'add' && values.address?.length) throw new UsageError('--address is only for add');

  const where = locateUsersFile(io);
  const { usersFile } = where;
  if (!where.enabled) {
    io.stderr.write(
      `petrel user: note: ${where.configFile} does not enable the users plugin; ${usersFile} is used once it does\n`,
    );
  }
  const load = async (): Promise<UsersFileData> => {
    try {
      return (await readUsersFile(usersFile))?.data ?? { users: {} };
    } catch (err) {
      throw new CommandError((err as Error).message);
    }
  };
  /** Applies a change under the users file's lock (the passwd-file follows); the data is re-read first. */
  const save = async (change: (data: UsersFileData) => UsersFileData): Promise<void> => {
    let skipped: readonly string[];
    try {
      ({ skipped } = await updateUsersFile(where, async (data) => change(data)));
    } catch (err) {
      if (err instanceof CommandError) throw err;
      if (err instanceof DirectoryFileError) throw new CommandError(err.message);
      throw new CommandError(`cannot write ${usersFile}: ${(err as Error).message}`);
    }
    if (where.passwd && skipped.length > 0) {
      io.stderr.write(
        `petrel user: note: ${skipped.join(', ')} not in ${where.passwd.file} yet (an older scrypt hash, upgraded at the next SMTP login, or a login with ":")\n`,
      );
    }
  };
  const warnDomain = (address: string): void => {
    const domain = parseAddressText(address)?.domain;
    const local = where.localDomains.map((d) => parseAddressText(`x@${d}`)?.domain ?? d);
    if (domain && !local.includes(domain)) {
      io.stderr.write(
        `petrel user: note: ${domain} is not in localDomains of ${where.configFile}; mail to ${address} is not accepted here\n`,
      );
    }
  };

  switch (sub) {
    case 'list': {
      if (login) throw new UsageError('list takes no address');
      const data = await load();
      for (const [name, entry] of Object.entries(data.users ?? {})) {
        const addresses = [entry.address ?? name, ...(entry.addresses ?? [])];
        io.stdout.write(`${name}\t${[...new Set(addresses)].join(' ')}\n`);
      }
      return 0;
    }
    case 'add': {
      if (!login) throw new UsageError('add needs an address');
      checkAddress(login, 'the user');
      const more = (values.address ?? []).map((a) => checkAddress(a, '--address'));
      const data = await load();
      const existing = findLogin(data, login);
      if (existing !== undefined) throw new CommandError(`${existing} already exists in ${usersFile}`);
      const hash = await hashPassword(await readNewPassword(io));
      await save((now) => {
        const twin = findLogin(now, login);
        if (twin !== undefined) throw new CommandError(`${twin} already exists in ${usersFile}`);
        return {
          users: { ...now.users, [login]: { password: hash, ...(more.length ? { addresses: more } : {}) } },
        };
      });
      for (const a of [login, ...more]) warnDomain(a);
      io.stdout.write(`added ${login} to ${usersFile}\n`);
      return 0;
    }
    case 'passwd': {
      if (!login) throw new UsageError('passwd needs an address');
      const data = await load();
      const name = findLogin(data, login);
      if (name === undefined) throw new CommandError(`no user ${login} in ${usersFile}`);
      const hash = await hashPassword(await readNewPassword(io));
      await save((now) => {
        const entry = now.users?.[name];
        if (!entry) throw new CommandError(`no user ${login} in ${usersFile}`);
        return { users: { ...now.users, [name]: { ...entry, password: hash } } };
      });
      io.stdout.write(`changed the password of ${name}\n`);
      return 0;
    }
    case 'remove': {
      if (!login) throw new UsageError('remove needs an address');
      const data = await load();
      const name = findLogin(data, login);
      if (name === undefined) throw new CommandError(`no user ${login} in ${usersFile}`);
      await save((now) => {
        const users = { ...now.users };
        delete users[name];
        return { users };
      });
      io.stdout.write(`removed ${name} from ${usersFile}\n`);
      return 0;
    }
    default:
      throw new UsageError(`unknown command "${sub}"`);
  }
}
