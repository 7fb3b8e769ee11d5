import type { KeyObject } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/**
 * Where the private-key operations run: threads of their own (`signingThreads`, one by default),
 * each signing one header at a time, at a lower CPU priority than the event loop (`signingNice`,
 * 10 by default; Linux).
 *
 * Why not libuv's thread pool (`crypto.sign` with a callback), which is Node's usual place for
 * it: an RSA-2048 signature is about 0.25 ms of CPU, and a pool thread has the same priority as
 * the event loop that serves every SMTP session of the worker, so on a machine whose cores are
 * busy the signatures took CPU away from the sessions (and the pool's other work, the queue's
 * writes and fsyncs, waited behind them). At a lower priority the signing takes the CPU the
 * sessions leave; a signature waits instead of a session. Measured with `npm run bench:relay`
 * on 2 cores shared with the load generator: signed relaying went from 715–849 to 1160–1415
 * messages a second (0.55–0.77 of unsigned to 0.71–0.87); the same thread at normal priority
 * gave 0.64.
 *
 * Contract: `sign` resolves with the signature, or rejects when the key cannot sign or the thread
 * died (it is started again for the next signature); it never waits for a thread that is gone.
 * `close` ends the threads; signatures still waiting are rejected.
 */
export class SigningThreads {
  private readonly threads: (Worker | null)[];
  private readonly pending = new Map<number, Pending>();
  private readonly waitingOn = new Map<Worker, Set<number>>();
  private nextId = 0;
  private turn = 0;
  private closed = false;

  constructor(
    count: number,
    private readonly nice: number,
  ) {
    this.threads = Array.from({ length: count }, () => null);
  }

  /**
   * RSA-SHA256 of `data` (RFC 6376 §3.3.1) or Ed25519 of its SHA-256 digest (RFC 8463 §3), by
   * the key's type.
   */
  sign(key: KeyObject, data: Buffer): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error('the signing threads are closed'));
    const slot = this.turn++ % this.threads.length;
    const thread = this.threads[slot] ?? this.start(slot);
    const id = this.nextId++;
    return new Promise<Buffer>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.waitingOn.get(thread)!.add(id);
      thread.postMessage({ id, key, data });
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    const threads = this.threads.filter((t): t is Worker => t !== null);
    this.threads.fill(null);
    await Promise.all(threads.map((t) => t.terminate()));
    this.failAll(new Error('the signing threads are closed'));
  }

  private start(slot: number): Worker {
    const thread = new Worker(THREAD_SOURCE, { eval: true, workerData: { nice: this.nice } });
    // A signing thread never keeps the process alive on its own.
    thread.unref();
    this.threads[slot] = thread;
    this.waitingOn.set(thread, new Set());
    thread.on('message', (m: { id: number; sig?: Uint8Array; error?: string }) => {
      this.waitingOn.get(thread)?.delete(m.id);
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.sig) p.resolve(Buffer.from(m.sig.buffer, m.sig.byteOffset, m.sig.byteLength));
      else p.reject(new Error(m.error ?? 'signing failed'));
    });
    const gone = (why: string): void => {
      if (this.threads[slot] === thread) this.threads[slot] = null;
      for (const id of this.waitingOn.get(thread) ?? []) {
        const p = this.pending.get(id);
        this.pending.delete(id);
        p?.reject(new Error(`the signing thread ${why}`));
      }
      this.waitingOn.delete(thread);
    };
    thread.on('error', (err) => gone(`failed: ${err.message}`));
    thread.on('exit', (code) => gone(`exited (${code})`));
    return thread;
  }

  private failAll(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.waitingOn.clear();
  }
}

interface Pending {
  readonly resolve: (sig: Buffer) => void;
  readonly reject: (err: Error) => void;
}

/**
 * The thread's code (CommonJS, evaluated): lowers its own priority (a Linux thread's id is the
 * last part of /proc/thread-self; setpriority on it affects that thread alone), then signs each
 * header it is sent, synchronously, one at a time. Keys arrive as KeyObjects, which Node passes
 * between threads without copying the key material.
 */
const THREAD_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { sign, createHash } = require('node:crypto');
try {
  const tid = Number(require('node:fs').readlinkSync('/proc/thread-self').split('/').pop());
  if (workerData.nice) require('node:os').setPriority(tid, workerData.nice);
} catch {}
parentPort.on('message', ({ id, key, data }) => {
  try {
    const sig =
      key.asymmetricKeyType === 'rsa'
        ? sign('sha256', data, key)
        : sign(null, createHash('sha256').update(data).digest(), key);
    parentPort.postMessage({ id, sig });
  } catch (err) {
    parentPort.postMessage({ id, error: String((err && err.message) || err) });
  }
});
`;
