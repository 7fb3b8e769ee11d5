import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { definePlugin, deny, proceed } from '../../core/index.js';
import { requirePeer } from '../../test/harness/peers.js';
import {
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { describeRun, killRunning, run } from '../../test/e2e/run.js';
import { parseXclient } from './index.js';

const here = { local: { address: '127.0.0.1', port: 25 } };

describe('xclient: parsing', () => {
  it('reads every attribute, xtext-decoded, IPv6 with its prefix', () => {
    const r = parseXclient(
      'NAME=mail.example.test ADDR=IPV6:2001:DB8::7 PORT=40001 PROTO=SMTP HELO=old+2Eclient LOGIN=alice DESTADDR=192.0.2.25 DESTPORT=587',
      here,
    );
    assert.deepEqual(r, {
      ok: true,
      identity: {
        name: 'mail.example.test',
        address: '2001:db8::7',
        port: 40001,
        user: 'alice',
        helo: { verb: 'HELO', hostname: 'old.client' },
        local: { address: '192.0.2.25', port: 587 },
      },
    });
  });

  it('takes [UNAVAILABLE] and [TEMPUNAVAIL] as unknown, except for the address', () => {
    const r = parseXclient(
      'NAME=[TEMPUNAVAIL] LOGIN=[UNAVAILABLE] HELO=[UNAVAILABLE] PORT=[UNAVAILABLE]',
      here,
    );
    assert.deepEqual(r, { ok: true, identity: { name: null, user: null, port: 0 } });
    assert.deepEqual(parseXclient('ADDR=[UNAVAILABLE]', here), { ok: false, text: 'Bad XCLIENT ADDR value' });
  });

  it('refuses unknown attributes, bad values and bad xtext', () => {
    for (const args of [
      '',
      'FOO=bar',
      'ADDR',
      'ADDR=999.1.1.1',
      'PORT=70000',
      'PROTO=LMTP',
      'NAME=a+zz',
      'NAME=bad_name!',
    ]) {
      assert.equal(parseXclient(args, here).ok, false, args);
    }
  });
});

describe('xclient: over SMTP', () => {
  let srv: TestServer;
  const queued: CapturedMessage[] = [];
  const events: { session: string; what: string }[] = [];
  /** Records each connect and disconnect with the client it saw; refuses 127.0.0.4 at connect. */
  const watcher = definePlugin({
    name: 'test-watcher',
    setup: () => ({
      async connect({ session }) {
        events.push({
          session: session.id,
          what: `connect ${session.remote.address}:${session.remote.port}`,
        });
        return session.remote.address === '127.0.0.4' ? deny(554, '5.7.1', 'Not from there') : proceed();
      },
      async disconnect({ session }) {
        events.push({ session: session.id, what: `disconnect ${session.remote.address}` });
      },
    }),
  });

  before(async () => {
    srv = await startServer({
      plugins: [watcher, memoryQueue(queued)],
      entries: [
        'test-watcher',
        { name: 'xclient', config: { networks: ['127.0.0.1/32'] } },
        { name: 'relay', config: { trustedNetworks: ['127.0.0.2/32'] } },
        'test-memory-queue',
      ],
    });
  });
  after(async () => {
    killRunning();
    await srv.close();
  });

  it('swaks: XCLIENT makes the session restart as the declared client, who may relay', async (t: TestContext) => {
    if (requirePeer(t, 'swaks', 'apt-get install swaks') === null) return;
    const token = randomUUID();
    const r = await run(
      'swaks',
      [
        '--server',
        '127.0.0.1',
        '--port',
        String(srv.port),
        '--helo',
        'client.test',
        '--timeout',
        '10',
        '--xclient-addr',
        '127.0.0.2',
        '--xclient-name',
        'two.example.test',
        '--xclient-port',
        '41000',
        '--from',
        'a@example.test',
        '--to',
        'far@elsewhere.test',
        '--header',
        `Subject: ${token}`,
      ],
      { timeoutMs: 20_000 },
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.match(
      r.stdout,
      /-> XCLIENT ADDR=127\.0\.0\.2 NAME=two\.example\.test PORT=41000|-> XCLIENT .*ADDR=127\.0\.0\.2/,
    );
    assert.match(r.stdout, /<- {2}220 mx\.test ESMTP Petrel/);
    const m = queued.find((q) => q.data.includes(token));
    assert.ok(m, 'the message was queued (relayed for 127.0.0.2)');
    assert.match(m.data.toString(), /^Received: from client\.test \(two\.example\.test \[127\.0\.0\.2\]\)/);
    const changed = srv.logs.find((l) => l.msg === 'client identity changed' && l.plugin === 'xclient');
    assert.ok(changed);
    assert.equal((changed.from as { remote: string }).remote, '127.0.0.1');
    assert.deepEqual((changed.to as { remote: string; peer: string }).remote, '127.0.0.2');
    assert.deepEqual((changed.to as { remote: string; peer: string }).peer, '127.0.0.1');
  });

  it('advertises XCLIENT only to the networks allowed to use it, and refuses everyone else', async () => {
    const trusted = await SmtpClient.connect(srv.port);
    await trusted.expect(/^220 /);
    assert.ok((await trusted.ehlo()).includes('XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT'));
    trusted.close();
    const stranger = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: '127.0.0.3' });
    await stranger.expect(/^220 /);
    assert.ok(!(await stranger.ehlo()).some((w) => w.startsWith('XCLIENT')));
    await stranger.cmd('XCLIENT ADDR=127.0.0.2', /^550 5\.7\.0 Insufficient authorization/);
    await stranger.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await stranger.cmd('RCPT TO:<far@elsewhere.test>', /^554 5\.7\.1 Relaying denied/);
    stranger.close();
  });

  it('runs disconnect for the old client and connect for the new one; their verdict is the greeting', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('XCLIENT ADDR=127.0.0.2 PORT=4000', /^220 mx\.test ESMTP Petrel/);
    // HELO/EHLO is forgotten, as at a new connection.
    await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 Send HELO\/EHLO first/);
    await c.ehlo('two.test');
    // The trust is the speaker's, which XCLIENT never moves: a second one is allowed.
    await c.cmd('XCLIENT ADDR=127.0.0.4', /^554 Not from there/);
    await c.cmd('EHLO four.test', /^503 5\.5\.1 Connection refused; only QUIT is allowed/);
    await c.cmd('QUIT', /^221 /);
    await c.closed();
    const id = (): string | undefined => events.find((e) => e.what === 'connect 127.0.0.4:4000')?.session;
    const mine = (): string[] => events.filter((e) => e.session === id()).map((e) => e.what);
    for (let i = 0; i < 50 && mine().length < 6; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(mine().slice(1), [
      'disconnect 127.0.0.1',
      'connect 127.0.0.2:4000',
      'disconnect 127.0.0.2',
      'connect 127.0.0.4:4000',
      'disconnect 127.0.0.4',
    ]);
    assert.match(mine()[0]!, /^connect 127\.0\.0\.1:\d+$/);
  });

  it('declares HELO, PROTO and LOGIN: the session needs no EHLO and is authenticated', async () => {
    const token = randomUUID();
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.cmd('XCLIENT ADDR=127.0.0.3 HELO=old.client.test PROTO=SMTP LOGIN=alice', /^220 /);
    await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
    await c.cmd('RCPT TO:<far@elsewhere.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`Subject: ${token}\r\n\r\nhi\r\n.\r\n`);
    await c.expect(/^250 /);
    await c.cmd('QUIT', /^221 /);
    const m = queued.find((q) => q.data.includes(token))!;
    assert.match(
      m.data.toString(),
      /^Received: from old\.client\.test \(\[127\.0\.0\.3\]\)\r\n\tby mx\.test \(Petrel\) with SMTPA /,
    );
  });

  it('is refused inside a mail transaction, and with bad syntax', async () => {
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('XCLIENT ADDR=[UNAVAILABLE]', /^501 5\.5\.4 Bad XCLIENT ADDR value/);
    await c.cmd('XCLIENT FOO=1', /^501 5\.5\.4 Bad XCLIENT attribute name: FOO/);
    await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await c.cmd('XCLIENT ADDR=127.0.0.2', /^503 5\.5\.1 Not allowed during a mail transaction/);
    await c.cmd('RSET', /^250 /);
    await c.cmd('XCLIENT ADDR=127.0.0.2', /^220 /);
    c.close();
  });
});
