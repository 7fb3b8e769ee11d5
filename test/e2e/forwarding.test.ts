import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TLS } from '../harness/server.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { requireDovecot, startDovecot, waitForMail, type Dovecot } from '../harness/dovecot.js';
import { startDnsmasq, type Dnsmasq } from '../harness/dnsmasq.js';
import { CLI, freePort, NODE, PetrelProcess, Project } from './cli.js';
import { describeRun, run } from './run.js';
import { dkimpyArcVerify, dkimpySign, dkimpyVerify, requireDkimpy } from '../harness/dkimpy.js';
import { Srs } from '../../plugins/users/srs.js';
import { makeAddress } from '../../core/index.js';

/**
 * Forwarding across two servers. hamburger.edu (127.0.0.2) delivers its own mailboxes to Dovecot
 * over LMTP and has aliases that point elsewhere; fries.test (127.0.0.3) hosts carol@fries.test
 * and alice@example.org in Maildirs. Alice writes from example.org, which hamburger.edu does not
 * host: copies forwarded to fries.test leave with an SRS sender at hamburger.edu, and mail to that
 * SRS address comes back to Alice. hamburger.edu judges what arrives (mailauth) and ARC-seals
 * what it forwards; dkimpy checks the seal and Alice's own DKIM signature at the other end.
 */
describe('forwarding: aliases to other domains, with SRS', () => {
  const bob = { address: 'bob@hamburger.edu', password: 'bob reads' };
  const cleanup: (() => unknown)[] = [];
  let dovecot: Dovecot;
  let dns: Dnsmasq;
  let project: Project;
  let hamburger: PetrelProcess;
  let fries: PetrelProcess;
  let port = 0;
  let ready = false;
  /** Alice's DKIM key at example.org (the test signs her mail with dkimpy). */
  const aliceKey = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const arcKey = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const dnsKey = (k: typeof aliceKey): string =>
    `v=DKIM1; k=rsa; p=${k.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`;

  before(() => {
    project = new Project([]);
    cleanup.push(() => project.remove());
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });

  async function setUp(t: import('node:test').TestContext): Promise<boolean> {
    if (ready) return true;
    if (!requireDovecot(t) || !(await requireDkimpy(t))) return false;
    const started = await startDnsmasq(
      t,
      {
        mx: [
          { domain: 'hamburger.edu', host: 'mail.hamburger.edu', preference: 10 },
          { domain: 'fries.test', host: 'mail.fries.test', preference: 10 },
          { domain: 'example.org', host: 'mail.fries.test', preference: 10 },
        ],
        hosts: [
          { name: 'mail.hamburger.edu', addresses: ['127.0.0.2'] },
          { name: 'mail.fries.test', addresses: ['127.0.0.3'] },
        ],
        txt: [
          { name: 's1._domainkey.example.org', text: dnsKey(aliceKey) },
          { name: 'arc2026._domainkey.hamburger.edu', text: dnsKey(arcKey) },
        ],
        local: ['edu', 'test', 'org'],
      },
      { stopWithTest: false },
    );
    if (!started) return false;
    dns = started;
    cleanup.push(() => dns.stop());
    dovecot = await startDovecot([bob]);
    cleanup.push(() => dovecot.stop());
    port = await freePort();
    mkdirSync(project.path('hamburger'));
    mkdirSync(project.path('fries'));
    const common = { tls: TLS, dns: { servers: [dns.server] }, spool: { dir: './spool' } };
    const outbound = { name: 'outbound', config: { port, addressFamilies: ['ipv4'] } };
    writeFileSync(
      project.path('hamburger', 'aliases.yaml'),
      [
        'team@hamburger.edu: [bob@hamburger.edu, carol@fries.test]',
        'carol@hamburger.edu: carol@fries.test',
        'gone@hamburger.edu: nobody@fries.test',
        "'@hamburger.edu': bob@hamburger.edu",
        '',
      ].join('\n'),
    );
    writeFileSync(
      project.path('hamburger', 'arc.pem'),
      arcKey.privateKey.export({ type: 'pkcs8', format: 'pem' }),
      { mode: 0o600 },
    );
    const hamburgerConfig = project.writeConfig('hamburger/petrel.yaml', {
      hostname: 'mail.hamburger.edu',
      localDomains: ['hamburger.edu'],
      listeners: [{ kind: 'smtp', address: '127.0.0.2', port }],
      ...common,
      plugins: [
        // Judges what arrives (this test's clients are on loopback: trust nobody), seals what leaves.
        {
          name: 'mailauth',
          config: {
            trustedNetworks: [],
            arcSeal: { domain: 'hamburger.edu', selector: 'arc2026', keyFile: './arc.pem' },
          },
        },
        'relay',
        { name: 'users', config: { usersFile: './users.json', aliasesFile: './aliases.yaml' } },
        { name: 'queue', config: { retry: '1h...' } },
        'bounce',
        { name: 'lmtp', config: { host: '127.0.0.1', port: dovecot.lmtpPort } },
        outbound,
      ],
    });
    const friesConfig = project.writeConfig('fries/petrel.yaml', {
      hostname: 'mail.fries.test',
      localDomains: ['fries.test', 'example.org'],
      listeners: [{ kind: 'smtp', address: '127.0.0.3', port }],
      ...common,
      plugins: [
        'relay',
        { name: 'users', config: { usersFile: './users.json' } },
        { name: 'queue', config: { retry: '1h...' } },
        { name: 'maildir', config: { root: './mail' } },
        outbound,
      ],
    });
    for (const [who, config] of [
      [bob.address, hamburgerConfig],
      ['carol@fries.test', friesConfig],
      ['alice@example.org', friesConfig],
    ] as const) {
      const added = await run(NODE, [CLI, 'user', 'add', who, '--config', config], {
        input: 'a password\n',
        timeoutMs: 15_000,
      });
      assert.equal(added.code, 0, describeRun(added));
    }
    hamburger = await PetrelProcess.start(hamburgerConfig, project.path('hamburger'));
    cleanup.push(() => hamburger.kill());
    fries = await PetrelProcess.start(friesConfig, project.path('fries'));
    cleanup.push(() => fries.kill());
    ready = true;
    return true;
  }

  /** One SMTP transaction to hamburger.edu, as another server would make it; returns the RCPT reply codes. */
  async function send(
    from: string,
    to: readonly string[],
    subject: string,
    content = `From: <${from}>\r\nTo: <${to[0]}>\r\nSubject: ${subject}\r\n\r\nForward me.\r\n`,
  ): Promise<number[]> {
    const c = await SmtpClient.connect(port, '127.0.0.2');
    try {
      await c.expect(/^220 /);
      await c.ehlo('mx.example.org');
      await c.cmd(`MAIL FROM:<${from}>`, /^250 /);
      const codes: number[] = [];
      for (const rcpt of to) {
        c.send(`RCPT TO:<${rcpt}>`);
        codes.push((await c.reply()).code);
      }
      if (codes.some((code) => code === 250)) {
        await c.cmd('DATA', /^354 /);
        c.write(`${content.replace(/^\./gm, '..')}.\r\n`);
        await c.expect(/^250 /);
      }
      await c.cmd('QUIT', /^221 /);
      return codes;
    } finally {
      c.close();
    }
  }

  /** Messages in a Maildir at fries.test whose text includes `subject`, once `count` are there (bounded). */
  async function friesMail(user: string, domain: string, subject: string, count = 1): Promise<string[]> {
    const box = project.path('fries', 'mail', domain, user, 'Maildir', 'new');
    const found = (): string[] => {
      try {
        return readdirSync(box)
          .map((f) => readFileSync(join(box, f), 'latin1'))
          .filter((text) => text.includes(subject));
      } catch {
        return [];
      }
    };
    const deadline = Date.now() + 30_000;
    while (found().length < count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    return found();
  }

  const returnPath = (text: string): string => /^Return-Path: <([^>]*)>/m.exec(text)?.[1] ?? '(none)';

  it('an alias to a local mailbox and an address elsewhere delivers both; the remote copy carries an SRS sender', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Team news ${Date.now()}`;
    assert.deepEqual(await send('alice@example.org', ['team@hamburger.edu'], subject), [250]);
    // Bob's copy went over LMTP as bob@hamburger.edu: Dovecot knows no team@.
    const local = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, {
      timeoutMs: 30_000,
    });
    assert.match(
      local.raw.toString('latin1'),
      /^Return-Path: <alice@example\.org>/m,
      'the local copy keeps the sender',
    );
    const [remote] = await friesMail('carol', 'fries.test', subject);
    assert.ok(remote, `carol@fries.test got a copy\n${hamburger.dump().slice(-4000)}`);
    const srs = returnPath(remote);
    assert.match(srs, /^SRS0=[a-z2-7]{8}=[a-z2-7]{2}=example\.org=alice@hamburger\.edu$/, srs);
  });

  it('a catch-all and a forward-only alias expand before delivery, so neither LMTP nor the remote server sees the alias', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Catch me ${Date.now()}`;
    assert.deepEqual(
      await send('alice@example.org', ['whoever@hamburger.edu', 'carol@hamburger.edu'], subject),
      [250, 250],
    );
    const caught = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, {
      timeoutMs: 30_000,
    });
    assert.match(caught.raw.toString('latin1'), /^Delivered-To: <?bob@hamburger\.edu>?/m);
    const [remote] = await friesMail('carol', 'fries.test', subject);
    assert.ok(remote, 'carol@hamburger.edu forwarded to carol@fries.test');
    assert.match(remote, /^Delivered-To: carol@fries\.test/m);
  });

  it('mail to the SRS address comes back to the original sender; a forged or stale one is refused', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Bounce me ${Date.now()}`;
    await send('alice@example.org', ['carol@hamburger.edu'], subject);
    const [forwarded] = await friesMail('carol', 'fries.test', subject);
    assert.ok(forwarded);
    const srs = returnPath(forwarded);

    // As a remote server's bounce arrives: from <>, to the SRS address (its case changed on the way).
    const back = `Returned ${Date.now()}`;
    assert.deepEqual(await send('', [srs.toLowerCase()], back), [250]);
    const [returned] = await friesMail('alice', 'example.org', back);
    assert.ok(returned, `alice@example.org got the bounce\n${hamburger.dump().slice(-4000)}`);
    assert.equal(returnPath(returned), '', 'still from the null sender');

    // A made-up hash, and an address made with the right secret 30 days ago: not ours to forward.
    const forged = srs.replace(/^SRS0=[a-z2-7]{8}=/, 'SRS0=aaaaaaaa=');
    const secretFile = project.path('hamburger', 'spool', 'srs.secret');
    assert.equal(statSync(secretFile).mode & 0o777, 0o600, 'the secret file is private');
    const secrets = readFileSync(secretFile, 'utf8')
      .split('\n')
      .filter((l) => l && !l.startsWith('#'));
    const monthAgo = new Srs({
      secrets,
      domain: 'hamburger.edu',
      maxAgeDays: 21,
      now: () => Date.now() - 30 * 86_400_000,
    });
    const stale = monthAgo.forward(makeAddress('alice', 'example.org')).address;
    assert.deepEqual(await send('', [forged, stale], `Forged ${Date.now()}`), [550, 550]);
  });

  it('a forwarded copy the remote server refuses is reported to the original sender, naming the alias', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Nobody there ${Date.now()}`;
    assert.deepEqual(await send('alice@example.org', ['gone@hamburger.edu'], subject), [250]);
    const [report] = await friesMail('alice', 'example.org', subject);
    assert.ok(report, `a DSN reached alice@example.org\n${hamburger.dump().slice(-4000)}`);
    assert.match(report, /Content-Type: message\/delivery-status/i);
    assert.match(report, /Original-Recipient: rfc822; ?gone@hamburger\.edu/);
    assert.match(report, /Final-Recipient: rfc822; ?nobody@fries\.test/);
    assert.match(report, /Action: failed/);
    assert.equal(returnPath(report), '');
  });

  it('a forwarded copy carries an ARC set over what was found on arrival, and the original DKIM signature still verifies', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Sealed ${Date.now()}`;
    const signed = await dkimpySign(
      Buffer.from(
        `From: Alice <alice@example.org>\r\nTo: carol@hamburger.edu\r\nSubject: ${subject}\r\n` +
          `Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <${Date.now()}@example.org>\r\n\r\nOver to you.\r\n`,
      ),
      {
        domain: 'example.org',
        selector: 's1',
        privateKey: aliceKey.privateKey.export({ type: 'pkcs8', format: 'pem' }),
      },
    );
    assert.deepEqual(
      await send('alice@example.org', ['carol@hamburger.edu'], subject, signed.toString('latin1')),
      [250],
    );
    const [copy] = await friesMail('carol', 'fries.test', subject);
    assert.ok(copy, `carol@fries.test got a copy\n${hamburger.dump().slice(-4000)}`);
    const raw = Buffer.from(copy, 'latin1');
    assert.match(
      copy,
      /^ARC-Authentication-Results: i=1; mail\.hamburger\.edu;[\s\S]*?dkim=pass/m,
      'what was found on arrival',
    );
    assert.match(copy, /^ARC-Seal: i=1; a=rsa-sha256; .*cv=none/m);
    const arc = await dkimpyArcVerify(raw, dns.server);
    assert.equal(arc.cv, 'pass', `dkimpy validates the chain: ${arc.comment}`);
    const dkim = await dkimpyVerify(raw, dns.server);
    assert.ok(dkim.length >= 1 && dkim.every((v) => v.ok), JSON.stringify(dkim));
  });

  it('a message that only passes through to a local mailbox is not sealed', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Local only ${Date.now()}`;
    assert.deepEqual(await send('alice@example.org', ['bob@hamburger.edu'], subject), [250]);
    const mail = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, { timeoutMs: 30_000 });
    const raw = mail.raw.toString('latin1');
    assert.match(raw, /^Authentication-Results: mail\.hamburger\.edu;/m, 'judged on arrival');
    assert.doesNotMatch(raw, /^ARC-Seal:/m);
  });
});
