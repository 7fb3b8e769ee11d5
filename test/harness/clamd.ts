/**
 * A real clamd for tests: Debian's clamd in the foreground on 127.0.0.1 with a free TCP port and
 * a unix socket, its own temp folder, and a signature database built here (no download): EICAR
 * as `Petrel.Test.EICAR` (reported as `Petrel.Test.EICAR.UNOFFICIAL`, ClamAV's suffix for
 * signatures not its own).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { has, REQUIRE_PEERS, freePort } from './peers.js';

export const CLAMD = 'clamd';
export const CLAMD_PACKAGE = 'apt-get install clamav-daemon clamav';

/** Why clamd tests cannot run here, or false; a missing peer is a failure under PETREL_REQUIRE_PEERS=1. */
export const clamdMissing: string | false =
  !REQUIRE_PEERS && !has(CLAMD) ? `${CLAMD} not installed (${CLAMD_PACKAGE})` : false;

/** The EICAR test file (68 octets), in two pieces so this source is not itself "infected". */
export const EICAR = 'X5O!P%@AP[4\\PZX54(P^)7CC)7}$' + 'EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*';
/** The name clamd gives it with the database built here. */
export const EICAR_SIGNATURE = 'Petrel.Test.EICAR.UNOFFICIAL';

export interface ClamdPeer {
  readonly host: string;
  readonly port: number;
  /** Its unix socket (`LocalSocket`). */
  readonly socket: string;
  /** clamd's own log. */
  log(): string;
  /** Freezes it (SIGSTOP): connections are accepted by the kernel and never answered, until `resume`. */
  pause(): void;
  resume(): void;
  /** Stops clamd (by its pid, waiting for it to exit). Idempotent. */
  stop(): Promise<void>;
}

/** True once clamd answers `zPING\0` with `PONG\0` (it binds only after loading the database). */
function pong(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    let got = '';
    s.setTimeout(1000, () => s.destroy());
    s.on('connect', () => s.write('zPING\0'));
    s.on('data', (d) => {
      got += d.toString('latin1');
      if (got.includes('\0')) s.end();
    });
    s.on('error', () => undefined);
    s.on('close', () => resolve(got === 'PONG\0'));
  });
}

export async function startClamd(opts: { streamMaxLength?: string } = {}): Promise<ClamdPeer> {
  if (!has(CLAMD)) throw new Error(`required peer missing: ${CLAMD} (${CLAMD_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-clamd-'));
  mkdirSync(join(dir, 'db'));
  const hex = Buffer.from(EICAR, 'latin1').toString('hex');
  // An extended signature (.ndb): name, any file type, any offset, the hex pattern.
  writeFileSync(join(dir, 'db', 'petrel-test.ndb'), `Petrel.Test.EICAR:0:*:${hex}\n`);
  const port = await freePort();
  const socket = join(dir, 'clamd.sock');
  const logFile = join(dir, 'clamd.log');
  writeFileSync(
    join(dir, 'clamd.conf'),
    [
      'Foreground yes',
      `DatabaseDirectory ${join(dir, 'db')}`,
      `TCPSocket ${port}`,
      'TCPAddr 127.0.0.1',
      `LocalSocket ${socket}`,
      `PidFile ${join(dir, 'clamd.pid')}`,
      `LogFile ${logFile}`,
      ...(opts.streamMaxLength ? [`StreamMaxLength ${opts.streamMaxLength}`] : []),
      '',
    ].join('\n'),
  );
  let output = '';
  // The daemon itself is the child (no shell), so its pid is the one stopped.
  const child: ChildProcess = spawn(CLAMD, ['-c', join(dir, 'clamd.conf')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  const exit = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const log = (): string => {
    try {
      return readFileSync(logFile, 'utf8');
    } catch {
      return '';
    }
  };
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGCONT');
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exit;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      const why = `clamd exited at start: ${output}${log()}`;
      rmSync(dir, { recursive: true, force: true });
      throw new Error(why);
    }
    if (await pong(port)) break;
    await Promise.race([exit, new Promise((r) => setTimeout(r, 50))]);
  }
  return {
    host: '127.0.0.1',
    port,
    socket,
    log,
    stop,
    pause: () => child.kill('SIGSTOP'),
    resume: () => child.kill('SIGCONT'),
  };
}
