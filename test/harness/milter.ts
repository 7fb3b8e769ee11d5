/**
 * Real milters for tests: OpenDKIM in sign mode (Debian `opendkim`, `opendkim-tools`) and a
 * pymilter program (Debian `python3-milter`, run with /usr/bin/python3). Each daemon is this
 * process's direct child on a free 127.0.0.1 port; ready once the port accepts a connection;
 * stopped by its PID, waiting for it to exit (libmilter daemons take up to 5 s after SIGTERM).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { OPENDKIM, OPENDKIM_PACKAGE } from './opendkim.js';
import { has, PYTHON, REQUIRE_PEERS, stopChild, freePort } from './peers.js';

export const PYMILTER_PACKAGE = 'apt-get install python3-milter';

export interface MilterPeer {
  /** The TCP port it listens on, or 0 when it listens on `path`. */
  readonly port: number;
  /** Its unix socket, or null when it listens on TCP. */
  readonly path: string | null;
  /** What the daemon printed, for assertion messages. */
  output(): string;
  /** Stops it (SIGTERM, SIGKILL after 6 s) and waits for its exit; idempotent. */
  stop(): Promise<void>;
}

function accepts(where: number | string): Promise<boolean> {
  return new Promise((resolve) => {
    const s =
      typeof where === 'number' ? connect({ port: where, host: '127.0.0.1' }) : connect({ path: where });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function startDaemon(
  command: string,
  args: string[],
  where: number | string,
  cleanup: () => void,
): Promise<MilterPeer> {
  const child: ChildProcess = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const peer: MilterPeer = {
    port: typeof where === 'number' ? where : 0,
    path: typeof where === 'string' ? where : null,
    output: () => out,
    async stop() {
      await stopChild(child, 6000);
      cleanup();
    },
  };
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      cleanup();
      throw new Error(`${command} exited before listening: ${out}`);
    }
    if (await accepts(where)) return peer;
    if (Date.now() > deadline) {
      await peer.stop();
      throw new Error(`${command} did not listen on ${where}: ${out}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

function missing(t: TestContext, why: string): null {
  if (REQUIRE_PEERS) throw new Error(`required peer missing: ${why}`);
  t.skip(why);
  return null;
}

/** Is pymilter importable by Debian's python3? */
function hasPymilter(): Promise<boolean> {
  return new Promise((resolve) => execFile(PYTHON, ['-c', 'import Milter'], (err) => resolve(!err)));
}

/**
 * Runs the pymilter program `source`; it gets its socket as argv[1]: `inet:<port>@127.0.0.1`,
 * or with `unix`, `unix:<path>` in a scratch folder.
 */
export async function startPymilter(
  t: TestContext,
  source: string,
  opts: { unix?: boolean } = {},
): Promise<MilterPeer | null> {
  if (!(await hasPymilter())) return missing(t, `pymilter not installed (${PYMILTER_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-pymilter-'));
  const file = join(dir, 'test_milter.py');
  writeFileSync(file, source);
  const where = opts.unix ? join(dir, 'milter.sock') : await freePort();
  const spec = typeof where === 'string' ? `unix:${where}` : `inet:${where}@127.0.0.1`;
  return startDaemon(PYTHON, [file, spec], where, () => rmSync(dir, { recursive: true, force: true }));
}

export interface OpendkimSigner extends MilterPeer {
  /** The DNS TXT record's name and text for the key (`petrel._domainkey.<domain>`). */
  readonly record: { readonly name: string; readonly text: string };
}

/** OpenDKIM signing mail from `domain` (selector `petrel`) for clients in 127.0.0.0/8. */
export async function startOpendkimSigner(t: TestContext, domain: string): Promise<OpendkimSigner | null> {
  if (!has(OPENDKIM) || !has('opendkim-genkey'))
    return missing(t, `opendkim not installed (${OPENDKIM_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-opendkim-milter-'));
  const keys = join(dir, 'keys');
  mkdirSync(keys);
  await new Promise<void>((resolve, reject) =>
    execFile('opendkim-genkey', ['-b', '2048', '-D', keys, '-d', domain, '-s', 'petrel'], (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  const txt = readFileSync(join(keys, 'petrel.txt'), 'utf8');
  const text = [...txt.matchAll(/"([^"]*)"/g)].map((m) => m[1]).join('');
  const port = await freePort();
  const conf = join(dir, 'opendkim.conf');
  writeFileSync(
    conf,
    [
      'Syslog no',
      'Mode s',
      `Domain ${domain}`,
      'Selector petrel',
      `KeyFile ${join(keys, 'petrel.private')}`,
      `Socket inet:${port}@127.0.0.1`,
      `PidFile ${join(dir, 'opendkim.pid')}`,
      'Canonicalization relaxed/simple',
      'InternalHosts 127.0.0.0/8',
      'OversignHeaders From',
      // The key sits below /tmp, which others may write: accepted for a test key.
      'RequireSafeKeys false',
      '',
    ].join('\n'),
  );
  const peer = await startDaemon(OPENDKIM, ['-f', '-x', conf], port, () =>
    rmSync(dir, { recursive: true, force: true }),
  );
  return { ...peer, record: { name: `petrel._domainkey.${domain}`, text } };
}

export { freePort } from './peers.js';
