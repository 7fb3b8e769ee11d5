import { open, rename } from 'node:fs/promises';

/** Makes the names in a folder (a new file, a rename, a removal) survive a crash. */
export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Writes a whole file so that after a crash it is either absent or complete: into `<path>.tmp`,
 * fsynced, then renamed. The caller fsyncs the folder (once for several files).
 */
export async function writeComplete(path: string, data: Buffer | string): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}
