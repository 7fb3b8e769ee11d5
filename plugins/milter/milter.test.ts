/**
 * milter over the wire: a Petrel with the plugin, real milters (a pymilter program, OpenDKIM in
 * sign mode) on 127.0.0.1, and a queue that keeps accepted messages in memory with their hold
 * reasons. Each test asserts the SMTP reply and what reached the queue.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { accept, definePlugin, type PluginDefinition } from '../../core/index.js';
import { acceptAllRecipients, startServer, type TestServer } from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { freePort, startOpendkimSigner, startPymilter, type MilterPeer } from '../../test/harness/milter.js';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { dkimpyVerify, requireDkimpy } from '../../test/harness/dkimpy.js';
import { HoldOnAccept } from '../queue/api.js';
import queue from '../queue/index.js';
import outbound from '../outbound/index.js';
import { freePortOn, smtpPeer } from '../outbound/test-support.js';
import milter, { milterConfig } from './index.js';

/** The test milter: what it does is chosen by the recipient (at RCPT) and the Subject (at end of message). */
const TEST_MILTER = String.raw`
import sys, Milter

class TestMilter(Milter.Base):
    def envfrom(self, mailfrom, *params):
        self.subject = ''; self.nbody = 0
        return Milter.CONTINUE
    def envrcpt(self, to, *params):
        to = to.strip('<>').lower()
        if to.startswith('reject@'):
            self.setreply('550', '5.7.1', 'recipient rejected by test milter'); return Milter.REJECT
        if to.startswith('tempfail@'):
            return Milter.TEMPFAIL
        if to.startswith('full@'):
            self.setreply('452', '4.2.2', 'mailbox full says test milter'); return Milter.TEMPFAIL
        return Milter.CONTINUE
    def header(self, name, value):
        if name.lower() == 'subject': self.subject = value
        return Milter.CONTINUE
    def body(self, chunk):
        self.nbody += len(chunk)
        return Milter.CONTINUE
    def eom(self):
        s = self.subject
        if 'REJECTME' in s:
            self.setreply('550', '5.7.1', 'subject rejected by test milter'); return Milter.REJECT
        if 'TEMPFAILME' in s:
            return Milter.TEMPFAIL
        if 'DISCARDME' in s:
            return Milter.DISCARD
        if 'QUARANTINE' in s:
            self.quarantine('looks odd')
        if 'DELHDR' in s:
            self.chgheader('X-Remove', 1, '')
        if 'CHGHDR' in s:
            self.chgheader('X-Change', 2, 'changed')
        if 'INSHDR' in s:
            self.addheader('X-Inserted', 'at index 1', 1)
        if 'CHGFROM' in s:
            self.chgfrom('<other@example.test>')
        if 'ADDCAROL' in s:
            self.addrcpt('<carol@example.com>')
        if 'ADDDAVEPAR' in s:
            self.addrcpt('<dave@example.com>', 'NOTIFY=NEVER')
        if 'DELBOB' in s:
            self.delrcpt('<bob@example.com>')
        if 'BADRCPT' in s:
            self.addrcpt('<not an address>')
        if 'REPLBODY' in s:
            # Over 64 KiB, so libmilter sends it in several SMFIR_REPLBODY packets, and over the
            # spool's memory threshold (256 KiB), so it goes to a file.
            lines = [b'replaced line %06d\r\n' % i for i in range(15000)]
            self.replacebody(b''.join(lines[:7000]))
            self.replacebody(b''.join(lines[7000:]))
        self.addheader('X-Petrel-Milter', 'seen')
        self.addheader('X-Body-Bytes', str(self.nbody))
        return Milter.ACCEPT

Milter.factory = TestMilter
Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.CHGFROM | Milter.CHGBODY
                 | Milter.ADDRCPT | Milter.ADDRCPT_PAR | Milter.DELRCPT)
print('milter listening on', sys.argv[1], flush=True)
Milter.runmilter('petrel-test', sys.argv[1], 240)
`;

/** The body the test milter writes for REPLBODY. */
const REPLACED = Array.from(
  { length: 15000 },
  (_, i) => `replaced line ${String(i).padStart(6, '0')}\r\n`,
).join('');

interface Stored {
  readonly data: string;
  readonly holds: readonly string[];
  readonly sender: string;
  readonly recipients: readonly string[];
}

function captureQueue(into: Stored[]): PluginDefinition {
  return definePlugin({
    name: 'test-queue',
    setup: () => ({
      async queue({ transaction, message }) {
        const chunks: Buffer[] = [];
        for await (const c of message.stream()) chunks.push(c as Buffer);
        into.push({
          data: Buffer.concat(chunks).toString('latin1'),
          holds: transaction.notes.get(HoldOnAccept)?.reasons ?? [],
          sender: transaction.sender?.address ?? '',
          recipients: transaction.recipients.map((r) => r.address.address),
        });
        return accept();
      },
    }),
  });
}

async function start(
  milters: unknown[],
  stored: Stored[],
  extra: Record<string, unknown> = {},
): Promise<TestServer> {
  return startServer({
    plugins: [milter, acceptAllRecipients, captureQueue(stored)],
    entries: [{ name: 'milter', config: { milters, ...extra } }, 'test-accept-rcpt', 'test-queue'],
  });
}

/** One message; returns the RCPT replies and the reply to the end of data (null if no RCPT passed). */
async function send(
  port: number,
  opts: { to?: string[]; headers?: string; body?: string; subject?: string },
): Promise<{ rcpt: Reply[]; data: Reply | null }> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
    const rcpt: Reply[] = [];
    for (const to of opts.to ?? ['bob@example.com']) rcpt.push(await c.cmd(`RCPT TO:<${to}>`, /^\d{3} /));
    if (!rcpt.some((r) => r.code === 250)) return { rcpt, data: null };
    await c.cmd('DATA', /^354 /);
    const head =
      `From: Alice <alice@example.test>\r\nTo: bob@example.com\r\nSubject: ${opts.subject ?? 'hello'}\r\n` +
      `Date: Wed, 02 Dec 2026 06:00:00 +0000\r\nMessage-ID: <m${Date.now()}@example.test>\r\n${opts.headers ?? ''}`;
    c.write(`${head}\r\n${opts.body ?? 'Hello Bob.\r\n'}.\r\n`);
    const data = await c.reply(30_000);
    await c.cmd('QUIT', /^221 /);
    return { rcpt, data };
  } finally {
    c.close();
  }
}

const warnings = (server: TestServer, text: string): Record<string, unknown>[] =>
  server.logs.filter((l) => typeof l.msg === 'string' && l.msg.includes(text));

describe('milter: config', () => {
  it('a milter needs a port or a path; the default action on failure is tempfail', () => {
    const c = milterConfig.parse({ milters: [{ name: 'a', port: 1 }] });
    assert.equal(c.defaultAction, 'tempfail');
    assert.equal(c.milters[0]!.host, '127.0.0.1');
    assert.ok(!milterConfig.safeParse({ milters: [{ name: 'a' }] }).success);
    assert.ok(!milterConfig.safeParse({ milters: [{ name: 'a', port: 1, path: '/x' }] }).success);
  });
});

describe('milter: a pymilter test milter', () => {
  let peer: MilterPeer | null = null;
  let server: TestServer;
  const stored: Stored[] = [];

  before(async (t) => {
    peer = await startPymilter(t as unknown as TestContext, TEST_MILTER);
    if (!peer) return;
    server = await start([{ name: 'test', port: peer.port }], stored);
  });
  after(async () => {
    await server?.close();
    await peer?.stop();
  });

  it('rejects, tempfails and replies per recipient at RCPT, and the others go through', async (t) => {
    if (!peer) return t.skip();
    const before = stored.length;
    const { rcpt, data } = await send(server.port, {
      to: ['reject@example.com', 'tempfail@example.com', 'full@example.com', 'bob@example.com'],
    });
    assert.equal(rcpt[0]!.code, 550);
    assert.match(rcpt[0]!.raw, /5\.7\.1 recipient rejected by test milter/);
    assert.equal(rcpt[1]!.code, 451);
    assert.match(rcpt[1]!.raw, /4\.7\.1/);
    assert.equal(rcpt[2]!.code, 452);
    assert.match(rcpt[2]!.raw, /4\.2\.2 mailbox full says test milter/);
    assert.equal(rcpt[3]!.code, 250);
    assert.equal(data?.code, 250);
    assert.equal(stored.length, before + 1);
  });

  it('adds its headers at the end of message, having seen the whole body in chunks of at most 64 KiB', async (t) => {
    if (!peer) return t.skip();
    const line = `${'x'.repeat(998)}\r\n`;
    const body = line.repeat(200); // 200,000 octets: four SMFIC_BODY chunks
    const { data } = await send(server.port, { body });
    assert.equal(data?.code, 250);
    const msg = stored.at(-1)!.data;
    assert.match(msg, /^X-Petrel-Milter: seen\r\n/m);
    assert.match(msg, new RegExp(`^X-Body-Bytes: ${body.length}\\r\\n`, 'm'));
    assert.ok(msg.indexOf('X-Petrel-Milter') < msg.indexOf('X-Body-Bytes'), 'added in the milter’s order');
  });

  it('rejects and tempfails the message at end of data, and the connection goes on', async (t) => {
    if (!peer) return t.skip();
    const r = await send(server.port, { subject: 'please REJECTME' });
    assert.equal(r.data?.code, 550);
    assert.match(r.data!.raw, /5\.7\.1 subject rejected by test milter/);
    const tf = await send(server.port, { subject: 'TEMPFAILME' });
    assert.equal(tf.data?.code, 451);
    assert.match(tf.data!.raw, /4\.7\.1/);
  });

  it('deletes, changes and inserts header fields (a change removes the field and adds the new one on top; an insert goes on top)', async (t) => {
    if (!peer) return t.skip();
    const { data } = await send(server.port, {
      subject: 'DELHDR CHGHDR INSHDR',
      headers: 'X-Remove: bye\r\nX-Change: first\r\nX-Change: second\r\n',
    });
    assert.equal(data?.code, 250);
    const msg = stored.at(-1)!.data;
    assert.doesNotMatch(msg, /X-Remove/);
    assert.match(msg, /^X-Change: first\r\n/m);
    assert.doesNotMatch(msg, /X-Change: second/);
    assert.match(msg, /^X-Change: changed\r\n/m);
    assert.ok(
      msg.startsWith('X-Inserted: at index 1\r\n'),
      'SMFIR_INSHEADER: on top, the index not honoured',
    );
  });

  it('discard: the client gets 250, the message is taken by the plugin and never reaches the queue', async (t) => {
    if (!peer) return t.skip();
    const before = stored.length;
    const { data } = await send(server.port, { subject: 'DISCARDME' });
    assert.equal(data?.code, 250);
    assert.equal(stored.length, before);
    const dropped = server.logs.find((l) => l.msg === 'milter: discarded message accepted and dropped');
    assert.equal(dropped?.milter, 'test');
  });

  it('quarantine holds the message in the queue with the milter’s reason', async (t) => {
    if (!peer) return t.skip();
    const { data } = await send(server.port, { subject: 'QUARANTINE' });
    assert.equal(data?.code, 250);
    assert.deepEqual(stored.at(-1)!.holds, ['milter test: looks odd']);
  });

  it('replaces the body (in several packets, spooled to a file) and the queue stores the new one under the same header', async (t) => {
    if (!peer) return t.skip();
    const { data } = await send(server.port, { subject: 'REPLBODY', body: 'The original body.\r\n' });
    assert.equal(data?.code, 250);
    const msg = stored.at(-1)!.data;
    const split = msg.indexOf('\r\n\r\n');
    assert.equal(msg.slice(split + 4), REPLACED);
    assert.match(msg.slice(0, split), /^Subject: REPLBODY\r\n/m);
    assert.match(msg.slice(0, split), /^X-Body-Bytes: 20\r\n/m, 'the milter saw the original body');
    const replaced = server.logs.find((l) => l.msg === 'milter: body replaced');
    assert.equal(replaced?.size, split + 4 - msg.indexOf('From: Alice') + REPLACED.length);
  });

  it('changes the envelope sender and adds and deletes recipients: the queue gets the edited envelope', async (t) => {
    if (!peer) return t.skip();
    const { rcpt, data } = await send(server.port, {
      to: ['bob@example.com', 'erin@example.com'],
      subject: 'CHGFROM ADDCAROL ADDDAVEPAR DELBOB',
    });
    assert.deepEqual(
      rcpt.map((r) => r.code),
      [250, 250],
    );
    assert.equal(data?.code, 250);
    const last = stored.at(-1)!;
    assert.equal(last.sender, 'other@example.test');
    assert.deepEqual(last.recipients, ['erin@example.com', 'carol@example.com', 'dave@example.com']);
    const ignored = warnings(server, 'ESMTP arguments ignored');
    assert.equal(ignored.at(-1)?.args, 'NOTIFY=NEVER');
  });

  it('a message the milter leaves without recipients is refused with 554 5.5.1 and not stored', async (t) => {
    if (!peer) return t.skip();
    const before = stored.length;
    const { data } = await send(server.port, { subject: 'DELBOB' });
    assert.equal(data?.code, 554);
    assert.match(data!.raw, /5\.5\.1/);
    assert.equal(stored.length, before);
  });

  it('an address the server cannot take fails the milter: its default action (tempfail) answers', async (t) => {
    if (!peer) return t.skip();
    const before = stored.length;
    const { data } = await send(server.port, { subject: 'BADRCPT' });
    assert.equal(data?.code, 451);
    assert.equal(stored.length, before);
    const failed = server.logs.find((l) => l.msg === 'milter: failed, applying the default action');
    assert.equal(failed?.step, 'end of message edits');
    assert.match((failed?.err as { message?: string }).message ?? '', /bad recipient address/);
  });
});

describe('milter: edits reach the next hop', () => {
  it('two milters in order: the second sees the body the first replaced, and the queue delivers the edited envelope and body', async (t) => {
    const peer = await startPymilter(t, TEST_MILTER);
    if (!peer) return;
    const port = await freePortOn(['127.0.0.1']);
    const next = await smtpPeer(t, '127.0.0.1', port);
    let server: TestServer | null = null;
    try {
      server = await startServer({
        plugins: [milter, acceptAllRecipients, queue, outbound],
        entries: [
          {
            name: 'milter',
            config: {
              milters: [
                { name: 'first', port: peer.port },
                { name: 'second', port: peer.port },
              ],
            },
          },
          'test-accept-rcpt',
          'queue',
          { name: 'outbound', config: { smarthost: { host: '127.0.0.1', port, tls: 'opportunistic' } } },
        ],
      });
      const { rcpt, data } = await send(server.port, {
        to: ['bob@example.com', 'erin@example.com'],
        subject: 'REPLBODY CHGFROM ADDCAROL ADDDAVEPAR DELBOB',
        body: 'The original body.\r\n',
      });
      assert.deepEqual(
        rcpt.map((r) => r.code),
        [250, 250],
      );
      assert.equal(data?.code, 250);
      const deadline = Date.now() + 20_000;
      while (next.messages.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      assert.equal(next.messages.length, 1, 'one delivery to the next hop');
      const got = next.messages[0]!;
      assert.equal(got.mailFrom, 'other@example.test');
      assert.deepEqual(got.rcpts.map((r) => r.address).sort(), [
        'carol@example.com',
        'dave@example.com',
        'erin@example.com',
      ]);
      const text = got.data.toString('latin1');
      const split = text.indexOf('\r\n\r\n');
      assert.equal(text.slice(split + 4), REPLACED);
      // Each milter reports the body it was sent: the first the client's, the second the first's.
      const counts = [...text.slice(0, split).matchAll(/^X-Body-Bytes: (\d+)\r$/gm)].map((m) => Number(m[1]));
      assert.deepEqual(
        counts.sort((a, b) => a - b),
        [20, REPLACED.length],
      );
    } finally {
      await server?.close();
      await peer.stop();
    }
  });
});

describe('milter: over a unix socket', () => {
  it('a milter given by path sees the message and adds its header', async (t) => {
    const peer = await startPymilter(t, TEST_MILTER, { unix: true });
    if (!peer) return;
    const stored: Stored[] = [];
    let server: TestServer | null = null;
    try {
      server = await start([{ name: 'local', path: peer.path }], stored);
      const { rcpt, data } = await send(server.port, { to: ['reject@example.com', 'bob@example.com'] });
      assert.equal(rcpt[0]!.code, 550);
      assert.equal(data?.code, 250);
      assert.match(stored[0]!.data, /^X-Petrel-Milter: seen\r\n/m);
    } finally {
      await server?.close();
      await peer.stop();
    }
  });
});

describe('milter: a milter that is down', () => {
  it('default tempfail: the client is told to come back later; accept: the mail goes on without it', async () => {
    const port = await freePort(); // nothing listens there
    const stored: Stored[] = [];
    const down = await start([{ name: 'gone', port }], stored);
    try {
      const c = await SmtpClient.connect(down.port);
      try {
        const greeting = await c.reply();
        assert.match(greeting.raw, /^4\d\d/);
      } finally {
        c.close();
      }
      const failed = down.logs.find((l) => l.msg === 'milter: failed, applying the default action');
      assert.equal(failed?.milter, 'gone');
      assert.equal(failed?.action, 'tempfail');
    } finally {
      await down.close();
    }
    const lenient = await start([{ name: 'gone', port }], stored, { defaultAction: 'accept' });
    try {
      const { data } = await send(lenient.port, {});
      assert.equal(data?.code, 250);
      assert.equal(stored.length, 1);
    } finally {
      await lenient.close();
    }
  });
});

/**
 * A milter that negotiates properly and then misbehaves at SMFIC_CONNECT: `silent` never answers,
 * `garbage` answers with a packet whose length is over any limit. No packaged milter can be made
 * to do either on demand; this one is a real socket speaking real (then broken) protocol.
 */
async function brokenMilter(mode: 'silent' | 'garbage'): Promise<{ server: Server; port: number }> {
  const server = createServer((socket) => {
    let buf = Buffer.alloc(0);
    socket.on('error', () => undefined);
    socket.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 5 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const cmd = String.fromCharCode(buf[4]!);
        buf = buf.subarray(4 + buf.readUInt32BE(0));
        if (cmd === 'O') {
          const reply = Buffer.alloc(17);
          reply.writeUInt32BE(13, 0);
          reply.write('O', 4, 'latin1');
          reply.writeUInt32BE(6, 5);
          reply.writeUInt32BE(0, 9);
          reply.writeUInt32BE(0, 13);
          socket.write(reply);
        } else if (cmd === 'C' && mode === 'garbage') {
          socket.write(Buffer.from([0x7f, 0xff, 0xff, 0xff, 0x63]));
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as { port: number }).port };
}

describe('milter: a milter that breaks the protocol', () => {
  for (const mode of ['silent', 'garbage'] as const) {
    it(`${mode}: the step fails with its cause logged, and the default action (reject) answers the client`, async () => {
      const broken = await brokenMilter(mode);
      const stored: Stored[] = [];
      const server = await start([{ name: 'broken', port: broken.port, stepTimeout: '500ms' }], stored, {
        defaultAction: 'reject',
      });
      try {
        const c = await SmtpClient.connect(server.port);
        try {
          const greeting = await c.reply();
          assert.match(greeting.raw, /^5\d\d/);
        } finally {
          c.close();
        }
        const failed = server.logs.find((l) => l.msg === 'milter: failed, applying the default action');
        assert.equal(failed?.step, 'connect');
        assert.equal(failed?.action, 'reject');
        const err = failed?.err as { message?: string } | undefined;
        assert.match(err?.message ?? '', mode === 'silent' ? /did not reply in time/ : /bad packet length/);
      } finally {
        await server.close();
        await new Promise((r) => broken.server.close(r));
      }
    });
  }
});

describe('milter: the hook time limit', () => {
  it('a milter slower than the plugin’s hook timeout is cut off, so its late reply is never taken for a later step', async () => {
    const broken = await brokenMilter('silent');
    const server = await startServer({
      plugins: [milter, acceptAllRecipients],
      entries: [
        { name: 'milter', timeout: '300ms', config: { milters: [{ name: 'slow', port: broken.port }] } },
        'test-accept-rcpt',
      ],
    });
    try {
      const c = await SmtpClient.connect(server.port);
      try {
        assert.match((await c.reply()).raw, /^421 /);
      } finally {
        c.close();
      }
      // The abort closed the link; the step then failed and the default action was recorded.
      for (
        let i = 0;
        i < 50 && !server.logs.some((l) => l.msg === 'milter: failed, applying the default action');
        i++
      )
        await new Promise((r) => setTimeout(r, 20));
      const failed = server.logs.find((l) => l.msg === 'milter: failed, applying the default action');
      assert.equal(failed?.milter, 'slow');
      assert.match((failed?.err as { message?: string } | undefined)?.message ?? '', /closed/);
    } finally {
      await server.close();
      await new Promise((r) => broken.server.close(r));
    }
  });
});

describe('milter: OpenDKIM in sign mode', () => {
  it('signs the message through the plugin, and dkimpy verifies the signature against DNS', async (t) => {
    if (!(await requireDkimpy(t))) return;
    const signer = await startOpendkimSigner(t, 'example.test');
    if (!signer) return;
    const stored: Stored[] = [];
    let server: TestServer | null = null;
    try {
      const dns = await startDnsmasq(t, { txt: [signer.record] });
      if (!dns) return;
      server = await start([{ name: 'opendkim', port: signer.port }], stored);
      const { data } = await send(server.port, { subject: 'signed by opendkim' });
      assert.equal(data?.code, 250, signer.output());
      const msg = Buffer.from(stored[0]!.data, 'latin1');
      assert.match(
        stored[0]!.data,
        /^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/simple; d=example\.test;\r\n\ts=petrel;/m,
      );
      const verdicts = await dkimpyVerify(msg, dns.server);
      assert.equal(verdicts.length, 1);
      assert.deepEqual(verdicts[0], { ok: true, error: null });
    } finally {
      await server?.close();
      await signer.stop();
    }
  });
});
