/**
 * A real rspamd for tests: Debian's rspamd on 127.0.0.1 with a free port, its own top-level
 * config on the packaged rules, one `normal` worker (it serves `/checkv2` and `/ping`), DNS on a
 * dead loopback port and the network-dependent modules off, so scores do not depend on the
 * machine. Its hyperscan cache is kept in `HS_CACHE` between runs: a cold start compiles for
 * about 10 s, a start that finds the cache is ready in under a second.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { has, REQUIRE_PEERS, stopChild } from './peers.js';
import { freePort } from './spamd.js';

export const RSPAMD = 'rspamd';
export const RSPAMD_PACKAGE = 'apt-get install rspamd';
const HS_CACHE = join('/var/tmp', 'petrel-rspamd-hs');

/** Why rspamd tests cannot run here, or false; a missing peer is a failure under PETREL_REQUIRE_PEERS=1. */
export const rspamdMissing: string | false =
  !REQUIRE_PEERS && !has(RSPAMD) ? `${RSPAMD} not installed (${RSPAMD_PACKAGE})` : false;

export interface Rspamd {
  readonly port: number;
  readonly url: string;
  /** What rspamd logged (its log file is read on demand). */
  log(): string;
  /** Stops rspamd (SIGTERM to the main process, which stops its workers) and waits for it to exit. Idempotent. */
  stop(): Promise<void>;
}

const CONFIG = `.include "$CONFDIR/common.conf"
options {
  pidfile = "$RUNDIR/rspamd.pid";
  .include "$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}
logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "notice"; }
worker "normal" {
  bind_socket = "127.0.0.1:\${PORT}";
  count = 1;
  .include "$CONFDIR/worker-normal.inc"
}
`;

/** True once `GET /ping` answers 200. */
function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ host: '127.0.0.1', port, path: '/ping', timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
    req.end();
  });
}

export async function startRspamd(): Promise<Rspamd> {
  if (!has(RSPAMD)) throw new Error(`required peer missing: ${RSPAMD} (${RSPAMD_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-rspamd-'));
  for (const d of ['conf/local.d', 'run', 'db', 'log']) mkdirSync(join(dir, d), { recursive: true });
  mkdirSync(HS_CACHE, { recursive: true });
  writeFileSync(join(dir, 'conf', 'rspamd.conf'), CONFIG);
  const dnsPort = await freePort(); // nothing listens there: lookups fail fast instead of leaving the machine
  writeFileSync(
    join(dir, 'conf', 'local.d', 'options.inc'),
    `dns { nameserver = ["127.0.0.1:${dnsPort}"]; timeout = 0.2s; retransmits = 1; }\nhs_cache_dir = "\${HSCACHE}";\n`,
  );
  for (const m of ['fuzzy_check', 'rbl', 'phishing', 'asn', 'emails', 'hfilter', 'spf', 'dmarc'])
    writeFileSync(join(dir, 'conf', 'local.d', `${m}.conf`), 'enabled = false;\n');
  const port = await freePort();
  let output = '';
  // The daemon itself is the child (no shell), in the foreground (-f): its pid is the one stopped.
  // -i: as root rspamd refuses to run its workers without it.
  const child: ChildProcess = spawn(
    RSPAMD,
    [
      '-f',
      '-i',
      '-c',
      join(dir, 'conf', 'rspamd.conf'),
      '--var',
      `LOCAL_CONFDIR=${join(dir, 'conf')}`,
      '--var',
      `RUNDIR=${join(dir, 'run')}`,
      '--var',
      `DBDIR=${join(dir, 'db')}`,
      '--var',
      `LOGDIR=${join(dir, 'log')}`,
      '--var',
      `PORT=${port}`,
      '--var',
      `HSCACHE=${HS_CACHE}`,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  const log = (): string => {
    try {
      return output + readFileSync(join(dir, 'log', 'rspamd.log'), 'utf8');
    } catch {
      return output;
    }
  };
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await stopChild(child);
    rmSync(dir, { recursive: true, force: true });
  };
  // A cold start compiles the hyperscan databases: allow a minute.
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      const why = log();
      await stop();
      throw new Error(`rspamd exited at start: ${why}`);
    }
    if (await ping(port)) break;
    if (Date.now() > deadline) {
      const why = log();
      await stop();
      throw new Error(`rspamd not ready after 60 s: ${why}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { port, url: `http://127.0.0.1:${port}`, log, stop };
}
