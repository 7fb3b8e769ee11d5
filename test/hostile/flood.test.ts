/**
 * Clients that send a lot: pipelined floods of ordinary commands (RFC 2920 allows any number
 * before reading), and fuzzed command lines from a seeded generator. Every command gets exactly
 * one well-formed reply, in order, memory stays within budget, and a probe gets through meanwhile.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { SmtpClient, type Reply } from '../harness/smtp-client.js';
import {
  BOB,
  IDLE_SESSION_BUDGET,
  MARGIN,
  MiB,
  probe,
  RssWatch,
  seeded,
  startHostileServer,
  type HostileServer,
} from './server.js';

/** A reply as RFC 5321 §4.2 writes it: `ddd-text` lines, then one `ddd text` (or `ddd`) line, all CRLF. */
const WELL_FORMED = /^(?:(\d{3})-[^\r\n]*\r\n)*(\d{3})(?: [^\r\n]*)?\r\n$/;

function assertWellFormed(r: Reply, what: string): void {
  assert.match(r.raw, WELL_FORMED, `${what}: ${JSON.stringify(r.raw)}`);
  const codes = new Set(
    r.raw
      .split('\r\n')
      .filter(Boolean)
      .map((l) => l.slice(0, 3)),
  );
  assert.equal(codes.size, 1, `${what}: one code on every line: ${JSON.stringify(r.raw)}`);
  assert.ok(r.code >= 200 && r.code <= 599, `${what}: code ${r.code}`);
}

/** The commands of the flood and the reply each must get. */
const FLOOD: readonly [string, RegExp][] = [
  ['NOOP', /^250 2\.0\.0 OK$/],
  ['EHLO flood.test', /^250 CHUNKING$/], // the last line of the EHLO reply
  ['MAIL FROM:<flood@remote.test>', /^250 2\.1\.0 /],
  [`RCPT TO:<${BOB}>`, /^250 2\.1\.5 /],
  ['RCPT TO:<nobody@hostile.test>', /^550 5\.1\.1 /],
  ['RSET', /^250 2\.0\.0 OK$/],
  ['VRFY bob', /^252 2\.5\.0 /],
  ['HELP', /^214 2\.0\.0 End of HELP info$/],
];

/**
 * Sends `rounds` rounds of FLOOD, pipelined in large writes (respecting its own socket's
 * back-pressure), then QUIT, while reading; returns the final line of every reply, in order.
 */
async function flood(port: number, rounds: number): Promise<string[]> {
  const socket = connect({ port, host: '127.0.0.1' });
  let received = '';
  const closed = new Promise<void>((resolve, reject) => {
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.once('close', () => resolve());
    socket.once('error', reject);
  });
  await new Promise<void>((resolve) => socket.once('data', () => resolve()));
  const round = `${FLOOD.map(([c]) => c).join('\r\n')}\r\n`;
  const batch = round.repeat(100);
  for (let i = 0; i < rounds; i += 100) {
    if (!socket.write(batch)) await new Promise((r) => socket.once('drain', r));
  }
  socket.write('QUIT\r\n');
  await closed;
  return received
    .split('\r\n')
    .filter((l) => /^\d{3}(?: |$)/.test(l))
    .slice(1); // the greeting
}

describe('floods and fuzz', () => {
  let srv: HostileServer;
  before(async () => {
    srv = await startHostileServer();
  });
  after(() => srv.stop());

  it('answers every command of pipelined floods, in order, within the memory budget, while serving others', async (t) => {
    await probe(srv.port, 'warm-up');
    const baseline = srv.rssKiB() * 1024;
    const watch = new RssWatch(() => srv.rssKiB() * 1024);
    const ROUNDS = 3000;
    const floods = [flood(srv.port, ROUNDS), flood(srv.port, ROUNDS), flood(srv.port, ROUNDS)];
    await probe(srv.port, 'during the floods');
    const results = await Promise.all(floods);
    const peak = watch.stop();
    for (const replies of results) {
      assert.equal(replies.length, ROUNDS * FLOOD.length + 1, 'one reply per command, and the QUIT');
      for (let i = 0; i < ROUNDS * FLOOD.length; i++) {
        const [command, expected] = FLOOD[i % FLOOD.length]!;
        assert.match(replies[i]!, expected, `reply ${i} (to ${command})`);
      }
      assert.match(replies.at(-1)!, /^221 /);
    }
    t.diagnostic(`RSS +${((peak - baseline) / MiB).toFixed(1)} MiB at most`);
    const budget = floods.length * IDLE_SESSION_BUDGET + MARGIN;
    assert.ok(peak - baseline < budget, `RSS grew by ${((peak - baseline) / MiB).toFixed(1)} MiB`);
  });

  it('gives a well-formed reply to each of thousands of fuzzed command lines, while serving others', async (t) => {
    const SEED = Number(process.env.PETREL_FUZZ_SEED ?? 0x5eed);
    const LINES = 3000;
    t.diagnostic(`seed ${SEED} (PETREL_FUZZ_SEED repeats a run)`);
    const random = seeded(SEED);
    const fuzz = new CommandFuzzer(random);
    let c: SmtpClient | null = null;
    let connections = 0;
    let probed: Promise<string> | null = null;
    const codes = new Map<number, number>();
    for (let i = 0; i < LINES; i++) {
      if (i === LINES / 2) probed = probe(srv.port, 'during the fuzz');
      if (!c) {
        c = await SmtpClient.connect(srv.port);
        connections++;
        fuzz.restart();
        assertWellFormed(await c.reply(), 'greeting');
      }
      const { line, after } = fuzz.next();
      const what = `line ${i} of seed ${SEED}: ${JSON.stringify(line.toString('latin1').slice(0, 120))}`;
      c.write(Buffer.concat([line, after]));
      let r = await c.reply();
      assertWellFormed(r, what);
      // DATA accepted: a body (never holding the end of data before its own), then the end.
      if (r.code === 354) {
        codes.set(354, (codes.get(354) ?? 0) + 1);
        c.write(Buffer.concat([fuzz.body(), Buffer.from('\r\n.\r\n')]));
        r = await c.reply();
        assertWellFormed(r, `${what}, end of data`);
      }
      codes.set(r.code, (codes.get(r.code) ?? 0) + 1);
      if (closes(r)) {
        await c.closed();
        c = null;
      }
    }
    c?.close();
    await probed;
    const seen = [...codes].sort(([a], [b]) => a - b).map(([code, n]) => `${code}×${n}`);
    t.diagnostic(`${LINES} lines over ${connections} connections; last replies: ${seen.join(' ')}`);
  });
});

/** Replies after which the server closes the connection. */
function closes(r: Reply): boolean {
  return (
    r.code === 221 ||
    r.code === 421 ||
    (r.code === 554 && /This is an SMTP server/.test(r.raw)) ||
    (r.code === 501 && /BDAT size/.test(r.raw))
  );
}

const VERBS = [
  'HELO',
  'EHLO',
  'MAIL',
  'RCPT',
  'DATA',
  'BDAT',
  'RSET',
  'NOOP',
  'QUIT',
  'VRFY',
  'EXPN',
  'HELP',
  'AUTH',
  'STARTTLS',
  'TURN',
  'GET',
  'XCLIENT',
];
/** Commands as a client sends them, to start from: a fuzzer that gets nowhere tests nothing. */
const TEMPLATES = [
  'EHLO fuzz.test',
  'HELO fuzz.test',
  'MAIL FROM:<fuzz@remote.test>',
  'MAIL FROM:<> BODY=8BITMIME',
  'MAIL FROM:<fuzz@remote.test> SIZE=100 SMTPUTF8',
  `RCPT TO:<${BOB}>`,
  `RCPT TO:<${BOB}> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;${BOB}`,
  'RCPT TO:<postmaster>',
  'RCPT TO:<Postmaster@hostile.test>',
  'DATA',
  'BDAT 10',
  'BDAT 20 LAST',
  'BDAT 0 LAST',
  'RSET',
  'NOOP',
  'VRFY bob',
  'HELP',
  'AUTH PLAIN',
  'STARTTLS',
  'QUIT',
];
const PRINTABLE =
  ' !"#$%&\'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~';
/** The server's own test for a BDAT line it will take octets after (session.ts). */
const BDAT_ARGS = /^(\d{1,15})(?: +(LAST))?\s*$/i;

/** Command lines, mostly almost right, from a seeded generator. */
class CommandFuzzer {
  constructor(private readonly random: () => number) {}

  private int(n: number): number {
    return Math.floor(this.random() * n);
  }

  private pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }

  /** Random octets, biased to the ones that matter: NUL, CR, 8-bit, `<>:@"`, spaces. */
  private junk(max: number): string {
    let s = '';
    const n = this.int(max);
    for (let i = 0; i < n; i++) {
      const k = this.random();
      if (k < 0.03) s += '\0';
      else if (k < 0.06) s += '\r';
      else if (k < 0.12) s += String.fromCharCode(0x80 + this.int(128));
      else if (k < 0.3) s += this.pick(['<', '>', ':', '@', '"', ' ', '\t', '=', '.']);
      else s += PRINTABLE[this.int(PRINTABLE.length)];
    }
    return s;
  }

  private path(): string {
    const local =
      this.random() < 0.5 ? this.pick(['bob', 'postmaster', 'Postmaster', '"a b"', '']) : this.junk(20);
    const domain =
      this.random() < 0.5 ? this.pick(['hostile.test', 'remote.test', '[127.0.0.1]', '']) : this.junk(20);
    const at = this.random() < 0.9 ? '@' : '';
    const open = this.random() < 0.9 ? '<' : '';
    const close = this.random() < 0.9 ? '>' : '';
    const params =
      this.random() < 0.3
        ? ` ${this.pick(['SIZE=', 'BODY=', 'NOTIFY=', 'ORCPT=', 'RET=', 'X='])}${this.junk(12)}`
        : '';
    return `${open}${local}${at}${domain}${close}${params}`;
  }

  private args(verb: string): string {
    switch (verb) {
      case 'MAIL':
        return `${this.pick(['FROM:', 'from:', 'FROM: ', 'TO:'])}${this.path()}`;
      case 'RCPT':
        return `${this.pick(['TO:', 'to:', 'TO: ', 'FROM:'])}${this.path()}`;
      case 'BDAT':
        return this.random() < 0.7 ? `${this.int(300)}${this.random() < 0.4 ? ' LAST' : ''}` : this.junk(10);
      case 'GET':
        return this.random() < 0.5 ? '/ HTTP/1.1' : this.junk(20);
      default:
        return this.random() < 0.4 ? '' : this.junk(40);
    }
  }

  /** The next line, with its line end, and any octets that belong after it (a BDAT chunk). */
  next(): { line: Buffer; after: Buffer } {
    const k = this.random();
    let text =
      k < 0.4
        ? this.scripted()
        : k < 0.6
          ? this.pick(TEMPLATES)
          : k < 0.8
            ? this.mutate(this.pick(TEMPLATES))
            : this.invent();
    if (this.random() < 0.02) text += this.junk(3000); // often overlong
    const end = this.random() < 0.9 ? '\r\n' : '\n';
    const line = Buffer.from(text.replaceAll('\n', '') + end, 'latin1');
    const chunk = bdatChunkSize(line);
    return { line, after: chunk === null ? Buffer.alloc(0) : this.octets(chunk) };
  }

  private step = 0;

  /** A new connection: the script starts again from EHLO. */
  restart(): void {
    this.step = 0;
  }

  /** The next step of an ordinary transaction, so that the content paths are reached too. */
  private scripted(): string {
    const steps = ['EHLO fuzz.test', 'MAIL FROM:<fuzz@remote.test>', `RCPT TO:<${BOB}>`];
    const text =
      this.step < steps.length ? steps[this.step]! : this.pick(['DATA', 'BDAT 30', 'BDAT 40 LAST']);
    this.step = (this.step + 1) % (steps.length + 2);
    return text;
  }

  /** A template with a few octets replaced, inserted or removed. */
  private mutate(text: string): string {
    let s = text;
    for (let n = 1 + this.int(3); n > 0; n--) {
      const at = this.int(s.length + 1);
      const op = this.int(3);
      const junk = this.junk(2 + this.int(4));
      s = s.slice(0, at) + (op === 2 ? '' : junk) + s.slice(op === 0 ? at : at + 1);
    }
    return s;
  }

  /** A verb (or not) in random case, with arguments made for it. */
  private invent(): string {
    const verb = this.random() < 0.85 ? this.pick(VERBS) : this.junk(12);
    const cased = [...verb].map((ch) => (this.random() < 0.2 ? ch.toLowerCase() : ch)).join('');
    const args = this.args(verb);
    return args || this.random() < 0.5 ? `${cased} ${args}` : cased;
  }

  private octets(n: number): Buffer {
    return Buffer.from(Array.from({ length: n }, () => this.int(256)));
  }

  /** A DATA body whose first end of data is the `CRLF . CRLF` the caller adds after it. */
  body(): Buffer {
    for (;;) {
      const lines = Array.from({ length: this.int(8) }, () => this.junk(80));
      const text = lines.join(this.pick(['\r\n', '\n', '\r\n']));
      const sent = `${text}\r\n.\r\n`;
      if (!sent.startsWith('.\r\n') && sent.indexOf('\r\n.\r\n') === text.length) {
        return Buffer.from(text, 'latin1');
      }
    }
  }
}

/**
 * The chunk size when the server will read a BDAT chunk after this line, as session.ts decides
 * it: a line within `limits.maxLineLength` (2048, LF included), in ASCII without NUL, whose
 * verb is BDAT and whose arguments are a size and perhaps LAST. Else null.
 */
function bdatChunkSize(line: Buffer): number | null {
  if (line.length > 2048) return null;
  let text = line.toString('latin1').replace(/\n$/, '');
  if (text.endsWith('\r')) text = text.slice(0, -1);
  if (/[\0\x80-\xff]/.test(text)) return null;
  const sp = text.indexOf(' ');
  if (sp < 0 || text.slice(0, sp).toUpperCase() !== 'BDAT') return null;
  const m = BDAT_ARGS.exec(text.slice(sp + 1));
  return m ? Number(m[1]) : null;
}
