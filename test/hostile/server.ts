/**
 * What the hostile-client tests share: a Petrel started as its own process (`petrel start`, as an
 * operator runs it, so its memory can be read from /proc), a probe that must still get a message
 * through while an attack runs, and a watch on the server's resident memory.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { READER_HIGH_WATER } from '../../core/smtp/reader.js';
import { REPLY_BOUND } from '../../core/smtp/session.js';
import { hashPassword } from '../../plugins/users/password.js';
import { writeUsersFile } from '../../plugins/users/users-file.js';
import { freePort, PetrelProcess, Project } from '../e2e/cli.js';
import { SmtpClient } from '../harness/smtp-client.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
/**
 * docs/security.md, "Memory per session", outside a transaction: the reader's input buffer (its
 * high-water mark plus one socket read of at most 64 KiB), a command line inside it, and the
 * unsent replies (their bound plus one reply).
 */
export const IDLE_SESSION_BUDGET = READER_HIGH_WATER + 64 * KiB + REPLY_BOUND + 4 * KiB;
/**
 * What the process may grow by for reasons that have nothing to do with one client's data: V8
 * enlarges its young generation (to about 50 MiB) when a few hundred thousand commands make
 * garbage quickly, and keeps it a while; code is compiled on the way. Generous on purpose: a
 * server that buffers the replies grows by hundreds of MiB here.
 */
export const MARGIN = 96 * MiB;

/** The only mailbox on the server under attack. */
export const BOB = 'bob@hostile.test';

/**
 * Time limits of the server under attack: short, so that a test sees a deadline pass in a few
 * seconds. The tests assert why a connection ended (the reply, the logged cause), never how long
 * it took.
 */
export const TIMEOUTS = { command: '4s', data: '2s', minDataRate: 500 } as const;

export interface HostileServer {
  readonly petrel: PetrelProcess;
  readonly port: number;
  readonly project: Project;
  /** The server's resident set size now, in KiB. */
  rssKiB(): number;
  /** Message files delivered into Bob's Maildir so far. */
  bobsMail(): string[];
  stop(): Promise<void>;
}

/** Starts `petrel start` with users (Bob), queue and maildir, and the short `TIMEOUTS`. */
export async function startHostileServer(config: Record<string, unknown> = {}): Promise<HostileServer> {
  const project = new Project([]);
  const port = await freePort();
  await writeUsersFile(project.path('users.json'), {
    users: { [BOB]: { password: await hashPassword('not used here', { iterations: 4096 }) } },
  });
  const file = project.writeConfig('petrel.yaml', {
    hostname: 'mx.hostile.test',
    localDomains: ['hostile.test'],
    listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
    spool: { dir: './spool' },
    timeouts: TIMEOUTS,
    log: { level: 'info', format: 'json' },
    plugins: [
      { name: 'users', config: { usersFile: './users.json' } },
      'queue',
      { name: 'maildir', config: { root: './mail' } },
    ],
    ...config,
  });
  const petrel = await PetrelProcess.start(file, project.dir);
  const pid = petrel.pid!;
  return {
    petrel,
    port,
    project,
    rssKiB: () => rssKiB(pid),
    bobsMail: () => {
      const dir = project.path('mail', 'hostile.test', 'bob', 'Maildir', 'new');
      try {
        return readdirSync(dir).map((f) => join(dir, f));
      } catch {
        return [];
      }
    },
    async stop() {
      petrel.signal('SIGTERM');
      await petrel.waitForExit(20_000).catch(() => petrel.kill());
      project.remove();
    },
  };
}

/** Resident set size of a process, in KiB (Linux). */
export function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for process ${pid}`);
  return Number(m[1]);
}

/** Samples a process's RSS until stopped; `peak` is the largest seen. */
export class RssWatch {
  peak = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly sample: () => number) {
    this.peak = sample();
    this.timer = setInterval(() => {
      this.peak = Math.max(this.peak, this.sample());
    }, 50);
  }

  stop(): number {
    clearInterval(this.timer);
    this.peak = Math.max(this.peak, this.sample());
    return this.peak;
  }
}

/**
 * A whole transaction for Bob, as an ordinary client sends it: the proof that the server still
 * serves others while it is under attack. Resolves with the `250` reply to the end of data.
 */
export async function probe(port: number, tag: string): Promise<string> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /, 30_000);
    await c.cmd('EHLO probe.test', /^250[ -]/);
    await c.cmd('MAIL FROM:<probe@remote.test>', /^250 /);
    await c.cmd(`RCPT TO:<${BOB}>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`Subject: probe ${tag}\r\n\r\nStill served while under attack.\r\n.\r\n`);
    const done = await c.expect(/^250 2\.0\.0 Ok: queued as /, 30_000);
    await c.cmd('QUIT', /^221 /);
    return done.raw;
  } finally {
    c.close();
  }
}

/** A raw connection whose greeting has been read. */
export async function greeted(port: number): Promise<Socket> {
  const s = connect({ port, host: '127.0.0.1' });
  s.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => {
    let got = '';
    const onData = (d: Buffer): void => {
      got += d.toString('latin1');
      if (!got.includes('\r\n')) return;
      s.off('data', onData);
      if (got.startsWith('220 ')) resolve();
      else reject(new Error(`unexpected greeting ${JSON.stringify(got)}`));
    };
    s.on('data', onData);
    s.once('error', reject);
  });
  return s;
}

/**
 * A deterministic pseudo-random generator (mulberry32), so that a failing fuzz run can be
 * repeated from its seed.
 */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The deadline log lines for a cause (`command`, `content` or `replies`), from `from` on. */
/**
 * Waits for the first log line of a deadline with this cause: a worker's lines reach the log
 * through the primary, so one may arrive just after the client saw its connection close.
 */
export function deadlineLine(
  petrel: PetrelProcess,
  cause: string,
  from = 0,
): Promise<Record<string, unknown>> {
  return petrel.waitForLog(
    (l) => l.msg === 'deadline passed, closing connection' && l.deadline === cause,
    10_000,
    from,
  );
}

export function deadlineLines(petrel: PetrelProcess, cause: string, from = 0): Record<string, unknown>[] {
  return petrel.logs
    .slice(from)
    .filter((l) => l.msg === 'deadline passed, closing connection' && l.deadline === cause);
}
