import { createConnection } from 'node:net';
import type { RecipientReply } from '../../hooks/catalogue.js';
import type { ControlSocket } from '../../services/control-sockets.js';

/*
 * The console's side of the queue's control protocol (plugins/queue/control.ts defines it; this is
 * what the console sends and the part of each answer it reads). The same sockets and the same
 * requests as `petrel queue`: one way to act on the queue. The core cannot import the plugin, so
 * the shapes are restated here, read-only and structurally; the console's browser test runs the
 * two against each other.
 */

/** One attempt kept in a recipient's history. */
export interface QueueAttempt {
  readonly t: number;
  readonly n?: number;
  readonly status: 'delivered' | 'deferred' | 'failed';
  readonly transport?: string;
  readonly route?: string;
  readonly reply: RecipientReply;
  readonly kind?: 'deleted' | 'returned' | 'expired';
}

export interface QueueRecipient {
  readonly address: string;
  readonly expandedFrom?: string;
  readonly status: 'pending' | 'deferred' | 'delivered' | 'failed';
  readonly attempts: number;
  readonly nextAttemptAt: string | null;
  readonly lastReply: RecipientReply | null;
  readonly lastAttemptAt: string | null;
  readonly transport: string | null;
  readonly postponed?: { readonly reason: string; readonly by: string };
  readonly history?: readonly QueueAttempt[];
}

export interface QueueMessage {
  readonly id: string;
  readonly sender: string;
  readonly receivedAt: string;
  readonly size: number;
  readonly held: boolean;
  readonly heldReason?: string;
  readonly attempting: boolean;
  readonly unrecorded?: string;
  readonly recipients: readonly QueueRecipient[];
  readonly origin?: {
    readonly client?: { readonly address: string; readonly port: number };
    readonly helo?: string;
    readonly user?: string;
    readonly tls?: string;
    readonly listener?: string;
    readonly messageId?: string;
    readonly verdicts?: readonly string[];
    readonly submitted?: true;
    readonly reportFor?: string;
  };
  readonly reports?: readonly string[];
  /** A finished message's story only: when and how it ended. */
  readonly finishedAt?: string;
  readonly outcome?: string;
}

export type QueueAction = 'flush' | 'hold' | 'release' | 'delete' | 'bounce';
export const QUEUE_ACTIONS: readonly QueueAction[] = ['flush', 'hold', 'release', 'delete', 'bounce'];

type Request =
  | { readonly op: 'list' }
  | { readonly op: 'show'; readonly id: string }
  | { readonly op: QueueAction; readonly id: string }
  | { readonly op: 'finished'; readonly query: { readonly id: string; readonly limit: number } };

type Answer =
  | {
      readonly ok: true;
      readonly op: string;
      readonly messages?: QueueMessage[];
      readonly message?: QueueMessage;
    }
  | { readonly ok: false; readonly error: string; readonly message: string };

/** The queue could not be asked: no part answers, or a part failed the request. */
export class QueueUnavailable extends Error {}

/** Most read from a part for one answer (a list of many messages): beyond it the answer is refused. */
const MAX_ANSWER = 64 * 1024 * 1024;
/** Longer than the history store's commit interval (200 ms). */
const STORY_COMMIT_MS = 400;
/** A part's answer deadline, total (delete and bounce wait for an attempt in progress). */
const ANSWER_MS = 30_000;

/**
 * The queue, over its parts' control sockets (found through the workers, see ControlSockets).
 * Lists are joined oldest first; a request about one message goes to every part and the part
 * holding it answers.
 */
export class QueueClient {
  constructor(private readonly sockets: () => Promise<ControlSocket[]>) {}

  /** True when some plugin serves a queue control socket. */
  async present(): Promise<boolean> {
    return (await this.paths()).length > 0;
  }

  async list(): Promise<QueueMessage[]> {
    const answers = await this.all({ op: 'list' });
    return answers
      .flatMap((a) => (a.ok ? (a.messages ?? []) : []))
      .sort((a, b) => Date.parse(a.receivedAt) - Date.parse(b.receivedAt));
  }

  /** A queued message with its history; else its finished story; else null. */
  async show(id: string): Promise<QueueMessage | null> {
    const queued = (await this.all({ op: 'show', id })).find((a) => a.ok)?.message;
    if (queued) return queued;
    const story = await this.finished(id);
    if (story) return story;
    // A message that has just finished leaves the queue's list before the history commits its
    // story (a commit every 200 ms, plugins/queue/history-store.ts): look once more after that.
    await new Promise((r) => setTimeout(r, STORY_COMMIT_MS));
    return this.finished(id);
  }

  private async finished(id: string): Promise<QueueMessage | null> {
    const answers = await this.all({ op: 'finished', query: { id, limit: 1 } });
    return answers.flatMap((a) => (a.ok ? (a.messages ?? []) : []))[0] ?? null;
  }

  /**
   * One action on one message. Resolves to null when done, or to the queue's reason when it
   * refused (`not-found`, `held`).
   */
  async act(action: QueueAction, id: string): Promise<string | null> {
    const answers = await this.all({ op: action, id });
    if (answers.some((a) => a.ok)) return null;
    const refused = answers.find((a) => !a.ok && a.error !== 'not-found') ?? answers[0];
    return refused && !refused.ok ? refused.message : 'no answer';
  }

  private async paths(): Promise<string[]> {
    return [...new Set((await this.sockets()).filter((s) => s.kind === 'queue').map((s) => s.path))];
  }

  /** Every part's answer; a part that fails to answer is passed over unless none answers. */
  private async all(req: Request): Promise<Answer[]> {
    const paths = await this.paths();
    if (paths.length === 0) throw new QueueUnavailable('no queue is running (is the queue plugin enabled?)');
    const settled = await Promise.allSettled(paths.map((p) => ask(p, req)));
    const answers = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    if (answers.length === 0) {
      const first = settled.find((r) => r.status === 'rejected');
      throw new QueueUnavailable(`no queue part answers: ${(first?.reason as Error | undefined)?.message}`);
    }
    const failed = answers.find((a) => !a.ok && a.error === 'failed');
    if (failed && !failed.ok) throw new QueueUnavailable(`the queue failed the request: ${failed.message}`);
    return answers;
  }
}

/**
 * One request and its answer, within ANSWER_MS and MAX_ANSWER. A `list` answer streams, a line
 * per batch with `more: true` and a last one with `more: false`: its messages are joined.
 */
function ask(path: string, req: Request): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    let partial: Buffer[] = [];
    let size = 0;
    const messages: QueueMessage[] = [];
    let settled = false;
    const finish = (err: Error | null, answer?: Answer): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(answer!);
    };
    const timer = setTimeout(
      () => finish(new Error(`no answer within ${ANSWER_MS} ms on ${path}`)),
      ANSWER_MS,
    );
    /** One whole line: the answer, or (with `more: true`) a part of it. */
    const line = (text: string): void => {
      let a: Answer & { readonly more?: boolean };
      try {
        a = JSON.parse(text) as Answer & { readonly more?: boolean };
      } catch {
        return finish(new Error(`an answer that is not JSON on ${path}`));
      }
      if (a.ok && a.messages) messages.push(...a.messages);
      if (a.ok && a.more === true) return;
      finish(null, a.ok && a.messages ? { ...a, messages } : a);
    };
    socket.once('connect', () => socket.write(`${JSON.stringify(req)}\n`));
    socket.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_ANSWER) return finish(new Error(`an answer larger than ${MAX_ANSWER} bytes on ${path}`));
      let rest = chunk;
      for (let nl = rest.indexOf(0x0a); nl >= 0 && !settled; nl = rest.indexOf(0x0a)) {
        partial.push(rest.subarray(0, nl));
        line(Buffer.concat(partial).toString('utf8'));
        partial = [];
        rest = rest.subarray(nl + 1);
      }
      if (rest.length) partial.push(rest);
    });
    socket.once('end', () => finish(new Error(`closed without an answer on ${path}`)));
    socket.once('error', (err) => finish(err));
  });
}
