/**
 * A real SpamAssassin spamd for tests: Debian's spamd on 127.0.0.1 with a free port, its own
 * site config (no DNS, no Bayes, no network tests) and home, the packaged rules (GTUBE
 * included). Ready once it answers PING (its port accepts connections before the rules load).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { has, REQUIRE_PEERS, stopChild, freePort } from './peers.js';

export const SPAMD = 'spamd';
export const SPAMD_PACKAGE = 'apt-get install spamassassin spamd spamc';

/** Why spamd tests cannot run here, or false; a missing peer is a failure under PETREL_REQUIRE_PEERS=1. */
export const spamdMissing: string | false =
  !REQUIRE_PEERS && !has(SPAMD) ? `${SPAMD} not installed (${SPAMD_PACKAGE})` : false;

/** The GTUBE test string: every SpamAssassin scores it 1000. */
export const GTUBE = 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X';

export interface Spamd {
  readonly port: number;
  /** What spamd logged. */
  log(): string;
  /** Stops spamd and waits for it to exit; removes its folder. Idempotent. */
  stop(): Promise<void>;
}

/** True once spamd answers `PING` with `PONG`. */
function pong(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    let got = '';
    s.setTimeout(2000, () => s.destroy());
    s.on('connect', () => s.write('PING SPAMC/1.5\r\n\r\n'));
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', () => undefined);
    s.on('close', () => resolve(/^SPAMD\/[\d.]+ 0 PONG/.test(got)));
  });
}

export async function startSpamd(): Promise<Spamd> {
  if (!has(SPAMD)) throw new Error(`required peer missing: ${SPAMD} (${SPAMD_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-spamd-'));
  // spamd drops to debian-spamd when run as root: it must be able to read the site config.
  chmodSync(dir, 0o755);
  const site = join(dir, 'site');
  const home = join(dir, 'home');
  mkdirSync(site);
  mkdirSync(home);
  // The `.pre` files (loadplugin lines) are read from the site dir only.
  for (const f of readdirSync('/etc/spamassassin'))
    if (f.endsWith('.pre')) copyFileSync(join('/etc/spamassassin', f), join(site, f));
  writeFileSync(
    join(site, 'local.cf'),
    'use_bayes 0\nbayes_auto_learn 0\ndns_available no\nskip_rbl_checks 1\nuse_razor2 0\nuse_pyzor 0\n',
  );
  const root = userInfo().uid === 0;
  const userArgs: string[] = [];
  if (root) {
    const spamdUser = 'debian-spamd';
    try {
      const uid = Number(execFileSync('id', ['-u', spamdUser], { encoding: 'utf8' }).trim());
      chownSync(home, uid, -1);
      userArgs.push('-u', spamdUser);
    } catch {
      // No such user: spamd falls back to nobody, which still scans.
    }
  }
  const port = await freePort();
  let output = '';
  // The daemon itself is the child (no shell), so its pid is the one stopped.
  const child: ChildProcess = spawn(
    SPAMD,
    [
      '-x',
      '-L',
      ...userArgs,
      '-H',
      home,
      `--siteconfigpath=${site}`,
      '-C',
      '/usr/share/spamassassin',
      '-i',
      `127.0.0.1:${port}`,
      '-r',
      join(dir, 'spamd.pid'),
      '-s',
      'stderr',
      '--max-children=1',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await stopChild(child);
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      await stop();
      throw new Error(`spamd exited at start: ${output}`);
    }
    if (await pong(port)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`spamd not ready after 60 s: ${output}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { port, log: () => output, stop };
}

export { freePort } from './peers.js';
