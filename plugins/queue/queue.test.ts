import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import {
  appendFileSync,
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { once } from 'node:events';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import {
  accept,
  definePlugin,
  deny,
  expandTo,
  postpone,
  proceed,
  routeTo,
  type DeliveryStatus,
  type PetrelConfigInput,
} from '../../core/index.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { REQUIRE_PEERS } from '../../test/harness/peers.js';
import { Journal, segmentName } from './journal.js';
import { QueueEngine } from './engine.js';
import { holdOnAccept, Queue } from './api.js';
import { QueueStore, type Entry, type RecipientState } from './store.js';
import { DueHeap } from './due-heap.js';
import { resolveToken } from '../../core/di/tokens.js';
import { address } from '../../core/testing/index.js';
import { parseSchedule } from './schedule.js';
import { describeMessage } from './cli.js';
import type { WireMessage } from './control.js';

interface Delivery {
  id: string;
  rcpt: string;
  body: string;
  maybeDelivered: boolean;
}

/** A transport for tests: decides per recipient local part, records what it delivered. */
function testTransport(
  log: Delivery[],
  decide: (local: string, attempt: number) => DeliveryStatus = () => 'delivered',
) {
  return definePlugin({
    name: 'test-transport',
    setup: () => ({
      rcpt: async () => accept(),
      route: async ({ recipient }) =>
        recipient.address.local === 'noroute' ? deny(550, '5.1.1', 'No such mailbox') : routeTo('test'),
      deliver: async ({ route, message, recipients }) => {
        if (route.transport !== 'test') return { kind: 'proceed' };
        const chunks: Buffer[] = [];
        for await (const c of message.stream()) chunks.push(c as Buffer);
        const body = Buffer.concat(chunks).toString();
        return {
          kind: 'results',
          results: recipients.map((r) => {
            const status = decide(r.address.local, r.attempts);
            if (status === 'delivered') {
              log.push({ id: message.id, rcpt: r.address.address, body, maybeDelivered: r.maybeDelivered });
            }
            const reply =
              status === 'delivered'
                ? { code: 250, enhanced: '2.0.0', text: 'ok' }
                : status === 'deferred'
                  ? { code: 451, enhanced: '4.2.0', text: 'busy' }
                  : { code: 550, enhanced: '5.1.1', text: 'gone' };
            return { recipient: r.address.address, status, reply };
          }),
        };
      },
    }),
  });
}

function notices(into: string[]) {
  return definePlugin({
    name: 'test-notices',
    setup: () => ({
      delivered: async ({ recipient }) => void into.push(`delivered ${recipient.address.address}`),
      deferred: async ({ recipient }) => void into.push(`deferred ${recipient.address.address}`),
      failed: async ({ recipient, reason, result }) =>
        void into.push(`failed ${recipient.address.address} ${reason} ${result.reply.enhanced}`),
    }),
  });
}

async function start(
  dir: string,
  plugins: ReturnType<typeof definePlugin>[],
  queue: Record<string, unknown> = {},
  logger: pino.Logger = pino({ level: 'silent' }),
) {
  const config: PetrelConfigInput = {
    hostname: 'mx.test',
    listeners: [{ kind: 'smtp', port: 0 }],
    spool: { dir: join(dir, 'spool') },
    plugins: [...plugins.map((p) => p.name), { name: 'queue', config: queue }],
  };
  return Petrel.start({ config, plugins, logger });
}

async function send(port: number, rcpts: string[], body = 'Subject: test\r\n\r\nhello\r\n'): Promise<string> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
  for (const r of rcpts) await c.cmd(`RCPT TO:<${r}>`, /^250 /);
  await c.cmd('DATA', /^354 /);
  c.write(`${body}.\r\n`);
  const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
  await c.cmd('QUIT', /^221 /);
  return /queued as (\S+)/.exec(reply.text)![1]!;
}

async function until(check: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('the durable queue', () => {
  it('answers 250 with the queue id once the message is in the journal, then delivers it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const app = await start(dir, [testTransport(delivered)]);
    try {
      const id = await send(app.port(), ['bob@hamburger.test', 'carol@hamburger.test']);
      const journal = join(dir, 'spool', 'queue', 'journal');
      const bytes = readdirSync(journal)
        .map((f) => readFileSync(join(journal, f)).toString('latin1'))
        .join('');
      assert.ok(bytes.includes('hello\r\n') && bytes.includes(id), 'the message is in the journal');
      await until(() => delivered.length === 2);
      assert.deepEqual(delivered.map((d) => d.rcpt).sort(), ['bob@hamburger.test', 'carol@hamburger.test']);
      assert.equal(delivered[0]!.id, id);
      assert.match(
        delivered[0]!.body,
        /^Received: from client\.test .*\r\n(\t.*\r\n)*Subject: test\r\n\r\nhello\r\n$/,
      );
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps a message whose recipients end in different states, and says so through the hooks', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const events: string[] = [];
    const decide = (local: string, attempt: number): DeliveryStatus =>
      local === 'gone' ? 'failed' : local === 'later' && attempt < 2 ? 'deferred' : 'delivered';
    const app = await start(dir, [testTransport(delivered, decide), notices(events)], {
      retry: '100ms, 200ms...',
    });
    try {
      await send(app.port(), ['ok@h.test', 'gone@h.test', 'later@h.test', 'noroute@h.test']);
      // Notices run after each attempt's state is recorded: wait for all six.
      await until(() => events.length === 6);
      assert.deepEqual(
        [...events].sort(),
        [
          'deferred later@h.test',
          'deferred later@h.test',
          'delivered later@h.test',
          'delivered ok@h.test',
          'failed gone@h.test refused 5.1.1',
          'failed noroute@h.test refused 5.1.1',
        ].sort(),
      );
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('fails a recipient whose queue lifetime runs out, with status 4.4.7', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const events: string[] = [];
    const app = await start(dir, [testTransport([], () => 'deferred'), notices(events)], {
      retry: '100ms...',
      lifetime: '350ms',
    });
    try {
      await send(app.port(), ['stuck@h.test']);
      await until(() => events.some((e) => e.startsWith('failed')));
      assert.equal(events.at(-1), 'failed stuck@h.test expired 4.4.7');
      assert.ok(events.filter((e) => e.startsWith('deferred')).length >= 2, 'retried on the schedule first');
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('finds every queued message after a restart and delivers it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    let open = false;
    const delivered: Delivery[] = [];
    const gate = (): DeliveryStatus => (open ? 'delivered' : 'deferred');
    let app: Petrel = await start(dir, [testTransport(delivered, gate)], { retry: '1h' });
    const ids: string[] = [];
    for (let i = 0; i < 5; i++)
      ids.push(await send(app.port(), [`r${i}@h.test`], `Subject: n${i}\r\n\r\nbody ${i}\r\n`));
    await new Promise((r) => setTimeout(r, 200));
    await app.stop(1000);
    open = true;
    app = await start(dir, [testTransport(delivered, gate)], { retry: '1h' });
    try {
      const engine = QueueEngine.get(join(dir, 'spool', 'queue'))!;
      assert.equal(engine.store.entries.size, 5, 'all five found again');
      assert.equal(await engine.flush(), 5);
      await until(() => delivered.length === 5);
      assert.deepEqual(delivered.map((d) => d.id).sort(), [...ids].sort());
      assert.ok(
        delivered.every((d) => !d.maybeDelivered),
        'a clean stop leaves no doubt',
      );
      for (let i = 0; i < 5; i++) assert.ok(delivered.some((d) => d.body.endsWith(`body ${i}\r\n`)));
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('stores large messages as their own file and delivers them byte for byte', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const app = await start(dir, [testTransport(delivered)], { inlineLimit: 1000 });
    try {
      const line = 'x'.repeat(76) + '\r\n';
      const body = `Subject: big\r\n\r\n${line.repeat(5000)}`;
      await send(app.port(), ['big@h.test'], body);
      await until(() => delivered.length === 1);
      assert.ok(delivered[0]!.body.endsWith(body));
      assert.match(delivered[0]!.body, /^Received: /);
      await until(() => readdirSync(join(dir, 'spool', 'queue', 'blobs')).length === 0);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('gives the first attempt the octets from memory and a retry the same octets from disk', async () => {
    for (const memoryCache of [32 * 1024 * 1024, 0]) {
      const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
      const attempts: { body: string; inMemory: boolean }[] = [];
      const engineOf = (): QueueEngine => QueueEngine.get(join(dir, 'spool', 'queue'))!;
      const twice = definePlugin({
        name: 'test-twice',
        setup: () => ({
          rcpt: async () => accept(),
          route: async () => routeTo('test'),
          deliver: async ({ message, recipients }) => {
            const chunks: Buffer[] = [];
            for await (const c of message.stream()) chunks.push(c as Buffer);
            const inMemory = engineOf().store.entries.get(message.id)?.memory != null;
            attempts.push({ body: Buffer.concat(chunks).toString('latin1'), inMemory });
            const later = attempts.length === 1;
            return {
              kind: 'results',
              results: recipients.map((r) => ({
                recipient: r.address.address,
                status: later ? 'deferred' : 'delivered',
                reply: later
                  ? { code: 451, enhanced: '4.2.0', text: 'busy' }
                  : { code: 250, enhanced: '2.0.0', text: 'ok' },
              })),
            };
          },
        }),
      });
      const app = await start(dir, [twice], { retry: '100ms', memoryCache });
      try {
        const text = `Subject: twice\r\n\r\n${'8-bit Latin-1: ünïcödé\r\n'.repeat(2000)}`;
        await send(app.port(), ['bob@h.test'], text);
        await until(() => attempts.length === 2);
        assert.deepEqual(
          attempts.map((a) => a.inMemory),
          [memoryCache > 0, false],
          `memoryCache ${memoryCache}`,
        );
        assert.ok(attempts[0]!.body.endsWith(text), 'the first attempt has the whole message');
        assert.equal(attempts[1]!.body, attempts[0]!.body, 'the retry reads the same octets');
      } finally {
        await app.stop(1000);
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  it('refuses a message with more Received fields than allowed (554 5.4.6)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const app = await start(dir, [testTransport([])], { maxReceived: 3 });
    try {
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@h.test>', /^250 /);
      await c.cmd('RCPT TO:<b@h.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write(
        'Received: from a\r\nReceived: from b\r\nReceived: from c\r\nReceived: from d\r\n\r\nloop\r\n.\r\n',
      );
      await c.expect(/^554 5\.4\.6 /);
      c.close();
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** Postpones every delivery (for an hour, by default) while `closed()` says so; then lets it through. */
function pacer(closed: () => boolean, until = () => Date.now() + 3_600_000) {
  return definePlugin({
    name: 'test-pacer',
    setup: () => ({
      deliver: async () => (closed() ? postpone(until(), 'throttled: test rate') : proceed()),
    }),
  });
}

describe('postponed deliveries (postpone())', () => {
  it('count no attempt and send no notice; after a restart the plugin is asked again, and it is delivered once', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const events: string[] = [];
    let closed = true;
    const plugins = () => [pacer(() => closed), testTransport(delivered), notices(events)];
    let app: Petrel = await start(dir, plugins(), { retry: '100ms...' });
    try {
      const id = await send(app.port(), ['bob@h.test']);
      const queue = resolveToken(app.generation.container, Queue);
      await until(async () => (await queue.get(id))?.recipients[0]?.postponed !== undefined);
      const r = (await queue.get(id))!.recipients[0]!;
      assert.deepEqual(r.postponed, { reason: 'throttled: test rate', by: 'test-pacer' });
      assert.equal(r.attempts, 0);
      assert.equal(r.status, 'pending');
      assert.ok(r.nextAttemptAt!.getTime() > Date.now() + 3_000_000, 'held back for the hour asked');
      // A short retry schedule changes nothing: a postponement is not a deferral.
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(events, []);
      assert.equal((await queue.get(id))!.recipients[0]!.attempts, 0);
      await app.stop(1000);

      closed = false;
      app = await start(dir, plugins(), { retry: '100ms...' });
      await until(() => delivered.length === 1);
      assert.equal(delivered[0]!.id, id);
      assert.deepEqual(events, ['delivered bob@h.test']);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('never take a recipient past its lifetime: then it expires (4.4.7) with the postponement as the last error', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const failed: string[] = [];
    const told = definePlugin({
      name: 'test-told',
      setup: () => ({
        failed: async ({ reason, result }) =>
          void failed.push(`${reason} ${result.reply.enhanced} ${String(result.reply.text)}`),
      }),
    });
    const app = await start(dir, [pacer(() => true), testTransport([]), told], { lifetime: '500ms' });
    try {
      await send(app.port(), ['bob@h.test']);
      await until(() => failed.length === 1);
      assert.match(
        failed[0]!,
        /^expired 4\.4\.7 Message expired after [\d.]+ days in the queue; last error: 451 4\.4\.5 Postponed: throttled: test rate$/,
      );
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the queue service', () => {
  it('lets a plugin submit a message with the null sender, lists it, and delivers it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    let open = false;
    const app = await start(dir, [testTransport(delivered, () => (open ? 'delivered' : 'deferred'))], {
      retry: '1h',
    });
    try {
      const queue = resolveToken(app.generation.container, Queue);
      const id = await queue.submit({
        sender: null,
        recipients: [{ address: address('alice@crepes.test') }],
        content: Buffer.from('Subject: Undelivered Mail\r\n\r\nreport\r\n'),
      });
      await until(async () => (await queue.get(id))?.recipients[0]?.status === 'deferred');
      const listed = (await queue.list()).find((m) => m.id === id)!;
      assert.equal(listed.sender, '');
      assert.equal(listed.recipients[0]!.lastReply?.text, 'busy');
      assert.ok(listed.recipients[0]!.nextAttemptAt! > new Date(), 'says when it will try again');
      open = true;
      assert.equal(await queue.flush({ domain: 'CREPES.test' }), 1);
      await until(() => delivered.length === 1);
      assert.equal(delivered[0]!.body, 'Subject: Undelivered Mail\r\n\r\nreport\r\n');
      await until(async () => (await queue.get(id)) === null);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('queue administration', () => {
  /** Reads the whole message in the failed hook, as a bounce quoting it would. */
  function reader(into: string[]) {
    return definePlugin({
      name: 'test-reader',
      setup: () => ({
        failed: async ({ message, recipient }) => {
          const chunks: Buffer[] = [];
          for await (const c of message.stream()) chunks.push(c as Buffer);
          into.push(`${recipient.address.address} read ${Buffer.concat(chunks).length}`);
        },
      }),
    });
  }

  it('holds, releases, deletes and bounces through the service; the failed hooks can read the message', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const seen: string[] = [];
    const read: string[] = [];
    let open = false;
    const gate = (): DeliveryStatus => (open ? 'delivered' : 'deferred');
    const app = await start(dir, [testTransport(delivered, gate), notices(seen), reader(read)], {
      retry: '1h...',
      inlineLimit: 1000,
    });
    try {
      const queue = resolveToken(app.generation.container, Queue);
      const big = `Subject: big\r\n\r\n${('z'.repeat(78) + '\r\n').repeat(100)}`;
      const m1 = await send(app.port(), ['one@h.test'], big);
      const m2 = await send(app.port(), ['two@h.test']);
      const m3 = await send(app.port(), ['three@h.test']);
      const attempts = async (id: string): Promise<number> =>
        (await queue.get(id))?.recipients[0]?.attempts ?? -1;
      await until(async () => (await Promise.all([m1, m2, m3].map(attempts))).every((n) => n === 1));

      const held = await queue.hold(m3);
      assert.equal(held?.held, true);
      assert.equal((await queue.get(m3))?.held, true);
      assert.equal(await queue.flush(), 2, 'a held message is not flushed');
      await until(async () => (await attempts(m1)) === 2 && (await attempts(m2)) === 2);
      assert.equal(await attempts(m3), 1, 'nor attempted');

      const deleted = await queue.delete(m1);
      assert.equal(deleted?.recipients[0]?.status, 'failed');
      assert.match(
        String(deleted?.recipients[0]?.lastReply?.text),
        /^Deleted by the administrator; last error: 451 /,
      );
      assert.ok(seen.includes('failed one@h.test deleted 5.0.0'), seen.join('\n'));
      assert.equal(await queue.get(m1), null);
      const size = Number(/read (\d+)/.exec(read.find((r) => r.startsWith('one@h.test')) ?? '')?.[1]);
      assert.ok(size > big.length, `the failed hook read the whole stored message (${size})`);
      await until(() => readdirSync(join(dir, 'spool', 'queue', 'blobs')).length === 0);

      const bounced = await queue.bounce(m2);
      assert.equal(bounced?.recipients[0]?.lastReply?.code, 550);
      assert.match(String(bounced?.recipients[0]?.lastReply?.text), /^Returned by the administrator/);
      assert.ok(seen.includes('failed two@h.test refused 5.0.0'), seen.join('\n'));
      assert.equal(await queue.get(m2), null);

      assert.equal(await queue.delete('NOSUCH'), null);
      assert.equal(await queue.hold('NOSUCH'), null);

      open = true;
      assert.equal((await queue.release(m3))?.held, false);
      assert.equal(await queue.flush({ id: m3 }), 1);
      await until(async () => (await queue.get(m3)) === null);
      assert.deepEqual(
        delivered.map((d) => d.rcpt),
        ['three@h.test'],
      );
      assert.equal((await queue.list()).length, 0);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps a hold across restarts and across the compaction of the segment that recorded it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    let open = false;
    const gate = (): DeliveryStatus => (open ? 'delivered' : 'deferred');
    const queueDir = join(dir, 'spool', 'queue');
    let app = await start(dir, [testTransport(delivered, gate)], { retry: '1h...' });
    try {
      let queue = resolveToken(app.generation.container, Queue);
      const id = await send(app.port(), ['held@h.test']);
      await until(async () => (await queue.get(id))?.recipients[0]?.status === 'deferred');
      await queue.hold(id);
      await app.stop(1000);

      app = await start(dir, [testTransport(delivered, gate)], { retry: '1h...' });
      const segments = (): string[] => readdirSync(join(queueDir, 'journal')).sort();
      const first = segments()[0]!;
      await QueueEngine.get(queueDir)!.store.compact({ everything: true });
      assert.ok(!segments().includes(first), 'the segment with the Hold record was compacted away');
      await app.stop(1000);

      open = true;
      app = await start(dir, [testTransport(delivered, gate)], { retry: '1h...' });
      queue = resolveToken(app.generation.container, Queue);
      assert.equal((await queue.get(id))?.held, true);
      assert.equal(await queue.flush(), 0);
      await queue.release(id);
      assert.equal(await queue.flush({ id }), 1);
      await until(() => delivered.length === 1);
      assert.equal(delivered[0]!.id, id);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('holding a message from its acceptance (holdOnAccept)', () => {
  /** Asks for every message whose subject says so to be held, as a quarantine would. */
  const quarantine = definePlugin({
    name: 'test-quarantine',
    setup: () => ({
      data_post: async ({ message, transaction }) => {
        if (message.headers.get('subject') === 'suspicious') holdOnAccept(transaction.notes, 'looks forged');
        return proceed();
      },
    }),
  });

  it('never attempts it, keeps the hold and its reason across restarts, and a release across compaction', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    const plugins = [quarantine, testTransport(delivered)];
    let app = await start(dir, plugins);
    try {
      let queue = resolveToken(app.generation.container, Queue);
      const held = await send(app.port(), ['held@h.test'], 'Subject: suspicious\r\n\r\nhello\r\n');
      const plain = await send(app.port(), ['plain@h.test']);
      await until(() => delivered.length === 1);
      assert.equal(delivered[0]!.id, plain);
      assert.equal((await queue.get(held))?.held, true);
      assert.equal((await queue.get(held))?.heldReason, 'looks forged');
      assert.equal((await queue.get(held))?.recipients[0]?.attempts, 0, 'not attempted');
      await app.stop(1000);

      app = await start(dir, plugins);
      queue = resolveToken(app.generation.container, Queue);
      assert.equal((await queue.get(held))?.held, true, 'still held after a restart');
      assert.equal((await queue.get(held))?.heldReason, 'looks forged');
      await queue.release(held);
      await until(() => delivered.length === 2);
      assert.equal(delivered[1]!.id, held);
      assert.equal(await queue.get(held), null);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps a release when compaction copies the envelope of a message still waiting', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const delivered: Delivery[] = [];
    let open = false;
    const plugins = [quarantine, testTransport(delivered, () => (open ? 'delivered' : 'deferred'))];
    const queueDir = join(dir, 'spool', 'queue');
    let app = await start(dir, plugins, { retry: '1h...' });
    try {
      let queue = resolveToken(app.generation.container, Queue);
      const id = await send(app.port(), ['held@h.test'], 'Subject: suspicious\r\n\r\nhello\r\n');
      await queue.release(id);
      await until(async () => (await queue.get(id))?.recipients[0]?.status === 'deferred');
      await app.stop(1000);

      // The envelope (which says "held") is copied by compaction: the release must come along.
      app = await start(dir, plugins, { retry: '1h...' });
      const segments = (): string[] => readdirSync(join(queueDir, 'journal')).sort();
      const first = segments()[0]!;
      await QueueEngine.get(queueDir)!.store.compact({ everything: true });
      assert.ok(
        !segments().includes(first),
        'the segment with the Message and Hold records was compacted away',
      );
      await app.stop(1000);

      open = true;
      app = await start(dir, plugins, { retry: '1h...' });
      queue = resolveToken(app.generation.container, Queue);
      assert.equal((await queue.get(id))?.held, false);
      assert.equal(await queue.flush({ id }), 1);
      await until(() => delivered.length === 1);
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** The first recipient's state once delivered, for `store.update`. */
function delivered(entry: Entry): Map<number, RecipientState> {
  return new Map([[0, { ...entry.rcpts[0]!, status: 'delivered' as const }]]);
}

describe('queue space', () => {
  it('removes segments whose messages all finished, also those that were current at the time', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-segments-'));
    try {
      const store = new QueueStore(dir, 65_536, { warn: () => undefined, error: () => undefined });
      await store.open();
      await store.indexed;
      for (let i = 0; i < 100; i++) {
        const entry = await store.add(
          {
            id: `m${i}`,
            sender: null,
            mailParams: { smtputf8: false },
            recipients: [{ address: address('a@b.test'), params: {} }],
            receivedAt: Date.now(),
            size: 10_000,
          },
          { inline: [Buffer.alloc(10_000)] },
        );
        if (await store.update(entry, delivered(entry))) await store.discard(entry);
      }
      await store.compact();
      const segments = readdirSync(join(dir, 'journal')).filter((f) => f.endsWith('.seg'));
      assert.equal(store.entries.size, 0);
      assert.ok(segments.length <= 2, `only the current segment is left, found ${segments.length}`);
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the due heap', () => {
  it('gives every message back in the order it is due, however they were pushed', () => {
    const heap = new DueHeap();
    const times = Array.from({ length: 500 }, (_, i) => 1_700_000_000_000 + ((i * 7919) % 503) * 1000);
    times.forEach((at, i) => heap.push(at, `m${i}`));
    assert.equal(heap.size, 500);
    const out: { at: number; id: string }[] = [];
    while (heap.peek()) {
      const top = heap.peek()!;
      const popped = heap.pop()!;
      assert.deepEqual(popped, top);
      out.push(popped);
    }
    assert.equal(heap.pop(), undefined);
    assert.deepEqual(
      out.map((o) => o.at),
      [...times].sort((a, b) => a - b),
    );
    // Each id comes back with its own time.
    for (const o of out) assert.equal(o.at, times[Number(o.id.slice(1))]);
  });
});

describe('the active window', () => {
  it('holds at most its count of envelopes parsed; the others read back whole, also after a restart and a compaction', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-window-'));
    const log = { warn: () => undefined, error: () => undefined };
    const window = { messages: 3, bytes: 1 << 20 };
    const env = (i: number) => ({
      id: `w${i}`,
      sender: address(`from${i}@example.test`),
      mailParams: { smtputf8: false },
      recipients: [{ address: address(`to${i}@example.org`), params: {} }],
      receivedAt: 1_700_000_000_000 + i,
      size: 100,
      origin: { listener: 'mx (smtp)', messageId: `<${i}@example.test>` },
    });
    try {
      let store = new QueueStore(dir, 65_536, log, 0, undefined, undefined, window);
      await store.open();
      await store.indexed;
      for (let i = 0; i < 10; i++) await store.add(env(i), { inline: [Buffer.from(`message ${i}\r\n`)] });
      assert.equal(store.window.size, 3, 'only the latest three stay loaded');
      assert.deepEqual(
        [...store.entries.values()].map((e) => e.isLoaded),
        [false, false, false, false, false, false, false, true, true, true],
      );
      // Every message reads back as stored, loaded again from the journal when it left the window.
      for (let i = 0; i < 10; i++)
        await store.use(store.entries.get(`w${i}`)!, (e) => assert.deepEqual(e.env, env(i)));
      assert.equal(store.window.size, 3);
      await store.close();

      store = new QueueStore(dir, 65_536, log, 0, undefined, undefined, window);
      await store.open();
      await store.indexed;
      await store.indexed;
      assert.equal(store.window.size, 0, 'a restart loads no message until one is looked at');
      // What the index holds without reading the disk.
      const w4 = store.entries.get('w4')!;
      assert.deepEqual(
        { sender: w4.sender, domains: w4.domains, receivedAt: w4.receivedAt, size: w4.size },
        { sender: 'from4@example.test', domains: ['example.org'], receivedAt: 1_700_000_000_004, size: 100 },
      );
      assert.throws(() => w4.env, /not loaded/);
      await store.compact({ everything: true });
      for (let i = 0; i < 10; i++) {
        await store.use(store.entries.get(`w${i}`)!, async (e) => {
          assert.deepEqual(e.env, env(i));
          const body: Buffer[] = [];
          for await (const c of store.view(e).stream()) body.push(c as Buffer);
          assert.equal(Buffer.concat(body).toString(), `message ${i}\r\n`);
        });
      }
      assert.ok(store.window.size <= 3);
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('compaction', () => {
  it('never removes a segment under a delivery that is reading it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-compact-'));
    try {
      const store = new QueueStore(dir, 65_536, { warn: () => undefined, error: () => undefined });
      await store.open();
      await store.indexed;
      const env = (id: string) => ({
        id,
        sender: null,
        mailParams: { smtputf8: false },
        recipients: [{ address: address('a@b.test'), params: {} }],
        receivedAt: Date.now(),
        size: 40_000,
      });
      const live = await store.add(env('live'), { inline: [Buffer.alloc(40_000, 0x61)] });
      // Fill the segment so the journal moves on; the others finish.
      for (let i = 0; i < 3; i++) {
        const e = await store.add(env(`done${i}`), { inline: [Buffer.alloc(40_000)] });
        if (await store.update(e, delivered(e))) await store.discard(e);
      }
      // A delivery attempt starts while compaction is writing the copy (it may open the old place).
      const journal = (store as unknown as { journal: { append: (...a: unknown[]) => Promise<unknown> } })
        .journal;
      const append = journal.append.bind(journal);
      journal.append = async (...args: unknown[]) => {
        const done = await append(...args);
        live.busy = true;
        return done;
      };
      await store.compact();
      journal.append = append;
      assert.ok(
        existsSync(join(dir, 'journal', segmentName(1))),
        'the old segment stays while the delivery runs',
      );
      live.busy = false;
      const after: Buffer[] = [];
      for await (const c of store.view(live).stream()) after.push(c as Buffer);
      assert.ok(Buffer.concat(after).equals(Buffer.alloc(40_000, 0x61)), 'the relocated copy reads the same');
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the journal', () => {
  /** Opens a journal folder with recovery's callbacks defaulted. */
  function openJournal(
    dir: string,
    opts: Partial<Parameters<typeof Journal.open>[1]> = {},
  ): Promise<Journal> {
    return Journal.open(dir, {
      segmentSize: 1 << 20,
      cleanStop: false,
      quarantineDir: join(dir, 'quarantine'),
      onRecord: () => undefined,
      onDamage: () => undefined,
      ...opts,
    });
  }

  it('cuts off a torn record at the end of the newest segment after an unclean stop, and keeps everything before it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    try {
      const j = await openJournal(dir);
      await j.append(1, [Buffer.from('first')]);
      await j.append(1, [Buffer.from('second')]);
      await j.close();
      const seg = join(dir, segmentName(1));
      const good = statSync(seg).size;
      // A crash mid-write: a header promising more bytes than were written.
      appendFileSync(
        seg,
        Buffer.from([0x50, 0x54, 0x52, 0x4c, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x61, 0x62]),
      );
      const seen: string[] = [];
      const cut: string[] = [];
      const j2 = await openJournal(dir, {
        onRecord: (_t, p) => void seen.push(p.toString()),
        onDamage: (d) => void cut.push(`${d.action} ${d.reason}`),
      });
      await j2.close();
      assert.deepEqual(seen, ['first', 'second']);
      assert.deepEqual(cut, ['cut length runs past the end of the segment']);
      assert.equal(statSync(seg).size, good, 'the torn tail is gone from the file');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('acknowledges many concurrent appends with few syncs (group commit)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    try {
      const j = await openJournal(dir, { segmentSize: 1 << 24 });
      const refs = await Promise.all(
        Array.from({ length: 200 }, (_, i) => j.append(1, [Buffer.from(`record ${i}`)])),
      );
      await j.close();
      const offsets = new Set(refs.map((r) => r.offset));
      assert.equal(offsets.size, 200, 'every record has its own place');
      const seen: string[] = [];
      const j2 = await openJournal(dir, {
        segmentSize: 1 << 24,
        onRecord: (_t, p) => void seen.push(p.toString()),
      });
      await j2.close();
      assert.equal(seen.length, 200);
      assert.deepEqual(
        seen,
        Array.from({ length: 200 }, (_, i) => `record ${i}`),
        'in order of append',
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('retry schedules', () => {
  it('reads "5m, 10m, 30m..." and repeats the last delay', () => {
    const s = parseSchedule('5m, 10m, 30m...');
    assert.deepEqual(
      [1, 2, 3, 4, 9].map((n) => s.delay(n)),
      [300_000, 600_000, 1_800_000, 1_800_000, 1_800_000],
    );
    assert.equal(parseSchedule('1m, 2m').delay(3), null);
    assert.throws(() => parseSchedule(''), /at least one/);
    assert.throws(() => parseSchedule('soon'), /duration/);
  });
});

describe('a full disk', () => {
  it('answers 452 4.3.1 when the spool fills up, and loses nothing accepted before', async (t) => {
    const mnt = mkdtempSync(join(tmpdir(), 'petrel-tmpfs-'));
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mnt], { stdio: 'ignore' });
    } catch {
      rmSync(mnt, { recursive: true, force: true });
      if (REQUIRE_PEERS) throw new Error('cannot mount a tmpfs (needs root) for the full-disk test');
      t.skip('cannot mount a tmpfs here (needs root)');
      return;
    }
    const delivered: Delivery[] = [];
    let open = false;
    const gate = (): DeliveryStatus => (open ? 'delivered' : 'deferred');
    let app: Petrel | null = null;
    try {
      mkdirSync(join(mnt, 'spool'));
      app = await start(mnt, [testTransport(delivered, gate)], { retry: '1h', inlineLimit: 1 << 20 });
      const body = `Subject: fill\r\n\r\n${('y'.repeat(998) + '\r\n').repeat(100)}`;
      const accepted: string[] = [];
      let refused = '';
      for (let i = 0; i < 40 && !refused; i++) {
        const c = await SmtpClient.connect(app!.port());
        await c.expect(/^220 /);
        await c.ehlo();
        await c.cmd('MAIL FROM:<a@h.test>', /^250 /);
        await c.cmd('RCPT TO:<b@h.test>', /^250 /);
        await c.cmd('DATA', /^354 /);
        c.write(`${body}.\r\n`);
        const r = await c.reply();
        if (r.code === 250) accepted.push(/queued as (\S+)/.exec(r.text)![1]!);
        else refused = r.raw;
        c.close();
      }
      assert.match(refused, /^452 4\.3\.1 /, 'a full disk is a temporary failure');
      assert.ok(accepted.length > 3, `some messages fit first (${accepted.length})`);
      await app.stop(1000);
      app = null;
      open = true;
      const lines: Record<string, unknown>[] = [];
      const logger = pino(
        { level: 'info' },
        new Writable({
          write(chunk: Buffer, _enc, done) {
            for (const l of chunk.toString().split('\n'))
              if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
            done();
          },
        }),
      );
      app = await start(mnt, [testTransport(delivered, gate)], { retry: '1h', inlineLimit: 1 << 20 }, logger);
      assert.deepEqual(
        lines.filter((l) => l.kind === 'damage' || l.kind === 'torn-tail'),
        [],
        'a refused write leaves nothing that reads as damage or a torn tail',
      );
      assert.equal(await QueueEngine.get(join(mnt, 'spool', 'queue'))!.flush(), accepted.length);
      await until(() => delivered.length === accepted.length, 10_000);
      assert.deepEqual(delivered.map((d) => d.id).sort(), [...accepted].sort());
    } finally {
      await app?.stop(1000);
      execFileSync('umount', ['-l', mnt], { stdio: 'ignore' });
      rmSync(mnt, { recursive: true, force: true });
    }
  });

  it('retries recording delivery state on a full disk: the message never looks finished, and is delivered once', async (t) => {
    const mnt = mkdtempSync(join(tmpdir(), 'petrel-tmpfs-'));
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mnt], { stdio: 'ignore' });
    } catch {
      rmSync(mnt, { recursive: true, force: true });
      if (REQUIRE_PEERS) throw new Error('cannot mount a tmpfs (needs root) for the full-disk test');
      t.skip('cannot mount a tmpfs here (needs root)');
      return;
    }
    const lines: Record<string, unknown>[] = [];
    const logger = pino(
      { level: 'info' },
      new Writable({
        write(chunk: Buffer, _enc, done) {
          for (const l of chunk.toString().split('\n'))
            if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
          done();
        },
      }),
    );
    const logged = (msg: string, id: string): boolean => lines.some((l) => l.msg === msg && l.queueId === id);
    // The transport waits for the test to let each attempt finish.
    let release = (): void => undefined;
    let gate = Promise.resolve();
    const close = (): void => {
      gate = new Promise((r) => (release = r));
    };
    const calls: Delivery[] = [];
    const slow = definePlugin({
      name: 'test-slow',
      setup: () => ({
        rcpt: async () => accept(),
        route: async () => routeTo('slow'),
        deliver: async ({ message, recipients }) => {
          calls.push({ id: message.id, rcpt: '', body: '', maybeDelivered: recipients[0]!.maybeDelivered });
          await gate;
          // A long (multi-line) reply makes the State record larger than a page, so that a full
          // filesystem refuses it whatever room is left in the segment's last page.
          const text = 'delivered '.repeat(600);
          return {
            kind: 'results',
            results: recipients.map((r) => ({
              recipient: r.address.address,
              status: 'delivered',
              reply: { code: 250, enhanced: '2.0.0', text },
            })),
          };
        },
      }),
    });
    const events: string[] = [];
    const filler = join(mnt, 'filler');
    const fill = (): void => {
      const fd = openSync(filler, 'w');
      for (const size of [1 << 16, 4096, 1]) {
        const chunk = Buffer.alloc(size);
        try {
          for (;;) writeSync(fd, chunk);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
        }
      }
      closeSync(fd);
    };
    const queueDir = join(mnt, 'spool', 'queue');
    let app: Petrel | null = null;
    try {
      mkdirSync(join(mnt, 'spool'));
      app = await start(mnt, [slow, notices(events)], { retry: '1h' }, logger);
      let queue = resolveToken(app.generation.container, Queue);

      // Delivered while the disk is full: the outcome cannot be recorded.
      close();
      const first = await send(app.port(), ['bob@h.test']);
      await until(() => calls.length === 1);
      fill();
      release();
      await until(() => logged('could not record delivery state; retrying', first));
      const stuck = (await queue.get(first))!;
      assert.equal(stuck.recipients[0]!.status, 'pending', 'not delivered until the disk says so');
      assert.equal(stuck.recipients[0]!.attempts, 0);
      assert.match(stuck.unrecorded ?? '', /^ENOSPC: /);
      const listed = describeMessage(JSON.parse(JSON.stringify(stuck)) as WireMessage, new Date());
      assert.match(listed, /not recorded: the attempt's outcome cannot be written \(ENOSPC: /);
      assert.match(listed, /pending, not tried yet/);
      assert.doesNotMatch(listed, /delivered/);
      assert.deepEqual(events, [], 'nobody is told before it is recorded');

      // Room again: the record is written on the next try, and nothing is delivered twice.
      rmSync(filler);
      await until(async () => (await queue.get(first)) === null, 10_000);
      assert.equal(calls.length, 1, 'delivered once');
      assert.deepEqual(events, ['delivered bob@h.test']);
      assert.ok(logged('delivery state recorded after earlier failures', first));
      assert.equal(
        lines.find((l) => l.msg === 'could not record delivery state; retrying')?.level,
        50,
        'at error level',
      );

      // Still full at shutdown: no clean-stop mark, so the next start treats it as after a crash.
      close();
      const second = await send(app.port(), ['carol@h.test']);
      await until(() => calls.length === 2);
      fill();
      release();
      await until(() => logged('could not record delivery state; retrying', second));
      await app.stop(1000);
      app = null;
      assert.ok(
        lines.some(
          (l) =>
            l.msg ===
            'queue closed with delivery outcomes not recorded; the next start treats them as after a crash',
        ),
      );
      assert.ok(!existsSync(join(queueDir, 'clean-shutdown')));
      rmSync(filler);
      app = await start(mnt, [slow, notices(events)], { retry: '1h' }, logger);
      queue = resolveToken(app.generation.container, Queue);
      assert.equal((await queue.get(second))?.recipients[0]?.status, 'pending');
      await queue.flush();
      await until(async () => (await queue.get(second)) === null, 10_000);
      assert.equal(calls.length, 3);
      assert.equal(calls[2]!.id, second);
      assert.equal(calls[2]!.maybeDelivered, true, 'the transport is told it may have delivered it already');
    } finally {
      release();
      await app?.stop(1000);
      execFileSync('umount', ['-l', mnt], { stdio: 'ignore' });
      rmSync(mnt, { recursive: true, force: true });
    }
  });
});

describe('the control socket', () => {
  it('stops reading a client that does not read its answers, and answers every request once it does', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const app = await start(dir, []);
    try {
      const socket = connect(join(dir, 'spool', 'queue', 'control.sock'));
      await once(socket, 'connect');
      socket.pause(); // read nothing for now
      const REQUESTS = 200_000;
      const line = `${JSON.stringify({ op: 'list' })}\n`;
      socket.write(line.repeat(REQUESTS));
      // Far more requests than the socket buffers hold: a server that keeps reading while its
      // answers pile up takes them all within a second or two (and its memory grows by the
      // answers); one that stops reading leaves them with the client.
      await new Promise((r) => setTimeout(r, 4000));
      assert.ok(socket.writableLength > 0, 'the server stopped taking requests while its answers waited');
      let received = '';
      socket.setEncoding('utf8');
      socket.on('data', (d: string) => (received += d));
      socket.resume();
      await until(() => received.split('\n').length > REQUESTS, 60_000);
      const answers = received.split('\n').filter(Boolean);
      assert.equal(answers.length, REQUESTS, 'one answer per request');
      assert.ok(answers.every((a) => (JSON.parse(a) as { ok: boolean; op: string }).op === 'list'));
      socket.destroy();
    } finally {
      await app.stop(1000);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the queue: recipients expand at acceptance', () => {
  interface Seen {
    rcpt: string;
    sender: string;
    orcpt?: string;
    notify?: string;
  }
  const expander = (fail = false) =>
    definePlugin({
      name: 'test-expand',
      setup: () => ({
        expand: async ({ recipient }) => {
          if (recipient.address.local !== 'list') return proceed();
          if (fail) throw new Error('directory unreachable');
          const x = (l: string) => address(`${l}@x.test`);
          return expandTo([
            { address: x('a') },
            { address: x('b'), sender: address('srs0=h=tt=crepes.test=alice@fwd.test') },
            { address: x('a') },
            { address: x('c'), sender: address('alice@crepes.test') },
          ]);
        },
      }),
    });
  const recorder = (into: Seen[]) =>
    definePlugin({
      name: 'test-recorder',
      setup: () => ({
        rcpt: async () => accept(),
        route: async () => routeTo('rec'),
        deliver: async ({ recipients, sender }) => {
          for (const r of recipients)
            into.push({
              rcpt: r.address.address,
              sender: sender?.address ?? '',
              ...(r.params.orcpt ? { orcpt: `${r.params.orcpt.type};${r.params.orcpt.address}` } : {}),
              ...(r.params.notify ? { notify: r.params.notify.join(',') } : {}),
            });
          // b waits: the queue then shows how it came to be there.
          return {
            kind: 'results',
            results: recipients.map((r) =>
              r.address.local === 'b'
                ? {
                    recipient: r.address.address,
                    status: 'deferred',
                    reply: { code: 451, enhanced: '4.4.1', text: 'later' },
                  }
                : {
                    recipient: r.address.address,
                    status: 'delivered',
                    reply: { code: 250, enhanced: '2.0.0', text: 'ok' },
                  },
            ),
          };
        },
      }),
    });

  it('stores each target as a recipient of its own, once, with ORCPT, NOTIFY and its own sender', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const seen: Seen[] = [];
    const app = await start(dir, [expander(), recorder(seen)]);
    try {
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      await c.cmd('RCPT TO:<list@crepes.test> NOTIFY=FAILURE', /^250 /);
      await c.cmd('RCPT TO:<a@x.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: x\r\n\r\nhi\r\n.\r\n');
      const id = /queued as (\S+)/.exec((await c.expect(/^250 2\.0\.0 /)).text)![1]!;
      c.close();
      await until(() => seen.length >= 3);
      await new Promise((r) => setTimeout(r, 100));
      const orcpt = 'rfc822;list@crepes.test';
      assert.deepEqual(
        seen.sort((p, q) => p.rcpt.localeCompare(q.rcpt)),
        [
          { rcpt: 'a@x.test', sender: 'alice@crepes.test', orcpt, notify: 'FAILURE' },
          { rcpt: 'b@x.test', sender: 'srs0=h=tt=crepes.test=alice@fwd.test', orcpt, notify: 'FAILURE' },
          { rcpt: 'c@x.test', sender: 'alice@crepes.test', orcpt, notify: 'FAILURE' },
        ],
        'a@x.test once (the alias and the direct recipient), b with its own sender, c with the message’s',
      );
      const waiting = (await resolveToken(app.generation.container, Queue).get(id))!;
      const listed = describeMessage(JSON.parse(JSON.stringify(waiting)) as WireMessage, new Date());
      assert.match(
        listed,
        /to: +b@x\.test \(for list@crepes\.test\)\n +sent as <srs0=h=tt=crepes\.test=alice@fwd\.test>/,
      );
      assert.match(listed, /to: +a@x\.test \(for list@crepes\.test\)\n +delivered/);
      assert.equal(listed.match(/to: +a@x\.test/g)?.length, 1, 'a@x.test is stored once');
    } finally {
      await app.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses the message for now (451 4.3.0) when an expand hook fails, and stores nothing', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-queue-'));
    const seen: Seen[] = [];
    const app = await start(dir, [expander(true), recorder(seen)]);
    try {
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
      await c.cmd('RCPT TO:<list@crepes.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: x\r\n\r\nhi\r\n.\r\n');
      await c.expect(/^451 4\.3\.0 /);
      c.close();
      assert.equal((await resolveToken(app.generation.container, Queue).list()).length, 0);
    } finally {
      await app.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
