import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  CommandError,
  parseDuration,
  runSubcommand,
  UsageError,
  type CommandApi,
  type PluginCommand,
} from '../../core/index.js';
import type { BulkCounts, ControlRequest, WireBrief, WireMessage, WireRecipient } from './control.js';
import { listAllParts, requestAllParts, statusAllParts } from './control-client.js';
import type { QueueConfig } from './config.js';
import type { AttemptRecord, Origin } from './history.js';
import { queueDir } from './parts.js';
import { formatShape } from './qshape.js';
import { MESSAGE_STATES, type MessageState, type Selection } from './select.js';
import { describeVerify, verifyQueue, VERIFY_CLEAN, VERIFY_DAMAGED, VERIFY_NO_JOURNAL } from './verify.js';

export { request, requestAllParts } from './control-client.js';

export const QUEUE_USAGE = `Usage: petrel queue <command> [--config FILE] [--json]
       petrel queue verify [--config FILE | --dir DIR] [--json]

Commands:
  list [filters] [--skip N] [--limit N] [--brief]
                              the messages waiting, oldest first, and why: per recipient
                              its status, attempts, next attempt and the last reply (and
                              who gave it), or what holds it back (a quarantine, an
                              outbound rate); printed as they come, the totals last
  summary [filters] [--by sender] [--top N]
                              the queue's shape, as Postfix's qshape: messages per
                              recipient domain (or sender domain) and age band, in minutes
  show <id>                   one message, with its header
  status                      the queue at a glance, from memory at any size: messages and
                              recipients waiting, deliveries in progress and due, messages
                              loaded, whether the journal has been read since the start
  flush [<id> | filters]      try deferred recipients now: every message, one, or those
                              that match (held messages are left alone)
  hold <id> | filters | --all no delivery attempts until released
  release <id> | filters | --all
                              attempts resume on schedule (flush to try at once); a
                              message quarantined at acceptance is delivered now
  delete <id> | filters | --all
                              remove; the recipients fail without a bounce
  bounce <id> | filters | --all
                              fail now and return to the sender (a bounce plugin sends
                              the delivery status notification)
  verify                      read every record of the journal, without a server and
                              without changing anything: one line per segment, and each
                              damaged range with what it held

Filters (every one given must match):
  --state S         held, deferred (tried at least once) or pending (not tried yet)
  --domain D        a recipient not yet final in domain D
  --from S          the sender: an address, <> for the null sender, @example.com for a domain
  --older-than T    received at least T ago (30s, 30m, 4h, 2d)
  --newer-than T    received at most T ago
  --held            list only: --state held

Options:
  --config FILE   the config the server runs with (found as petrel start finds it)
  --limit N       list only: the N oldest that match (the totals still count them all)
  --skip N        list only: leave out the N oldest that match first (a page:
                  --skip 2000 --limit 1000 is the third thousand)
  --brief         list only: one line per message, from what the queue holds in memory
  --by sender     summary only: rows by sender domain instead of recipient domain
  --top N         summary only: the N largest rows (default 50)
  --all           hold, release, delete, bounce: every message (delete and bounce refuse
                  to act on every message without it)
  --dir DIR       verify only: the queue folder to check, instead of the config's
  --json          print the server's answer (verify: the findings) as JSON; list prints
                  one JSON object per message per line (ndjson), as they come

The commands but verify talk to the running server through control.sock in the queue folder
(the "queue" plugin entry's dir, default <spool.dir>/queue), which only the server's user (and
root) may open. Exit status: 0 done, 1 no such message (or it is held), 64 bad usage, 69 no
server running, 70 the server failed, 75 no answer in time, 77 no permission, 78 bad config.
verify: 0 no damage, 65 damage found, 66 no journal in the folder.`;

/**
 * How long to wait for each line of the server's answer (delete and bounce wait for an attempt
 * in progress; a long list or bulk action sends a line per batch).
 */
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

/** `petrel queue list|summary|show|flush|hold|release|delete|bounce|verify`; the exit codes are in QUEUE_USAGE. */
export const queueCommand: PluginCommand<QueueConfig> = {
  description: "the running server's queue: why mail waits (petrel queue --help)",
  run: (cli) => runSubcommand('queue', QUEUE_USAGE, cli.stderr, () => queue(cli)),
};

const COMMANDS = new Set([
  'list',
  'summary',
  'show',
  'status',
  'flush',
  'hold',
  'release',
  'delete',
  'bounce',
]);
/** The commands that take filters (a selection) instead of an id. */
const FILTERED = new Set(['list', 'summary', 'flush', 'hold', 'release', 'delete', 'bounce']);
const FILTERS = ['state', 'domain', 'from', 'older-than', 'newer-than'] as const;

async function queue(io: CommandApi<QueueConfig>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...io.args],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        state: { type: 'string' },
        domain: { type: 'string', short: 'd' },
        from: { type: 'string' },
        'older-than': { type: 'string' },
        'newer-than': { type: 'string' },
        held: { type: 'boolean' },
        limit: { type: 'string' },
        skip: { type: 'string' },
        brief: { type: 'boolean' },
        by: { type: 'string' },
        top: { type: 'string' },
        all: { type: 'boolean' },
        dir: { type: 'string' },
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
  const onlyFor = (flag: string, given: unknown, subs: readonly string[]): void => {
    if (given !== undefined && !subs.includes(sub))
      throw new UsageError(`--${flag} is only for ${subs.join(', ')}`);
  };
  onlyFor('dir', values.dir, ['verify']);
  onlyFor('held', values.held, ['list']);
  onlyFor('limit', values.limit, ['list']);
  onlyFor('skip', values.skip, ['list']);
  onlyFor('brief', values.brief, ['list']);
  onlyFor('by', values.by, ['summary']);
  onlyFor('top', values.top, ['summary']);
  onlyFor('all', values.all, ['hold', 'release', 'delete', 'bounce']);
  const filtered = FILTERS.filter((f) => values[f] !== undefined);
  if (sub === 'verify') {
    if (id) throw new UsageError('verify takes no id');
    if (filtered.length) throw new UsageError(`--${filtered[0]} is not for verify`);
    if (values.dir === '') throw new UsageError('--dir needs a folder');
    if (values.dir !== undefined && values.config !== undefined)
      throw new UsageError('verify takes --config or --dir, not both');
    return verify(values.dir, values.json === true, io);
  }
  if (!COMMANDS.has(sub)) throw new UsageError(`unknown command "${sub}"`);
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (filtered.length && !FILTERED.has(sub)) throw new UsageError(`--${filtered[0]} is not for ${sub}`);
  if ((sub === 'list' || sub === 'summary' || sub === 'status') && id)
    throw new UsageError(`${sub} takes no id (petrel queue show <id> shows one)`);
  if (id && (filtered.length || values.all))
    throw new UsageError(`${sub} takes an id or filters (--${FILTERS.join(', --')}) or --all, not both`);
  if (sub === 'show' && !id) throw new UsageError('show needs a queue id (see petrel queue list)');
  const select = selection(values);
  const many = ['hold', 'release', 'delete', 'bounce'].includes(sub);
  if (many && !id && !filtered.length && !values.all)
    throw new UsageError(
      `${sub} needs a queue id (see petrel queue list), filters (--${FILTERS.join(', --')}), or --all`,
    );
  const where = locateQueueDir(io);
  const out = (text: string): void => void io.stdout.write(`${text}\n`);

  if (sub === 'list') return list(io, where.dir, select, values);
  if (sub === 'status') return status(io, where.dir, values.json === true);
  const req: ControlRequest = {
    op: sub as ControlRequest['op'],
    ...(id ? { id } : {}),
    ...(Object.keys(select).length ? { select } : {}),
    ...(values.all ? { all: true } : {}),
    ...(sub === 'summary' ? { by: by(values.by), top: count('top', values.top ?? '50') } : {}),
  };
  const res = await requestAllParts(where.dir, req, ANSWER_TIMEOUT_MS);
  if (!res.ok)
    throw new CommandError(res.message, res.error === 'not-found' || res.error === 'held' ? 1 : 70);
  if (values.json) {
    io.stdout.write(`${JSON.stringify(res, null, 2)}\n`);
  }
  const now = new Date(res.now);
  if ('bulk' in res) {
    if (!values.json) for (const line of describeBulk(res, id, select)) out(line);
    if (res.failed)
      throw new CommandError(
        `${sub} failed on ${plural(res.failed, 'message')}, and stopped there: ${res.error ?? 'see the server log'}`,
        70,
      );
    return 0;
  }
  if (values.json) return 0;
  switch (res.op) {
    case 'list':
    case 'find':
    case 'finished':
    case 'status':
      throw new CommandError('the server answered another question than the one asked', 70);
    case 'summary': {
      if (res.total.total === 0) {
        out(
          Object.keys(select).length
            ? `No message matches (${where.dir}).`
            : `The queue is empty (${where.dir}).`,
        );
        return 0;
      }
      for (const line of formatShape(res)) out(line);
      if (res.domains > res.rows.length)
        out(`(the ${res.rows.length} largest of ${res.domains} domains; --top N shows more)`);
      return 0;
    }
    case 'show':
      out(describeMessage(res.message, now, true));
      if (res.headers) out(`\n  header:\n${indent(res.headers.replace(/\r?\n$/, ''), '    ')}`);
      return 0;
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

type Values = {
  readonly [K in (typeof FILTERS)[number] | 'held' | 'limit' | 'skip' | 'brief' | 'json']?: string | boolean;
};

/** The filters given on the command line, as a selection (ages in ms). */
function selection(values: Values): Selection {
  const text = (k: (typeof FILTERS)[number]): string | undefined => {
    const v = values[k] as string | undefined;
    if (v === '') throw new UsageError(`--${k} needs a value`);
    return v;
  };
  const age = (k: 'older-than' | 'newer-than'): number | undefined => {
    const v = text(k);
    if (v === undefined) return undefined;
    try {
      return parseDuration(v);
    } catch (err) {
      throw new UsageError(`--${k}: ${(err as Error).message}`);
    }
  };
  let state = text('state');
  if (values.held) {
    if (state !== undefined && state !== 'held')
      throw new UsageError('--held is --state held: give one of them');
    state = 'held';
  }
  if (state !== undefined && !(MESSAGE_STATES as readonly string[]).includes(state))
    throw new UsageError(`--state is one of ${MESSAGE_STATES.join(', ')}`);
  const sel = {
    state: state as MessageState | undefined,
    domain: text('domain'),
    sender: text('from'),
    olderThan: age('older-than'),
    newerThan: age('newer-than'),
  };
  return Object.fromEntries(Object.entries(sel).filter(([, v]) => v !== undefined)) as Selection;
}

function count(flag: string, v: string, min = 1): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min)
    throw new UsageError(`--${flag} needs a whole number${min ? ' above 0' : ''}`);
  return n;
}

function by(v: string | undefined): 'recipient' | 'sender' {
  if (v === undefined || v === 'recipient' || v === 'sender') return v ?? 'recipient';
  throw new UsageError('--by is recipient or sender');
}

/** How a selection reads after "messages": ` with a recipient in example.org from <a@b> older than 30m`. */
function scope(sel: Selection): string {
  const parts: string[] = [];
  if (sel.domain) parts.push(`with a recipient in ${sel.domain}`);
  if (sel.sender)
    parts.push(
      sel.sender.startsWith('@') ? `from ${sel.sender}` : `from <${sel.sender === '<>' ? '' : sel.sender}>`,
    );
  if (sel.olderThan !== undefined) parts.push(`older than ${span(sel.olderThan)}`);
  if (sel.newerThan !== undefined) parts.push(`newer than ${span(sel.newerThan)}`);
  return parts.length ? ` ${parts.join(' ')}` : '';
}

/** `3 deferred messages`: a count of messages, with the state the selection asked for. */
function messages(n: number, sel: Selection): string {
  return plural(n, sel.state ? `${sel.state} message` : 'message');
}

/** What a flush or a bulk action did, in sentences. */
function describeBulk(
  res: BulkCounts & { readonly op: string },
  id: string | undefined,
  sel: Selection,
): string[] {
  const lines: string[] = [];
  const where = scope(sel);
  const some = messages(res.done, sel);
  // A few ids say which; `list --held` lists them all.
  const more = (ids: readonly string[], n: number): string =>
    `${ids.slice(0, 5).join(', ')}${n > Math.min(ids.length, 5) ? ', …' : ''}`;
  if (res.op === 'flush') {
    if (id) return [`Flushed ${id}: its deferred recipients are being tried now (petrel queue show ${id}).`];
    if (res.done === 0 && res.held === 0) lines.push(`No message${where} to flush.`);
    else if (res.done) lines.push(`Flushed ${some}${where}: deferred recipients are being tried now.`);
    if (res.held)
      lines.push(
        `Left ${plural(res.held, 'held message')} alone: ${more(res.heldIds, res.held)} (petrel queue release <id> first).`,
      );
  } else if (res.done === 0 && !res.failed) {
    lines.push(`No ${res.op === 'release' ? 'held ' : ''}message${where} to ${res.op}.`);
  } else if (res.op === 'hold') {
    lines.push(`Held ${some}${where}: no delivery attempts until they are released.`);
  } else if (res.op === 'release') {
    lines.push(
      `Released ${some}${where}: attempts resume on their schedule (petrel queue flush tries at once).`,
    );
  } else if (res.op === 'delete') {
    lines.push(
      `Deleted ${some}${where}: their recipients not yet final are dropped; the senders are not told.`,
    );
  } else {
    lines.push(
      `Returned ${some}${where}: their recipients not yet final failed with 550 5.0.0; a bounce plugin tells the senders.`,
    );
  }
  if (res.notFound) lines.push(`${plural(res.notFound, 'message')} finished before its turn.`);
  return lines;
}

/** `petrel queue list`: prints each batch as it comes; the totals come last. */
async function list(
  io: CommandApi<QueueConfig>,
  dir: string,
  select: Selection,
  values: Values,
): Promise<number> {
  const limit = values.limit === undefined ? undefined : count('limit', values.limit as string);
  const skip = values.skip === undefined ? 0 : count('skip', values.skip as string, 0);
  const brief = values.brief === true;
  // Each part sends at most the messages a page can need (the oldest `skip + limit`); the pages
  // are cut from the merged stream, here.
  const req = {
    op: 'list' as const,
    ...(Object.keys(select).length ? { select } : {}),
    ...(limit ? { limit: skip + limit } : {}),
    ...(brief ? { brief } : {}),
  };
  let waiting = 0;
  let first = true;
  // Whoever reads the output sets the pace (`| less`); one who stops (`| head`) ends the list.
  let closed = false;
  const write = (text: string): Promise<void> =>
    io.stdout.write(text)
      ? Promise.resolve()
      : new Promise((resolve, reject) => {
          const done = (err?: unknown): void => {
            io.stdout.off('drain', done);
            io.stdout.off('error', done);
            io.stdout.off('close', done);
            if (err !== undefined || io.stdout.destroyed) {
              closed = true;
              reject(new OutputClosed());
            } else resolve();
          };
          io.stdout.on('drain', done);
          io.stdout.on('error', done);
          io.stdout.on('close', done);
        });
  let skipped = 0;
  const listed = await listAllParts(dir, req, ANSWER_TIMEOUT_MS, async (batch, now) => {
    let text = '';
    for (const m of batch) {
      if (skipped < skip) {
        skipped++;
        continue;
      }
      if (values.json) text += `${JSON.stringify(m)}\n`;
      else if ('recipients' in m) {
        waiting += m.recipients.filter((r) => r.status === 'pending' || r.status === 'deferred').length;
        text += `${first ? '' : '\n'}${describeMessage(m, now)}\n`;
      } else {
        waiting += m.waiting;
        text += `${describeBrief(m, now)}\n`;
      }
      first = false;
    }
    await write(text);
  }).catch((err: unknown) => {
    if (closed) return null;
    throw err;
  });
  if (!listed) return 0;
  const { matched } = listed;
  const shown = listed.shown - skipped;
  if (values.json) return 0;
  const out = (text: string): void => void io.stdout.write(`${text}\n`);
  if (shown === 0) {
    if (matched > 0) out(`No message shown of ${matched} matching (${dir}).`);
    else if (!Object.keys(select).length) out(`The queue is empty (${dir}).`);
    else if (select.state === 'held' && Object.keys(select).length === 1) out(`No message is held (${dir}).`);
    else out(`No message matches (${dir}).`);
    return 0;
  }
  const page = [
    ...(skip ? [`--skip ${skip}`] : []),
    ...(limit !== undefined ? [`--limit ${limit}`] : []),
  ].join(' ');
  const of = page && matched > shown ? ` of ${matched} matching (${page})` : '';
  out(`\n${messages(shown, select)} shown${of}, ${plural(waiting, 'recipient')} waiting (${dir})`);
  return 0;
}

/** The output of a list was closed by its reader. */
class OutputClosed extends Error {}

/** One message on one line, from what the index knows (`list --brief`). */
export function describeBrief(b: WireBrief, now: Date): string {
  const state = b.held ? 'held' : b.attempting ? 'attempting' : b.deferred ? 'deferred' : 'pending';
  const next =
    b.held || b.nextAttemptAt === null
      ? ''
      : Date.parse(b.nextAttemptAt) <= now.getTime()
        ? '  due now'
        : `  next in ${span(Date.parse(b.nextAttemptAt) - now.getTime())}`;
  const age = span(now.getTime() - Date.parse(b.receivedAt));
  return `${b.id}  ${size(b.size)}  ${age} old  ${state}  <${b.sender}>  ${b.waiting} waiting: ${b.domains.join(', ')}${next}`;
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

/** `petrel queue status`: each part's counts, from memory (no message is read from disk). */
async function status(io: CommandApi<QueueConfig>, dir: string, json: boolean): Promise<number> {
  const parts = await statusAllParts(dir, ANSWER_TIMEOUT_MS);
  const out = (text: string): void => void io.stdout.write(`${text}\n`);
  if (json) {
    for (const p of parts) out(JSON.stringify({ part: p.part, ...p.status }));
    return 0;
  }
  const sum = (k: 'messages' | 'recipients' | 'attempting' | 'ready' | 'loaded'): number =>
    parts.reduce((n, p) => n + p.status[k], 0);
  out(
    `${plural(sum('messages'), 'message')} in the queue, ${plural(sum('recipients'), 'recipient')} waiting (${dir})`,
  );
  out(
    `  ${sum('attempting')} being delivered, ${sum('ready')} due and waiting for a delivery slot, ${sum('loaded')} loaded in memory`,
  );
  for (const { part, status: st } of parts) {
    const journal = st.indexed
      ? `journal read at the start: ${plural(st.indexedMessages, 'message')} in ${st.indexSeconds.toFixed(1)} s`
      : `journal being read since the start: ${plural(st.messages, 'message')} known so far`;
    const mib = (n: number): string => `${Math.round(n / 1024 / 1024)} MiB`;
    out(
      `  part ${part}: ${plural(st.messages, 'message')}; ${journal}; its process: ${mib(st.memory.rss)} resident, ${mib(st.memory.heapUsed)} heap in use`,
    );
  }
  return 0;
}
