import { createConnection } from 'node:net';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  CommandError,
  runSubcommand,
  UsageError,
  type CommandApi,
  type PluginCommand,
} from '../../core/index.js';
import {
  CONTROL_SOCKET,
  type ControlRequest,
  type ControlResponse,
  type WireMessage,
  type WireRecipient,
} from './control.js';
import type { QueueConfig } from './config.js';
import type { AttemptRecord, Origin } from './history.js';
import { existingParts, partDir, queueDir } from './parts.js';
import { describeVerify, verifyQueue, VERIFY_CLEAN, VERIFY_DAMAGED, VERIFY_NO_JOURNAL } from './verify.js';

export const QUEUE_USAGE = `Usage: petrel queue <command> [--config FILE] [--json]
       petrel queue verify [--config FILE | --dir DIR] [--json]

Commands:
  list [--held]               every message waiting, and why: per recipient its status,
                              attempts, next attempt and the last reply (and who gave it),
                              or what holds it back (a quarantine, an outbound rate);
                              --held: only the held messages (quarantined or held by hand)
  show <id>                   one message, with its header
  flush [<id> | --domain D]   try deferred recipients now: all messages, one, or those
                              with a recipient in domain D
  hold <id>                   no delivery attempts until it is released
  release <id>                attempts resume on schedule (flush it to try at once); a
                              message quarantined at acceptance is delivered now
  delete <id>                 remove it; its recipients fail without a bounce
  bounce <id>                 fail it now and return it to its sender (a bounce plugin
                              sends the delivery status notification)
  verify                      read every record of the journal, without a server and
                              without changing anything: one line per segment, and each
                              damaged range with what it held

Options:
  --config FILE   the config the server runs with (found as petrel start finds it)
  --dir DIR       verify only: the queue folder to check, instead of the config's
  --held          list only: only the messages held (by a quarantine or petrel queue hold)
  --json          print the server's answer (verify: the findings) as JSON

The commands but verify talk to the running server through control.sock in the queue folder
(the "queue" plugin entry's dir, default <spool.dir>/queue), which only the server's user (and
root) may open. Exit status: 0 done, 1 no such message (or it is held), 64 bad usage, 69 no
server running, 70 the server failed, 75 no answer in time, 77 no permission, 78 bad config.
verify: 0 no damage, 65 damage found, 66 no journal in the folder.`;

/** How long to wait for the server's answer (delete and bounce wait for an attempt in progress). */
const ANSWER_TIMEOUT_MS = 60_000;

/** The queue folder a config uses. */
export interface QueueLocation {
  readonly dir: string;
  readonly configFile: string;
}

/**
 * Finds the queue folder from the config's `queue` plugin entry (its `dir`, relative to the config
 * file's folder; by default `<spool.dir>/queue`), as the plugin itself does.
 */
export function locateQueueDir(
  cli: Pick<CommandApi<QueueConfig>, 'config' | 'baseDir' | 'configFile' | 'entry' | 'petrel'>,
): QueueLocation {
  if (!cli.entry?.enabled) {
    throw new CommandError(
      `${cli.configFile} does not enable the queue plugin: there is no queue to look at`,
      78,
    );
  }
  return { dir: queueDir(cli.config.dir, cli.baseDir, cli.petrel.spool.dir), configFile: cli.configFile };
}

/** Sends one request over the control socket and reads its one-line answer. */
export function request(
  socketPath: string,
  req: ControlRequest,
  timeoutMs: number,
): Promise<ControlResponse> {
  const hint =
    'Start it with `petrel start` (`npm start` in the project), or pass the --config it runs with.';
  return new Promise((resolvePromise, reject) => {
    const socket = createConnection(socketPath);
    let buffer = '';
    let settled = false;
    const finish = (err: Error | null, res?: ControlResponse): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolvePromise(res!);
    };
    const timer = setTimeout(
      () =>
        finish(
          new CommandError(
            `the server did not answer within ${Math.round(timeoutMs / 1000)} s on ${socketPath}`,
            75,
          ),
        ),
      timeoutMs,
    );
    socket.setEncoding('utf8');
    socket.once('connect', () => socket.write(`${JSON.stringify(req)}\n`));
    socket.on('data', (chunk: string) => {
      buffer += chunk;
      const nl = buffer.indexOf('\n');
      if (nl < 0) return;
      try {
        finish(null, JSON.parse(buffer.slice(0, nl)) as ControlResponse);
      } catch {
        finish(new CommandError(`the server sent an answer that is not JSON: ${buffer.slice(0, 200)}`, 1));
      }
    });
    socket.once('end', () =>
      finish(new CommandError('the server closed the connection without an answer (is it stopping?)', 69)),
    );
    socket.once('error', (err: NodeJS.ErrnoException) => {
      switch (err.code) {
        case 'ENOENT':
          return finish(
            new CommandError(
              `no Petrel server is running for this queue: there is no control socket at ${socketPath}.\n${hint}`,
              69,
            ),
          );
        case 'ECONNREFUSED':
          return finish(
            new CommandError(
              `no Petrel server is running for this queue: nothing answers on ${socketPath} (left by a server that stopped abruptly).\n${hint}`,
              69,
            ),
          );
        case 'EACCES':
        case 'EPERM':
          return finish(
            new CommandError(
              `permission denied on ${socketPath}: run petrel queue as the user the server runs as, or as root`,
              77,
            ),
          );
        default:
          return finish(new CommandError(`cannot reach the server on ${socketPath}: ${err.message}`, 69));
      }
    });
  });
}

/**
 * Sends a request to every part of the queue (one per worker, see plugins/queue/parts.ts) and
 * merges the answers as if they came from one queue: lists are joined (oldest first), a flush
 * adds up, and a request about one message gets the answer of the part that holds it. Parts
 * where no server answers are passed over, unless none answers at all.
 */
export async function requestAllParts(
  dir: string,
  req: ControlRequest,
  timeoutMs: number,
): Promise<ControlResponse> {
  const parts = await existingParts(dir);
  const settled = await Promise.allSettled(
    parts.map((k) => request(join(partDir(dir, k), CONTROL_SOCKET), req, timeoutMs)),
  );
  const answers: ControlResponse[] = [];
  let unreachable: unknown = null;
  for (const r of settled) {
    if (r.status === 'fulfilled') answers.push(r.value);
    else if (r.reason instanceof CommandError && r.reason.code === 69) unreachable ??= r.reason;
    else throw r.reason;
  }
  if (answers.length === 0) throw unreachable;
  const good = answers.filter((a) => a.ok);
  const first = good[0];
  if (!first) return answers.find((a) => !a.ok && a.error !== 'not-found') ?? answers[0]!;
  if (first.op === 'list' || first.op === 'find') {
    const messages = good.flatMap((a) => (a.ok && (a.op === 'list' || a.op === 'find') ? a.messages : []));
    messages.sort((a, b) => Date.parse(a.receivedAt) - Date.parse(b.receivedAt));
    return { ...first, messages };
  }
  if (first.op === 'flush') {
    const flushed = good.flatMap((a) => (a.ok && a.op === 'flush' ? a.flushed : []));
    const held = good.flatMap((a) => (a.ok && a.op === 'flush' ? a.held : []));
    return { ...first, flushed, held };
  }
  return first;
}

/** `petrel queue list|show|flush|hold|release|delete|bounce|verify`; the exit codes are in QUEUE_USAGE. */
export const queueCommand: PluginCommand<QueueConfig> = {
  description: "the running server's queue: why mail waits (petrel queue --help)",
  run: (cli) => runSubcommand('queue', QUEUE_USAGE, cli.stderr, () => queue(cli)),
};

const NEEDS_ID = new Set(['show', 'hold', 'release', 'delete', 'bounce']);

async function queue(io: CommandApi<QueueConfig>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...io.args],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        domain: { type: 'string', short: 'd' },
        dir: { type: 'string' },
        held: { type: 'boolean' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    io.stdout.write(`${QUEUE_USAGE}\n`);
    return 0;
  }
  const [sub, id, ...extra] = positionals;
  if (!sub) throw new UsageError('missing command');
  if (values.dir !== undefined && sub !== 'verify') throw new UsageError('--dir is only for verify');
  if (values.held && sub !== 'list') throw new UsageError('--held is only for list');
  if (sub === 'verify') {
    if (id) throw new UsageError('verify takes no id');
    if (values.domain !== undefined) throw new UsageError('--domain is only for flush');
    if (values.dir === '') throw new UsageError('--dir needs a folder');
    if (values.dir !== undefined && values.config !== undefined)
      throw new UsageError('verify takes --config or --dir, not both');
    return verify(values.dir, values.json === true, io);
  }
  if (sub !== 'list' && sub !== 'flush' && !NEEDS_ID.has(sub))
    throw new UsageError(`unknown command "${sub}"`);
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (NEEDS_ID.has(sub) && !id) throw new UsageError(`${sub} needs a queue id (see petrel queue list)`);
  if (sub === 'list' && id) throw new UsageError('list takes no id (petrel queue show <id> shows one)');
  if (values.domain !== undefined && sub !== 'flush') throw new UsageError('--domain is only for flush');
  if (values.domain !== undefined && id) throw new UsageError('flush takes an id or --domain, not both');
  if (values.domain === '') throw new UsageError('--domain needs a domain');

  const where = locateQueueDir(io);
  const req = {
    op: sub,
    ...(id ? { id } : {}),
    ...(values.domain ? { domain: values.domain } : {}),
  } as ControlRequest;
  const answer = await requestAllParts(where.dir, req, ANSWER_TIMEOUT_MS);
  if (!answer.ok) {
    throw new CommandError(answer.message, answer.error === 'not-found' || answer.error === 'held' ? 1 : 70);
  }
  // `list --held`: the same answer, with only the held messages in it.
  const res =
    values.held && answer.op === 'list'
      ? { ...answer, messages: answer.messages.filter((m) => m.held) }
      : answer;
  if (values.json) {
    io.stdout.write(`${JSON.stringify(res, null, 2)}\n`);
    return 0;
  }
  const now = new Date(res.now);
  const out = (text: string): void => void io.stdout.write(`${text}\n`);
  switch (res.op) {
    case 'find':
    case 'finished':
    case 'status':
      throw new CommandError('the server answered another question than the one asked', 70);
    case 'list': {
      if (res.messages.length === 0) {
        out(values.held ? `No message is held (${where.dir}).` : `The queue is empty (${where.dir}).`);
        return 0;
      }
      if (values.held) {
        out(`${plural(res.messages.length, 'held message')} (${where.dir})`);
        for (const m of res.messages) out(`\n${describeMessage(m, now)}`);
        return 0;
      }
      const waiting = res.messages.reduce(
        (n, m) => n + m.recipients.filter((r) => r.status === 'pending' || r.status === 'deferred').length,
        0,
      );
      out(
        `${plural(res.messages.length, 'message')} in the queue, ${plural(waiting, 'recipient')} waiting (${where.dir})`,
      );
      for (const m of res.messages) out(`\n${describeMessage(m, now)}`);
      return 0;
    }
    case 'show':
      out(describeMessage(res.message, now, true));
      if (res.headers) out(`\n  header:\n${indent(res.headers.replace(/\r?\n$/, ''), '    ')}`);
      return 0;
    case 'flush': {
      const scope = id ? '' : values.domain ? ` with a recipient in ${values.domain}` : '';
      if (res.flushed.length === 0 && res.held.length === 0) out(`No message${scope} to flush.`);
      else if (id)
        out(`Flushed ${id}: its deferred recipients are being tried now (petrel queue show ${id}).`);
      else if (res.flushed.length)
        out(
          `Flushed ${plural(res.flushed.length, 'message')}${scope}: deferred recipients are being tried now.`,
        );
      if (res.held.length)
        out(
          `Left ${plural(res.held.length, 'held message')} alone: ${res.held.join(', ')} (petrel queue release <id> first).`,
        );
      return 0;
    }
    case 'hold':
      out(`Held ${res.message.id}: no delivery attempts until petrel queue release ${res.message.id}.`);
      if (res.message.attempting) out('A delivery attempt already in progress is finishing.');
      return 0;
    case 'release': {
      const next = res.message.recipients
        .map((r) => (r.nextAttemptAt ? Date.parse(r.nextAttemptAt) : Infinity))
        .reduce((a, b) => Math.min(a, b), Infinity);
      const when =
        next === Infinity
          ? ''
          : next <= now.getTime()
            ? ': it is due now'
            : `: next attempt ${at(next, now)}`;
      out(`Released ${res.message.id}${when}; petrel queue flush ${res.message.id} tries at once.`);
      return 0;
    }
    case 'delete': {
      const n = ended(res.message, 'Deleted by the administrator');
      out(`Deleted ${res.message.id}: ${plural(n, 'recipient')} dropped; the sender is not told.`);
      return 0;
    }
    case 'bounce': {
      const n = ended(res.message, 'Returned by the administrator');
      const to = res.message.sender
        ? `a bounce plugin returns it to <${res.message.sender}>`
        : 'it has the null sender, so there is nobody to return it to';
      out(`Returned ${res.message.id}: ${plural(n, 'recipient')} failed with 550 5.0.0; ${to}.`);
      return 0;
    }
  }
}

/** `petrel queue verify`: reads the journal files; never talks to the server. */
async function verify(dir: string | undefined, json: boolean, io: CommandApi<QueueConfig>): Promise<number> {
  const where = dir ? resolve(io.cwd, dir) : locateQueueDir(io).dir;
  const result = await verifyQueue(where);
  if (result.parts.length === 0)
    throw new CommandError(
      `no queue journal in ${where} (neither ${join(where, 'journal')} nor a part-*/journal in it)`,
      VERIFY_NO_JOURNAL,
    );
  if (json) io.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else io.stdout.write(`${describeVerify(result).join('\n')}\n`);
  return result.damaged ? VERIFY_DAMAGED : VERIFY_CLEAN;
}

/** How many recipients an administrator's delete or bounce just failed. */
function ended(m: WireMessage, text: string): number {
  return m.recipients.filter((r) => r.status === 'failed' && replyText(r.lastReply?.text).startsWith(text))
    .length;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function indent(text: string, pad: string): string {
  return text
    .split(/\r?\n/)
    .map((l) => pad + l)
    .join('\n');
}

function replyText(text: string | readonly string[] | undefined): string {
  if (text === undefined) return '';
  return typeof text === 'string' ? text : text.join(' ');
}

/** `2025-06-01 10:02:03` in local time. */
function clock(ms: number): string {
  const d = new Date(ms);
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** `45s`, `12m`, `3h 5m`, `2d 4h`. */
export function span(ms: number): string {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 24) return m % 60 ? `${h}h ${m % 60}m` : `${h}h`;
  const d = Math.floor(h / 24);
  return h % 24 ? `${d}d ${h % 24}h` : `${d}d`;
}

/** An absolute time and how far it is from now: `2025-06-01 10:02:03 (in 12m)` or `(5m ago)`. */
function at(ms: number, now: Date): string {
  const diff = ms - now.getTime();
  const rel =
    Math.abs(diff) < 1000
      ? diff > 0
        ? 'in 1s'
        : 'just now'
      : diff > 0
        ? `in ${span(diff)}`
        : `${span(diff)} ago`;
  return `${clock(ms)} (${rel})`;
}

function size(n: number): string {
  if (n < 1000) return `${n} bytes`;
  if (n < 1_000_000) return `${(n / 1000).toFixed(1)} kB`;
  return `${(n / 1_000_000).toFixed(1)} MB`;
}

/** Where a message came from, as lines of its story (see Origin in history.ts). */
function describeOrigin(o: Origin): string[] {
  const lines: string[] = [];
  if (o.client) {
    const how = [
      o.helo ? `HELO ${o.helo}` : 'no HELO',
      o.user ? `AUTH ${o.user}` : null,
      o.tls ?? 'no TLS',
      o.listener ? `on ${o.listener}` : null,
    ].filter(Boolean);
    lines.push(`  client: [${o.client.address}]:${o.client.port}, ${how.join(', ')}`);
  } else if (o.submitted) {
    lines.push(`  client: none, submitted by a plugin${o.reportFor ? ` as a report on ${o.reportFor}` : ''}`);
  }
  if (o.messageId) lines.push(`  message-id: ${o.messageId}`);
  for (const v of o.verdicts ?? []) lines.push(`  verdict: ${v}`);
  return lines;
}

/** One attempt of a recipient: when, by what route, to whom (with TLS), and the reply. */
function describeAttempt(a: AttemptRecord, now: Date): string[] {
  const what =
    a.kind === 'deleted' || a.kind === 'returned'
      ? `administrator (${a.kind})`
      : [a.transport ?? 'no route', a.route].filter(Boolean).join(' ');
  const peer = a.reply.remote ? `  ${a.reply.remote}${a.reply.tls ? ` (${a.reply.tls})` : ' (no TLS)'}` : '';
  const end = a.kind === 'expired' ? '; lifetime over, failed' : '';
  const n = a.n !== undefined ? `#${a.n} ` : '';
  return [
    `           ${n}${at(a.t, now)}  ${what}${peer}  ${a.status}${end}`,
    `             ${a.reply.code} ${a.reply.enhanced} ${replyText(a.reply.text)}`,
  ];
}

/**
 * One message as a block of text that says why it is still in the queue; `detail` (show, trace)
 * adds its origin, each recipient's kept attempts, and the reports sent about it.
 */
export function describeMessage(m: WireMessage, now: Date, detail = false): string {
  const lines = [`${m.id}  ${size(m.size)}  arrived ${at(Date.parse(m.receivedAt), now)}`];
  lines.push(`  from:  <${m.sender}>`);
  if (detail && m.origin) lines.push(...describeOrigin(m.origin));
  if (m.held) {
    lines.push(`  held:  no delivery attempts until petrel queue release ${m.id}`);
    // A hold given at acceptance names the plugin that asked for it first (`clamav: virus …`).
    lines.push(
      `  why:   ${m.heldReason ? `quarantined at acceptance by ${m.heldReason}` : 'held by the administrator'}`,
    );
  }
  if (m.attempting) lines.push('  now:   a delivery attempt is in progress');
  if (m.unrecorded)
    lines.push(`  not recorded: the attempt's outcome cannot be written (${m.unrecorded}); retrying`);
  for (const r of m.recipients) {
    lines.push(`  to:    ${r.address}${r.expandedFrom ? ` (for ${r.expandedFrom})` : ''}`);
    if (r.sender !== undefined) lines.push(`         sent as <${r.sender}>`);
    lines.push(`         ${describeRecipient(r, m.held, now)}`);
    if (r.lastReply) {
      const who = r.lastReply.remote ? ` from ${r.lastReply.remote}` : '';
      const when = r.lastAttemptAt ? ` at ${at(Date.parse(r.lastAttemptAt), now)}` : '';
      lines.push(`         last reply${who}${when}:`);
      lines.push(`           ${r.lastReply.code} ${r.lastReply.enhanced} ${replyText(r.lastReply.text)}`);
    }
    if (detail && r.transport) lines.push(`         transport: ${r.transport}`);
    if (detail && r.history?.length) {
      lines.push('         attempts:');
      let prev = 0;
      for (const a of r.history) {
        // Attempts dropped to keep the history bounded leave a gap in the numbers.
        if (a.n !== undefined && a.n - prev > 1 && prev > 0)
          lines.push(`           … ${plural(a.n - prev - 1, 'attempt')} not kept …`);
        if (a.n !== undefined) prev = a.n;
        lines.push(...describeAttempt(a, now));
      }
    }
  }
  if (detail && m.reports?.length)
    lines.push(`  reports: ${m.reports.map((id) => `${id} (a delivery status notification)`).join(', ')}`);
  return lines.join('\n');
}

function describeRecipient(r: WireRecipient, held: boolean, now: Date): string {
  const tries = r.attempts === 0 ? 'not tried yet' : plural(r.attempts, 'attempt');
  if (r.status === 'delivered') return `delivered (${tries})`;
  if (r.status === 'failed') return `failed (${tries})`;
  const next = r.nextAttemptAt ? Date.parse(r.nextAttemptAt) : null;
  const when = held
    ? 'next attempt: none while held'
    : next === null
      ? 'no attempt scheduled'
      : next <= now.getTime()
        ? 'next attempt: due now'
        : `next attempt ${at(next, now)}`;
  // A postponement (`postpone()`: an outbound rate) is no attempt: say what holds it back.
  const why = r.postponed && !held ? `, ${r.postponed.reason} (${r.postponed.by})` : '';
  return `${r.status}, ${tries}${why}, ${when}`;
}
