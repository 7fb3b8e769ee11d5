import { appendFile, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Which recipients have had their delay warning, kept on disk so that a restart does not warn a
 * second time. One JSON line per warning, `["<queue id>","<recipient>"]`, appended as it is sent;
 * lines of messages that have left the queue are dropped when the file is rewritten (at start,
 * and once enough lines have piled up).
 */
export class WarnedLog {
  private readonly keys = new Set<string>();
  private appended = 0;
  private rewriting: Promise<void> | null = null;
  private readonly file: string;

  private constructor(
    dir: string,
    private readonly onError: (err: unknown, what: string) => void,
  ) {
    this.file = join(dir, 'delay-warned.jsonl');
  }

  static async open(dir: string, onError: (err: unknown, what: string) => void): Promise<WarnedLog> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const log = new WarnedLog(dir, onError);
    let text = '';
    try {
      text = await readFile(log.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    for (const line of text.split('\n')) {
      if (!line) continue;
      try {
        const [id, rcpt] = JSON.parse(line) as [string, string];
        if (typeof id === 'string' && typeof rcpt === 'string') log.keys.add(key(id, rcpt));
      } catch {
        // A line cut short by a crash: that warning may be sent again, nothing worse.
      }
    }
    return log;
  }

  has(id: string, rcpt: string): boolean {
    return this.keys.has(key(id, rcpt));
  }

  /** Records a warning (in memory at once; on disk before the returned promise settles). */
  async add(id: string, rcpt: string): Promise<void> {
    this.keys.add(key(id, rcpt));
    this.appended++;
    try {
      await this.rewriting;
      await appendFile(this.file, `${JSON.stringify([id, rcpt])}\n`, { mode: 0o600 });
    } catch (err) {
      this.onError(err, 'could not record a delay warning; it may be sent again after a restart');
    }
  }

  /** How many warnings were added since the file was last rewritten. */
  get added(): number {
    return this.appended;
  }

  /** Rewrites the file with only the warnings of messages `live` still knows. */
  async prune(live: (id: string) => boolean): Promise<void> {
    if (this.rewriting) return this.rewriting;
    this.rewriting = (async () => {
      for (const k of this.keys) if (!live(k.slice(0, k.indexOf('\n')))) this.keys.delete(k);
      const text = [...this.keys]
        .map((k) => {
          const nl = k.indexOf('\n');
          return `${JSON.stringify([k.slice(0, nl), k.slice(nl + 1)])}\n`;
        })
        .join('');
      const tmp = `${this.file}.tmp`;
      await writeFile(tmp, text, { mode: 0o600 });
      await rename(tmp, this.file);
      this.appended = 0;
    })()
      .catch((err: unknown) => this.onError(err, 'could not rewrite the delay-warning record'))
      .finally(() => {
        this.rewriting = null;
      });
    return this.rewriting;
  }
}

function key(id: string, rcpt: string): string {
  return `${id}\n${rcpt}`;
}
