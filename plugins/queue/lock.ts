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

/**
 * Makes this process the only one that opens a queue part: a `lock` file, created exclusively,
 * holds the owner's pid. A lock whose process is gone (kill -9, a crash) is stale and taken over;
 * a live owner's is refused with a message that says which process holds it.
 * Returns the function that gives the lock back.
 */
export async function lockPart(dir: string): Promise<() => Promise<void>> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const path = join(dir, LOCK);
  for (let tries = 0; ; tries++) {
    try {
      const fh = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => rm(path, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || tries > 0) throw err;
    }
    const owner = Number((await readFile(path, 'utf8').catch(() => '')).trim());
    if (owner > 0 && owner !== process.pid && alive(owner)) {
      throw new Error(
        `the queue folder ${dir} is in use by another running Petrel (process ${owner}); stop that one first`,
      );
    }
    await rm(path, { force: true });
  }
}
