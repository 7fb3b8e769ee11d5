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
