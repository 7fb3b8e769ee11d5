import 'reflect-metadata';
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { validateConfig } from '../../core/config/load.js';
import { DnsResolver } from '../../core/services/dns.js';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { lookupMx, orderMx, planDomain, Self, type PlanOptions } from './mx.js';
import { FAST, freePortOn, smtpPeer, startSender, summary } from './test-support.js';

function resolverFor(server: string): DnsResolver {
  const { config } = validateConfig(
    { listeners: [{ kind: 'smtp', port: 0 }], dns: { servers: [server], timeout: 1000 } },
    '(test)',
    '/',
  );
  return new DnsResolver(config);
}

describe('outbound: MX rules', () => {
  it('orders MX hosts by preference and shuffles hosts of equal preference', () => {
    const records = [
      { exchange: 'c.test', priority: 20 },
      { exchange: 'a.test', priority: 10 },
      { exchange: 'b.test.', priority: 10 },
      { exchange: 'd.test', priority: 30 },
    ];
    const seen = new Set<string>();
    for (let i = 0; i < 50; i++) {
      const hosts = orderMx(records).map((h) => h.host);
      assert.deepEqual(hosts.slice(2), ['c.test', 'd.test']);
      assert.deepEqual([...hosts.slice(0, 2)].sort(), ['a.test', 'b.test']);
      seen.add(hosts[0]!);
    }
    assert.deepEqual([...seen].sort(), ['a.test', 'b.test'], 'either host of preference 10 may come first');
    assert.deepEqual(
      orderMx(records, () => 0).map((h) => h.host),
      ['b.test', 'a.test', 'c.test', 'd.test'],
    );
  });

  it('recognises our own listeners: exact address, wildcard on a local address, and our name', () => {
    const self = new Self(
      ['petrel.test'],
      [
        { address: '127.0.0.5', port: 2525 },
        { address: '0.0.0.0', port: 2600 },
      ],
    );
    assert.ok(self.isAddress('127.0.0.5', 2525));
    assert.ok(!self.isAddress('127.0.0.5', 25), 'another port is another server');
    assert.ok(!self.isAddress('127.0.0.6', 2525));
    assert.ok(self.isAddress('127.0.0.9', 2600), 'a wildcard listener takes every local address');
    assert.ok(self.isAddress('::ffff:127.0.0.9', 2600));
    assert.ok(!self.isAddress('192.0.2.200', 2600));
    assert.ok(self.isName('PETREL.test.'));
    assert.ok(!self.isName('mx.petrel.test'));
  });

  it('looks up MX, implicit MX, null MX, NXDOMAIN and failing lookups in real DNS', async (t) => {
    const dns = await startDnsmasq(t, {
      mx: [
        { domain: 'a.test', host: 'mx2.a.test', preference: 20 },
        { domain: 'a.test', host: 'mx1.a.test', preference: 10 },
      ],
      hosts: [
        { name: 'mx1.a.test', addresses: ['127.0.0.2'] },
        { name: 'mx2.a.test', addresses: ['127.0.0.3', '::1'] },
        { name: 'implicit.test', addresses: ['127.0.0.4'] },
        { name: 'noaddr-mx.test', addresses: ['127.0.0.9'] },
      ],
      nullMx: ['null.test'],
      unanswered: ['slow.test'],
      txt: [{ name: 'a.test', text: 'v=spf1 ip4:127.0.0.1 -all' }],
    });
    if (!dns) return;
    const resolver = resolverFor(dns.server);
    assert.deepEqual(await resolver.resolveTxt('a.test'), [['v=spf1 ip4:127.0.0.1 -all']]);
    const opts: PlanOptions = {
      dns: resolver,
      families: ['ipv6', 'ipv4'],
      port: 25,
      self: new Self(['petrel.test'], [{ address: '127.0.0.1', port: 25 }]),
    };
    assert.deepEqual(await lookupMx(resolver, 'a.test'), {
      kind: 'hosts',
      hosts: [
        { host: 'mx1.a.test', preference: 10 },
        { host: 'mx2.a.test', preference: 20 },
      ],
      implicit: false,
    });
    assert.deepEqual(await planDomain('a.test', opts), {
      kind: 'hops',
      hops: [
        { host: 'mx1.a.test', ip: '127.0.0.2' },
        { host: 'mx2.a.test', ip: '::1' },
        { host: 'mx2.a.test', ip: '127.0.0.3' },
      ],
    });
    assert.deepEqual(
      await planDomain('a.test', { ...opts, families: ['ipv4'] }),
      {
        kind: 'hops',
        hops: [
          { host: 'mx1.a.test', ip: '127.0.0.2' },
          { host: 'mx2.a.test', ip: '127.0.0.3' },
        ],
      },
      'IPv6 can be left out',
    );
    assert.deepEqual(await planDomain('implicit.test', opts), {
      kind: 'hops',
      hops: [{ host: 'implicit.test', ip: '127.0.0.4' }],
    });
    assert.deepEqual(await planDomain('null.test', opts), {
      kind: 'failed',
      reply: { code: 556, enhanced: '5.1.10', text: 'Domain null.test does not accept mail (null MX)' },
    });
    assert.deepEqual(await planDomain('nx.test', opts), {
      kind: 'failed',
      reply: { code: 550, enhanced: '5.1.2', text: 'Domain nx.test does not exist (DNS: NXDOMAIN)' },
    });
    const slow = await planDomain('slow.test', opts);
    assert.equal(slow.kind, 'deferred');
    assert.ok(slow.kind === 'deferred' && slow.reply.enhanced === '4.4.3', JSON.stringify(slow));
    assert.deepEqual(await planDomain('[127.0.0.7]', opts), {
      kind: 'hops',
      hops: [{ host: '127.0.0.7', ip: '127.0.0.7' }],
    });
  });

  it('tries only MX hosts more preferred than itself, and calls it a loop when none is', async (t) => {
    const dns = await startDnsmasq(t, {
      mx: [
        { domain: 'backup.test', host: 'primary.backup.test', preference: 10 },
        { domain: 'backup.test', host: 'me.backup.test', preference: 20 },
        { domain: 'backup.test', host: 'other.backup.test', preference: 30 },
        { domain: 'loop.test', host: 'me.backup.test', preference: 10 },
        { domain: 'named.test', host: 'petrel.test', preference: 10 },
      ],
      hosts: [
        { name: 'primary.backup.test', addresses: ['127.0.0.2'] },
        { name: 'me.backup.test', addresses: ['127.0.0.5'] },
        { name: 'other.backup.test', addresses: ['127.0.0.3'] },
        { name: 'petrel.test', addresses: ['127.0.0.6'] },
      ],
    });
    if (!dns) return;
    const opts: PlanOptions = {
      dns: resolverFor(dns.server),
      families: ['ipv4'],
      port: 2525,
      self: new Self(['petrel.test'], [{ address: '127.0.0.5', port: 2525 }]),
    };
    assert.deepEqual(await planDomain('backup.test', opts), {
      kind: 'hops',
      hops: [{ host: 'primary.backup.test', ip: '127.0.0.2' }],
    });
    const loop = { code: 554, enhanced: '5.4.6' };
    const l1 = await planDomain('loop.test', opts);
    assert.deepEqual(l1, {
      kind: 'failed',
      reply: { ...loop, text: 'mail for loop.test loops back to myself' },
    });
    const l2 = await planDomain('named.test', opts);
    assert.deepEqual(l2, {
      kind: 'failed',
      reply: { ...loop, text: 'mail for named.test loops back to myself' },
    });
  });
});

describe('outbound: MX delivery through the queue', () => {
  it('fails over from an MX that refuses connections to the next, over every address', async (t) => {
    const port = await freePortOn(['127.0.0.2', '127.0.0.3']);
    const dns = await startDnsmasq(t, {
      mx: [
        { domain: 'a.test', host: 'mx1.a.test', preference: 10 },
        { domain: 'a.test', host: 'mx2.a.test', preference: 20 },
      ],
      // mx1 has nobody listening (connection refused); mx2's IPv6 address neither; its IPv4 one takes it.
      hosts: [
        { name: 'mx1.a.test', addresses: ['127.0.0.2'] },
        { name: 'mx2.a.test', addresses: ['127.0.0.3', '::1'] },
      ],
    });
    if (!dns) return;
    const mx2 = await smtpPeer(t, '127.0.0.3', port);
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const id = await sender.submit(['bob@a.test', 'carol@a.test']);
    const outcomes = await sender.settled(id, 2);
    assert.deepEqual(summary(outcomes), [
      ['bob@a.test', 'delivered', 250, '2.0.0'],
      ['carol@a.test', 'delivered', 250, '2.0.0'],
    ]);
    assert.equal(outcomes[0]!.reply.remote, 'mx2.a.test [127.0.0.3]');
    assert.equal(mx2.messages.length, 1, 'both recipients in one transaction');
    assert.deepEqual(
      mx2.messages[0]!.rcpts.map((r) => r.address),
      ['bob@a.test', 'carol@a.test'],
    );
    assert.equal(mx2.messages[0]!.mailFrom, 'alice@petrel.test');
  });

  it('delivers to the implicit MX (the A record) when a domain has no MX', async (t) => {
    const port = await freePortOn(['127.0.0.4']);
    const dns = await startDnsmasq(t, { hosts: [{ name: 'implicit.test', addresses: ['127.0.0.4'] }] });
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.4', port);
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['dave@implicit.test']), 1);
    assert.equal(o!.status, 'delivered');
    assert.equal(o!.reply.remote, 'implicit.test [127.0.0.4]');
    assert.equal(peer.messages.length, 1);
  });

  it('fails null MX (5.1.10) and NXDOMAIN (5.1.2) at once, defers a DNS timeout (4.4.3)', async (t) => {
    const dns = await startDnsmasq(t, { nullMx: ['null.test'], unanswered: ['slow.test'] });
    if (!dns) return;
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port: 2, timeouts: FAST } });
    const id = await sender.submit(['a@null.test', 'b@nx.test', 'c@slow.test']);
    const outcomes = await sender.settled(id, 3);
    assert.deepEqual(summary(outcomes), [
      ['a@null.test', 'failed', 556, '5.1.10'],
      ['b@nx.test', 'failed', 550, '5.1.2'],
      ['c@slow.test', 'deferred', 451, '4.4.3'],
    ]);
    assert.equal(outcomes.find((o) => o.recipient === 'a@null.test')!.reply.remote, undefined);
  });

  it('refuses to deliver to itself: an MX that is one of our listeners is a loop (5.4.6)', async (t) => {
    const port = await freePortOn(['127.0.0.5']);
    const dns = await startDnsmasq(t, {
      mx: [{ domain: 'loop.test', host: 'mx.loop.test', preference: 10 }],
      hosts: [{ name: 'mx.loop.test', addresses: ['127.0.0.5'] }],
    });
    if (!dns) return;
    const sender = await startSender(t, {
      dnsServer: dns.server,
      outbound: { port, timeouts: FAST },
      config: {
        listeners: [
          { kind: 'smtp', address: '127.0.0.1', port: 0 },
          { kind: 'smtp', address: '127.0.0.5', port },
        ],
      },
    });
    const [o] = await sender.settled(await sender.submit(['eve@loop.test']), 1);
    assert.deepEqual(
      [o!.status, o!.reply.code, o!.reply.enhanced, o!.reply.text],
      ['failed', 554, '5.4.6', 'mail for loop.test loops back to myself'],
    );
  });

  it('calls it a loop when the peer greets with our own name (a listener behind NAT)', async (t) => {
    const port = await freePortOn(['127.0.0.6']);
    const dns = await startDnsmasq(t, {
      mx: [{ domain: 'nat.test', host: 'gw.nat.test', preference: 10 }],
      hosts: [{ name: 'gw.nat.test', addresses: ['127.0.0.6'] }],
    });
    if (!dns) return;
    const peer = await smtpPeer(t, '127.0.0.6', port, { name: 'petrel.test' });
    const sender = await startSender(t, { dnsServer: dns.server, outbound: { port, timeouts: FAST } });
    const [o] = await sender.settled(await sender.submit(['eve@nat.test']), 1);
    assert.equal(o!.status, 'failed');
    assert.equal(o!.reply.enhanced, '5.4.6');
    assert.match(String(o!.reply.text), /loops back to myself/);
    assert.equal(peer.messages.length, 0);
  });
});
