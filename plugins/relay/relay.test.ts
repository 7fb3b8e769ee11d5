import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cidrProblem, compileCidrs, deny, Tokens, type PetrelConfig } from '../../core/index.js';
import { address, runHook, session, transaction } from '../../core/testing/index.js';
import { startServer, type TestServer } from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { hashPassword } from '../users/password.js';
import { writeUsersFile } from '../users/users-file.js';
import relay from './index.js';

const PASSWORD = 'relay test password';
const LOCAL = ['hamburger.edu', 'fries.test'];

describe('relay: trusted networks', () => {
  it('accepts networks and single addresses of both families', () => {
    for (const ok of [
      '127.0.0.0/8',
      '192.0.2.1',
      '0.0.0.0/0',
      '::1/128',
      '2001:db8::/32',
      'fe80::/10',
      '::/0',
    ]) {
      assert.equal(cidrProblem(ok), null, ok);
    }
  });

  it('refuses typos, out-of-range prefixes and host bits, saying what was meant', () => {
    assert.match(cidrProblem('10.0.0.0/33')!, /prefix length of 0 to 32/);
    assert.match(cidrProblem('10.0.0.300/8')!, /IPv4 or IPv6 address/);
    assert.match(cidrProblem('192.168.1.5/24')!, /did you mean 192\.168\.1\.0\/24\?/);
    assert.match(cidrProblem('2001:db8::1/32')!, /did you mean 2001:db8::\/32\?/);
    assert.match(cidrProblem('localhost')!, /IPv4 or IPv6 address/);
    assert.match(cidrProblem('10.0.0.0/8 192.168.0.0/16')!, /expected a network/);
  });

  it('matches client addresses, IPv4-mapped IPv6 ones included', () => {
    const trusted = compileCidrs(['192.0.2.0/24', '2001:db8:1::/48']);
    assert.equal(trusted('192.0.2.200'), true);
    assert.equal(trusted('::ffff:192.0.2.200'), true);
    assert.equal(trusted('192.0.3.1'), false);
    assert.equal(trusted('2001:db8:1:ffff::1'), true);
    assert.equal(trusted('2001:db8:2::1'), false);
    assert.equal(trusted('not an address'), false);
  });

  it('stops the server at boot when a network is mistyped, naming the key', async () => {
    await assert.rejects(
      startServer({
        entries: [{ name: 'relay', config: { trustedNetworks: ['10.0.0.0/8', '192.168.1.5/24'] } }],
      }),
      /plugins\[0\] \(relay\)\.config\.trustedNetworks\[1\]: expected no host bits .*did you mean 192\.168\.1\.0\/24/,
    );
  });
});

describe('relay: the rcpt hook', () => {
  const services = new Map<symbol, unknown>([
    [Tokens.Config, { localDomains: LOCAL } as unknown as PetrelConfig],
  ]);
  const rcpt = (to: string, over: Parameters<typeof session>[0] = {}) =>
    runHook(
      relay,
      'rcpt',
      { session: session(over), transaction: transaction(), recipient: address(to), params: {} },
      { services, config: { trustedNetworks: ['192.0.2.0/24'] } },
    );

  it('leaves local domains to the directory, accepts others only from users and trusted networks', async () => {
    const untrusted = { remote: { address: '198.51.100.7', port: 1 } };
    assert.equal((await rcpt('bob@hamburger.edu', untrusted)).kind, 'proceed');
    assert.equal((await rcpt('anyone@FRIES.TEST', untrusted)).kind, 'proceed');
    assert.deepEqual(await rcpt('user@remote.test', untrusted), deny(554, '5.7.1', 'Relaying denied'));
    assert.deepEqual(await rcpt('user@sub.hamburger.edu', untrusted), deny(554, '5.7.1', 'Relaying denied'));
    assert.equal(
      (await rcpt('user@remote.test', { ...untrusted, user: 'bob@hamburger.edu' })).kind,
      'accept',
    );
    assert.equal(
      (await rcpt('user@remote.test', { remote: { address: '192.0.2.9', port: 1 } })).kind,
      'accept',
    );
  });

  it('knows a local IDN domain in either form', async () => {
    const idn = new Map<symbol, unknown>([
      [Tokens.Config, { localDomains: ['bücher.test'] } as unknown as PetrelConfig],
    ]);
    const untrusted = session({ remote: { address: '198.51.100.7', port: 1 } });
    for (const to of ['ünal@bücher.test', 'unal@xn--bcher-kva.test', 'unal@BÜCHER.test']) {
      const v = await runHook(
        relay,
        'rcpt',
        { session: untrusted, transaction: transaction(), recipient: address(to), params: {} },
        { services: idn, config: { trustedNetworks: [] } },
      );
      assert.equal(v.kind, 'proceed', to);
    }
  });
});

/** A server with relay (nothing trusted but 192.0.2.0/24) and users (bob; a catch-all for fries.test). */
async function relayServer(trustedNetworks: string[]): Promise<{ srv: TestServer; dir: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-relay-'));
  const usersFile = join(dir, 'users.json');
  const aliasesFile = join(dir, 'aliases.yaml');
  await writeUsersFile(usersFile, {
    users: { 'bob@hamburger.edu': { password: await hashPassword(PASSWORD, { iterations: 4096 }) } },
  });
  writeFileSync(aliasesFile, "'@fries.test': bob@hamburger.edu\n");
  const srv = await startServer({
    entries: [
      { name: 'relay', config: { trustedNetworks } },
      { name: 'users', config: { usersFile, aliasesFile, auth: { delayMs: 0 } } },
    ],
    config: { localDomains: LOCAL },
  });
  return { srv, dir };
}

async function mx(
  srv: TestServer,
  opts: { smtputf8?: boolean; localAddress?: string } = {},
): Promise<SmtpClient> {
  const c = await SmtpClient.connect(srv.port, '127.0.0.1', { localAddress: opts.localAddress });
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd(`MAIL FROM:<someone@remote.test>${opts.smtputf8 ? ' SMTPUTF8' : ''}`, /^250 /);
  return c;
}

describe('relay: never an open relay, however the address is dressed up', () => {
  let srv: TestServer;
  let dir: string;
  before(async () => {
    ({ srv, dir } = await relayServer(['192.0.2.0/24']));
  });
  after(async () => {
    await srv.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const cases: [string, string, RegExp, boolean?][] = [
    ['a plain remote address', 'user@remote.test', /^554 5\.7\.1 Relaying denied/],
    [
      'the percent hack at a local domain',
      'user%remote.test@hamburger.edu',
      /^550 5\.1\.1 No such user here/,
    ],
    ['the percent hack at a catch-all domain', 'user%remote.test@fries.test', /^550 5\.1\.1 /],
    ['a source route through a local domain', '@hamburger.edu:user@remote.test', /^554 5\.7\.1 /],
    ['a source route of several hops', '@hamburger.edu,@fries.test:user@remote.test', /^554 5\.7\.1 /],
    ['a quoted local part holding a remote address', '"user@remote.test"@hamburger.edu', /^550 5\.1\.1 /],
    ['the same at a catch-all domain', '"user@remote.test"@fries.test', /^550 5\.1\.1 /],
    ['a UUCP bang path', 'remote.test!user@hamburger.edu', /^550 5\.1\.1 /],
    ['a bang path at a catch-all domain', 'remote.test!user@fries.test', /^550 5\.1\.1 /],
    ['a trailing dot on the domain', 'user@remote.test.', /^501 5\.1\.3 /],
    ['a trailing dot on a local domain', 'bob@hamburger.edu.', /^501 5\.1\.3 /],
    ['an address literal', 'user@[203.0.113.9]', /^554 5\.7\.1 /],
    ['an IPv6 address literal', 'user@[IPv6:2001:db8::9]', /^554 5\.7\.1 /],
    ['an upper-case remote domain', 'USER@REMOTE.TEST', /^554 5\.7\.1 /],
    ['a mixed-case remote domain', 'User@Remote.Test', /^554 5\.7\.1 /],
    ['a subdomain of a local domain', 'user@mail.hamburger.edu', /^554 5\.7\.1 /],
    ['a local domain as a prefix', 'user@hamburger.edu.remote.test', /^554 5\.7\.1 /],
    ['an IDN domain with SMTPUTF8', 'user@bücher.test', /^554 5\.7\.1 /, true],
    ['an IDN domain in A-label form', 'user@xn--bcher-kva.test', /^554 5\.7\.1 /],
    ['an unknown user at a local domain', 'nobody@hamburger.edu', /^550 5\.1\.1 /],
  ];

  for (const [what, rcpt, expected, utf8] of cases) {
    it(`refuses ${what}: RCPT TO:<${rcpt}>`, async () => {
      const c = await mx(srv, { smtputf8: utf8 });
      c.write(Buffer.from(`RCPT TO:<${rcpt}>\r\n`, 'utf8'));
      await c.expect(expected);
      await c.cmd('QUIT', /^221 /);
      c.close();
    });
  }

  it('accepts local users however the domain is written: bob@HAMBURGER.EDU, BOB@Hamburger.Edu, "bob"@…', async () => {
    const c = await mx(srv);
    await c.cmd('RCPT TO:<bob@HAMBURGER.EDU>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<BOB@Hamburger.Edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<"bob"@hamburger.edu>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<anyone@FRIES.test>', /^250 2\.1\.5 /);
    c.close();
  });

  it('takes no message when every recipient was a relay attempt', async () => {
    const c = await mx(srv);
    c.write(
      'RCPT TO:<user@remote.test>\r\nRCPT TO:<user%remote.test@hamburger.edu>\r\nRCPT TO:<@hamburger.edu:user@remote.test>\r\nDATA\r\n',
    );
    await c.expect(/^554 5\.7\.1 /);
    await c.expect(/^550 5\.1\.1 /);
    await c.expect(/^554 5\.7\.1 /);
    await c.expect(/^554 5\.5\.1 No valid recipients/);
    c.close();
  });

  it('relays for an authenticated user, but a routing local part still is no route', async () => {
    const c = await SmtpClient.connect(srv.submissionsPort, '127.0.0.1', { tls: true });
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd(`AUTH PLAIN ${Buffer.from(`\0bob@hamburger.edu\0${PASSWORD}`).toString('base64')}`, /^235 /);
    await c.cmd('MAIL FROM:<bob@hamburger.edu>', /^250 /);
    await c.cmd('RCPT TO:<user@remote.test>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<user@[203.0.113.9]>', /^250 2\.1\.5 /);
    await c.cmd('RCPT TO:<user%remote.test@hamburger.edu>', /^550 5\.1\.1 /);
    await c.cmd('RCPT TO:<remote.test!user@hamburger.edu>', /^550 5\.1\.1 /);
    c.close();
  });
});

describe('relay: trusted networks over a real session', () => {
  let srv: TestServer;
  let dir: string;
  before(async () => {
    ({ srv, dir } = await relayServer(['127.0.0.1/32']));
  });
  after(async () => {
    await srv.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('relays for a client in a trusted network and refuses one outside it', async () => {
    const inside = await mx(srv, { localAddress: '127.0.0.1' });
    await inside.cmd('RCPT TO:<user@remote.test>', /^250 2\.1\.5 /);
    await inside.cmd('RCPT TO:<nobody@hamburger.edu>', /^550 5\.1\.1 /);
    inside.close();
    const outside = await mx(srv, { localAddress: '127.0.0.2' });
    await outside.cmd('RCPT TO:<user@remote.test>', /^554 5\.7\.1 /);
    outside.close();
    assert.ok(srv.logs.some((l) => l.msg === 'relay refused' && l.remote === '127.0.0.2'));
  });
});
