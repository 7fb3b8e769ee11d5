import { constants } from 'node:fs';
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';

const LOCK = 'lock';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** How long a part's lock waits for a live owner to exit before it refuses. */
const WAIT_FOR_OWNER_MS = 10_000;

/**
 * Makes this process the only one that opens a queue part: a `lock` file, created exclusively,
 * holds the owner's pid. A lock whose process is gone (kill -9, a crash) is stale and taken over.
 * A live owner is waited for, up to ten seconds — a worker whose primary was killed exits on its
 * own, but may still be finishing when the next server starts — and then refused with a message
 * that says which process holds it. Returns the function that gives the lock back.
 */
export async function lockPart(dir: string): Promise<() => Promise<void>> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const path = join(dir, LOCK);
  const deadline = Date.now() + WAIT_FOR_OWNER_MS;
  for (let tries = 0; ; tries++) {
    try {
      const fh = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => rm(path, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || tries > 1000) throw err;
    }
    const owner = Number((await readFile(path, 'utf8').catch(() => '')).trim());
    if (owner > 0 && owner !== process.pid && alive(owner)) {
      if (Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      throw new Error(
        `the queue folder ${dir} is in use by another running Petrel (process ${owner}); stop that one first`,
      );
    }
    await rm(path, { force: true });
  }
}
