import { describe, it, type TestContext } from 'node:test';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { stringify } from 'yaml';
import { freePort, petrel, PetrelProcess } from '../../test/e2e/cli.js';
import { describeRun, type RunResult } from '../../test/e2e/run.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { smtpPeer } from '../outbound/test-support.js';
import { keepAttempt, type AttemptRecord } from './history.js';
import { HistoryStore, type FinishedMessage } from './history-store.js';
import { Journal } from './journal.js';
import { QueueStore } from './store.js';
import { RecordType } from './records.js';
import { verifyQueue } from './verify.js';

interface Attempt {
  n?: number;
  status: string;
  transport?: string;
  reply: { code: number; enhanced: string; text: string; remote?: string; tls?: string };
}
interface Story {
  id: string;
  state?: string;
  outcome?: string;
  reports?: string[];
  origin?: { client?: { address: string }; helo?: string; messageId?: string; reportFor?: string };
  recipients: { address: string; status: string; attempts: number; history?: Attempt[] }[];
}

/** A Petrel that relays everything to one smtp-server peer (over opportunistic STARTTLS), with bounces. */
async function relayTo(
  t: TestContext,
  peerPort: number,
): Promise<{
  dir: string;
  config: string;
  port: number;
  start(): Promise<PetrelProcess>;
  cli(...args: string[]): Promise<RunResult>;
}> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-history-'));
  const port = await freePort();
  const config = join(dir, 'petrel.config.yaml');
  writeFileSync(
    config,
    stringify({
      hostname: 'mx.history.test',
      listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
      spool: { dir: './spool' },
      log: { level: 'info', format: 'json' },
      plugins: [
        'relay',
        // An hour between attempts: every retry in these tests is a flush.
        { name: 'queue', config: { retry: '1h...' } },
        'bounce',
        {
          name: 'outbound',
          config: { smarthost: { host: '127.0.0.1', port: peerPort, tls: 'opportunistic' } },
        },
      ],
    }),
  );
  const running: PetrelProcess[] = [];
  t.after(() => {
    for (const p of running) p.kill();
    rmSync(dir, { recursive: true, force: true });
  });
  return {
    dir,
    config,
    port,
    async start() {
      const p = await PetrelProcess.start(config, dir);
      running.push(p);
      return p;
    },
    cli: (...args) => petrel([...args, '--config', config], dir, 20_000),
  };
}

async function send(port: number, to: string, messageId: string): Promise<string> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo('client.history.test');
    await c.cmd('MAIL FROM:<alice@history.test>', /^250 /);
    await c.cmd(`RCPT TO:<${to}>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(
      `From: alice@history.test\r\nTo: ${to}\r\nMessage-ID: ${messageId}\r\nSubject: Where is it?\r\n\r\nHello\r\n.\r\n`,
    );
    const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
    await c.cmd('QUIT', /^221 /);
    return /queued as (\S+)/.exec(reply.text)![1]!;
  } finally {
    c.close();
  }
}

/** The nth `delivery attempt` log line of a message (1-based), counted from log index `from`. */
function attemptLogged(server: PetrelProcess, id: string, from = 0): Promise<unknown> {
  return server.waitForLog((l) => l.msg === 'delivery attempt' && l.queueId === id, 15_000, from);
}

describe('every message has a history', { timeout: 120_000 }, () => {
  it('keeps each attempt with its reply, host and TLS, across a kill -9, and traces the message after delivery', async (t) => {
    const peerPort = await freePort();
    let refusals = 2;
    await smtpPeer(t, '127.0.0.1', peerPort, {
      hideSTARTTLS: false,
      rcpt: () => (refusals-- > 0 ? { code: 451, message: 'Greylisted, try again later' } : null),
    });
    const env = await relayTo(t, peerPort);
    let server = await env.start();
    const id = await send(env.port, 'bob@remote.test', '<trace-1@history.test>');
    await attemptLogged(server, id);
    let mark = server.logs.length;
    assert.equal((await env.cli('queue', 'flush', id)).code, 0);
    await attemptLogged(server, id, mark);

    // Queued, deferred twice: show lists both attempts, with the peer, its TLS and its reply.
    let show = await env.cli('queue', 'show', id);
    assert.equal(show.code, 0, describeRun(show));
    assert.match(show.stdout, /client: \[127\.0\.0\.1\]:\d+, HELO client\.history\.test, no TLS, on /);
    assert.match(show.stdout, /message-id: <trace-1@history\.test>/);
    const attempts = [
      ...show.stdout.matchAll(/#(\d) \S+ \S+ \([^)]*\) {2}outbound \S+ {2}(.+?) {2}deferred/g),
    ];
    assert.deepEqual(
      attempts.map((m) => m[1]),
      ['1', '2'],
      show.stdout,
    );
    for (const m of attempts) assert.match(m[2]!, /^127\.0\.0\.1 \[127\.0\.0\.1\] \(TLSv1\.[23] \S+\)$/);
    assert.equal(
      show.stdout.match(/^ {13}451 4\.\d\.\d Greylisted, try again later$/gm)?.length,
      2,
      show.stdout,
    );

    // A kill -9 loses none of it: the journal has every attempt.
    server.kill();
    await server.waitForExit();
    server = await env.start();
    show = await env.cli('queue', 'show', id);
    assert.equal(show.code, 0, describeRun(show));
    assert.equal(
      show.stdout.match(/^ {13}451 4\.\d\.\d Greylisted, try again later$/gm)?.length,
      2,
      show.stdout,
    );

    mark = server.logs.length;
    assert.equal((await env.cli('queue', 'flush', id)).code, 0);
    await server.waitForLog(
      (l) => l.msg === 'delivery attempt' && l.queueId === id && l.status === 'delivered',
      15_000,
      mark,
    );
    // Killed again at once: the story is in the history store, or the journal still has the
    // message's records (they go only once its story is committed) and the next start puts it there.
    server.kill();
    await server.waitForExit();
    await env.start();

    const trace = await env.cli('trace', '<trace-1@history.test>');
    assert.equal(trace.code, 0, describeRun(trace));
    assert.match(trace.stdout, new RegExp(`^${id} `, 'm'));
    assert.match(trace.stdout, /delivered \(3 attempts\)/);
    assert.match(trace.stdout, /#1 .* deferred\n +451 /);
    assert.match(trace.stdout, /#2 .* deferred\n +451 /);
    assert.match(trace.stdout, /#3 .* delivered\n +250 /);
    assert.match(trace.stdout, /finished \S+: delivered/);

    const json = await env.cli('trace', id, '--json');
    assert.equal(json.code, 0, describeRun(json));
    const found = (JSON.parse(json.stdout) as { messages: Story[] }).messages;
    assert.equal(found.length, 1);
    assert.equal(found[0]!.state, 'finished');
    assert.equal(found[0]!.outcome, 'delivered');
    const history = found[0]!.recipients[0]!.history!;
    assert.deepEqual(
      history.map((a) => [a.n, a.status, a.reply.code, a.transport]),
      [
        [1, 'deferred', 451, 'outbound'],
        [2, 'deferred', 451, 'outbound'],
        [3, 'delivered', 250, 'outbound'],
      ],
    );
    assert.match(history[2]!.reply.tls ?? '', /^TLSv1\.[23] /);
    // Found the other ways too; and nothing for someone else.
    assert.equal((await env.cli('trace', '--to', 'BOB@remote.test')).code, 0);
    assert.equal((await env.cli('trace', '--from', 'alice@history.test', '--since', '1h')).code, 0);
    const none = await env.cli('trace', '--to', 'nobody@remote.test');
    assert.equal(none.code, 1, describeRun(none));
    assert.match(none.stdout, /No message found/);
  });

  it("names the DSN in a bounced message's trace, the DSN names what it reports on, and a deleted message keeps its story", async (t) => {
    const peerPort = await freePort();
    await smtpPeer(t, '127.0.0.1', peerPort, {
      hideSTARTTLS: false,
      rcpt: (a) =>
        a.startsWith('carol@')
          ? { code: 550, message: 'No such user here' }
          : a.startsWith('dave@')
            ? { code: 451, message: 'Mailbox busy' }
            : null,
    });
    const env = await relayTo(t, peerPort);
    const server = await env.start();
    const id = await send(env.port, 'carol@remote.test', '<trace-2@history.test>');
    const dsn = (await server.waitForLog((l) => l.queueId === id && typeof l.report === 'string', 15_000))
      .report as string;
    // The DSN goes out through the same peer (to alice, whom it accepts).
    await server.waitForLog(
      (l) => l.msg === 'delivery attempt' && l.queueId === dsn && l.status === 'delivered',
      15_000,
    );
    const trace = await env.cli('trace', id, '--json');
    assert.equal(trace.code, 0, describeRun(trace));
    const [story] = (JSON.parse(trace.stdout) as { messages: Story[] }).messages;
    assert.equal(story!.outcome, 'bounced');
    assert.deepEqual(story!.reports, [dsn]);
    assert.equal(story!.recipients[0]!.history![0]!.reply.code, 550);
    const text = await env.cli('trace', id);
    assert.match(text.stdout, new RegExp(`reports: ${dsn} \\(a delivery status notification\\)`));
    assert.match(text.stdout, /finished \S+: bounced/);

    const back = await env.cli('trace', '--from', '<>', '--json');
    assert.equal(back.code, 0, describeRun(back));
    const report = (JSON.parse(back.stdout) as { messages: Story[] }).messages.find((m) => m.id === dsn);
    assert.equal(report?.origin?.reportFor, id);

    // A deleted message keeps its story too: the attempt, then the administrator's delete.
    const gone = await send(env.port, 'dave@remote.test', '<trace-3@history.test>');
    await attemptLogged(server, gone);
    assert.equal((await env.cli('queue', 'delete', gone)).code, 0);
    const deleted = await env.cli('trace', '<trace-3@history.test>');
    assert.equal(deleted.code, 0, describeRun(deleted));
    assert.match(deleted.stdout, /#1 .* deferred\n +451 4\.\d\.\d Mailbox busy/);
    assert.match(
      deleted.stdout,
      /administrator \(deleted\) {2}failed\n +550 5\.0\.0 Deleted by the administrator/,
    );
    assert.match(deleted.stdout, /finished \S+: deleted/);
  });
});

describe('the history store', () => {
  const story = (id: string, finishedAt: number): FinishedMessage =>
    ({
      id,
      sender: 'alice@history.test',
      receivedAt: new Date(finishedAt - 1000).toISOString(),
      size: 10,
      held: false,
      attempting: false,
      recipients: [
        {
          address: 'bob@remote.test',
          status: 'delivered',
          attempts: 1,
          nextAttemptAt: null,
          lastReply: null,
          lastAttemptAt: null,
          transport: 'outbound',
        },
      ],
      finishedAt: new Date(finishedAt).toISOString(),
      outcome: 'delivered',
    }) as FinishedMessage;

  it('removes stories past the retention, and keeps at most maxMessages', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-history-store-'));
    try {
      let now = Date.parse('2026-11-20T08:00:00Z');
      const day = 86_400_000;
      const path = join(dir, 'history.sqlite');
      const store = HistoryStore.acquire({ path, retention: 7 * day, maxMessages: 3, now: () => now });
      await Promise.all([store.add(story('OLD', now)), store.add(story('NEW', now + 2 * day))]);
      now += 8 * day;
      assert.equal(store.sweep(), 1, 'the story finished 8 days ago goes');
      assert.deepEqual(
        store.find({ limit: 10 }).map((m) => m.id),
        ['NEW'],
      );
      await Promise.all(['A', 'B', 'C'].map((id, i) => store.add(story(id, now + i))));
      store.sweep();
      assert.deepEqual(
        store.find({ limit: 10 }).map((m) => m.id),
        ['C', 'B', 'A'],
        'the oldest beyond maxMessages go first',
      );
      HistoryStore.release(store);
      // Another process (petrel trace) reads what was written.
      const reader = HistoryStore.reader(path)!;
      assert.deepEqual(
        reader.find({ to: 'BOB@REMOTE.TEST', limit: 1 }).map((m) => m.id),
        ['C'],
      );
      reader.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('takes the stories of several processes writing at once, and loses none', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-history-procs-'));
    try {
      const path = join(dir, 'history.sqlite');
      const module = fileURLToPath(new URL('./history-store.js', import.meta.url));
      // Each process is a worker: 300 stories, added as deliveries finish, committed in batches.
      const script = `
        const { HistoryStore } = await import(${JSON.stringify(module)});
        const [path, tag] = process.argv.slice(1);
        const store = HistoryStore.acquire({ path, retention: 864e5, maxMessages: 1e6 });
        const now = Date.now();
        const adds = [];
        for (let i = 0; i < 300; i++) {
          adds.push(store.add({ id: tag + i, sender: 'a@b.test', receivedAt: new Date(now).toISOString(), size: 1,
            held: false, attempting: false, recipients: [{ address: 'r' + i + '@b.test', status: 'delivered', attempts: 1,
            nextAttemptAt: null, lastReply: null, lastAttemptAt: null, transport: 't' }],
            finishedAt: new Date(now).toISOString(), outcome: 'delivered' }));
          if (i % 50 === 0) await new Promise((r) => setTimeout(r, 5));
        }
        await Promise.all(adds);
        HistoryStore.release(store);
      `;
      const run = (tag: string): Promise<void> =>
        new Promise((resolve, reject) =>
          execFile(process.execPath, ['--input-type=module', '-e', script, path, tag], (err, _out, stderr) =>
            err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(),
          ),
        );
      await Promise.all([run('W1-'), run('W2-'), run('W3-')]);
      const reader = HistoryStore.reader(path)!;
      try {
        assert.equal(reader.find({ limit: 10_000 }).length, 900);
        assert.equal(reader.find({ to: 'r299@b.test', limit: 10 }).length, 3);
      } finally {
        reader.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps the first and the latest attempts of a recipient, and counts those dropped', () => {
    let kept: AttemptRecord[] = [];
    let omitted = 0;
    for (let n = 1; n <= 20; n++) {
      const a: AttemptRecord = {
        t: n,
        n,
        status: 'deferred',
        reply: { code: 451, enhanced: '4.0.0', text: 'x' },
      };
      ({ kept, omitted } = keepAttempt(kept, omitted, a, { first: 3, last: 10 }));
    }
    assert.deepEqual(
      kept.map((a) => a.n),
      [1, 2, 3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    );
    assert.equal(omitted, 7);
  });

  it('recovers a journal written before histories were kept: no origin, no attempts, the state as it was', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-history-old-'));
    const log = pino({ level: 'silent' });
    try {
      const journal = await Journal.open(join(dir, 'journal'), {
        segmentSize: 1 << 20,
        cleanStop: true,
        quarantineDir: join(dir, 'quarantine'),
        onRecord: () => undefined,
        onDamage: () => undefined,
      });
      const bob = { local: 'bob', domain: 'remote.test', address: 'bob@remote.test' };
      const env = Buffer.from(
        JSON.stringify({
          id: 'OLDFORMAT',
          sender: null,
          mailParams: { smtputf8: false },
          recipients: [{ address: bob, params: {} }],
          receivedAt: 1,
          size: 4,
        }),
      );
      const len = Buffer.alloc(4);
      len.writeUInt32BE(env.length);
      await journal.append(RecordType.Message, [len, env, Buffer.from('Hi\r\n')]);
      const reply = { code: 451, enhanced: '4.4.1', text: 'Connection refused' };
      const state = { id: 'OLDFORMAT', u: [{ i: 0, s: 'deferred', a: 1, n: 2, r: reply, t: 1 }] };
      await journal.append(RecordType.State, [Buffer.from(JSON.stringify(state))]);
      await journal.close();
      writeFileSync(join(dir, 'clean-shutdown'), 'old\n');

      const store = new QueueStore(dir, 1 << 20, log);
      await store.open();
      await store.indexed;
      const entry = store.entries.get('OLDFORMAT')!;
      await store.load(entry);
      assert.equal(entry.env.origin, undefined);
      assert.deepEqual(
        [
          entry.rcpts[0]!.status,
          entry.rcpts[0]!.attempts,
          entry.rcpts[0]!.lastReply,
          entry.rcpts[0]!.history,
        ],
        ['deferred', 1, reply, []],
      );
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("keeps a finished message's records until its story is stored: a crash before that finds it at the next start", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-history-crash-'));
    const log = pino({ level: 'silent' });
    const bob = { local: 'bob', domain: 'remote.test', address: 'bob@remote.test' };
    const envelope = (id: string, size: number) => ({
      id,
      sender: null,
      mailParams: { smtputf8: false },
      recipients: [{ address: bob as never, params: {} }],
      receivedAt: 1,
      size,
    });
    try {
      const store = new QueueStore(dir, 65_536, log);
      await store.open();
      await store.indexed;
      const done = await store.add(envelope('DONE', 4), { inline: [Buffer.from('Hi\r\n')] });
      // A second message starts the next segment; it finishes and its files go (a sweep).
      const other = await store.add(envelope('OTHER', 70_000), { inline: [Buffer.alloc(70_000, 0x61)] });
      const attempt: AttemptRecord = {
        t: 5,
        n: 1,
        status: 'delivered',
        transport: 'outbound',
        reply: { code: 250, enhanced: '2.0.0', text: 'Ok' },
      };
      const delivered = (e: typeof done) => new Map([[0, { ...e.rcpts[0]!, status: 'delivered' as const }]]);
      assert.equal(await store.update(done, delivered(done), new Map([[0, attempt]])), true);
      assert.equal(await store.update(other, delivered(other)), true);
      await store.discard(other);
      // DONE's story was never stored (the process dies here): its first segment must still be there.
      await store.close(false);
      const again = new QueueStore(dir, 65_536, log);
      let finished: string[] = [];
      let history: readonly AttemptRecord[] = [];
      await again.open(async (entries) => {
        finished = entries.map((e) => e.env.id);
        history = entries.find((e) => e.env.id === 'DONE')?.rcpts[0]?.history ?? [];
      });
      await again.indexed;
      assert.ok(finished.includes('DONE'), `finished at start: ${finished.join(', ')}`);
      assert.deepEqual(
        history.map((a) => [a.n, a.status]),
        [[1, 'delivered']],
      );
      await again.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('carries kept attempts through a compaction that removes the segments that recorded them', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-history-compact-'));
    const log = pino({ level: 'silent' });
    try {
      const store = new QueueStore(dir, 65_536, log, 0, undefined, { first: 1, last: 2 });
      await store.open();
      await store.indexed;
      const address = { local: 'bob', domain: 'remote.test', address: 'bob@remote.test' };
      const entry = await store.add(
        {
          id: 'COMPACTME',
          sender: null,
          mailParams: { smtputf8: false },
          recipients: [{ address: address as never, params: {} }],
          receivedAt: 1,
          size: 5,
        },
        { inline: [Buffer.from('Hi\r\n')] },
      );
      for (let n = 1; n <= 4; n++) {
        const st = { ...entry.rcpts[0]!, status: 'deferred' as const, attempts: n };
        const a: AttemptRecord = {
          t: n,
          n,
          status: 'deferred',
          reply: { code: 451, enhanced: '4.0.0', text: `try ${n}` },
        };
        await store.update(entry, new Map([[0, st]]), new Map([[0, a]]));
      }
      // Fill the first segment so that compaction moves the message into a new one.
      const filler = await store.add(
        {
          id: 'FILLER',
          sender: null,
          mailParams: { smtputf8: false },
          recipients: [{ address: address as never, params: {} }],
          receivedAt: 1,
          size: 70_000,
        },
        { inline: [Buffer.alloc(70_000, 0x61)] },
      );
      await store.update(filler, new Map([[0, { ...filler.rcpts[0]!, status: 'delivered' as const }]]));
      await store.discard(filler);
      await store.compact({ everything: true });
      await store.close();
      const again = new QueueStore(dir, 65_536, log, 0, undefined, { first: 1, last: 2 });
      await again.open();
      await again.indexed;
      await again.load(again.entries.get('COMPACTME')!);
      const r = again.entries.get('COMPACTME')!.rcpts[0]!;
      assert.deepEqual(
        r.history.map((a) => a.n),
        [1, 3, 4],
      );
      assert.equal(r.omitted, 1);
      await again.close();
      // petrel queue verify reads the new record type as a record, not as damage.
      const checked = await verifyQueue(dir);
      assert.equal(checked.damaged, 0);
      assert.ok(checked.parts[0]!.segments.some((seg) => seg.histories === 1));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
