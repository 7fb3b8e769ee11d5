import { readFile } from 'node:fs/promises';
import { parse as parseYaml } from 'yaml';
import { asciiDomain, parseAddressText, type AddressKey } from './addresses.js';
import { DirectoryFileError } from './users-file.js';

/**
 * The aliases file: YAML (or JSON, which is YAML too), one mapping from an address to one
 * target address or a list of them. A key `@domain` is that domain's catch-all.
 *
 * ```yaml
 * postmaster@hamburger.edu: bob@hamburger.edu
 * team@hamburger.edu: [bob@hamburger.edu, alice@hamburger.edu, carol@elsewhere.test]
 * '@fries.test': bob@hamburger.edu
 * ```
 */
export interface Aliases {
  /** Exact addresses (key form) → targets. */
  readonly exact: ReadonlyMap<string, readonly AddressKey[]>;
  /** Domain (ASCII) → catch-all targets. */
  readonly catchAll: ReadonlyMap<string, readonly AddressKey[]>;
}

export const NO_ALIASES: Aliases = { exact: new Map(), catchAll: new Map() };

/** Parses and checks the aliases file's text. Throws DirectoryFileError naming file and key. */
export function parseAliasesFile(text: string, file: string): Aliases {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (err) {
    throw new DirectoryFileError(`${file}: (file): expected YAML or JSON: ${(err as Error).message}`);
  }
  if (raw === null || raw === undefined) return NO_ALIASES;
  if (typeof raw !== 'object' || Array.isArray(raw)) {
    throw new DirectoryFileError(`${file}: (top level): expected a mapping of address: target(s)`);
  }
  const exact = new Map<string, AddressKey[]>();
  const catchAll = new Map<string, AddressKey[]>();
  for (const [key, value] of Object.entries(raw as Record<string, unknown>)) {
    const where = `${file}: ${JSON.stringify(key)}`;
    const list = typeof value === 'string' ? [value] : value;
    if (!Array.isArray(list) || list.length === 0 || !list.every((v) => typeof v === 'string')) {
      throw new DirectoryFileError(`${where}: expected a target address or a non-empty list of them`);
    }
    const targets: AddressKey[] = [];
    for (const t of list as string[]) {
      const target = parseAddressText(t.trim());
      if (!target) throw new DirectoryFileError(`${where}: expected a target address, got "${t}"`);
      if (!targets.some((x) => x.key === target.key)) targets.push(target);
    }
    let map: Map<string, AddressKey[]>;
    let name: string | null;
    if (key.startsWith('@')) {
      name = asciiDomain(key.slice(1));
      map = catchAll;
    } else {
      name = parseAddressText(key.trim())?.key ?? null;
      map = exact;
    }
    if (!name) throw new DirectoryFileError(`${where}: expected an address or @domain as the key`);
    if (map.has(name)) throw new DirectoryFileError(`${where}: ${name} is listed twice`);
    map.set(name, targets);
  }
  return { exact, catchAll };
}

/** Reads and parses the aliases file. Throws when it is missing or bad. */
export async function readAliasesFile(file: string): Promise<Aliases> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new DirectoryFileError(`${file}: cannot read: ${(err as Error).message}`);
  }
  return parseAliasesFile(text, file);
}
