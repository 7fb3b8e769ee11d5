import { createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdir, open, readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { domainToASCII } from 'node:url';
import { parseArgs } from 'node:util';
import {
  CommandError,
  DnsResolver,
  runSubcommand,
  UsageError,
  type CommandApi,
  type PluginCommand,
} from '../../core/index.js';
import { defaultKeyFile, keyLocations, type DkimConfig } from './config.js';
import { checkRecord, recordName, recordText, zoneLine } from './dns-record.js';

export const DKIM_USAGE = `Usage: petrel dkim <command> --domain D --selector S [--config FILE]

Commands:
  keygen [--type rsa|ed25519]   make a private key (RSA 2048 bits by default) where the config
                                expects it, and print the DNS TXT record to publish
  check                         look the record up (through dns.servers) and say whether it
                                holds the key the config signs with

The key file is the dkim plugin entry's keyFile for that selector, else
<keyDir>/<domain>/<selector>.pem (keyDir default ./dkim next to the config file).
keygen never overwrites a key: pick a new selector to rotate (see the plugin's README).`;

/** Where the config reads the key of this domain and selector. */
export function keyFileFor(
  cli: Pick<CommandApi<DkimConfig>, 'config' | 'baseDir'>,
  domain: string,
  selector: string,
): string {
  const listed = keyLocations(cli.config, cli.baseDir).find(
    (k) => k.domain === domain && k.selector === selector,
  );
  return listed?.file ?? defaultKeyFile(resolve(cli.baseDir, cli.config.keyDir), domain, selector);
}

export const dkimCommand: PluginCommand<DkimConfig> = {
  description: 'make DKIM keys and check their DNS records (petrel dkim --help)',
  run: (cli) => runSubcommand('dkim', DKIM_USAGE, cli.stderr, () => dkim(cli)),
};

async function dkim(cli: CommandApi<DkimConfig>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...cli.args],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        domain: { type: 'string', short: 'd' },
        selector: { type: 'string', short: 's' },
        type: { type: 'string', short: 't' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    cli.stdout.write(`${DKIM_USAGE}\n`);
    return 0;
  }
  const [sub, ...extra] = positionals;
  if (!sub) throw new UsageError('missing command');
  if (sub !== 'keygen' && sub !== 'check') throw new UsageError(`unknown command "${sub}"`);
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (!values.domain) throw new UsageError('--domain is required');
  if (!values.selector) throw new UsageError('--selector is required');
  const domain = domainToASCII(values.domain.replace(/\.$/, '')).toLowerCase();
  if (!domain) throw new UsageError(`"${values.domain}" is not a domain name`);
  const selector = values.selector;
  if (
    !/^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$/.test(
      selector,
    )
  ) {
    throw new UsageError(`"${selector}" is not a selector (letters, digits and dashes, dot-separated)`);
  }
  if (sub === 'check' && values.type) throw new UsageError('--type is only for keygen');
  const type = values.type ?? 'rsa';
  if (type !== 'rsa' && type !== 'ed25519')
    throw new UsageError(`--type must be rsa or ed25519, not "${type}"`);
  const file = keyFileFor(cli, domain, selector);
  return sub === 'keygen' ? keygen(cli, domain, selector, type, file) : check(cli, domain, selector, file);
}

async function keygen(
  cli: CommandApi<DkimConfig>,
  domain: string,
  selector: string,
  type: 'rsa' | 'ed25519',
  file: string,
): Promise<number> {
  const { privateKey } =
    type === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ed25519');
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' });
  await mkdir(dirname(file), { recursive: true, mode: 0o700 });
  let handle;
  try {
    // 'wx': never replace a key that may be in DNS and in use.
    handle = await open(file, 'wx', 0o600);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') {
      throw new CommandError(
        `${file} exists; keygen never overwrites a key (use a new selector to rotate)`,
        73,
      );
    }
    throw new CommandError(`cannot create ${file}: ${code ?? (err as Error).message}`, 73);
  }
  try {
    await handle.writeFile(pem);
    await handle.sync();
  } finally {
    await handle.close();
  }
  cli.stderr.write(
    `petrel dkim: wrote ${type === 'rsa' ? 'an RSA-2048' : 'an Ed25519'} private key to ${file}\n`,
  );
  const listed = keyLocations(cli.config, cli.baseDir).some(
    (k) => k.domain === domain && k.selector === selector,
  );
  if (!listed) {
    cli.stderr.write(
      `petrel dkim: note: ${cli.configFile} does not list selector ${selector} under domains.${domain} of the dkim plugin; add it to sign with this key\n`,
    );
  }
  cli.stderr.write(
    `petrel dkim: publish this TXT record, then run: petrel dkim check --domain ${domain} --selector ${selector}\n`,
  );
  cli.stdout.write(`${zoneLine(domain, selector, recordText(privateKey))}\n`);
  return 0;
}

async function check(
  cli: CommandApi<DkimConfig>,
  domain: string,
  selector: string,
  file: string,
): Promise<number> {
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: await readFile(file), format: 'pem' });
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new CommandError(`cannot read the key ${file}: ${e.code ?? e.message}`, 66);
  }
  const name = recordName(domain, selector);
  const dns = new DnsResolver(cli.petrel);
  let records: string[][];
  try {
    records = await dns.resolveTxt(name);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTFOUND' || code === 'ENODATA') {
      throw new CommandError(
        `no TXT record at ${name} (asked ${dns.servers().join(', ')}); publish the one petrel dkim keygen printed`,
      );
    }
    throw new CommandError(`DNS lookup of ${name} failed: ${code ?? (err as Error).message}`, 75);
  }
  const result = checkRecord(records, key);
  const published = records.map((r) => r.join('')).join(' | ');
  switch (result.kind) {
    case 'match':
      cli.stdout.write(`ok: ${name} publishes the ${result.k} key in ${file}\n`);
      return 0;
    case 'mismatch':
      throw new CommandError(`${name} publishes a different ${result.k} key than the one in ${file}`);
    case 'revoked':
      throw new CommandError(`${name} publishes an empty p= (the key is revoked)`);
    case 'several':
      throw new CommandError(
        `${name} has ${records.length} TXT records; verifiers need exactly one: ${published}`,
      );
    case 'malformed':
      throw new CommandError(`${name} is malformed (${result.reason}): ${published}`);
  }
}
