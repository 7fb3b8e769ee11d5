/**
 * OpenDKIM (Debian `opendkim`, `opendkim-tools`) as an independent DKIM implementation for
 * tests: `opendkim -t` verifies or signs a message file, `opendkim-testkey` checks a key file
 * against its DNS record.
 *
 * libopendkim resolves through libunbound; each call writes an unbound config that forwards
 * every query to the test DNS server (`127.0.0.1:<port>`, e.g. a test dnsmasq's `server`), with
 * `local-zone: "test." nodefault` so that unbound does not answer `*.test` itself (NXDOMAIN).
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { has, REQUIRE_PEERS } from './peers.js';

export const OPENDKIM = ['opendkim', '/usr/sbin/opendkim'].find((p) => has(p)) ?? 'opendkim';
export const OPENDKIM_TESTKEY =
  ['opendkim-testkey', '/usr/sbin/opendkim-testkey'].find((p) => has(p)) ?? 'opendkim-testkey';
export const OPENDKIM_PACKAGE = 'apt-get install opendkim opendkim-tools';

/** Are opendkim and opendkim-testkey installed? Skips the test when not (fails it under PETREL_REQUIRE_PEERS=1). */
export function requireOpendkim(t: TestContext): boolean {
  if (has(OPENDKIM) && has(OPENDKIM_TESTKEY)) return true;
  const why = `opendkim not installed (${OPENDKIM_PACKAGE})`;
  if (REQUIRE_PEERS) throw new Error(`required peer missing: ${why}`);
  t.skip(why);
  return false;
}

interface Outcome {
  readonly code: number;
  /** Standard output and error together. */
  readonly output: string;
}

function run(command: string, args: string[]): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, output: `${stdout}${stderr}` });
    });
  });
}

/** A scratch folder with the unbound config and an opendkim config of `lines`; removed by `done`. */
function workspace(dns: string, lines: string[]): { dir: string; conf: string; done(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-opendkim-'));
  const [host, port] = dns.split(':');
  const unbound = join(dir, 'unbound.conf');
  writeFileSync(
    unbound,
    [
      'server:',
      '    do-not-query-localhost: no',
      '    module-config: "iterator"',
      '    local-zone: "test." nodefault',
      'forward-zone:',
      '    name: "."',
      `    forward-addr: ${host}@${port}`,
      '',
    ].join('\n'),
  );
  const conf = join(dir, 'opendkim.conf');
  writeFileSync(conf, [`ResolverConfiguration ${unbound}`, 'Syslog no', ...lines, ''].join('\n'));
  return { dir, conf, done: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface OpendkimVerdict {
  /** Every signature has a `pass` in OpenDKIM's Authentication-Results (and there is one). */
  readonly ok: boolean;
  /** One entry per signature, in order, from the Authentication-Results OpenDKIM would add. */
  readonly results: readonly {
    readonly result: string;
    readonly domain: string;
    readonly selector: string;
    readonly algorithm: string;
  }[];
  /** Its `verification (s=…, d=…, 2048-bit key) succeeded` or `… failed: <reason>` lines (about one signature). */
  readonly lines: readonly string[];
  readonly output: string;
}

/**
 * Verifies `message` with `opendkim -t` (verify mode), keys from DNS at `dns`. Each signature's
 * result is read from the `Authentication-Results` field OpenDKIM prints in its debug output
 * (`dkim=pass … header.d=… header.a=… header.s=…`).
 */
export async function opendkimVerify(message: Buffer, dns: string): Promise<OpendkimVerdict> {
  const ws = workspace(dns, ['Mode v']);
  try {
    const file = join(ws.dir, 'msg.eml');
    writeFileSync(file, message);
    const { output } = await run(OPENDKIM, ['-x', ws.conf, '-t', file, '-vvv']);
    const lines = output.split('\n').filter((l) => /verification \(.*\) (succeeded|failed)/.test(l));
    // One entry per line: `dkim=pass (2048-bit key; unprotected) header.d=… header.s=…;`
    const tag = (entry: string, name: string): string =>
      new RegExp(`header\\.${name}=([^\\s;']+)`).exec(entry)?.[1] ?? '';
    const ar = /hname='Authentication-Results' hvalue='([^']*)'/.exec(output)?.[1] ?? '';
    const results = [...ar.matchAll(/\bdkim=([a-z]+)\b([^\n]*)/g)].map((m) => ({
      result: m[1]!,
      domain: tag(m[2]!, 'd'),
      selector: tag(m[2]!, 's'),
      algorithm: tag(m[2]!, 'a'),
    }));
    return { ok: results.length > 0 && results.every((r) => r.result === 'pass'), results, lines, output };
  } finally {
    ws.done();
  }
}

export interface OpendkimSignOptions {
  readonly domain: string;
  readonly selector: string;
  /** A PEM key file, mode 0600 (OpenDKIM refuses others). */
  readonly keyFile: string;
  /** Default `rsa-sha256`. */
  readonly algorithm?: 'rsa-sha256' | 'ed25519-sha256';
}

/** Signs `message` with `opendkim -t` (relaxed/relaxed) and returns it with the DKIM-Signature on top. */
export async function opendkimSign(
  message: Buffer,
  opts: OpendkimSignOptions,
  dns = '127.0.0.1:53',
): Promise<Buffer> {
  const ws = workspace(dns, [
    'Mode s',
    `Domain ${opts.domain}`,
    `Selector ${opts.selector}`,
    `KeyFile ${opts.keyFile}`,
    'Canonicalization relaxed/relaxed',
    `SignatureAlgorithm ${opts.algorithm ?? 'rsa-sha256'}`,
    // Needed for key files under /tmp ("can be read or written by other users").
    'RequireSafeKeys false',
  ]);
  try {
    const file = join(ws.dir, 'msg.eml');
    writeFileSync(file, message);
    const { code, output } = await run(OPENDKIM, ['-x', ws.conf, '-t', file, '-vvv']);
    // The signature is printed only as debug output: hname='DKIM-Signature' hvalue='…'.
    const m = /hname='DKIM-Signature' hvalue='([^']*)'/.exec(output);
    if (!m) throw new Error(`opendkim made no signature (exit ${code}): ${output}`);
    const value = m[1]!.replace(/\r?\n/g, '\r\n');
    return Buffer.concat([Buffer.from(`DKIM-Signature: ${value}\r\n`), message]);
  } finally {
    ws.done();
  }
}

/**
 * `opendkim-testkey`: does the record at `<selector>._domainkey.<domain>` (DNS at `dns`) hold the
 * public half of `keyFile` (mode 0600)? `ok` when it printed `key OK` (`key not secure` only
 * means no DNSSEC). RSA keys only: OpenDKIM 2.11's testkey fails on an Ed25519 key
 * (`EVP_PKEY_get1_RSA() failed`); check those by verifying a message signed with the key.
 */
export async function opendkimTestkey(opts: {
  domain: string;
  selector: string;
  keyFile: string;
  dns: string;
}): Promise<{ ok: boolean; output: string }> {
  const ws = workspace(opts.dns, []);
  try {
    const { code, output } = await run(OPENDKIM_TESTKEY, [
      '-x',
      ws.conf,
      '-d',
      opts.domain,
      '-s',
      opts.selector,
      '-k',
      opts.keyFile,
      '-vvv',
    ]);
    return { ok: code === 0 && /key OK/.test(output), output };
  } finally {
    ws.done();
  }
}
