import 'reflect-metadata';
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { definePlugin } from '../../core/plugins/define.js';
import { startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { FAST, freePortOn, MESSAGE, smtpPeer, startSender, summary } from './test-support.js';

/** dnsmasq with `a.test` → `mx.a.test` → `ip`, and a port free there. */
async function oneMx(t: TestContext, ip = '127.0.0.2'): Promise<{ dns: Dnsmasq; port: number } | null> {
  const port = await freePortOn([ip]);
  const dns = await startDnsmasq(t, {
    mx: [{ domain: 'a.test', host: 'mx.a.test', preference: 10 }],
    hosts: [{ name: 'mx.a.test', addresses: [ip] }],
  });
  return dns ? { dns, port } : null;
}

describe('outbound: routing', () => {
  it('routes remote domains to outbound keyed by the A-label domain, and leaves local ones', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const seen: string[] = [];
    const probe = definePlugin({
      name: 'test-route-probe',
      setup: () => ({
        async deliver({ route, recipients }) {
          seen.push(`${route.transport}|${route.key}|${JSON.stringify(route.data)}|${recipients.length}`);
          return { kind: 'proceed' };
        },
      }),
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
      before: [probe],
    });
    const id = await sender.submit(['bob@a.test', 'carol@A.TEST', 'local@petrel.test', 'x@bücher.test']);
    const outcomes = await sender.settled(id, 4);
    assert.deepEqual(seen.sort(), [
      'outbound|a.test|{"domain":"a.test"}|2',
      'outbound|xn--bcher-kva.test|{"domain":"xn--bcher-kva.test"}|1',
    ]);
    const local = outcomes.find((o) => o.recipient === 'local@petrel.test')!;
    assert.equal(local.status, 'deferred', 'nobody routes the local domain in this test');
    assert.match(String(local.reply.text), /No route/);
  });
});

describe('outbound: per-recipient results', () => {
  it('delivers, defers and fails recipients of one message by the RCPT replies', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port, {
      rcpt: (a) =>
        a.startsWith('later@')
          ? { code: 451, message: 'Greylisted, try again later' }
          : a.startsWith('gone@')
            ? { code: 550, message: 'No such user' }
            : null,
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const id = await sender.submit(['bob@a.test', 'later@a.test', 'gone@a.test']);
    const outcomes = await sender.settled(id, 3);
    assert.deepEqual(
      summary(outcomes).map((s) => s.slice(0, 3)),
      [
        ['bob@a.test', 'delivered', 250],
        ['gone@a.test', 'failed', 550],
        ['later@a.test', 'deferred', 451],
      ],
    );
    const byRcpt = new Map(outcomes.map((o) => [o.recipient, o.reply]));
    assert.match(String(byRcpt.get('later@a.test')!.text), /Greylisted/);
    assert.match(String(byRcpt.get('gone@a.test')!.text), /No such user/);
    assert.match(byRcpt.get('gone@a.test')!.enhanced, /^5\./);
    for (const r of byRcpt.values()) assert.equal(r.remote, 'mx.a.test [127.0.0.2]');
    assert.equal(peer.messages.length, 1);
    assert.deepEqual(
      peer.messages[0]!.rcpts.map((r) => r.address),
      ['bob@a.test'],
    );
  });

  it('applies the reply to the end of data to every accepted recipient', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    await smtpPeer(t, '127.0.0.2', env.port, {
      rcpt: (a) => (a.startsWith('gone@') ? { code: 550, message: 'No such user' } : null),
      data: (rcpts) =>
        rcpts.some((r) => r.startsWith('full'))
          ? { code: 452, message: 'Insufficient storage' }
          : { code: 554, message: 'Message refused as spam' },
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const a = await sender.submit(['full1@a.test', 'full2@a.test', 'gone@a.test']);
    const b = await sender.submit(['spam@a.test']);
    assert.deepEqual(
      summary(await sender.settled(a, 3)).map((s) => s.slice(0, 3)),
      [
        ['full1@a.test', 'deferred', 452],
        ['full2@a.test', 'deferred', 452],
        ['gone@a.test', 'failed', 550],
      ],
    );
    const [spam] = await sender.settled(b, 1);
    assert.deepEqual([spam!.status, spam!.reply.code], ['failed', 554]);
    assert.match(String(spam!.reply.text), /spam/);
  });

  it('splits recipients over transactions of maxRecipientsPerTransaction, and follows up 452s at once', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    // Like a server with a recipient limit of 3 per transaction (RFC 5321 §4.5.3.1.10).
    const perSession = new Map<string, number>();
    let current = '';
    const peer = await smtpPeer(t, '127.0.0.2', env.port, {
      onMailFrom(_a, session, cb) {
        current = `${session.id}:${session.transaction}`;
        cb();
      },
      rcpt: () => {
        const n = (perSession.get(current) ?? 0) + 1;
        perSession.set(current, n);
        return n > 3 ? { code: 452, message: 'Too many recipients' } : null;
      },
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST, maxRecipientsPerTransaction: 5 },
    });
    const rcpts = Array.from({ length: 12 }, (_, i) => `r${String(i).padStart(2, '0')}@a.test`);
    const outcomes = await sender.settled(await sender.submit(rcpts), 12);
    assert.ok(
      outcomes.every((o) => o.status === 'delivered'),
      JSON.stringify(outcomes.filter((o) => o.status !== 'delivered')),
    );
    // 12 recipients in batches of 5: 5 (3 + 2), 5 (3 + 2), 2 — every one on the same connection.
    assert.deepEqual(
      peer.messages.map((m) => m.rcpts.length),
      [3, 2, 3, 2, 2],
    );
    assert.equal(new Set(peer.messages.map((m) => m.session)).size, 1);
    assert.deepEqual(peer.messages.flatMap((m) => m.rcpts.map((r) => r.address)).sort(), rcpts);
  });
});

describe('outbound: what goes over the wire', () => {
  it('sends the stored message byte for byte, dot-stuffed, after the transform chain', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port);
    const stamp = definePlugin({
      name: 'test-stamp',
      setup: () => ({
        async transform({ content }) {
          return Readable.from(
            (async function* () {
              yield Buffer.from('X-Stamped: yes\r\n');
              yield* content;
            })(),
          );
        },
      }),
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
      before: [stamp],
    });
    const body = Buffer.concat([
      Buffer.from('Subject: dots\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n'),
      Buffer.from(
        randomBytes(600_000)
          .toString('base64')
          .replace(/(.{76})/g, '$1\r\n.'),
      ),
      Buffer.from('\r\n.\r\n'),
    ]);
    const [o] = await sender.settled(await sender.submit(['bob@a.test'], body), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(peer.messages.length, 1);
    assert.ok(
      peer.messages[0]!.data.equals(Buffer.concat([Buffer.from('X-Stamped: yes\r\n'), body])),
      'the peer unstuffed exactly the transformed message',
    );
  });

  it('defers (and sends nothing) when the transform chain fails', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port);
    const broken = definePlugin({
      name: 'test-broken-transform',
      setup: () => ({
        async transform() {
          throw new Error('signing key missing');
        },
      }),
    });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
      before: [broken],
    });
    const [o] = await sender.settled(await sender.submit(['bob@a.test']), 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['deferred', 451, '4.3.0']);
    assert.equal(peer.messages.length, 0);
  });

  it('passes SIZE, BODY=8BITMIME, SMTPUTF8 and the DSN parameters on when the peer offers them', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port, { hideDSN: false });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const content = Buffer.from('Subject: caf\u00e9\r\n\r\nCaf\u00e9 cr\u00e8me\r\n', 'utf8');
    const id = await sender.submit(
      [
        { address: 'bob@a.test', notify: ['SUCCESS', 'FAILURE'], orcpt: 'bob+orig@a.test' },
        { address: 'j\u00f6rg@a.test', notify: ['NEVER'] },
      ],
      content,
      {
        from: 'andr\u00e9@petrel.test',
        mailParams: { body: '8BITMIME', smtputf8: true, ret: 'HDRS', envid: 'QQ 1+2=3' },
      },
    );
    const outcomes = await sender.settled(id, 2);
    assert.ok(
      outcomes.every((o) => o.status === 'delivered' && o.dsnPassedOn),
      `delivered, and the peer reports from now on: ${JSON.stringify(outcomes)}`,
    );
    const m = peer.messages[0]!;
    assert.equal(m.mailFrom, 'andr\u00e9@petrel.test');
    assert.deepEqual(m.mailArgs, {
      SIZE: String(content.length),
      BODY: '8BITMIME',
      SMTPUTF8: true,
      RET: 'HDRS',
      ENVID: 'QQ 1+2=3', // sent as xtext (QQ+201+2B2+3D3), decoded by the peer
    });
    const mail = [...peer.commands.values()].flat().find((c) => /^MAIL/i.test(c));
    assert.match(mail!, / ENVID=QQ\+201\+2B2\+3D3$/);
    const rcpt = [...peer.commands.values()].flat().find((c) => /^RCPT/i.test(c));
    assert.equal(rcpt, 'RCPT TO:<bob@a.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Borig@a.test');
    assert.deepEqual(
      m.rcpts.map((r) => [r.address, r.args]),
      [
        ['bob@a.test', { NOTIFY: 'SUCCESS,FAILURE', ORCPT: 'rfc822;bob+orig@a.test' }],
        ['j\u00f6rg@a.test', { NOTIFY: 'NEVER' }],
      ],
    );
    assert.ok(m.data.equals(content));
    assert.deepEqual(sender.peers.at(-1), { eightBitMime: true, smtputf8: true });
  });

  it('leaves out what the peer does not offer, and labels undeclared 8-bit content', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port, { hideDSN: true, hide8BITMIME: true, size: 0 });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const eight = Buffer.from('Subject: x\r\n\r\nna\u00efve\r\n', 'utf8');
    const a = await sender.submit([{ address: 'bob@a.test', notify: ['FAILURE'] }], eight, {
      mailParams: { body: '8BITMIME', smtputf8: false, ret: 'FULL' },
    });
    const [o] = await sender.settled(a, 1);
    assert.deepEqual([o!.status, o!.dsnPassedOn], ['delivered', false], 'nobody else reports on it');
    assert.deepEqual(peer.messages[0]!.mailArgs, {}, 'no SIZE, BODY or RET without the extensions');
    assert.deepEqual(peer.messages[0]!.rcpts[0]!.args, {});
    assert.deepEqual(sender.peers.at(-1), { eightBitMime: false, smtputf8: true });

    // A peer with 8BITMIME: undeclared 8-bit octets still get BODY=8BITMIME; 7-bit content does not.
    const env2 = await oneMx(t, '127.0.0.3');
    if (!env2) return;
    const peer2 = await smtpPeer(t, '127.0.0.3', env2.port);
    const sender2 = await startSender(t, {
      dnsServer: env2.dns.server,
      outbound: { port: env2.port, timeouts: FAST },
    });
    await sender2.settled(await sender2.submit(['bob@a.test'], eight), 1);
    await sender2.settled(await sender2.submit(['bob@a.test'], MESSAGE), 1);
    assert.deepEqual(
      peer2.messages.map((m) => m.mailArgs.BODY),
      ['8BITMIME', undefined],
    );
  });

  it('fails early (5.3.4) a message larger than the peer declared in SIZE', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port, { size: 1000 });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const big = Buffer.from(`Subject: big\r\n\r\n${'x'.repeat(76)}\r\n`.repeat(30));
    const [o] = await sender.settled(await sender.submit(['bob@a.test'], big), 1);
    assert.deepEqual([o!.status, o!.reply.code, o!.reply.enhanced], ['failed', 552, '5.3.4']);
    assert.match(String(o!.reply.text), /exceeds the limit of 1000 octets/);
    assert.equal(peer.messages.length, 0);
    const mails = [...peer.commands.values()].flat().filter((c) => /^MAIL/i.test(c));
    assert.deepEqual(mails, [], 'not even MAIL FROM was sent');
  });

  it('fails (5.6.7) what needs SMTPUTF8 when the peer lacks it, and sends the rest', async (t) => {
    const env = await oneMx(t);
    if (!env) return;
    const peer = await smtpPeer(t, '127.0.0.2', env.port, { hideSMTPUTF8: true });
    const sender = await startSender(t, {
      dnsServer: env.dns.server,
      outbound: { port: env.port, timeouts: FAST },
    });
    const a = await sender.submit(['bob@a.test', 'j\u00f6rg@a.test'], MESSAGE, {
      mailParams: { smtputf8: true },
    });
    assert.deepEqual(
      summary(await sender.settled(a, 2)).map((s) => s.slice(0, 4)),
      [
        ['bob@a.test', 'delivered', 250, '2.0.0'],
        ['j\u00f6rg@a.test', 'failed', 553, '5.6.7'],
      ],
    );
    assert.deepEqual(peer.messages[0]!.mailArgs.SMTPUTF8, undefined);
    // Decided here, not said by the peer: no `remote`, so a bounce does not quote the peer.
    const failed = (await sender.settled(a, 2)).find((o) => o.status === 'failed')!;
    assert.equal(failed.reply.remote, undefined);
    assert.match(String(failed.reply.text), /^mx\.a\.test \[127\.0\.0\.2\] does not support SMTPUTF8/);
    // A UTF-8 header with an all-ASCII envelope cannot go either (RFC 6531 §3.2)…
    const b = await sender.submit(['bob@a.test'], 'Subject: gr\u00fc\u00dfe\r\n\r\nhi\r\n', {
      mailParams: { smtputf8: true },
    });
    const [hb] = await sender.settled(b, 1);
    assert.deepEqual([hb!.status, hb!.reply.enhanced], ['failed', '5.6.7']);
    assert.match(String(hb!.reply.text), /message header/);
    // …but an IDN domain with an ASCII local part goes as its A-label.
    const c = await sender.submit(['bob@a.test'], MESSAGE, { from: 'alice@b\u00fccher.test' });
    const [ok] = await sender.settled(c, 1);
    assert.equal(ok!.status, 'delivered');
    const mails = [...peer.commands.values()].flat().filter((c) => /^MAIL/i.test(c));
    assert.equal(mails.at(-1), `MAIL FROM:<alice@xn--bcher-kva.test> SIZE=${MESSAGE.length}`);
  });
});
