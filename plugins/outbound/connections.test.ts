import 'reflect-metadata';
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { FAST, freePortOn, smtpPeer, smtpSink, startSender, summary } from './test-support.js';

async function dnsFor(
  t: TestContext,
  mx: readonly { host: string; ip: string; preference: number }[],
): Promise<Dnsmasq | null> {
  return startDnsmasq(t, {
    mx: mx.map((m) => ({ domain: 'a.test', host: m.host, preference: m.preference })),
    hosts: mx.map((m) => ({ name: m.host, addresses: [m.ip] })),
  });
}

async function waitUntil(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('outbound: connection reuse', () => {
  it('carries 100 messages over at most maxConnectionsPerDestination connections, straight to MAIL FROM each time', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    let open = 0;
    let mostOpen = 0;
    const peer = await smtpPeer(t, '127.0.0.2', port, {
      onConnect(_s, cb) {
        mostOpen = Math.max(mostOpen, ++open);
        cb();
      },
      onClose() {
        open--;
      },
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, idleTimeout: 2000, maxConnectionsPerDestination: 5 },
    });
    const ids = await Promise.all(
      Array.from({ length: 100 }, (_, i) =>
        sender.submit([`u${i}@a.test`], `Subject: ${i}\r\n\r\nbody ${i}\r\n`),
      ),
    );
    for (const id of ids) await sender.settled(id, 1);
    assert.ok(sender.outcomes.every((o) => o.status === 'delivered'));
    assert.equal(peer.messages.length, 100);
    assert.ok(peer.connections.opened <= 5, `${peer.connections.opened} connections for 100 messages`);
    t.diagnostic(`100 messages over ${peer.connections.opened} connections, at most ${mostOpen} at once`);
    assert.ok(mostOpen <= 5, `${mostOpen} connections open at once`);
    // A completed transaction leaves the session clean: the next one starts with MAIL FROM, no RSET.
    for (const [session, commands] of peer.commands) {
      assert.match(commands[0]!, /^EHLO /, `session ${session}: ${commands.join(' | ')}`);
      assert.equal(
        commands.filter((c) => /^RSET$/i.test(c)).length,
        0,
        `session ${session}: ${commands.join(' | ')}`,
      );
      const mails = commands.map((c, i) => (/^MAIL /i.test(c) ? i : -1)).filter((i) => i >= 0);
      for (const i of mails.slice(1)) assert.equal(commands[i - 1], 'DATA', `session ${session}`);
    }
  });

  it('sends RSET before the next message after a transaction that ended without data', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.2', port, {
      rcpt: (a) => (a.startsWith('nobody@') ? { code: 550, message: '5.1.1 No such user' } : null),
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, idleTimeout: 5000, maxConnectionsPerDestination: 1 },
    });
    const [refused] = await sender.settled(await sender.submit(['nobody@a.test']), 1);
    assert.deepEqual(summary([refused!]), [['nobody@a.test', 'failed', 550, '5.1.1']]);
    const [ok] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.equal(ok!.status, 'delivered');
    assert.equal(peer.connections.opened, 1);
    const [commands] = [...peer.commands.values()];
    const mails = commands!.map((c, i) => (/^MAIL /i.test(c) ? i : -1)).filter((i) => i >= 0);
    assert.equal(mails.length, 2, commands!.join(' | '));
    assert.equal(commands![mails[1]! - 1], 'RSET', commands!.join(' | '));
  });

  it('opens a new connection when a reused one is answered 421 at MAIL FROM, without deferring', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    // A scripted peer that gives up each connection at its second MAIL FROM (an idle limit shorter
    // than ours, noticed only when the next transaction starts).
    let connections = 0;
    let delivered = 0;
    const open = new Set<Socket>();
    const server = createServer((s) => {
      connections++;
      open.add(s);
      s.on('close', () => open.delete(s));
      s.on('error', () => undefined);
      let mails = 0;
      let inBody = false;
      let buf = '';
      s.write('220 scripted ESMTP\r\n');
      s.on('data', (d: Buffer) => {
        buf += d.toString('latin1');
        for (;;) {
          if (inBody) {
            const end = buf.indexOf('\r\n.\r\n');
            if (end < 0) return;
            buf = buf.slice(end + 5);
            inBody = false;
            delivered++;
            s.write('250 2.0.0 Ok\r\n');
            continue;
          }
          const i = buf.indexOf('\r\n');
          if (i < 0) return;
          const verb = buf.slice(0, i).split(/[ :]/)[0]!.toUpperCase();
          buf = buf.slice(i + 2);
          if (verb === 'EHLO') s.write('250-scripted\r\n250 PIPELINING\r\n');
          else if (verb === 'MAIL' && ++mails === 2) {
            s.end('421 4.4.2 scripted: idle for too long\r\n');
            return;
          } else if (verb === 'DATA') {
            inBody = true;
            s.write('354 go ahead\r\n');
          } else if (verb === 'QUIT') s.end('221 bye\r\n');
          else s.write('250 2.0.0 Ok\r\n');
        }
      });
    });
    await new Promise<void>((r) => server.listen(port, '127.0.0.2', () => r()));
    t.after(() => {
      for (const s of open) s.destroy();
      return new Promise<void>((r) => server.close(() => r()));
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, idleTimeout: 5000, maxConnectionsPerDestination: 1 },
    });
    const [first] = await sender.settled(await sender.submit(['a@a.test']), 1);
    assert.equal(first!.status, 'delivered');
    const [second] = await sender.settled(await sender.submit(['b@a.test']), 1);
    assert.equal(second!.status, 'delivered', JSON.stringify(second));
    assert.equal(connections, 2);
    assert.equal(delivered, 2);
  });

  it('closes a connection after maxMessagesPerConnection, and idle ones after idleTimeout (with QUIT)', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.2', port);
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: {
        port,
        timeouts: FAST,
        idleTimeout: 300,
        maxConnectionsPerDestination: 1,
        maxMessagesPerConnection: 10,
      },
    });
    const ids = await Promise.all(Array.from({ length: 25 }, (_, i) => sender.submit([`u${i}@a.test`])));
    for (const id of ids) await sender.settled(id, 1);
    assert.equal(peer.connections.opened, 3);
    assert.deepEqual(
      [...new Set(peer.messages.map((m) => m.session))].map(
        (s) => peer.messages.filter((m) => m.session === s).length,
      ),
      [10, 10, 5],
    );
    await waitUntil('the idle connection is closed', () => peer.connections.closed === 3, 5000);
    for (const commands of peer.commands.values()) assert.equal(commands.at(-1), 'QUIT');
    // A message after the idle close needs a new connection.
    await sender.settled(await sender.submit(['late@a.test']), 1);
    assert.equal(peer.connections.opened, 4);
  });

  it('backs a destination off after repeated connection failures, deferring without connecting', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    // Accepts and hangs up at once: no session can be had.
    let attempts = 0;
    const sockets = new Set<Socket>();
    const rude = createServer((s) => {
      attempts++;
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.destroy();
    });
    await new Promise<void>((r) => rude.listen(port, '127.0.0.2', () => r()));
    t.after(() => new Promise<void>((r) => rude.close(() => r())));
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, backoffAfter: 2, backoffTime: 60_000 },
    });
    for (let i = 0; i < 2; i++) {
      const [o] = await sender.settled(await sender.submit([`u${i}@a.test`]), 1);
      assert.deepEqual([o!.status, o!.reply.enhanced], ['deferred', '4.4.2']);
      assert.match(
        String(o!.reply.text),
        /lost connection with mx\.a\.test \[127\.0\.0\.2\] while receiving the initial server greeting/,
      );
    }
    assert.equal(attempts, 2);
    const [held] = await sender.settled(await sender.submit(['u2@a.test']), 1);
    assert.deepEqual([held!.status, held!.reply.code, held!.reply.enhanced], ['deferred', 451, '4.4.1']);
    assert.match(String(held!.reply.text), /backed off until .* after repeated connection failures/);
    assert.equal(attempts, 2, 'no connection while backed off');
  });
});

describe('outbound: failover on temporary refusals', () => {
  it('moves on to the next MX after a 4xx to MAIL FROM (smtp-sink) and after a 4xx greeting', async (t) => {
    const port = await freePortOn(['127.0.0.2', '127.0.0.3', '127.0.0.4']);
    const dns = await dnsFor(t, [
      { host: 'busy.a.test', ip: '127.0.0.2', preference: 5 },
      { host: 'sink.a.test', ip: '127.0.0.4', preference: 10 },
      { host: 'good.a.test', ip: '127.0.0.3', preference: 20 },
    ]);
    if (!dns) return;
    const busy = await smtpPeer(t, '127.0.0.2', port, {
      onConnect(_s, cb) {
        cb(Object.assign(new Error('Too busy, try later'), { responseCode: 421 }));
      },
    });
    const sink = await smtpSink(t, '127.0.0.4', port, ['-r', 'mail']);
    if (!sink) return;
    const good = await smtpPeer(t, '127.0.0.3', port);
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(o!.reply.remote, 'good.a.test [127.0.0.3]');
    assert.equal(good.messages.length, 1);
    assert.equal(busy.messages.length, 0);
    assert.match(sink.output(), /MAIL FROM:<alice@petrel\.test>/);
    assert.doesNotMatch(sink.output(), /RCPT TO/);
  });

  it('moves on to the next MX when one never greets (greeting timeout)', async (t) => {
    const port = await freePortOn(['127.0.0.2', '127.0.0.3']);
    const dns = await dnsFor(t, [
      { host: 'mute.a.test', ip: '127.0.0.2', preference: 10 },
      { host: 'good.a.test', ip: '127.0.0.3', preference: 20 },
    ]);
    if (!dns) return;
    const held = new Set<Socket>();
    let muteConnections = 0;
    const mute = createServer((s) => {
      muteConnections++;
      held.add(s);
      s.on('close', () => held.delete(s));
      s.resume(); // reads (and ignores) what comes, so that it sees the client close
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => mute.listen(port, '127.0.0.2', () => r()));
    t.after(() => {
      for (const s of held) s.destroy();
      return new Promise<void>((r) => mute.close(() => r()));
    });
    const good = await smtpPeer(t, '127.0.0.3', port);
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: { ...FAST, greeting: 300 } },
    });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(o!.reply.remote, 'good.a.test [127.0.0.3]');
    assert.equal(good.messages.length, 1);
    // The mute host was tried once and given up on: the connection to it was closed from our side.
    assert.equal(muteConnections, 1);
    await waitUntil('the mute connection is closed', () => held.size === 0);
  });

  for (const [label, talk] of [
    [
      'drips its greeting one continuation line at a time (one deadline for the whole reply)',
      (s: Socket) => {
        const timer = setInterval(() => s.write('220-still greeting\r\n'), 50);
        s.on('close', () => clearInterval(timer));
      },
    ],
    [
      'sends a greeting of endless continuation lines (a reply has at most 512)',
      (s: Socket) => {
        const timer = setInterval(() => s.write('220-endless\r\n'.repeat(100)), 10);
        s.on('close', () => clearInterval(timer));
      },
    ],
  ] as const) {
    it(`moves on to the next MX when one ${label}`, async (t) => {
      const port = await freePortOn(['127.0.0.2', '127.0.0.3']);
      const dns = await dnsFor(t, [
        { host: 'chatty.a.test', ip: '127.0.0.2', preference: 10 },
        { host: 'good.a.test', ip: '127.0.0.3', preference: 20 },
      ]);
      if (!dns) return;
      const held = new Set<Socket>();
      const chatty = createServer((s) => {
        held.add(s);
        s.on('close', () => held.delete(s));
        s.on('error', () => undefined);
        s.resume();
        talk(s);
      });
      await new Promise<void>((r) => chatty.listen(port, '127.0.0.2', () => r()));
      t.after(() => {
        for (const s of held) s.destroy();
        return new Promise<void>((r) => chatty.close(() => r()));
      });
      const good = await smtpPeer(t, '127.0.0.3', port);
      const sender = await startSender(t, {
        dnsServer: dns.server,
        outbound: { port, timeouts: { ...FAST, greeting: 500 } },
      });
      const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
      assert.equal(o!.status, 'delivered');
      assert.equal(o!.reply.remote, 'good.a.test [127.0.0.3]');
      assert.equal(good.messages.length, 1);
    });
  }

  it('defers with the last temporary reply when every MX refuses', async (t) => {
    const port = await freePortOn(['127.0.0.4']);
    const dns = await dnsFor(t, [{ host: 'sink.a.test', ip: '127.0.0.4', preference: 10 }]);
    if (!dns) return;
    const sink = await smtpSink(t, '127.0.0.4', port, ['-r', 'mail']);
    if (!sink) return;
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.deepEqual(summary([o!]), [['bob@a.test', 'deferred', 450, '4.3.0']]);
    assert.equal(o!.reply.remote, 'sink.a.test [127.0.0.4]');
  });

  it('falls back to HELO when the peer does not know EHLO (smtp-sink -e)', async (t) => {
    const port = await freePortOn(['127.0.0.4']);
    const dns = await dnsFor(t, [{ host: 'sink.a.test', ip: '127.0.0.4', preference: 10 }]);
    if (!dns) return;
    const sink = await smtpSink(t, '127.0.0.4', port, ['-e']);
    if (!sink) return;
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, heloName: 'out.petrel.test' },
    });
    const [o] = await sender.settled(await sender.submit(['bob@a.test', 'carol@a.test']), 1);
    assert.equal(o!.status, 'delivered');
    const out = sink.output();
    assert.match(
      out,
      /EHLO out\.petrel\.test[\s\S]*HELO out\.petrel\.test[\s\S]*MAIL FROM:<alice@petrel\.test>\n/,
    );
    assert.doesNotMatch(out, /SIZE=/, 'no ESMTP parameters after HELO');
  });
});

describe('outbound: on the wire', () => {
  it('pipelines MAIL, RCPTs and DATA in one write and sends the body in large chunks, not a line per write', async (t) => {
    const port = await freePortOn(['127.0.0.2']);
    const dns = await dnsFor(t, [{ host: 'mx.a.test', ip: '127.0.0.2', preference: 10 }]);
    if (!dns) return;
    // A scripted peer on a real socket: it records every chunk it receives.
    const chunks: { phase: string; text: string }[] = [];
    const open = new Set<Socket>();
    const server = createServer((s) => {
      open.add(s);
      s.on('close', () => open.delete(s));
      let phase = 'commands';
      let buf = '';
      s.write('220 scripted ESMTP\r\n');
      s.on('data', (d: Buffer) => {
        const text = d.toString('latin1');
        chunks.push({ phase, text });
        buf += text;
        if (phase === 'body') {
          if (buf.endsWith('\r\n.\r\n')) {
            phase = 'commands';
            buf = '';
            s.write('250 2.0.0 Ok\r\n');
          }
          return;
        }
        let i: number;
        while ((i = buf.indexOf('\r\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const verb = line.split(/[ :]/)[0]!.toUpperCase();
          if (verb === 'EHLO') s.write('250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n');
          else if (verb === 'DATA') {
            phase = 'body';
            s.write('354 go ahead\r\n');
          } else if (verb === 'QUIT') s.end('221 bye\r\n');
          else s.write('250 2.0.0 Ok\r\n');
        }
      });
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(port, '127.0.0.2', () => r()));
    t.after(() => {
      for (const s of open) s.destroy();
      return new Promise<void>((r) => server.close(() => r()));
    });
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST, idleTimeout: 100 },
    });
    const lines = Array.from({ length: 20_000 }, (_, i) => `.line ${i} of the message\r\n`).join('');
    const content = `Subject: big\r\n\r\n${lines}`;
    const id = await sender.submit(['a1@a.test', 'a2@a.test', 'a3@a.test'], content);
    assert.ok((await sender.settled(id, 3)).every((o) => o.status === 'delivered'));
    const mailChunk = chunks.find((c) => c.text.startsWith('MAIL FROM'));
    assert.equal(
      mailChunk?.text,
      `MAIL FROM:<alice@petrel.test>\r\nRCPT TO:<a1@a.test>\r\nRCPT TO:<a2@a.test>\r\nRCPT TO:<a3@a.test>\r\nDATA\r\n`,
    );
    const body = chunks.filter((c) => c.phase === 'body');
    assert.ok(body.length < 60, `${body.length} reads for a ${content.length}-octet body of 20,000 lines`);
    const sent = body.map((c) => c.text).join('');
    assert.equal(sent, content.replace(/^\./gm, '..') + '.\r\n');
  });
});
