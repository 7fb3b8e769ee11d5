import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { FIXTURES, ROOT } from '../harness/server.js';
import { run, type RunResult } from './run.js';

/** Node 24 from the devDependency (the system node may be older), else the one running the tests. */
export const NODE = existsSync(join(ROOT, 'node_modules', '.bin', 'node'))
  ? join(ROOT, 'node_modules', '.bin', 'node')
  : process.execPath;
/** The compiled `petrel` command. */
export const CLI = join(ROOT, 'dist', 'core', 'cli', 'main.js');
/**
 * `petrel start`'s arguments for tests that are not about privileges: as root (CI), Petrel refuses
 * to start without `user` in the config unless told `--run-as-root`.
 */
export const START = ['start', ...(process.getuid?.() === 0 ? ['--run-as-root'] : [])];

export type LogLine = Record<string, unknown> & { msg?: string };

export { freePort } from '../harness/peers.js';

/**
 * A user's project: a fresh folder under the system temp dir (outside this repository), with
 * plugin files copied from test/fixtures/e2e/plugins into `plugins-local/`.
 */
export class Project {
  readonly dir: string;

  constructor(plugins: readonly string[] = ['my-rules', 'thrower', 'hanger', 'bad-hooks']) {
    this.dir = mkdtempSync(join(tmpdir(), 'petrel-e2e-'));
    mkdirSync(join(this.dir, 'plugins-local'));
    for (const p of plugins) {
      copyFileSync(join(FIXTURES, 'e2e', 'plugins', `${p}.ts`), join(this.dir, 'plugins-local', `${p}.ts`));
    }
  }

  path(...parts: string[]): string {
    return join(this.dir, ...parts);
  }

  /** Writes a config file (an object becomes YAML; a string is written as is) and returns its path. */
  writeConfig(name: string, config: object | string): string {
    const file = this.path(name);
    writeFileSync(file, typeof config === 'string' ? config : stringify(config));
    return file;
  }

  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Runs `petrel <args>` to completion (for commands that exit, or a start that must fail). */
export function petrel(args: readonly string[], cwd: string, timeoutMs = 15_000): Promise<RunResult> {
  return run(NODE, [CLI, ...args], { cwd, timeoutMs, env: { ...process.env, NO_COLOR: '1' } });
}

/** A `petrel start` running as a child process, with its JSON log lines collected. */
export class PetrelProcess {
  /** Every JSON log line written to stdout so far. */
  readonly logs: LogLine[] = [];
  /** Lines on stdout that are not JSON. */
  readonly otherOutput: string[] = [];
  stderr = '';
  exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private partial = '';
  private waiters: (() => void)[] = [];

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (d: string) => {
      this.partial += d;
      const lines = this.partial.split('\n');
      this.partial = lines.pop() ?? '';
      for (const line of lines) {
        if (!line.trim()) continue;
        try {
          this.logs.push(JSON.parse(line) as LogLine);
        } catch {
          this.otherOutput.push(line);
        }
      }
      this.wake();
    });
    child.stderr.on('data', (d: string) => {
      this.stderr += d;
      this.wake();
    });
    this.exited = new Promise((resolve) => {
      child.once('close', (code, signal) => {
        this.exit = { code, signal };
        this.wake();
        resolve(this.exit);
      });
    });
  }

  /**
   * Spawns `petrel start --config <file>` in `cwd` (`start`: the command and its flags); does not
   * wait for it to be ready.
   */
  static spawn(configFile: string, cwd: string, start: readonly string[] = START): PetrelProcess {
    const child = spawn(NODE, [CLI, ...start, '--config', configFile], {
      cwd,
      env: { ...process.env, NO_COLOR: '1' },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    return new PetrelProcess(child);
  }

  /** Spawns and waits for the `petrel started` log line; fails with the output if it exits first. */
  static async start(
    configFile: string,
    cwd: string,
    timeoutMs = 15_000,
    start: readonly string[] = START,
  ): Promise<PetrelProcess> {
    const p = PetrelProcess.spawn(configFile, cwd, start);
    try {
      await p.waitForLog((l) => l.msg === 'petrel started', timeoutMs);
    } catch (err) {
      p.kill();
      throw err;
    }
    return p;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private async until<T>(probe: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = probe();
      if (found !== undefined) return found;
      if (this.exit)
        throw new Error(
          `petrel exited (${this.exit.code ?? this.exit.signal}) before ${what}\n${this.dump()}`,
        );
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${what} within ${timeoutMs} ms\n${this.dump()}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Waits for a log line (at index `from` or later) that matches. */
  waitForLog(match: (line: LogLine) => boolean, timeoutMs = 10_000, from = 0): Promise<LogLine> {
    return this.until(() => this.logs.slice(from).find(match), timeoutMs, 'matching log line');
  }

  /** Waits for the process to exit; kills it and fails when it does not within `timeoutMs`. */
  async waitForExit(timeoutMs = 10_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    const timer = new Promise<null>((resolve) => setTimeout(() => resolve(null), timeoutMs).unref());
    const result = await Promise.race([this.exited, timer]);
    if (result) return result;
    const output = this.dump();
    this.kill();
    throw new Error(`petrel did not exit within ${timeoutMs} ms\n${output}`);
  }

  signal(sig: NodeJS.Signals): void {
    if (!this.exit) this.child.kill(sig);
  }

  /** Ends the process for good (after hooks); a no-op once it has exited. */
  kill(): void {
    if (!this.exit) this.child.kill('SIGKILL');
  }

  /** stdout and stderr so far, for assertion messages. */
  dump(): string {
    const logs = this.logs.map((l) => JSON.stringify(l));
    return `--- log\n${[...logs, ...this.otherOutput].join('\n')}\n--- stderr\n${this.stderr}`;
  }
}
