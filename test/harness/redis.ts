/**
 * A real Redis for tests: Debian's redis-server on 127.0.0.1 with a free port, its own temp
 * folder, nothing saved to disk. Point `state.redis.url` at `url`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { has, REQUIRE_PEERS, freePort } from './peers.js';

export const REDIS_SERVER = 'redis-server';
export const REDIS_PACKAGE = 'apt-get install redis-server';

/** Why Redis tests cannot run here, or false; a missing peer is a failure under PETREL_REQUIRE_PEERS=1. */
export const redisMissing: string | false =
  !REQUIRE_PEERS && !has(REDIS_SERVER) ? `${REDIS_SERVER} not installed (${REDIS_PACKAGE})` : false;

export interface RedisPeer {
  readonly port: number;
  readonly url: string;
  /** Stops redis-server (what it held is gone: nothing is saved). Idempotent. */
  stop(): Promise<void>;
  /** Starts it again on the same port, empty. */
  start(): Promise<void>;
  /** Freezes it (SIGSTOP): connections stay open and nothing is answered, until `resume`. */
  pause(): void;
  resume(): void;
}

/** True once redis-server answers PING with PONG. */
function pong(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    let got = '';
    s.setTimeout(1000, () => s.destroy());
    s.on('connect', () => s.write('PING\r\n'));
    s.on('data', (d) => {
      got += d.toString('latin1');
      if (got.includes('\r\n')) s.end();
    });
    s.on('error', () => undefined);
    s.on('close', () => resolve(got.startsWith('+PONG')));
  });
}

export async function startRedis(): Promise<RedisPeer> {
  if (!has(REDIS_SERVER)) throw new Error(`required peer missing: ${REDIS_SERVER} (${REDIS_PACKAGE})`);
  const dir = mkdtempSync(join(tmpdir(), 'petrel-redis-'));
  const port = await freePort();
  let child: ChildProcess | undefined;
  let output = '';

  const start = async (): Promise<void> => {
    mkdirSync(dir, { recursive: true });
    // The daemon itself is the child (no shell), so its pid is the one stopped.
    const proc = spawn(
      REDIS_SERVER,
      ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', dir],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    child = proc;
    proc.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
    proc.stderr.setEncoding('utf8').on('data', (d: string) => (output += d));
    const exit = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    for (;;) {
      if (proc.exitCode !== null || proc.signalCode !== null)
        throw new Error(`redis-server exited at start: ${output}`);
      if (await pong(port)) return;
      await Promise.race([exit, new Promise((r) => setTimeout(r, 50))]);
    }
  };

  const stop = async (): Promise<void> => {
    const proc = child;
    child = undefined;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGCONT');
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  };

  await start();
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    start,
    pause: () => child?.kill('SIGSTOP'),
    resume: () => child?.kill('SIGCONT'),
    async stop() {
      await stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
