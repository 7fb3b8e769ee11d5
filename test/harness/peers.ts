import { execFileSync, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import type { TestContext } from 'node:test';

/** CI sets PETREL_REQUIRE_PEERS=1: then a missing peer fails the test instead of skipping it. */
export const REQUIRE_PEERS = process.env.PETREL_REQUIRE_PEERS === '1';

/** Debian's python3 (with its modules), which may not be the first python3 on PATH. */
export const PYTHON = ['/usr/bin/python3', 'python3'].find((p) => has(p)) ?? 'python3';

export function has(command: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * Returns the path of a real peer program, or skips the test when it is missing — unless
 * PETREL_REQUIRE_PEERS=1, where a missing peer is a failure.
 */
export function requirePeer(t: TestContext, command: string, installHint: string): string | null {
  if (has(command)) return command;
  const why = `${command} not installed (${installHint})`;
  if (REQUIRE_PEERS) throw new Error(`required peer missing: ${why}`);
  t.skip(why);
  return null;
}

/**
 * Stops a peer process: SIGTERM, then SIGKILL if it has not exited within `graceMs`. Resolves
 * once it has exited (at once if it already had).
 */
export async function stopChild(child: ChildProcess, graceMs = 3000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await gone;
  clearTimeout(timer);
}

/** A TCP port that was free a moment ago on 127.0.0.1 (for a peer the test starts). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}
