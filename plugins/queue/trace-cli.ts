import { join } from 'node:path';
import { parseArgs } from 'node:util';
import {
  CommandError,
  parseDuration,
  runSubcommand,
  UsageError,
  type CommandApi,
  type PluginCommand,
} from '../../core/index.js';
import { describeMessage, locateQueueDir, requestAllParts } from './cli.js';
import type { QueueConfig } from './config.js';
import type { WireMessage } from './control.js';
import { HISTORY_FILE, HistoryStore, type FinishedMessage, type TraceQuery } from './history-store.js';

export const TRACE_USAGE = `Usage: petrel trace <queue-id | Message-ID> [options]
       petrel trace --to ADDRESS | --from ADDRESS [options]

Finds messages, still queued or finished (delivered, bounced, deleted, within the history's
retention), and prints each one's story: who sent it from where, what the plugins decided at
acceptance, every attempt kept for each recipient, the outcome and the reports (DSNs) sent.
An argument with an "@" (or in <>) is a Message-ID, anything else a queue id.

Options:
  --to ADDRESS     messages with this recipient (as accepted, or an alias's target)
  --from ADDRESS   messages from this envelope sender (<> for bounces)
  --since WHEN     received since: a duration back from now (2h, 3d) or a date (2026-11-26T08:00)
  --limit N        at most N messages, the newest (default 20)
  --json           the stories as JSON
  --config FILE    the config the server runs with (found as petrel start finds it)

Queued messages are asked of the running server (through control.sock, as petrel queue does);
finished ones are read from history.sqlite in the queue folder, server running or not.
Exit status: 0 found, 1 nothing found, 64 bad usage, 70 the server failed (or history.sqlite
cannot be read), 75 no answer in time, 77 no permission, 78 bad config. With no server running, finished messages are still
searched and a note says the queue was not.`;

const ANSWER_TIMEOUT_MS = 30_000;

/** `petrel trace`: the exit codes are in TRACE_USAGE. */
export const traceCommand: PluginCommand<QueueConfig> = {
  description: "a message's story, queued or finished (petrel trace --help)",
  run: (cli) => runSubcommand('trace', TRACE_USAGE, cli.stderr, () => trace(cli)),
};

/** `--since`: a duration back from `now`, or a date. */
function since(text: string, now: number): number {
  try {
    return now - parseDuration(text);
  } catch {
    const t = Date.parse(text);
    if (Number.isNaN(t))
      throw new UsageError(`--since: expected a duration (2h, 3d) or a date, got "${text}"`);
    return t;
  }
}

type Found =
  (WireMessage & { readonly state: 'queued' }) | (FinishedMessage & { readonly state: 'finished' });

async function trace(io: CommandApi<QueueConfig>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...io.args],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        to: { type: 'string' },
        from: { type: 'string' },
        since: { type: 'string' },
        limit: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    io.stdout.write(`${TRACE_USAGE}\n`);
    return 0;
  }
  if (positionals.length > 1) throw new UsageError(`unexpected argument "${positionals[1]}"`);
  const [key] = positionals;
  if (!key && values.to === undefined && values.from === undefined)
    throw new UsageError('give a queue id, a Message-ID, --to or --from');
  if (values.to === '') throw new UsageError('--to needs an address');
  if (values.from === '') throw new UsageError('--from needs an address (<> for the null sender)');
  const limit = values.limit === undefined ? 20 : Number(values.limit);
  if (!Number.isInteger(limit) || limit < 1 || limit > 10_000)
    throw new UsageError('--limit: expected a whole number from 1 to 10000');
  const now = Date.now();
  const strip = (a: string): string => (a === '<>' ? a : a.replace(/^<(.*)>$/, '$1'));
  const query: TraceQuery = {
    ...(key ? (key.includes('@') || key.startsWith('<') ? { messageId: key } : { id: key }) : {}),
    ...(values.to !== undefined ? { to: strip(values.to) } : {}),
    ...(values.from !== undefined ? { from: strip(values.from) } : {}),
    ...(values.since !== undefined ? { since: since(values.since, now) } : {}),
    limit,
  };

  const where = locateQueueDir(io);
  let queued: WireMessage[] = [];
  let queueReached = true;
  try {
    const res = await requestAllParts(where.dir, { op: 'find', query }, ANSWER_TIMEOUT_MS);
    if (!res.ok) throw new CommandError(res.message, 70);
    if (res.op === 'find') queued = res.messages;
  } catch (err) {
    if (!(err instanceof CommandError && err.code === 69)) throw err;
    queueReached = false;
  }
  const path = join(where.dir, HISTORY_FILE);
  let history: HistoryStore | null;
  try {
    history = HistoryStore.reader(path);
  } catch (err) {
    throw new CommandError(`cannot read the message history ${path}: ${(err as Error).message}`, 70);
  }
  let finished: FinishedMessage[];
  try {
    finished = (history?.find(query) ?? []).map((m) => {
      // Reports sent after the story was written are found by their own stories.
      const reports = [...new Set([...(m.reports ?? []), ...history!.reportsOn(m.id)])];
      return { ...m, reports };
    });
  } finally {
    history?.close();
  }
  const found: Found[] = [
    ...queued.map((m) => ({ ...m, state: 'queued' as const })),
    ...finished
      .filter((m) => !queued.some((q) => q.id === m.id))
      .map((m) => ({ ...m, state: 'finished' as const })),
  ]
    .sort((a, b) => Date.parse(a.receivedAt) - Date.parse(b.receivedAt))
    .slice(-limit);

  if (values.json) {
    io.stdout.write(
      `${JSON.stringify({ now: new Date(now).toISOString(), queueReached, messages: found }, null, 2)}\n`,
    );
  } else {
    const at = new Date(now);
    for (const [i, m] of found.entries()) {
      if (i > 0) io.stdout.write('\n');
      const state =
        m.state === 'queued'
          ? 'still queued'
          : `finished ${new Date(m.finishedAt).toISOString()}: ${m.outcome}`;
      io.stdout.write(`${describeMessage(m, at, true)}\n  ${state}\n`);
    }
    if (found.length === 0) io.stdout.write('No message found.\n');
  }
  if (!queueReached)
    io.stderr.write(
      `petrel trace: no Petrel server answers for ${where.dir}: messages still queued were not searched, only finished ones.\n`,
    );
  return found.length ? 0 : 1;
}
