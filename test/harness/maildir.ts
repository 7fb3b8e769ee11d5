import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** The Message-ID of every message delivered under a tree of Maildirs (new/ and cur/), duplicates included. */
export function mailIds(root: string): string[] {
  const ids: string[] = [];
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\/(new|cur)$/.test(dir)) {
        const m = /^Message-ID: <([^>]+)>/im.exec(readFileSync(p, 'latin1'));
        if (m) ids.push(m[1]!);
      }
    }
  };
  if (existsSync(root)) walk(root);
  return ids;
}
