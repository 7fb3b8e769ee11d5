import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { deny, Tokens, type PetrelConfig } from '../../core/index.js';
import { address, memoryState, runHook, session, transaction } from '../../core/testing/index.js';
import { AuthThrottle, clientKey } from './auth-throttle.js';
import { parseAliasesFile } from './aliases-file.js';
import { DirectoryData } from './directory-data.js';
import { DirectoryStore } from './directory-store.js';
import users from './index.js';
import {
  hashPassword,
  hashScrypt,
  hmacSha256,
  needsUpgrade,
  parseHash,
  saltedPassword,
  SCRAM_ITERATIONS,
  sha256,
  verifyPassword,
} from './password.js';
import { DirectoryFileError, parseUsersFile, writeUsersFile } from './users-file.js';

const FAST = { iterations: 4096 };
const silent = pino({ level: 'silent' });

const key = (text: string): { local: string; domain: string; key: string } => {
  const at = text.lastIndexOf('@');
  return { local: text.slice(0, at), domain: text.slice(at + 1), key: text };
};

function data(
  usersJson: object,
  aliasesYaml = '',
  opts: { domains?: string[]; separators?: string; postmasters?: string[] } = {},
): DirectoryData {
  const u = parseUsersFile(JSON.stringify(usersJson), 'users.json').users;
  const a = parseAliasesFile(aliasesYaml, 'aliases.yaml');
  const domains = new Set(opts.domains ?? ['hamburger.edu', 'fries.test', 'xn--bcher-kva.test']);
  return new DirectoryData(u, a, domains, opts.separators ?? '+', (opts.postmasters ?? []).map(key));
}

describe('users: password hashes', () => {
  it('hashes as SCRAM-SHA-256 credentials in the form Dovecot checks, and verifies them', async () => {
    const a = await hashPassword('correct horse', FAST);
    const b = await hashPassword('correct horse', FAST);
    assert.match(a, /^\{SCRAM-SHA-256\}4096,[A-Za-z0-9+/]+=*,[A-Za-z0-9+/]+=*,[A-Za-z0-9+/]+=*$/);
    assert.notEqual(a, b, 'two hashes of one password differ (random salt)');
    assert.equal(await verifyPassword('correct horse', a), true);
    assert.equal(await verifyPassword('correct horsf', a), false);
    assert.equal(await verifyPassword('', a), false);
    assert.equal(needsUpgrade(a), false);
    assert.match(await hashPassword('x'), new RegExp(`^\\{SCRAM-SHA-256\\}${SCRAM_ITERATIONS},`));
  });

  it('agrees with the RFC 7677 example: the StoredKey and ServerKey of "pencil"', async () => {
    // RFC 7677 §3: salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
    const salt = Buffer.from('W22ZaJ0SNY7soEsUEjb6gQ==', 'base64');
    const salted = await saltedPassword('pencil', salt, 4096);
    const clientKey = hmacSha256(salted, 'Client Key');
    const authMessage =
      'n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,' +
      's=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0';
    const signature = hmacSha256(sha256(clientKey), authMessage);
    const proof = Buffer.from(clientKey.map((x, i) => x ^ signature[i]!));
    assert.equal(proof.toString('base64'), 'dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=');
    const serverSignature = hmacSha256(hmacSha256(salted, 'Server Key'), authMessage);
    assert.equal(serverSignature.toString('base64'), '6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=');
  });

  it('still verifies the older scrypt hashes, marks them for upgrade, and refuses malformed or absurd ones', async () => {
    const old = await hashScrypt('pw', { N: 1024, r: 8, p: 1 });
    assert.match(old, /^\$scrypt\$N=1024,r=8,p=1\$/);
    assert.equal(await verifyPassword('pw', old), true);
    assert.equal(await verifyPassword('pv', old), false);
    assert.equal(needsUpgrade(old), true);
    assert.equal(await verifyPassword('pw', 'pw'), false, 'plain text is never a hash');
    assert.equal(
      parseHash('$scrypt$N=1000,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=='),
      null,
      'N not 2^k',
    );
    assert.equal(
      parseHash('$scrypt$N=2097152,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=='),
      null,
      'N too big',
    );
    const keys = `${Buffer.alloc(16).toString('base64')},${Buffer.alloc(32).toString('base64')},${Buffer.alloc(32).toString('base64')}`;
    assert.notEqual(parseHash(`{SCRAM-SHA-256}4096,${keys}`), null);
    assert.equal(parseHash(`{SCRAM-SHA-256}1000,${keys}`), null, 'below RFC 7677 §4 minimum');
    assert.equal(parseHash(`{SCRAM-SHA-256}99999999,${keys}`), null, 'too many iterations');
  });
});

describe('users: the users file', () => {
  it('refuses a plain-text password, naming the file and the user', () => {
    assert.throws(
      () =>
        parseUsersFile(JSON.stringify({ users: { 'bob@hamburger.edu': { password: 'hunter2' } } }), 'u.json'),
      (err: Error) =>
        err instanceof DirectoryFileError &&
        /u\.json: users\["bob@hamburger\.edu"\]\.password: expected a password hash/.test(err.message),
    );
  });

  it('refuses an address claimed by two users, a login twice, and routing characters', async () => {
    const password = await hashPassword('x', FAST);
    const two = {
      users: {
        'a@hamburger.edu': { password },
        'b@hamburger.edu': { password, addresses: ['A@hamburger.edu'] },
      },
    };
    assert.throws(
      () => parseUsersFile(JSON.stringify(two), 'u.json'),
      /a@hamburger\.edu already belongs to "a@hamburger\.edu"/,
    );
    const twice = { users: { 'a@hamburger.edu': { password }, 'A@Hamburger.EDU': { password } } };
    assert.throws(
      () => parseUsersFile(JSON.stringify(twice), 'u.json'),
      /the same login as "a@hamburger\.edu"/,
    );
    const routed = { users: { 'a%b@hamburger.edu': { password } } };
    assert.throws(() => parseUsersFile(JSON.stringify(routed), 'u.json'), /expected an address/);
  });

  it('is written atomically with mode 0600', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-users-'));
    try {
      const file = join(dir, 'users.json');
      writeFileSync(file, '{"users":{}}', { mode: 0o644 });
      await writeUsersFile(file, {
        users: { 'bob@hamburger.edu': { password: await hashPassword('x', FAST) } },
      });
      assert.equal(statSync(file).mode & 0o777, 0o600);
      assert.equal(parseUsersFile(readFileSync(file, 'utf8'), file).users.length, 1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('users: resolving addresses', () => {
  let password: string;
  before(async () => {
    password = await hashPassword('x', FAST);
  });
  const base = (): object => ({
    users: {
      'bob@hamburger.edu': { password, addresses: ['robert@hamburger.edu'] },
      alice: { password, address: 'alice@hamburger.edu' },
      'ünal@bücher.test': { password },
    },
  });

  it('finds a user by any of its addresses, in any case, with the primary address as mailbox', () => {
    const d = data(base());
    for (const a of ['bob@hamburger.edu', 'BOB@HAMBURGER.EDU', 'Robert@hamburger.edu']) {
      const r = d.resolveKey(key(a.toLowerCase()));
      assert.deepEqual(r?.targets, [
        { kind: 'local', user: 'bob@hamburger.edu', local: 'bob', domain: 'hamburger.edu', tag: null },
      ]);
    }
    assert.equal(d.resolveKey(key('alice@hamburger.edu'))?.targets[0]?.kind, 'local');
    assert.equal(d.resolveKey(key('carol@hamburger.edu')), null);
    assert.equal(d.resolveKey(key('bob@elsewhere.test')), null, 'not a local domain');
  });

  it('keeps the sub-address as the tag, and follows aliases with it', () => {
    const d = data(base(), 'sales@hamburger.edu: bob@hamburger.edu\n');
    assert.deepEqual(d.resolveKey(key('bob+lists@hamburger.edu'))?.targets[0], {
      kind: 'local',
      user: 'bob@hamburger.edu',
      local: 'bob',
      domain: 'hamburger.edu',
      tag: 'lists',
    });
    assert.equal((d.resolveKey(key('sales+q3@hamburger.edu'))?.targets[0] as { tag: string }).tag, 'q3');
    assert.equal(d.resolveKey(key('carol+x@hamburger.edu')), null);
    const off = data(base(), '', { separators: '' });
    assert.equal(off.resolveKey(key('bob+lists@hamburger.edu')), null, 'separator turned off');
    const two = data(base(), '', { separators: '+-' });
    assert.equal((two.resolveKey(key('bob-x+y@hamburger.edu'))?.targets[0] as { tag: string }).tag, 'x+y');
  });

  it('expands aliases to every mailbox once, marks targets outside localDomains remote, survives loops', () => {
    const d = data(
      base(),
      [
        'team@hamburger.edu: [bob@hamburger.edu, alice@hamburger.edu, carol@elsewhere.test]',
        'all@hamburger.edu: [team@hamburger.edu, robert@hamburger.edu]',
        'loop1@hamburger.edu: loop2@hamburger.edu',
        'loop2@hamburger.edu: [loop1@hamburger.edu, alice@hamburger.edu]',
      ].join('\n'),
    );
    assert.deepEqual(
      d
        .resolveKey(key('all@hamburger.edu'))
        ?.targets.map((t) => (t.kind === 'local' ? t.user : `remote:${t.address}`)),
      ['bob@hamburger.edu', 'alice', 'remote:carol@elsewhere.test'],
    );
    assert.deepEqual(
      d.resolveKey(key('loop1@hamburger.edu'))?.targets.map((t) => t.kind === 'local' && t.user),
      ['alice'],
    );
  });

  it('sends unknown users of a domain to its catch-all, but never a local part that looks like a route', () => {
    const d = data(base(), "'@fries.test': bob@hamburger.edu\n");
    assert.equal(d.resolveKey(key('anyone@fries.test'))?.targets[0]?.kind, 'local');
    for (const local of ['user%remote.test', 'remote.test!user', 'user@remote.test']) {
      assert.equal(d.resolveKey({ local, domain: 'fries.test', key: `${local}@fries.test` }), null, local);
    }
    assert.equal(d.resolveKey(key('anyone@hamburger.edu')), null, 'no catch-all there');
  });

  it('sends postmaster@ every local domain to its own entry, else the first fallback that reaches a mailbox', () => {
    const user = (t: { kind: string; user?: string; address?: string } | undefined): string | undefined =>
      t?.kind === 'local' ? t.user : t?.address;
    // No entry and no fallback: nowhere, and the load says so.
    const none = data(base());
    assert.equal(none.resolveKey(key('postmaster@fries.test')), null);
    assert.ok(none.warnings().some((w) => w.startsWith('postmaster@fries.test reaches no mailbox')));
    // The defaults the store gives: the configured postmaster first, then postmaster@ the first domain.
    const d = data(base(), 'postmaster@hamburger.edu: alice@hamburger.edu\n', {
      postmasters: ['postmaster@hamburger.edu'],
    });
    assert.equal(user(d.resolveKey(key('postmaster@hamburger.edu'))?.targets[0]), 'alice');
    assert.equal(user(d.resolveKey(key('postmaster@fries.test'))?.targets[0]), 'alice');
    assert.equal(d.resolveKey(key('postmaster@fries.test'))?.address, 'postmaster@fries.test');
    assert.deepEqual(d.warnings(), []);
    const configured = data(base(), 'postmaster@hamburger.edu: alice@hamburger.edu\n', {
      postmasters: ['bob@hamburger.edu', 'postmaster@hamburger.edu'],
    });
    assert.equal(user(configured.resolveKey(key('postmaster@fries.test'))?.targets[0]), 'bob@hamburger.edu');
    assert.equal(
      user(configured.resolveKey(key('postmaster@hamburger.edu'))?.targets[0]),
      'alice',
      "a domain's own entry wins",
    );
    // Only postmaster itself: other unknown local parts stay unknown.
    assert.equal(configured.resolveKey(key('hostmaster@fries.test')), null);
  });

  it('matches IDN domains in either form', () => {
    const d = data(base());
    assert.equal(d.resolveKey(key('ünal@xn--bcher-kva.test'))?.targets[0]?.kind, 'local');
  });

  it('lets a login send as its addresses and their sub-addresses, and nothing else', () => {
    const d = data(base(), 'sales@hamburger.edu: bob@hamburger.edu\n');
    assert.equal(d.maySendAs('bob@hamburger.edu', key('bob@hamburger.edu')), true);
    assert.equal(d.maySendAs('bob@hamburger.edu', key('robert@hamburger.edu')), true);
    assert.equal(d.maySendAs('bob@hamburger.edu', key('bob+news@hamburger.edu')), true);
    assert.equal(d.maySendAs('bob@hamburger.edu', key('alice@hamburger.edu')), false);
    assert.equal(
      d.maySendAs('bob@hamburger.edu', key('sales@hamburger.edu')),
      false,
      'an alias is not an address of his',
    );
    assert.equal(d.maySendAs('alice', key('alice@hamburger.edu')), true);
    assert.equal(d.maySendAs('nobody', key('alice@hamburger.edu')), false);
  });
});

describe('users: AUTH throttling', () => {
  it('counts IPv6 clients by /64 and IPv4-mapped addresses as IPv4', () => {
    assert.equal(clientKey('192.0.2.7'), '192.0.2.7');
    assert.equal(clientKey('::ffff:192.0.2.7'), '192.0.2.7');
    assert.equal(clientKey('2001:db8:1:2:3:4:5:6'), '2001:db8:1:2::/64');
    assert.equal(clientKey('2001:db8:1:2::9'), '2001:db8:1:2::/64');
    assert.equal(clientKey('2001:db8::1'), '2001:db8:0:0::/64');
  });

  it('locks a client out after maxFailures within the window, for lockout, then starts afresh', async () => {
    let now = 0;
    const t = new AuthThrottle(memoryState({ now: () => now }), {
      maxFailures: 3,
      windowMs: 60_000,
      lockoutMs: 10_000,
    });
    for (let i = 0; i < 3; i++) {
      assert.notEqual(await t.begin('a'), null);
      assert.equal((await t.failed('a')).lockedOut, i === 2, 'the third failure starts the lockout');
      now += 1000;
    }
    assert.equal(await t.begin('a'), null, 'locked');
    assert.notEqual(await t.begin('b'), null, 'another client is not');
    now += 10_000;
    assert.notEqual(await t.begin('a'), null, 'lockout over');
    assert.equal((await t.failed('a')).failures, 1, 'with the old failures forgotten');
  });

  it('forgets failures older than the window, and does not count successes', async () => {
    let now = 0;
    const t = new AuthThrottle(memoryState({ now: () => now }), {
      maxFailures: 2,
      windowMs: 5000,
      lockoutMs: 60_000,
    });
    await t.begin('a');
    await t.failed('a');
    now += 6000;
    await t.begin('a');
    assert.equal((await t.failed('a')).lockedOut, false);
    const h = (await t.begin('a'))!;
    await t.succeeded('a', h);
    assert.notEqual(await t.begin('a'), null);
  });

  it('counts attempts still being checked, so parallel guesses cannot pass the limit', async () => {
    const t = new AuthThrottle(memoryState({ now: () => 0 }), {
      maxFailures: 2,
      windowMs: 5000,
      lockoutMs: 5000,
    });
    const started = await Promise.all([t.begin('a'), t.begin('a'), t.begin('a'), t.begin('a')]);
    assert.equal(started.filter((h) => h !== null).length, 2);
  });
});

describe('users: the rcpt hook', () => {
  let dir: string;
  const services = new Map<symbol, unknown>();
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-users-'));
    const password = await hashPassword('x', FAST);
    await writeUsersFile(join(dir, 'users.json'), {
      users: { 'bob@hamburger.edu': { password }, 'postmaster@hamburger.edu': { password } },
    });
    const config = {
      localDomains: ['hamburger.edu', 'fries.test'],
      spool: { dir },
    } as unknown as PetrelConfig;
    services.set(Tokens.Config, config);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const rcpt = (to: string) =>
    runHook(
      users,
      'rcpt',
      { session: session(), transaction: transaction(), recipient: address(to), params: {} },
      { baseDir: dir, services },
    );

  it('accepts a local user, refuses an unknown one with 550 5.1.1, and leaves other domains alone', async () => {
    assert.equal((await rcpt('bob@hamburger.edu')).kind, 'accept');
    assert.equal((await rcpt('Bob+x@Hamburger.EDU')).kind, 'accept');
    assert.deepEqual(await rcpt('carol@hamburger.edu'), deny(550, '5.1.1', 'No such user here'));
    assert.deepEqual(await rcpt('bob%remote.test@hamburger.edu'), deny(550, '5.1.1', 'No such user here'));
    assert.equal((await rcpt('bob@remote.test')).kind, 'proceed');
    assert.equal((await rcpt('bob@[192.0.2.1]')).kind, 'proceed');
  });

  it('accepts postmaster@ a local domain that has no entry of its own, for the first local domain postmaster', async () => {
    assert.equal((await rcpt('postmaster@hamburger.edu')).kind, 'accept');
    assert.equal((await rcpt('PostMaster@fries.test')).kind, 'accept');
  });
});

describe('users: reloading the files', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-users-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('starts without a users file, and sees users and aliases as soon as they are written', async () => {
    const usersFile = join(dir, 'users.json');
    const aliasesFile = join(dir, 'aliases.yaml');
    writeFileSync(aliasesFile, '');
    const store = await DirectoryStore.open({
      usersFile,
      aliasesFile,
      localDomains: ['hamburger.edu'],
      separators: '+',
      log: silent,
    });
    assert.equal(await store.isDeliverable('bob@hamburger.edu'), false);
    const password = await hashPassword('x', FAST);
    await writeUsersFile(usersFile, { users: { 'bob@hamburger.edu': { password } } });
    assert.equal(await store.isDeliverable('bob@hamburger.edu'), true);
    writeFileSync(aliasesFile, 'info@hamburger.edu: bob@hamburger.edu\n');
    assert.equal(await store.isDeliverable('info@hamburger.edu'), true);
    assert.deepEqual(await store.sendersFor('BOB@hamburger.edu'), ['bob@hamburger.edu']);

    // A file broken by hand is reported and the last good version stays.
    writeFileSync(usersFile, '{ "users": ');
    assert.equal(await store.isDeliverable('bob@hamburger.edu'), true);
    assert.equal(await store.isDeliverable('info@hamburger.edu'), true);
  });

  it('refuses to start on a bad file, naming it', async () => {
    const usersFile = join(dir, 'bad.json');
    writeFileSync(usersFile, JSON.stringify({ users: { 'bob@hamburger.edu': { password: 'hunter2' } } }));
    await assert.rejects(
      DirectoryStore.open({ usersFile, aliasesFile: null, localDomains: [], separators: '+', log: silent }),
      /bad\.json: users\["bob@hamburger\.edu"\]\.password/,
    );
  });
});

describe('users: the expand hook', () => {
  let dir: string;
  const services = new Map<symbol, unknown>();
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-users-'));
    const password = await hashPassword('x', FAST);
    await writeUsersFile(join(dir, 'users.json'), {
      users: { 'bob@hamburger.edu': { password, addresses: ['robert@hamburger.edu'] } },
    });
    writeFileSync(
      join(dir, 'aliases.yaml'),
      'team@hamburger.edu: [bob@hamburger.edu, carol@elsewhere.test]\n',
    );
    const config = { localDomains: ['hamburger.edu'], spool: { dir } } as unknown as PetrelConfig;
    services.set(Tokens.Config, config);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const expand = async (to: string, from: string | null) => {
    const v = await runHook(
      users,
      'expand',
      {
        sender: from === null ? null : address(from),
        mailParams: { smtputf8: false },
        recipient: { address: address(to), params: {} },
      },
      { baseDir: dir, services, config: { aliasesFile: './aliases.yaml' } },
    );
    if (v.kind === 'proceed') return null;
    return v.targets.map(
      (t) => `${t.address.address}${t.sender === undefined ? '' : ` <${t.sender?.address ?? ''}>`}`,
    );
  };

  it("leaves a user's own address alone, with or without a sub-address, and addresses elsewhere", async () => {
    assert.equal(await expand('bob@hamburger.edu', 'alice@example.org'), null);
    assert.equal(await expand('Bob+lists@hamburger.edu', 'alice@example.org'), null);
    assert.equal(await expand('carol@elsewhere.test', 'alice@example.org'), null);
  });

  it("turns a user's other address into the primary one, keeping the sub-address", async () => {
    assert.deepEqual(await expand('robert+x@hamburger.edu', 'alice@example.org'), ['bob+x@hamburger.edu']);
  });

  it('gives only the copy that leaves an SRS sender, and only when the sender is not ours', async () => {
    const [local, remote] = (await expand('team@hamburger.edu', 'alice@example.org'))!;
    assert.equal(local, 'bob@hamburger.edu');
    assert.match(
      remote!,
      /^carol@elsewhere\.test <SRS0=[a-z2-7]{8}=[a-z2-7]{2}=example\.org=alice@hamburger\.edu>$/,
    );
    assert.deepEqual(await expand('team@hamburger.edu', 'dave@hamburger.edu'), [
      'bob@hamburger.edu',
      'carol@elsewhere.test',
    ]);
    assert.deepEqual(await expand('team@hamburger.edu', null), ['bob@hamburger.edu', 'carol@elsewhere.test']);
  });
});
