import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { freePort, petrel, PetrelProcess } from '../../test/e2e/cli.js';
import { describeRun, killRunning, type RunResult } from '../../test/e2e/run.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { describeMessage, span } from './cli.js';
import { request } from './control-client.js';
import { formatShape, ShapeTally } from './qshape.js';
import { matcher, type MessageBrief } from './select.js';

/**
 * A transport as a user would write one: it takes mail for `domain` and cannot reach the next
 * hop (451 4.4.1 from mx.example.test) until the `flag` file exists. What the queue tells it
 * (`delivered`, `failed`) goes to the `events` file, one line each.
 */
const STUCK_PLUGIN = `
import { appendFileSync, existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { accept, definePlugin, proceed, routeTo, z } from 'petrel';

export default definePlugin({
  name: 'stuck',
  config: z.object({ domain: z.string(), flag: z.string(), events: z.string() }),
  setup({ config, baseDir }) {
    const flag = resolve(baseDir, config.flag);
    const events = resolve(baseDir, config.events);
    const note = (line) => appendFileSync(events, line + '\\n');
    return {
      async rcpt({ recipient }) {
        return recipient.domain === config.domain ? accept() : proceed();
      },
      async route({ recipient }) {
        return recipient.address.domain === config.domain ? routeTo('stuck') : proceed();
      },
      async deliver({ route, recipients }) {
        if (route.transport !== 'stuck') return { kind: 'proceed' };
        const open = existsSync(flag);
        return {
          kind: 'results',
          results: recipients.map((r) =>
            open
              ? { recipient: r.address.address, status: 'delivered', reply: { code: 250, enhanced: '2.0.0', text: 'Delivered' } }
              : {
                  recipient: r.address.address,
                  status: 'deferred',
                  reply: {
                    code: 451,
                    enhanced: '4.4.1',
                    text: 'Connection refused by mx.example.test',
                    remote: 'mx.example.test [192.0.2.1]',
                  },
                },
          ),
        };
      },
      async delivered({ message, recipient }) {
        note('delivered ' + message.id + ' ' + recipient.address.address);
      },
      async failed({ message, recipient, reason, result }) {
        const r = result.reply;
        note(['failed', message.id, recipient.address.address, reason, r.code, r.enhanced, r.text].join(' '));
      },
    };
  },
});
`;

interface WireMessage {
  id: string;
  held: boolean;
  recipients: { address: string; status: string; attempts: number; nextAttemptAt: string | null }[];
}

async function until(check: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('petrel queue, against a running server', { timeout: 180_000 }, () => {
  let dir: string;
  let config: string;
  let port: number;
  let server: PetrelProcess | null = null;
  const events = (): string[] => {
    const file = join(dir, 'events.log');
    return existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter(Boolean) : [];
  };
  const queue = (...args: string[]): Promise<RunResult> =>
    petrel(['queue', ...args, '--config', config], dir, 20_000);
  const listJson = async (): Promise<WireMessage[]> => {
    const r = await queue('list', '--json');
    assert.equal(r.code, 0, describeRun(r));
    // One message per line (ndjson).
    return r.stdout
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as WireMessage);
  };

  /** Sends a message and waits for the queue's first attempt at it (deferred while stuck). */
  async function send(to: string, subject = 'Lunch on Friday?'): Promise<string> {
    const c = await SmtpClient.connect(port);
    try {
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
      await c.cmd(`RCPT TO:<${to}>`, /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write(`From: alice@example.test\r\nTo: ${to}\r\nSubject: ${subject}\r\n\r\nHello\r\n.\r\n`);
      const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
      await c.cmd('QUIT', /^221 /);
      const id = /queued as (\S+)/.exec(reply.text)![1]!;
      await server!.waitForLog((l) => l.msg === 'delivery attempt' && l.queueId === id, 10_000);
      return id;
    } finally {
      c.close();
    }
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-cli-queue-'));
    writeFileSync(join(dir, 'stuck.mjs'), STUCK_PLUGIN);
    port = await freePort();
    config = join(dir, 'petrel.config.yaml');
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.queue.test',
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
        spool: { dir: './spool' },
        log: { level: 'info', format: 'json' },
        plugins: [
          { name: './stuck.mjs', config: { domain: 'stuck.test', flag: './open', events: './events.log' } },
          // An hour between attempts: nothing is retried during the test unless flushed.
          { name: 'queue', config: { retry: '1h...' } },
        ],
      }),
    );
    server = await PetrelProcess.start(config, dir);
  });

  after(() => {
    server?.kill();
    killRunning();
    rmSync(dir, { recursive: true, force: true });
  });

  it('list says why a message is still here: deferred, the last reply and who gave it, the next attempt', async () => {
    const id = await send('bob@stuck.test');
    const r = await queue('list');
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^1 message shown, 1 recipient waiting \(.*spool\/queue\)$/m);
    assert.match(
      r.stdout,
      new RegExp(`^${id}  \\d+ bytes  arrived \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d `, 'm'),
    );
    assert.match(r.stdout, /from: {2}<alice@example\.test>/);
    assert.match(r.stdout, /to: {4}bob@stuck\.test/);
    // The next attempt: an absolute time and how far off it is (an hour, ±10% jitter).
    assert.match(
      r.stdout,
      /deferred, 1 attempt, next attempt \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in (5[3-9]m|1h( \d+m)?)\)/,
    );
    assert.match(
      r.stdout,
      /last reply from mx\.example\.test \[192\.0\.2\.1\] at \d{4}-\S+ \S+ \((\d+s ago|just now)\):/,
    );
    assert.match(r.stdout, /^ +451 4\.4\.1 Connection refused by mx\.example\.test$/m);

    const messages = await listJson();
    assert.equal(messages.length, 1);
    assert.equal(messages[0]!.id, id);
    assert.equal(messages[0]!.held, false);
    const rcpt = messages[0]!.recipients[0]! as WireMessage['recipients'][number] & {
      lastReply: { code: number; remote: string };
    };
    assert.equal(rcpt.status, 'deferred');
    assert.equal(rcpt.lastReply.code, 451);
    assert.equal(rcpt.lastReply.remote, 'mx.example.test [192.0.2.1]');
    assert.ok(Date.parse(rcpt.nextAttemptAt!) > Date.now() + 50 * 60_000);
  });

  it('verify reads the journal of the running server without disturbing it: a line per segment, exit 0', async () => {
    const r = await queue('verify');
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      /spool\/queue\/journal: 1 segment, not stopped cleanly \(a server is running, or the last one crashed\)$/m,
    );
    assert.match(r.stdout, /^ {2}00000001\.seg {2}2 records: 1 message, 1 state, 0 hold; no damage$/m);
    assert.match(r.stdout, /^No damage\.$/m);
    assert.equal((await listJson()).length, 1, 'the server goes on');
  });

  it('the control socket is owner-only (0600) and speaks lines of JSON: one per answer, a list a line per batch', async () => {
    const path = join(dir, 'spool', 'queue', 'control.sock');
    const st = statSync(path);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
    const answers = await new Promise<string[]>((resolve, reject) => {
      const s = createConnection(path);
      let text = '';
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`no answers within 5 s: ${text}`));
      }, 5000);
      s.setEncoding('utf8');
      s.on('connect', () =>
        s.write('not json\n{"op":"hold"}\n{"op":"show","id":"NOSUCH"}\n{"op":"list"}\n{"op":"status"}\n'),
      );
      s.on('data', (d: string) => {
        text += d;
        const lines = text.split('\n').filter(Boolean);
        if (lines.length === 6 && text.endsWith('\n')) {
          clearTimeout(timer);
          s.destroy();
          resolve(lines);
        }
      });
      s.on('error', reject);
    });
    const [bad, noId, missing, batch, end, status] = answers.map(
      (l) => JSON.parse(l) as Record<string, unknown>,
    );
    assert.deepEqual(bad, { ok: false, error: 'bad-request', message: 'expected a line of JSON' });
    assert.equal(noId!.error, 'bad-request');
    assert.equal(missing!.error, 'not-found');
    // The list streams: a line per batch (here one), then the totals.
    assert.equal(batch!.ok, true);
    assert.equal(batch!.more, true);
    assert.equal((batch!.messages as unknown[]).length, 1);
    assert.deepEqual(
      { ...end, now: undefined },
      { ok: true, op: 'list', now: undefined, messages: [], more: false, matched: 1, shown: 1 },
    );
    // The part at a glance, without its messages: what a console polls at any queue size.
    assert.equal(status!.ok, true);
    assert.equal(status!.op, 'status');
    assert.equal(status!.messages, 1);
    assert.equal(status!.recipients, 1);
    assert.equal(status!.indexed, true);
    assert.equal(status!.indexedMessages, 0, 'the queue was empty when this server started');
    assert.equal(typeof status!.indexSeconds, 'number');
    assert.ok((status!.memory as { rss: number }).rss > 0);
  });

  it('show adds the header and the transport', async () => {
    const [m] = await listJson();
    const r = await queue('show', m!.id);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, new RegExp(`^${m!.id}  `));
    assert.match(r.stdout, /transport: stuck/);
    assert.match(r.stdout, /header:\n {4}Received: from /);
    assert.match(r.stdout, /^ {4}Subject: Lunch on Friday\?$/m);
  });

  it('hold: flush leaves the message alone; release and flush deliver it and it leaves the list', async () => {
    const [held] = await listJson();
    const id = held!.id;
    let r = await queue('hold', id);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      new RegExp(`^Held ${id}: no delivery attempts until petrel queue release ${id}\\.$`, 'm'),
    );
    r = await queue('list');
    assert.match(r.stdout, new RegExp(`held: {2}no delivery attempts until petrel queue release ${id}`));
    assert.match(r.stdout, /deferred, 1 attempt, next attempt: none while held/);

    // A second message shows when a flush has been through; then the next hop is back.
    const other = await send('carol@stuck.test');
    writeFileSync(join(dir, 'open'), '');
    r = await queue('flush');
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^Flushed 1 message: deferred recipients are being tried now\.$/m);
    assert.match(r.stdout, new RegExp(`^Left 1 held message alone: ${id} `, 'm'));
    await until(
      () => events().includes(`delivered ${other} carol@stuck.test`),
      'the other message delivered',
    );
    assert.ok(!events().some((e) => e.includes(id)), 'the held message was not attempted');

    r = await queue('flush', id);
    assert.equal(r.code, 1, describeRun(r));
    assert.match(r.stderr, new RegExp(`${id} is held; release it first`));
    const [still] = await listJson();
    assert.equal(still!.id, id);
    assert.equal(still!.held, true);
    assert.equal(still!.recipients[0]!.attempts, 1);

    r = await queue('release', id);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      new RegExp(
        `^Released ${id}: next attempt .*\\(in .*\\); petrel queue flush ${id} tries at once\\.$`,
        'm',
      ),
    );
    r = await queue('flush', '--domain', 'STUCK.test');
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^Flushed 1 message with a recipient in STUCK\.test: /m);
    await until(() => events().includes(`delivered ${id} bob@stuck.test`), 'the released message delivered');
    r = await queue('list');
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^The queue is empty \(/);
    rmSync(join(dir, 'open'));
  });

  it('delete removes a message without a bounce, and it stays gone after a crash and restart; a hold stays', async () => {
    const gone = await send('dave@stuck.test', 'to be deleted');
    const kept = await send('erin@stuck.test', 'to be held');
    let r = await queue('delete', gone);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      new RegExp(`^Deleted ${gone}: 1 recipient dropped; the sender is not told\\.$`, 'm'),
    );
    assert.ok(
      events().some((e) =>
        e.startsWith(
          `failed ${gone} dave@stuck.test deleted 550 5.0.0 Deleted by the administrator; last error: 451 4.4.1 `,
        ),
      ),
      events().join('\n'),
    );
    r = await queue('hold', kept);
    assert.equal(r.code, 0, describeRun(r));
    assert.deepEqual(
      (await listJson()).map((m) => m.id),
      [kept],
    );

    // kill -9: the socket file stays behind, and nothing answers on it.
    server!.kill();
    await server!.waitForExit();
    assert.ok(existsSync(join(dir, 'spool', 'queue', 'control.sock')));
    r = await queue('list');
    assert.equal(r.code, 69, describeRun(r));
    assert.match(r.stderr, /no Petrel server is running for this queue: nothing answers on .*control\.sock/);

    server = await PetrelProcess.start(config, dir);
    const after = await listJson();
    assert.deepEqual(
      after.map((m) => m.id),
      [kept],
      'the deleted message did not come back',
    );
    assert.equal(after[0]!.held, true, 'the hold survived the restart');
    assert.equal(after[0]!.recipients[0]!.attempts, 1, 'a held message is not tried at start');
    r = await queue('flush');
    assert.match(r.stdout, new RegExp(`^Left 1 held message alone: ${kept} `, 'm'));
    r = await queue('delete', kept);
    assert.equal(r.code, 0, describeRun(r));
    assert.deepEqual(await listJson(), []);
  });

  it('bounce fails a message now as refused, so a bounce plugin tells the sender', async () => {
    const id = await send('frank@stuck.test', 'to be returned');
    const r = await queue('bounce', id);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      new RegExp(
        `^Returned ${id}: 1 recipient failed with 550 5\\.0\\.0; a bounce plugin returns it to <alice@example\\.test>\\.$`,
        'm',
      ),
    );
    assert.ok(
      events().some((e) =>
        e.startsWith(
          `failed ${id} frank@stuck.test refused 550 5.0.0 Returned by the administrator; last error: 451 4.4.1 Connection refused`,
        ),
      ),
      events().join('\n'),
    );
    assert.deepEqual(await listJson(), []);
  });

  it('unknown ids exit 1; bad usage exits 64; a config without the queue exits 78', async () => {
    const cases: [string[], number, RegExp][] = [
      [['show', 'NOSUCH'], 1, /no message NOSUCH in the queue/],
      [['delete', 'NOSUCH'], 1, /no message NOSUCH in the queue/],
      [['bounce', 'NOSUCH'], 1, /no message NOSUCH in the queue/],
      [['hold', 'NOSUCH'], 1, /no message NOSUCH in the queue/],
      [['flush', 'NOSUCH'], 1, /no message NOSUCH in the queue/],
      [['frobnicate'], 64, /unknown command "frobnicate"/],
      [['hold'], 64, /hold needs a queue id/],
      [['show', 'a', 'b'], 64, /unexpected argument "b"/],
      [['flush', 'X', '--domain', 'stuck.test'], 64, /takes an id or filters .*, not both/],
      [['show', 'X', '--domain', 'stuck.test'], 64, /--domain is not for show/],
      [['list', '--bogus'], 64, /Unknown option/],
      [['verify', 'X'], 64, /verify takes no id/],
      [['list', '--dir', 'x'], 64, /--dir is only for verify/],
      [['verify', '--dir', 'x'], 64, /verify takes --config or --dir, not both/],
    ];
    for (const [args, code, stderr] of cases) {
      const r = await queue(...args);
      assert.equal(r.code, code, `${args.join(' ')}\n${describeRun(r)}`);
      assert.match(r.stderr, stderr, args.join(' '));
    }
    const bare = join(dir, 'bare.yaml');
    writeFileSync(bare, stringify({ listeners: [{ kind: 'smtp', port: 0 }], plugins: ['./stuck.mjs'] }));
    const r = await petrel(['queue', 'list', '--config', bare], dir);
    assert.equal(r.code, 78, describeRun(r));
    assert.match(r.stderr, /does not enable the queue plugin/);
  });

  it('against a stopped server: exit 69 and a clear message', async () => {
    server!.signal('SIGTERM');
    assert.equal((await server!.waitForExit()).code, 0);
    assert.ok(!existsSync(join(dir, 'spool', 'queue', 'control.sock')), 'a clean stop removes the socket');
    const r = await queue('list');
    assert.equal(r.code, 69, describeRun(r));
    assert.match(
      r.stderr,
      /^petrel queue: no Petrel server is running for this queue: there is no control socket at /,
    );
    assert.match(r.stderr, /Start it with `petrel start`/);
    assert.equal(r.stdout, '');
  });
});

/**
 * A transport for an outage: it cannot reach the next hop for stuck.test, other.test and
 * late.test (451), and an outbound rate holds later.test back (postponed: never tried).
 */
const OUTAGE_PLUGIN = `
import { accept, definePlugin, postpone, proceed, routeTo } from 'petrel';

const DOWN = new Set(['stuck.test', 'other.test', 'late.test']);
export default definePlugin({
  name: 'outage',
  setup() {
    return {
      async rcpt({ recipient }) {
        return DOWN.has(recipient.domain) || recipient.domain === 'later.test' ? accept() : proceed();
      },
      async route({ recipient }) {
        return routeTo('outage');
      },
      async deliver({ route, recipients }) {
        if (route.transport !== 'outage') return { kind: 'proceed' };
        if (recipients.some((r) => r.address.domain === 'later.test'))
          return postpone(Date.now() + 3_600_000, 'throttled: at most 1 per 1h to later.test');
        return {
          kind: 'results',
          results: recipients.map((r) => ({
            recipient: r.address.address,
            status: 'deferred',
            reply: { code: 451, enhanced: '4.4.1', text: 'Connection refused', remote: 'mx.example.test [192.0.2.1]' },
          })),
        };
      },
    };
  },
});
`;

interface Feed {
  readonly from: string;
  readonly to: readonly string[];
}

/**
 * Sends messages over a few connections at once, each pipelining MAIL, RCPT and DATA (RFC 2920),
 * and returns their queue ids, in the order given.
 */
async function feed(port: number, messages: readonly Feed[], connections = 8): Promise<string[]> {
  const ids: string[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(connections, messages.length) }, async () => {
      const c = await SmtpClient.connect(port);
      try {
        await c.expect(/^220 /);
        await c.ehlo();
        for (let i = next++; i < messages.length; i = next++) {
          const m = messages[i]!;
          c.write(`MAIL FROM:<${m.from}>\r\n${m.to.map((t) => `RCPT TO:<${t}>\r\n`).join('')}DATA\r\n`);
          await c.expect(/^250 /);
          for (let k = 0; k < m.to.length; k++) await c.expect(/^250 /);
          await c.expect(/^354 /);
          c.write(`From: someone@example.test\r\nSubject: message ${i}\r\n\r\nHello\r\n.\r\n`);
          const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
          ids[i] = /queued as (\S+)/.exec(reply.text)![1]!;
        }
        await c.cmd('QUIT', /^221 /);
      } finally {
        c.close();
      }
    }),
  );
  return ids;
}

/** `list --json` and friends: one JSON object per line. */
function ndjson<T>(stdout: string): T[] {
  return stdout
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as T);
}

interface Brief {
  id: string;
  sender: string;
  held: boolean;
  deferred: boolean;
  domains: string[];
  waiting: number;
}

describe(
  'petrel queue at the size of an outage: selections, streamed lists, bulk actions',
  { timeout: 300_000 },
  () => {
    let dir: string;
    let config: string;
    let socket: string;
    let server: PetrelProcess | null = null;
    /** Queue ids by what they are: 3000 deferred to stuck.test, and a few of each other kind. */
    const ids = {
      bulk: [] as string[],
      other: [] as string[],
      bounces: [] as string[],
      both: [] as string[],
      late: [] as string[],
    };
    const queue = (...args: string[]): Promise<RunResult> =>
      petrel(['queue', ...args, '--config', config], dir, 60_000);
    const briefs = async (...args: string[]): Promise<Brief[]> => {
      const r = await queue('list', '--brief', '--json', ...args);
      assert.equal(r.code, 0, describeRun(r));
      return ndjson<Brief>(r.stdout);
    };
    const sorted = (list: readonly string[]): string[] => [...list].sort();

    before(async () => {
      dir = mkdtempSync(join(tmpdir(), 'petrel-cli-outage-'));
      writeFileSync(join(dir, 'outage.mjs'), OUTAGE_PLUGIN);
      const port = await freePort();
      config = join(dir, 'petrel.config.yaml');
      socket = join(dir, 'spool', 'queue', 'control.sock');
      writeFileSync(
        config,
        stringify({
          hostname: 'mx.outage.test',
          listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
          spool: { dir: './spool' },
          log: { level: 'info', format: 'json' },
          plugins: ['./outage.mjs', { name: 'queue', config: { retry: '1h...' } }],
        }),
      );
      server = await PetrelProcess.start(config, dir);
      const few = await feed(
        port,
        [
          ...Array.from({ length: 20 }, (_, i) => ({
            from: 'carol@other.example',
            to: [`o${i}@other.test`],
          })),
          ...Array.from({ length: 10 }, (_, i) => ({ from: '', to: [`p${i}@later.test`] })),
          ...Array.from({ length: 5 }, (_, i) => ({
            from: 'dave@example.test',
            to: [`a${i}@stuck.test`, `b${i}@OTHER.test`],
          })),
        ],
        1,
      );
      ids.other = few.slice(0, 20);
      ids.bounces = few.slice(20, 30);
      ids.both = few.slice(30);
      ids.bulk = await feed(
        port,
        Array.from({ length: 3000 }, (_, i) => ({ from: 'bulk@example.test', to: [`x${i}@stuck.test`] })),
      );
      ids.late = await feed(
        port,
        Array.from({ length: 30 }, (_, i) => ({ from: 'erin@example.test', to: [`w${i}@late.test`] })),
        1,
      );
      // Every message has had its first attempt (deferred) or its postponement (still pending).
      const count = async (select: Record<string, unknown>): Promise<number> => {
        const r = await request(socket, { op: 'list', brief: true, select, limit: 1 }, 10_000);
        if (!r.ok || r.op !== 'list' || r.more)
          throw new Error(`not a list's last line: ${JSON.stringify(r)}`);
        return r.matched;
      };
      const end = Date.now() + 120_000;
      while ((await count({ state: 'deferred' })) !== 3055) {
        if (Date.now() > end) throw new Error('the first attempts did not all happen within 120 s');
        await new Promise((r) => setTimeout(r, 200));
      }
    });

    after(() => {
      server?.kill();
      killRunning();
      rmSync(dir, { recursive: true, force: true });
    });

    it('list --brief --json sees every message exactly once, oldest first, one JSON object per line', async () => {
      const all = await briefs();
      const listed = all.map((b) => b.id);
      assert.equal(new Set(listed).size, listed.length, 'no message twice');
      assert.deepEqual(
        sorted(listed),
        sorted([...ids.other, ...ids.bounces, ...ids.both, ...ids.bulk, ...ids.late]),
      );
      // The first ones fed (over one connection) come first.
      assert.deepEqual(listed.slice(0, 20), ids.other);
      const both = all.find((b) => b.id === ids.both[0])!;
      assert.deepEqual(sorted(both.domains), ['other.test', 'stuck.test'], 'lower case, each once');
      assert.equal(both.waiting, 2);
      assert.equal(all.find((b) => b.id === ids.bounces[0])!.sender, '', 'the null sender');
    });

    it('list filters by state, destination, sender and age; every filter given must match', async () => {
      const cases: [string[], string[]][] = [
        [['--state', 'pending'], ids.bounces],
        [
          ['--state', 'deferred', '--domain', 'OTHER.test'],
          [...ids.other, ...ids.both],
        ],
        [['--domain', 'later.test'], ids.bounces],
        [['--from', '<>'], ids.bounces],
        [['--from', 'Carol@Other.Example'], ids.other],
        [['--from', '@example.test', '--domain', 'other.test'], ids.both],
        [['--newer-than', '1d', '--from', '@other.example'], ids.other],
        [['--older-than', '1d'], []],
        [['--held'], []],
      ];
      for (const [args, expected] of cases) {
        const got = (await briefs(...args)).map((b) => b.id);
        assert.deepEqual(sorted(got), sorted(expected), args.join(' '));
      }
    });

    it('list --limit pages from the oldest, and says how many more match; the text form prints totals last', async () => {
      const first = await briefs('--limit', '10');
      assert.deepEqual(
        first.map((b) => b.id),
        ids.other.slice(0, 10),
      );
      const r = await queue('list', '--domain', 'other.test', '--limit', '3');
      assert.equal(r.code, 0, describeRun(r));
      assert.equal(r.stdout.match(/^\S+ {2}\d+ bytes {2}arrived /gm)?.length, 3);
      assert.match(
        r.stdout,
        /\n\n3 messages shown of 25 matching \(--limit 3\), 3 recipients waiting \(.*\)\n$/,
      );
      const none = await queue('list', '--older-than', '2d');
      assert.match(none.stdout, /^No message matches \(/);
    });

    it('list --skip and --limit page through every message, each once, in arrival order', async () => {
      const all = (await briefs()).map((b) => b.id);
      const pages: string[] = [];
      for (let skip = 0; skip < all.length; skip += 1000)
        pages.push(...(await briefs('--skip', String(skip), '--limit', '1000')).map((b) => b.id));
      assert.equal(all.length, 3065);
      assert.deepEqual(pages, all);
      const r = await queue('list', '--domain', 'other.test', '--skip', '20', '--limit', '3');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /\n\n3 messages shown of 25 matching \(--skip 20 --limit 3\), /);
    });

    it('summary draws the queue as qshape does: domains by age band, a message in two domains in both rows', async () => {
      let r = await queue('summary');
      assert.equal(r.code, 0, describeRun(r));
      const lines = r.stdout.split('\n');
      assert.match(lines[0]!, /^ +T +5 +10 +20 +40 +80 +160 +320 +640 +1280 +1280\+$/);
      // Everything arrived within the last five minutes: the first band holds it all.
      assert.match(lines[1]!, /^ +TOTAL +3065 +3065( +0){9}$/);
      assert.match(lines[2]!, /^ *stuck\.test +3005 +3005( +0){9}$/);
      assert.match(lines[3]!, /^ *late\.test +30 +30 /);
      assert.match(lines[4]!, /^ *other\.test +25 +25 /);
      assert.match(lines[5]!, /^ *later\.test +10 +10 /);
      r = await queue('summary', '--by', 'sender', '--state', 'deferred', '--json');
      assert.equal(r.code, 0, describeRun(r));
      const shape = JSON.parse(r.stdout) as {
        total: { total: number };
        rows: { domain: string; total: number }[];
      };
      assert.equal(shape.total.total, 3055);
      assert.deepEqual(
        shape.rows.map((x) => [x.domain, x.total]),
        [
          ['example.test', 3035],
          ['other.example', 20],
        ],
      );
    });

    it('status counts the queue from memory: messages, recipients waiting, and the journal read', async () => {
      const r = await queue('status');
      assert.equal(r.code, 0, describeRun(r));
      // stuck.test's five also have a recipient at other.test: 3065 messages, 3070 recipients.
      assert.match(r.stdout, /^3065 messages in the queue, 3070 recipients waiting \(/);
      assert.match(r.stdout, /^ {2}part 0: 3065 messages; journal read at the start: 0 messages in /m);
      const json = await queue('status', '--json');
      assert.equal(json.code, 0, describeRun(json));
      const st = JSON.parse(json.stdout.trim()) as { part: number; messages: number; indexed: boolean };
      assert.deepEqual([st.part, st.messages, st.indexed], [0, 3065, true]);
    });

    it('hold --from and release act on exactly the matching messages, and no others', async () => {
      let r = await queue('hold', '--from', '@other.example');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(
        r.stdout,
        /^Held 20 messages from @other\.example: no delivery attempts until they are released\.$/m,
      );
      const held = await briefs('--state', 'held');
      assert.deepEqual(sorted(held.map((b) => b.id)), sorted(ids.other));
      assert.ok(held.every((b) => b.held && b.sender === 'carol@other.example'));
      // The flush leaves them alone, and says so.
      r = await queue('flush', '--domain', 'other.test', '--json');
      assert.equal(r.code, 0, describeRun(r));
      const flushed = JSON.parse(r.stdout) as {
        done: number;
        held: number;
        ids: string[];
        heldIds: string[];
      };
      assert.equal(flushed.done, 5);
      assert.deepEqual(sorted(flushed.ids), sorted(ids.both));
      assert.equal(flushed.held, 20);
      assert.deepEqual(sorted(flushed.heldIds), sorted(ids.other));
      r = await queue('release', '--all');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /^Released 20 messages: attempts resume on their schedule/m);
      assert.deepEqual(await briefs('--state', 'held'), []);
    });

    it('delete and bounce refuse to act on everything unless asked in so many words', async () => {
      let r = await queue('delete');
      assert.equal(r.code, 64, describeRun(r));
      assert.match(r.stderr, /delete needs a queue id .*, filters .*, or --all/);
      r = await queue('bounce', '--limit', '1');
      assert.equal(r.code, 64, describeRun(r));
      const refused = await request(socket, { op: 'delete', select: {} }, 10_000);
      assert.deepEqual(refused, {
        ok: false,
        error: 'bad-request',
        message: 'refusing to delete every message: give a non-empty "select", or "all": true',
      });
      assert.equal((await briefs()).length, 3065, 'nothing was deleted');
    });

    it('a list whose reader stops is walked no further: the server holds a batch, not the list', async () => {
      // A client asks for every message in full and reads the first batch only.
      const s = createConnection(socket);
      let text = '';
      s.setEncoding('utf8');
      s.on('error', () => undefined);
      const firstLine = new Promise<void>((resolve) => {
        const first = (d: string): void => {
          text += d;
          if (!text.includes('\n')) return;
          s.pause(); // from now on, not one more octet is read
          s.off('data', first);
          resolve();
        };
        s.on('data', first);
      });
      s.write('{"op":"list"}\n');
      await firstLine;
      // Meanwhile the last messages to arrive are deleted (another client is served all the same).
      const r = await queue('delete', '--domain', 'late.test', '--json');
      assert.equal(r.code, 0, describeRun(r));
      const deleted = JSON.parse(r.stdout) as { done: number; matched: number; ids: string[] };
      assert.equal(deleted.done, 30);
      assert.deepEqual(sorted(deleted.ids), sorted(ids.late));
      // The reader goes on: the walk had not reached them, so they are not in its list, which has
      // every other message once, in several lines.
      const lines = await new Promise<string[]>((resolve, reject) => {
        const done = (): boolean => {
          const all = text.split('\n').filter(Boolean);
          const last = all.at(-1);
          if (!text.endsWith('\n') || !last || (JSON.parse(last) as { more?: boolean }).more !== false)
            return false;
          resolve(all);
          return true;
        };
        s.on('data', (d: string) => {
          text += d;
          done();
        });
        s.on('end', () => (done() ? undefined : reject(new Error('the list ended early'))));
        s.resume();
      });
      s.destroy();
      const answers = lines.map(
        (l) => JSON.parse(l) as { more: boolean; messages: { id: string }[]; matched?: number },
      );
      assert.ok(answers.length > 10, `a line per batch: ${answers.length}`);
      const listed = answers.flatMap((a) => a.messages.map((m) => m.id));
      assert.equal(new Set(listed).size, listed.length, 'no message twice');
      assert.deepEqual(sorted(listed), sorted([...ids.other, ...ids.bounces, ...ids.both, ...ids.bulk]));
      assert.equal(answers.at(-1)!.matched, 3035);
      // And the queue holds exactly those.
      assert.equal((await briefs()).length, 3035);
      assert.deepEqual(await briefs('--domain', 'late.test'), []);
    });

    it('list prints thousands of messages in full as they come, with the totals last', async () => {
      const r = await queue('list', '--domain', 'stuck.test');
      assert.equal(r.code, 0, describeRun(r));
      const shown = [...r.stdout.matchAll(/^(\S+) {2}\d+ bytes {2}arrived /gm)].map((m) => m[1]!);
      assert.equal(shown.length, 3005);
      assert.deepEqual(sorted(shown), sorted([...ids.both, ...ids.bulk]));
      assert.match(r.stdout, /\n\n3005 messages shown, 3010 recipients waiting \(.*\)\n$/);
    });

    it('delete --domain removes exactly the matching messages; the rest stay', async () => {
      const r = await queue('delete', '--domain', 'other.test');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(
        r.stdout,
        /^Deleted 25 messages with a recipient in other\.test: their recipients not yet final are dropped; the senders are not told\.$/m,
      );
      const left = (await briefs()).map((b) => b.id);
      assert.deepEqual(sorted(left), sorted([...ids.bounces, ...ids.bulk]));
    });
  },
);

describe('petrel queue, formatting', () => {
  it('writes durations as a person would', () => {
    assert.equal(span(45_000), '45s');
    assert.equal(span(12 * 60_000), '12m');
    assert.equal(span(-(3 * 3600_000 + 5 * 60_000)), '3h 5m');
    assert.equal(span(2 * 86400_000), '2d');
    assert.equal(span(2 * 86400_000 + 4 * 3600_000), '2d 4h');
  });

  const now = new Date('2026-05-04T10:02:03Z');
  const recipient = {
    address: 'bob@gmail.com',
    status: 'pending' as const,
    attempts: 0,
    nextAttemptAt: '2026-05-04T10:02:51Z',
    lastReply: null,
    lastAttemptAt: null,
    transport: null,
  };
  const message = {
    id: '20QCX9T0P1R2H00002',
    sender: 'alice@example.test',
    receivedAt: '2026-05-04T10:01:03Z',
    size: 245,
    held: false,
    attempting: false,
    recipients: [recipient],
  };

  it('says what holds a postponed recipient back, and by which plugin, with no attempt made', () => {
    const text = describeMessage(
      {
        ...message,
        recipients: [
          { ...recipient, postponed: { reason: 'throttled: at most 2 per 1m to gmail.com', by: 'limit' } },
        ],
      },
      now,
    );
    assert.match(
      text,
      /^ {9}pending, not tried yet, throttled: at most 2 per 1m to gmail\.com \(limit\), next attempt .* \(in 48s\)$/m,
    );
  });

  it('says who quarantined a held message and why, and what an administrator can do', () => {
    const quarantined = describeMessage(
      { ...message, held: true, heldReason: 'clamav: virus Eicar-Test-Signature' },
      now,
    );
    assert.match(
      quarantined,
      /^ {2}held: {2}no delivery attempts until petrel queue release 20QCX9T0P1R2H00002$/m,
    );
    assert.match(
      quarantined,
      /^ {2}why: {3}quarantined at acceptance by clamav: virus Eicar-Test-Signature$/m,
    );
    assert.match(quarantined, /next attempt: none while held/);
    const byHand = describeMessage({ ...message, held: true }, now);
    assert.match(byHand, /^ {2}why: {3}held by the administrator$/m);
  });
});

describe('petrel queue, selections and the queue shape', () => {
  const now = Date.parse('2026-05-04T10:00:00Z');
  const brief = (over: Partial<MessageBrief>): MessageBrief => ({
    id: 'A',
    sender: 'alice@example.test',
    receivedAt: now,
    size: 100,
    held: false,
    attempting: false,
    domains: ['example.org'],
    waiting: 1,
    nextAttemptAt: now + 60_000,
    deferred: true,
    ...over,
  });

  it('matches ages at both ends, the null sender, a sender domain, and a state', () => {
    const old = brief({ receivedAt: now - 2 * 3600_000 });
    const young = brief({ receivedAt: now - 10 * 60_000 });
    assert.equal(matcher({ olderThan: 3600_000 }, now)(old), true);
    assert.equal(matcher({ olderThan: 3600_000 }, now)(young), false);
    assert.equal(matcher({ newerThan: 3600_000 }, now)(young), true);
    assert.equal(matcher({ newerThan: 3600_000 }, now)(old), false);
    assert.equal(matcher({ sender: '<>' }, now)(brief({ sender: '' })), true);
    assert.equal(matcher({ sender: '<>' }, now)(old), false);
    assert.equal(matcher({ sender: '@EXAMPLE.test' }, now)(old), true);
    assert.equal(matcher({ sender: '@example' }, now)(old), false, 'a domain, not a suffix');
    assert.equal(matcher({ state: 'pending' }, now)(brief({ deferred: false })), true);
    assert.equal(matcher({ state: 'deferred' }, now)(brief({ held: true })), false, 'held comes first');
  });

  it('counts messages in qshape age bands; one in two domains counts in both rows and once in TOTAL', () => {
    const tally = new ShapeTally('recipient', now);
    const minutes = (m: number): number => now - m * 60_000;
    tally.add(brief({ receivedAt: minutes(1), domains: ['a.test', 'b.test'] }));
    tally.add(brief({ receivedAt: minutes(5), domains: ['a.test'] }));
    tally.add(brief({ receivedAt: minutes(700), domains: ['b.test'] }));
    tally.add(brief({ receivedAt: minutes(3000), domains: ['a.test'] }));
    const shape = tally.result(10);
    assert.deepEqual(shape.total.counts, [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]);
    assert.deepEqual(
      shape.rows.map((r) => [r.domain, r.total]),
      [
        ['a.test', 3],
        ['b.test', 2],
      ],
    );
    assert.deepEqual(formatShape(shape), [
      '       T 5 10 20 40 80 160 320 640 1280 1280+',
      ' TOTAL 4 1  1  0  0  0   0   0   0    1     1',
      'a.test 3 1  1  0  0  0   0   0   0    0     1',
      'b.test 2 1  0  0  0  0   0   0   0    1     0',
    ]);
  });
});
