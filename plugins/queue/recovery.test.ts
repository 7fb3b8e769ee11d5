import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import { accept, definePlugin, routeTo, type PetrelConfigInput } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import { address } from '../../core/testing/index.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { petrel } from '../../test/e2e/cli.js';
import { describeRun } from '../../test/e2e/run.js';
import { Queue } from './api.js';
import { QueueEngine } from './engine.js';
import { Journal, segmentName, type DamageReport } from './journal.js';
import { RecordType } from './records.js';
import { QueueStore } from './store.js';
import type { VerifyResult } from './verify.js';

type LogLine = Record<string, unknown> & { level: number; msg: string };

/** A pino logger whose lines are kept, parsed, for the test to read. */
function capture(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as LogLine);
      done();
    },
  });
  return { logger: pino({ level: 'info' }, sink), lines };
}

interface Delivered {
  id: string;
  maybeDelivered: boolean;
}

/** A transport that defers everything while `open()` is false, and records what it delivers. */
function gateTransport(open: () => boolean, delivered: Delivered[]) {
  return definePlugin({
    name: 'test-gate',
    setup: () => ({
      rcpt: async () => accept(),
      route: async () => routeTo('gate'),
      deliver: async ({ message, recipients }) => ({
        kind: 'results',
        results: recipients.map((r) => {
          if (open()) delivered.push({ id: message.id, maybeDelivered: r.maybeDelivered });
          return open()
            ? {
                recipient: r.address.address,
                status: 'delivered',
                reply: { code: 250, enhanced: '2.0.0', text: 'ok' },
              }
            : {
                recipient: r.address.address,
                status: 'deferred',
                reply: { code: 451, enhanced: '4.2.0', text: 'busy' },
              };
        }),
      }),
    }),
  });
}

async function start(
  dir: string,
  plugin: ReturnType<typeof definePlugin>,
  logger: pino.Logger,
): Promise<Petrel> {
  const config: PetrelConfigInput = {
    hostname: 'mx.test',
    listeners: [{ kind: 'smtp', port: 0 }],
    spool: { dir: join(dir, 'spool') },
    plugins: [plugin.name, { name: 'queue', config: { retry: '1h...' } }],
  };
  return Petrel.start({ config, plugins: [plugin], logger });
}

async function send(port: number, n: number): Promise<string> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
  await c.cmd(`RCPT TO:<r${n}@h.test>`, /^250 /);
  await c.cmd('DATA', /^354 /);
  // "PTRL" is the journal's record magic: a message may contain it, and recovery must not take it
  // for a record.
  c.write(
    `Subject: message ${n}\r\n\r\nbody of message ${n}, PTRL PTRL\r\n${'filler line\r\n'.repeat(20)}.\r\n`,
  );
  const reply = await c.expect(/^250 2\.0\.0 Ok: queued as /);
  await c.cmd('QUIT', /^221 /);
  return /queued as (\S+)/.exec(reply.text)![1]!;
}

async function until(check: () => boolean | Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A record as laid out in an undamaged segment: read here independently of the code under test. */
interface Layout {
  type: number;
  start: number;
  end: number;
  /** The queue id of a Message record. */
  id?: string;
}

function layout(data: Buffer): Layout[] {
  const out: Layout[] = [];
  for (let pos = 0; pos < data.length;) {
    assert.equal(data.toString('latin1', pos, pos + 4), 'PTRL', `a record at ${pos}`);
    const type = data[pos + 4]!;
    const end = pos + 16 + data.readUInt32BE(pos + 8);
    const rec: Layout = { type, start: pos, end };
    if (type === RecordType.Message) {
      const envLen = data.readUInt32BE(pos + 16);
      rec.id = (JSON.parse(data.toString('utf8', pos + 20, pos + 20 + envLen)) as { id: string }).id;
    }
    out.push(rec);
    pos = end;
  }
  return out;
}

/**
 * A queue of `count` deferred messages, each with its Message record and a State record in one
 * segment; the server stopped cleanly. Returns the ids in order and the segment's path.
 */
async function queueOf(
  dir: string,
  count: number,
): Promise<{ ids: string[]; segment: string; queueDir: string }> {
  const app = await start(
    dir,
    gateTransport(() => false, []),
    pino({ level: 'silent' }),
  );
  const ids: string[] = [];
  try {
    for (let i = 0; i < count; i++) ids.push(await send(app.port(), i));
    const queue = resolveToken(app.generation.container, Queue);
    await until(
      async () =>
        (await Promise.all(ids.map((id) => queue.get(id)))).every((m) => m?.recipients[0]?.attempts === 1),
      'every first attempt',
    );
  } finally {
    await app.stop(1000);
  }
  const queueDir = join(dir, 'spool', 'queue');
  return { ids, segment: join(queueDir, 'journal', segmentName(1)), queueDir };
}

/**
 * Restarts over the journal as it is, with the transport delivering, makes every message due,
 * and waits until the queue is empty. Returns the log and what was delivered.
 */
async function recover(
  dir: string,
  before?: () => void,
): Promise<{ lines: LogLine[]; delivered: Delivered[] }> {
  const { logger, lines } = capture();
  const delivered: Delivered[] = [];
  const app = await start(
    dir,
    gateTransport(() => true, delivered),
    logger,
  );
  try {
    before?.();
    const engine = QueueEngine.get(join(dir, 'spool', 'queue'))!;
    await engine.flush();
    await until(async () => (await engine.list()).length === 0, 'the queue emptied');
  } finally {
    await app.stop(1000);
  }
  return { lines, delivered };
}

const damageLines = (lines: LogLine[]): LogLine[] => lines.filter((l) => l.kind === 'damage');

/**
 * Damages a segment of 40 messages, restarts over it, and checks that every message whose Message
 * record is untouched is delivered exactly once, that the damage is reported at error level with
 * a quarantine copy of exactly the damaged bytes, and that the segment is still whole.
 */
async function damageAndRecover(
  damage: (data: Buffer, records: Layout[]) => { data: Buffer; hit: [number, number] },
  beforeRestart?: (queueDir: string, original: Buffer, lost: string[]) => Promise<void>,
): Promise<{ lost: string[]; reports: LogLine[]; ids: string[]; dir: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-recovery-'));
  const { ids, segment, queueDir } = await queueOf(dir, 40);
  const original = readFileSync(segment);
  const records = layout(original);
  assert.equal(records.filter((r) => r.type === RecordType.Message).length, 40, 'one segment holds all 40');
  const { data, hit } = damage(Buffer.from(original), records);
  // Lost: the messages whose Message record overlaps the damaged bytes (in the original layout).
  const lost = records
    .filter((r) => r.type === RecordType.Message && r.start < hit[1] && r.end > hit[0])
    .map((r) => r.id!);
  assert.ok(lost.length >= 1 && lost.length < 10, `the damage hits a few messages (${lost.length})`);
  await beforeRestart?.(queueDir, original, lost);
  writeFileSync(segment, data);

  let sizeAtStart = -1;
  const { lines, delivered } = await recover(dir, () => {
    sizeAtStart = statSync(segment).size;
  });
  assert.equal(sizeAtStart, data.length, 'the damaged segment was not truncated');
  const expected = ids.filter((id) => !lost.includes(id));
  assert.deepEqual(
    delivered.map((d) => d.id).sort(),
    [...expected].sort(),
    `every intact message delivered once (${expected.length} of 40)`,
  );
  assert.ok(
    delivered.every((d) => d.maybeDelivered),
    'after damage, as after a crash, a transport is told a delivery may have happened',
  );
  const reports = damageLines(lines);
  assert.ok(reports.length >= 1, 'the damage is reported');
  for (const r of reports) {
    assert.equal(r.level, 50, 'at error level');
    assert.match(r.msg, /^queue journal damaged: the damaged bytes are set aside in quarantine/);
    assert.equal(r.segment, segment);
    const copy = readFileSync(r.quarantine as string);
    assert.ok(
      copy.equals(data.subarray(r.start as number, r.end as number)),
      'the quarantine holds the damaged bytes',
    );
    const meta = JSON.parse(
      readFileSync((r.quarantine as string).replace(/\.bin$/, '.json'), 'utf8'),
    ) as Record<string, unknown>;
    assert.equal(meta.source, segment);
    assert.equal(meta.start, r.start);
  }
  assert.ok(!lines.some((l) => l.kind === 'torn-tail'), 'damage after a clean stop is not a torn tail');
  return { lost, reports, ids, dir };
}

describe('recovery from a damaged journal', () => {
  it('a flipped bit costs the one record it is in', async () => {
    const { lost, reports, dir } = await damageAndRecover(
      (data, records) => {
        const victim = records.filter((r) => r.type === RecordType.Message)[10]!;
        const at = victim.end - 40; // in the body, after the envelope
        data[at] = data[at]! ^ 0x04;
        return { data, hit: [at, at + 1] };
      },
      async (queueDir) => {
        // Before the damage, for contrast: the journal as the server left it verifies.
        const r = await petrel(['queue', 'verify', '--dir', queueDir], queueDir);
        assert.equal(r.code, 0, describeRun(r));
        assert.match(
          r.stdout,
          /^ {2}00000001\.seg {2}80 records: 40 messages, 40 state, 0 hold; no damage$/m,
        );
        assert.match(r.stdout, /^No damage\.$/m);
      },
    );
    try {
      assert.equal(lost.length, 1);
      assert.equal(reports.length, 1);
      assert.deepEqual(reports[0]!.lostMessages, lost, 'the lost message is named');
      assert.equal(reports[0]!.reason, 'checksum mismatch');
      assert.equal(reports[0]!.recordHeaders, 1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a zeroed 4 KiB page costs only the records it touches', async () => {
    const { lost, reports, dir } = await damageAndRecover((data) => {
      data.fill(0, 3 * 4096, 4 * 4096);
      return { data, hit: [3 * 4096, 4 * 4096] };
    });
    try {
      assert.equal(reports.length, 1);
      const r = reports[0]!;
      assert.ok(
        (r.start as number) <= 3 * 4096 && (r.end as number) >= 4 * 4096,
        'the range covers the page',
      );
      for (const id of r.lostMessages as string[]) assert.ok(lost.includes(id), `${id} was in the page`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a bad length field does not make recovery skip the intact records after it', async () => {
    const { lost, reports, dir } = await damageAndRecover((data, records) => {
      const victim = records.filter((r) => r.type === RecordType.Message)[10]!;
      // Pointing 3000 bytes further, into the middle of later records that are intact.
      data.writeUInt32BE(data.readUInt32BE(victim.start + 8) + 3000, victim.start + 8);
      return { data, hit: [victim.start + 8, victim.start + 12] };
    });
    try {
      assert.equal(lost.length, 1);
      assert.equal(reports.length, 1);
      assert.deepEqual(reports[0]!.lostMessages, lost);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a cut in the middle costs the records it cuts through, and none after', async () => {
    const { lost, reports, dir } = await damageAndRecover((data, records) => {
      const messages = records.filter((r) => r.type === RecordType.Message);
      const from = messages[10]!.end - 100;
      const to = messages[12]!.start + 100;
      return { data: Buffer.concat([data.subarray(0, from), data.subarray(to)]), hit: [from, to] };
    });
    try {
      assert.ok(lost.length >= 3, `the records cut through are lost (${lost.length})`);
      assert.equal(reports.length, 1);
      assert.ok(
        (reports[0]!.lostMessages as string[]).includes(lost[0]!),
        'the message with a legible envelope is named',
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('petrel queue verify', () => {
  it('reads every part of a queue without a server: a summary line per segment, exit 65 on damage, --json', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-verify-'));
    try {
      const { segment, queueDir } = await queueOf(dir, 30);
      const original = readFileSync(segment);
      const messages = layout(original).filter((r) => r.type === RecordType.Message);
      const victim = messages[7]!;
      const damaged = Buffer.from(original);
      damaged.fill(0, victim.start + 100, victim.start + 200);
      writeFileSync(segment, damaged);
      // A second part (a queue split between workers), intact, and stopped cleanly too.
      cpSync(join(queueDir, 'journal'), join(queueDir, 'part-2', 'journal'), { recursive: true });
      writeFileSync(join(queueDir, 'part-2', 'journal', segmentName(1)), original);
      writeFileSync(join(queueDir, 'part-2', 'clean-shutdown'), '');

      const r = await petrel(['queue', 'verify', '--dir', queueDir], dir);
      assert.equal(r.code, 65, describeRun(r));
      const lines = r.stdout.trimEnd().split('\n');
      assert.deepEqual(lines, [
        `${join(queueDir, 'journal')}: 1 segment, stopped cleanly`,
        '  00000001.seg  59 records: 29 messages, 30 state, 0 hold; 1 damaged range',
        `    damaged bytes ${victim.start}-${victim.end} (${victim.end - victim.start} bytes): checksum mismatch; lost messages named: ${victim.id}; not set aside yet (the next start does it)`,
        `${join(queueDir, 'part-2', 'journal')}: 1 segment, stopped cleanly`,
        '  00000001.seg  60 records: 30 messages, 30 state, 0 hold; no damage',
        'Damaged: 1 range. A message is named where its envelope is legible in the damaged bytes; others there are lost unnamed.',
        'See "After a journal damage report" in docs/operations.md.',
      ]);

      const j = await petrel(['queue', 'verify', '--dir', queueDir, '--json'], dir);
      assert.equal(j.code, 65, describeRun(j));
      const found = JSON.parse(j.stdout) as VerifyResult;
      assert.equal(found.damaged, 1);
      assert.deepEqual(
        found.parts.map((p) => p.dir),
        [queueDir, join(queueDir, 'part-2')],
      );
      assert.deepEqual(found.parts[0]!.segments[0]!.ranges[0]!.lostMessages, [victim.id]);

      const none = await petrel(['queue', 'verify', '--dir', join(dir, 'nothing')], dir);
      assert.equal(none.code, 66, describeRun(none));
      assert.match(none.stderr, /no queue journal in /);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('a torn tail', () => {
  /** A record header promising 1000 bytes, followed by 50: a write cut short. */
  const torn = Buffer.concat([
    Buffer.from([0x50, 0x54, 0x52, 0x4c, RecordType.Message, 0, 0, 0, 0, 0, 0x03, 0xe8, 0, 0, 0, 0]),
    Buffer.alloc(50, 0x61),
  ]);

  it('is cut off after an unclean stop, at warn level, and everything before it is delivered', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-torn-'));
    try {
      const { ids, segment, queueDir } = await queueOf(dir, 5);
      const good = statSync(segment).size;
      rmSync(join(queueDir, 'clean-shutdown')); // as after kill -9 in the middle of a write
      writeFileSync(segment, torn, { flag: 'a' });
      const { lines, delivered } = await recover(dir);
      assert.deepEqual(delivered.map((d) => d.id).sort(), [...ids].sort());
      assert.ok(
        delivered.every((d) => d.maybeDelivered),
        'after a crash a delivery may have happened',
      );
      const cut = lines.filter((l) => l.kind === 'torn-tail');
      assert.equal(cut.length, 1);
      assert.equal(cut[0]!.level, 40);
      assert.match(cut[0]!.msg, /cut off a torn write at the end of the newest segment/);
      assert.deepEqual([cut[0]!.start, cut[0]!.bytes], [good, torn.length]);
      assert.deepEqual(damageLines(lines), []);
      assert.ok(!existsSync(join(queueDir, 'quarantine')), 'nothing to set aside');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('is damage after a clean stop: set aside in quarantine at error level, the file left whole', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-torn-'));
    try {
      const { ids, segment } = await queueOf(dir, 5);
      const good = statSync(segment).size;
      writeFileSync(segment, torn, { flag: 'a' });
      let size = -1;
      const { lines, delivered } = await recover(dir, () => {
        size = statSync(segment).size;
      });
      assert.equal(size, good + torn.length, 'not truncated');
      assert.deepEqual(delivered.map((d) => d.id).sort(), [...ids].sort());
      assert.ok(!lines.some((l) => l.kind === 'torn-tail'));
      const [report, ...more] = damageLines(lines);
      assert.deepEqual(more, []);
      assert.equal(report!.level, 50);
      assert.equal(report!.cleanStop, true);
      assert.deepEqual([report!.start, report!.end], [good, good + torn.length]);
      assert.ok(readFileSync(report!.quarantine as string).equals(torn));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('journal recovery rules', () => {
  it('damage at the end of an older segment is damage even after an unclean stop: set aside, not cut', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    try {
      const open = (cleanStop: boolean, onDamage: (d: DamageReport) => void = () => undefined) =>
        Journal.open(join(dir, 'journal'), {
          segmentSize: 65_536,
          cleanStop,
          quarantineDir: join(dir, 'quarantine'),
          onRecord: () => undefined,
          onDamage,
        });
      const j = await open(true);
      // Two segments: the first fills up, the second is the newest.
      for (let i = 0; i < 3; i++) await j.append(1, [Buffer.alloc(30_000, 0x61 + i)]);
      await j.close();
      const older = join(dir, 'journal', segmentName(1));
      writeFileSync(older, Buffer.from('PTRL\u0001\u0000\u0000\u0000garbage'), { flag: 'a' });
      const size = statSync(older).size;
      const seen: DamageReport[] = [];
      await (await open(false, (d) => seen.push(d))).close();
      assert.equal(seen.length, 1);
      assert.equal(seen[0]!.action, 'quarantined');
      assert.equal(seen[0]!.tornTail, false);
      assert.equal(statSync(older).size, size, 'not cut');
      assert.equal(
        readFileSync(seen[0]!.quarantine!).toString('latin1'),
        'PTRL\u0001\u0000\u0000\u0000garbage',
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a record whose checksum verifies but whose envelope does not read is set aside; recovery goes on', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    const errors: Record<string, unknown>[] = [];
    const log = {
      warn: () => undefined,
      error: (o: object) => void errors.push(o as Record<string, unknown>),
    };
    try {
      const env = (id: string) => ({
        id,
        sender: null,
        mailParams: { smtputf8: false },
        recipients: [{ address: address('a@b.test'), params: {} }],
        receivedAt: Date.now(),
        size: 5,
      });
      let store = new QueueStore(dir, 65_536, log);
      await store.open();
      await store.indexed;
      await store.add(env('before'), { inline: [Buffer.from('hello')] });
      // An envelope length far past the record, with a checksum that verifies: a bug's record.
      const bad = Buffer.alloc(4);
      bad.writeUInt32BE(1_000_000);
      const journal = (store as unknown as { journal: Journal }).journal;
      await journal.append(RecordType.Message, [bad, Buffer.from('{"id":"x"}')]);
      await journal.append(RecordType.State, [Buffer.from('not json')]);
      await store.add(env('after'), { inline: [Buffer.from('hello')] });
      await store.close();
      store = new QueueStore(dir, 65_536, log);
      await store.open();
      await store.indexed;
      assert.deepEqual([...store.entries.keys()], ['before', 'after']);
      assert.deepEqual(
        errors.map((e) => e.reason),
        ['envelope length 1000000 runs past the record', 'state record is not { id, u }'],
      );
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  /** A store over `dir` whose log lines are kept. */
  function storeIn(dir: string, errors: Record<string, unknown>[]): QueueStore {
    const keep = (o: object, msg: string): void => void errors.push({ ...o, msg });
    return new QueueStore(dir, 65_536, { warn: () => undefined, error: keep });
  }
  const envelope = (id: string, blob?: { headers: string }) => ({
    id,
    sender: null,
    mailParams: { smtputf8: false },
    recipients: [{ address: address('a@b.test'), params: {} }],
    receivedAt: Date.now(),
    size: 5,
    ...(blob ? { blob } : {}),
  });

  it('keeps a damaged segment whole while its quarantine copy cannot be made, even once its messages are done', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    const errors: Record<string, unknown>[] = [];
    try {
      let store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      for (const id of ['one', 'two', 'three'])
        await store.add(envelope(id), { inline: [Buffer.from('hello')] });
      await store.close();
      const seg = join(dir, 'journal', segmentName(1));
      const data = readFileSync(seg);
      const at = data.indexOf('"two"') + 2;
      data[at] = data[at]! ^ 1;
      writeFileSync(seg, data);
      writeFileSync(join(dir, 'quarantine'), 'a file where the folder should be');

      store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      const [report] = errors.filter((e) => e.kind === 'damage');
      assert.match(String(report?.msg), /the quarantine copy failed: the segment is kept whole/);
      assert.deepEqual([...store.entries.keys()], ['one', 'three']);
      for (const entry of [...store.entries.values()]) {
        const done = new Map([[0, { ...entry.rcpts[0]!, status: 'delivered' as const }]]);
        if (await store.update(entry, done)) await store.discard(entry);
      }
      await store.compact();
      assert.ok(existsSync(seg), 'nothing refers to it any more, and it is still there');
      await store.close();

      rmSync(join(dir, 'quarantine'));
      store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      const copy = readdirSync(join(dir, 'quarantine')).filter((f) => f.endsWith('.bin'));
      assert.equal(copy.length, 1, 'the next start makes the copy');
      assert.ok(!existsSync(seg), 'and only then lets the segment go');
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('sets aside the body file of a large message whose record is damaged instead of removing it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-journal-'));
    const errors: Record<string, unknown>[] = [];
    try {
      let store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      const body = join(dir, 'incoming.eml');
      writeFileSync(body, 'a large body\r\n');
      await store.add(envelope('big', { headers: 'Received: x\r\n' }), { file: body });
      await store.add(envelope('small'), { inline: [Buffer.from('hello')] });
      await store.close();
      const seg = join(dir, 'journal', segmentName(1));
      const data = readFileSync(seg);
      data.fill(0, 0, 12); // the big message's record header
      writeFileSync(seg, data);
      // First the body cannot be moved (a folder is in the way): it stays, and so does the segment.
      mkdirSync(join(dir, 'quarantine', 'blob-big.eml'), { recursive: true });

      store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      assert.deepEqual([...store.entries.keys()], ['small']);
      assert.match(String(errors.find((e) => e.queueId === 'big')?.msg), /could not be set aside; it stays/);
      assert.ok(existsSync(join(dir, 'blobs', 'big.eml')));
      const small = store.entries.get('small')!;
      const done = new Map([[0, { ...small.rcpts[0]!, status: 'delivered' as const }]]);
      if (await store.update(small, done)) await store.discard(small);
      await store.compact();
      assert.ok(existsSync(seg), 'the damaged segment stays, so that the next start finds the damage again');
      await store.close();

      rmSync(join(dir, 'quarantine', 'blob-big.eml'), { recursive: true });
      errors.length = 0;
      store = storeIn(dir, errors);
      await store.open();
      await store.indexed;
      const kept = errors.find((e) => e.queueId === 'big');
      assert.match(String(kept?.msg), /body of a large message with no readable record is set aside/);
      assert.equal(readFileSync(kept!.quarantine as string, 'utf8'), 'a large body\r\n');
      assert.ok(!existsSync(join(dir, 'blobs', 'big.eml')));
      assert.equal(errors.find((e) => e.kind === 'damage')?.alreadyQuarantined, true);
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
