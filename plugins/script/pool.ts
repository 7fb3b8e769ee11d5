import { spawn, type ChildProcess } from 'node:child_process';
import { z, type PluginApi } from '../../core/index.js';
import type { LaunchCommand } from './launch.js';

type Logger = PluginApi<unknown>['log'];

/**
 * A pool of script processes (child.ts, started by the command `launch.ts` builds). Each runs one
 * call at a time; calls wait in a bounded queue for a free process. Anything odd about a call —
 * its time is up, the process died, the script threw, the reply is not what the protocol says, or
 * the verdict does not parse — fails the call, and the process is killed (SIGKILL) and replaced:
 * a process that has run a misbehaving script is not trusted with the next call.
 *
 * Petrel's side never blocks on a process: requests and replies are single JSON lines over the
 * child's stdin and stdout (Unix socket pairs), one request in flight per process and bounded by
 * the caller (`maxInputBytes`); a reply longer than `MAX_REPLY_BYTES` kills the process; of its
 * stderr only the last few KiB are kept, for the log.
 */
export interface PoolOptions {
  readonly command: LaunchCommand;
  readonly scripts: readonly { readonly name: string; readonly source: string }[];
  readonly size: number;
  readonly maxQueued: number;
  readonly timeoutMs: number;
  readonly log: Logger;
}

export type CallOutcome<T> =
  | { readonly ok: true; readonly value: T; readonly pid: number }
  | { readonly ok: false; readonly reason: string; readonly pid: number | null };

const MAX_REPLY_BYTES = 16 * 1024;
const STDERR_KEPT = 4096;
const STARTUP_MS = 15_000;
const RESTART_BACKOFF_MAX_MS = 5000;

const fromChild = z.discriminatedUnion('type', [
  z.object({ type: z.literal('ready') }),
  z.object({ type: z.literal('init-error'), script: z.number().int(), message: z.string() }),
  z.object({
    type: z.literal('result'),
    id: z.number().int(),
    ok: z.boolean(),
    value: z.string().optional(),
    error: z.string().optional(),
  }),
]);
type FromChild = z.output<typeof fromChild>;

interface Call {
  readonly script: number;
  readonly input: string;
  readonly signal: AbortSignal;
  readonly parse: (value: unknown) => unknown;
  readonly resolve: (outcome: CallOutcome<unknown>) => void;
  readonly onAbort: () => void;
}

interface ScriptProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  state: 'starting' | 'idle' | 'busy' | 'gone';
  /** Why Petrel ended it, for the log when it exits. */
  endReason: string | null;
  /** A script did not compile in it: the whole reason it did not start. */
  initError: string | null;
  running: { id: number; call: Call; timer: NodeJS.Timeout } | null;
  out: string;
  stderr: string;
  /** Settles the promise `spawn` returned: ready, or failed to start. */
  started: (err: Error | null) => void;
  /** Resolves once the process has exited and its output pipes are closed. */
  readonly gone: Promise<void>;
}

export class ScriptPool {
  private readonly procs = new Set<ScriptProcess>();
  private readonly queue: Call[] = [];
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly initFrame: string;
  private closing = false;
  private nextId = 1;
  private failedStarts = 0;
  private readonly killAll = (): void => {
    for (const p of this.procs) p.child.kill('SIGKILL');
  };

  private constructor(private readonly o: PoolOptions) {
    this.initFrame = `${JSON.stringify({ type: 'init', scripts: o.scripts })}\n`;
  }

  /** Starts `size` processes and resolves once every one has compiled the scripts. */
  static async start(o: PoolOptions): Promise<ScriptPool> {
    const pool = new ScriptPool(o);
    // A process must not outlive Petrel: on a normal exit kill them here; on any other death the
    // kernel does it (see launch.ts, PR_SET_PDEATHSIG).
    process.on('exit', pool.killAll);
    try {
      await Promise.all(Array.from({ length: o.size }, () => pool.spawn()));
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  /** The process ids of the running processes (for the log). */
  pids(): number[] {
    return [...this.procs].map((p) => p.pid);
  }

  /**
   * Runs script number `script` on `input` (JSON text). `parse` checks the script's verdict; if it
   * throws, the call fails. Resolves with a failure, never rejects.
   */
  run<T>(
    script: number,
    input: string,
    signal: AbortSignal,
    parse: (value: unknown) => T,
  ): Promise<CallOutcome<T>> {
    if (this.closing) return Promise.resolve({ ok: false, reason: 'the script pool is closed', pid: null });
    if (signal.aborted) return Promise.resolve({ ok: false, reason: 'aborted', pid: null });
    const idle = [...this.procs].some((p) => p.state === 'idle');
    if (!idle && this.queue.length >= this.o.maxQueued) {
      return Promise.resolve({ ok: false, reason: 'too many calls waiting (maxQueued)', pid: null });
    }
    return new Promise((resolve) => {
      const call: Call = {
        script,
        input,
        signal,
        parse,
        resolve: resolve as (outcome: CallOutcome<unknown>) => void,
        onAbort: () => {
          // Only a call still waiting is dropped; a running one ends by its own deadline.
          const i = this.queue.indexOf(call);
          if (i >= 0) {
            this.queue.splice(i, 1);
            resolve({ ok: false, reason: 'aborted while waiting for a script process', pid: null });
          }
        },
      };
      signal.addEventListener('abort', call.onAbort, { once: true });
      this.queue.push(call);
      this.dispatch();
    });
  }

  /** Kills every process and fails every call; resolves when the processes have exited. */
  async close(): Promise<void> {
    this.closing = true;
    process.removeListener('exit', this.killAll);
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    for (const call of this.queue.splice(0))
      this.finish(call, { ok: false, reason: 'the script pool is closed', pid: null });
    const gone = [...this.procs].map((p) => p.gone);
    for (const p of [...this.procs]) this.end(p, 'the plugin set closed');
    await Promise.all(gone);
  }

  private spawn(): Promise<void> {
    const { file, args, env, cwd } = this.o.command;
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], env, cwd });
    // 'close' comes once the process exited and its pipes are closed: with namespaces, that is
    // when the script process itself is gone, not only the `unshare` above it. A process that
    // could not be started at all gets 'error' and no 'close'.
    const gone = new Promise<void>((resolve) => {
      child.once('close', () => resolve());
      child.once('error', () => child.pid === undefined && resolve());
    });
    return new Promise((resolve, reject) => {
      const p: ScriptProcess = {
        child,
        pid: child.pid ?? -1,
        state: 'starting',
        endReason: null,
        initError: null,
        running: null,
        out: '',
        stderr: '',
        started: (err) => {
          clearTimeout(startup);
          if (err) reject(err);
          else resolve();
        },
        gone,
      };
      const startup = setTimeout(() => this.end(p, `not ready within ${STARTUP_MS} ms`), STARTUP_MS);
      this.procs.add(p);
      child.on('error', (err) => this.end(p, `it could not be started: ${err.message}`));
      child.stdin!.on('error', () => undefined); // EPIPE after a death; 'close' tells the rest
      child.stdout!.setEncoding('utf8').on('data', (chunk: string) => this.onOutput(p, chunk));
      child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
        p.stderr = (p.stderr + chunk).slice(-STDERR_KEPT);
      });
      child.on('close', (code, signal) => this.onExit(p, code, signal));
      child.stdin!.write(this.initFrame);
    });
  }

  private onOutput(p: ScriptProcess, chunk: string): void {
    if (p.state === 'gone') return;
    p.out += chunk;
    for (let nl = p.out.indexOf('\n'); nl >= 0; nl = p.out.indexOf('\n')) {
      const line = p.out.slice(0, nl);
      p.out = p.out.slice(nl + 1);
      if (Buffer.byteLength(line) > MAX_REPLY_BYTES) return this.violation(p, 'a reply line is too long');
      let message: FromChild;
      try {
        message = fromChild.parse(JSON.parse(line));
      } catch {
        return this.violation(p, 'a reply line is not a protocol message');
      }
      this.onMessage(p, message);
      if (!this.procs.has(p)) return; // ended by that message
    }
    if (Buffer.byteLength(p.out) > MAX_REPLY_BYTES) this.violation(p, 'a reply line is too long');
  }

  private onMessage(p: ScriptProcess, message: FromChild): void {
    if (message.type === 'ready' && p.state === 'starting') {
      p.state = 'idle';
      this.failedStarts = 0;
      this.o.log.info({ childPid: p.pid }, 'script process started');
      p.started(null);
      this.dispatch();
      return;
    }
    if (message.type === 'init-error' && p.state === 'starting') {
      const name = this.o.scripts[message.script]?.name ?? `script ${message.script}`;
      p.initError = `${name}: ${message.message}`;
      return this.end(p, 'a script did not compile');
    }
    const running = p.running;
    if (message.type !== 'result' || p.state !== 'busy' || !running || message.id !== running.id) {
      return this.violation(p, `an unexpected "${message.type}" message`);
    }
    if (!message.ok) return this.end(p, `the script threw: ${message.error ?? '?'}`);
    let value: unknown;
    try {
      value = running.call.parse(JSON.parse(message.value ?? 'null'));
    } catch (err) {
      return this.end(p, `the script returned no valid verdict: ${(err as Error).message}`);
    }
    clearTimeout(running.timer);
    p.running = null;
    this.finish(running.call, { ok: true, value, pid: p.pid });
    p.state = 'idle';
    this.dispatch();
  }

  private dispatch(): void {
    for (const p of this.procs) {
      if (p.state !== 'idle') continue;
      const call = this.queue.shift();
      if (!call) return;
      const id = this.nextId++;
      p.state = 'busy';
      const timer = setTimeout(
        () => this.end(p, `no verdict within ${this.o.timeoutMs} ms`),
        this.o.timeoutMs,
      );
      p.running = { id, call, timer };
      this.o.log.debug({ childPid: p.pid, script: this.o.scripts[call.script]?.name }, 'script call started');
      p.child.stdin!.write(
        `${JSON.stringify({ type: 'call', id, script: call.script, input: call.input })}\n`,
      );
    }
  }

  private finish(call: Call, outcome: CallOutcome<unknown>): void {
    call.signal.removeEventListener('abort', call.onAbort);
    call.resolve(outcome);
  }

  private violation(p: ScriptProcess, what: string): void {
    this.end(p, `the script process broke the protocol: ${what}`);
  }

  /**
   * Kills a process (if it still runs), fails the call it was running with `reason`, and, unless
   * the pool is closing, starts its replacement.
   */
  private end(p: ScriptProcess, reason: string): void {
    if (p.state === 'gone') return;
    const wasStarting = p.state === 'starting';
    p.state = 'gone';
    p.endReason = reason;
    if (p.running) {
      clearTimeout(p.running.timer);
      this.finish(p.running.call, { ok: false, reason, pid: p.pid });
      p.running = null;
    }
    p.child.kill('SIGKILL');
    this.procs.delete(p);
    if (wasStarting) {
      const stderr = p.stderr.trim();
      const why =
        p.initError ?? `a script process did not start: ${reason}${stderr ? `; stderr: ${stderr}` : ''}`;
      p.started(new Error(why));
      this.failedStarts++;
    }
    if (!this.closing) this.replace();
  }

  private onExit(p: ScriptProcess, code: number | null, signal: NodeJS.Signals | null): void {
    const byItself = p.state !== 'gone';
    if (byItself) this.end(p, `the script process exited (${signal ?? `code ${code}`})`);
    const fields = {
      childPid: p.pid,
      code,
      signal,
      reason: p.endReason,
      stderr: p.stderr.trim() || undefined,
    };
    if (byItself) this.o.log.warn(fields, 'script process ended by itself');
    else this.o.log.info(fields, 'script process ended');
  }

  /** Starts a process in place of one that ended, backing off while starts keep failing. */
  private replace(): void {
    const delay =
      this.failedStarts === 0 ? 0 : Math.min(RESTART_BACKOFF_MAX_MS, 100 * 2 ** (this.failedStarts - 1));
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (this.closing) return;
      this.spawn().catch((err: Error) => {
        if (!this.closing)
          this.o.log.error({ err: err.message }, 'script process failed to start; trying again');
      });
    }, delay);
    this.timers.add(timer);
  }
}
