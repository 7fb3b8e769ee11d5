import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { simpleParser } from 'mailparser';
import { TLS } from '../harness/server.js';
import { requirePeer } from '../harness/peers.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { fetchMail, requireDovecot, startDovecot, waitForMail, type Dovecot } from '../harness/dovecot.js';
import { startDnsmasq, type Dnsmasq } from '../harness/dnsmasq.js';
import { CLI, freePort, NODE, petrel, PetrelProcess, Project } from './cli.js';
import { describeRun, run } from './run.js';

/**
 * The SMTP primer, end to end: Alice submits to her server (crepes.fr, 127.0.0.2); it queues the
 * message, looks up hamburger.edu's MX (a real dnsmasq) and delivers straight to Bob's server
 * (127.0.0.3), which puts it in Bob's Maildir, where Dovecot shows it to Bob. When Bob's server is
 * down the message waits, and the queue says why; mail to an unknown user comes back to Alice.
 * Alice's server signs what she sends (DKIM, with the key `petrel dkim keygen` made) and her
 * domain publishes SPF and DMARC; Bob's server judges what arrives (mailauth) and says so in an
 * Authentication-Results field that Bob reads.
 */
describe('the primer: Alice to Bob across two servers', () => {
  const alice = { address: 'alice@crepes.fr', password: 'alice writes' };
  const bob = { address: 'bob@hamburger.edu', password: 'bob reads' };
  const cleanup: (() => unknown)[] = [];
  let dovecot: Dovecot;
  let dns: Dnsmasq;
  let project: Project;
  let crepes: PetrelProcess;
  let hamburger: PetrelProcess | null = null;
  let crepesConfig = '';
  let hamburgerConfig = '';
  let port = 0;
  let submission = 0;
  let ready = false;

  before(async () => {
    project = new Project([]);
    cleanup.push(() => project.remove());
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });

  async function startHamburger(): Promise<void> {
    hamburger = await PetrelProcess.start(hamburgerConfig, project.path('hamburger'));
    cleanup.push(() => hamburger?.kill());
  }

  async function setUp(t: import('node:test').TestContext): Promise<boolean> {
    if (ready) return true;
    if (!requirePeer(t, 'swaks', 'apt-get install swaks') || !requireDovecot(t)) return false;
    mkdirSync(project.path('crepes'));
    mkdirSync(project.path('hamburger'));
    // Alice's signing key, made by the CLI from the config that will use it; its record goes to DNS.
    const dkim = { name: 'dkim', config: { domains: { 'crepes.fr': ['s2026'] } } };
    const keygenConfig = project.writeConfig('crepes/petrel.yaml', {
      hostname: 'mail.crepes.fr',
      localDomains: ['crepes.fr'],
      listeners: [{ kind: 'smtp', address: '127.0.0.2', port: 25 }],
      plugins: [dkim],
    });
    const keygen = await run(
      NODE,
      [CLI, 'dkim', 'keygen', '--domain', 'crepes.fr', '--selector', 's2026', '--config', keygenConfig],
      {
        timeoutMs: 15_000,
      },
    );
    assert.equal(keygen.code, 0, describeRun(keygen));
    const dkimRecord = [...keygen.stdout.matchAll(/"([^"]*)"/g)].map((m) => m[1]).join('');
    assert.match(dkimRecord, /^v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+$/);
    const started = await startDnsmasq(
      t,
      {
        mx: [
          { domain: 'crepes.fr', host: 'mail.crepes.fr', preference: 10 },
          { domain: 'hamburger.edu', host: 'mail.hamburger.edu', preference: 10 },
        ],
        hosts: [
          { name: 'mail.crepes.fr', addresses: ['127.0.0.2'] },
          { name: 'mail.hamburger.edu', addresses: ['127.0.0.3'] },
        ],
        txt: [
          // Alice's server reaches Bob's from a loopback address the kernel picks.
          { name: 'crepes.fr', text: 'v=spf1 ip4:127.0.0.1 ip4:127.0.0.2 -all' },
          { name: 's2026._domainkey.crepes.fr', text: dkimRecord },
          { name: '_dmarc.crepes.fr', text: 'v=DMARC1; p=reject' },
        ],
        local: ['fr', 'edu'],
      },
      { stopWithTest: false },
    );
    if (!started) return false;
    dns = started;
    cleanup.push(() => dns.stop());
    dovecot = await startDovecot([bob]);
    cleanup.push(() => dovecot.stop());
    port = await freePort();
    submission = await freePort();
    const common = { tls: TLS, dns: { servers: [dns.server] }, spool: { dir: './spool' } };
    crepesConfig = project.writeConfig('crepes/petrel.yaml', {
      hostname: 'mail.crepes.fr',
      localDomains: ['crepes.fr'],
      listeners: [
        { kind: 'smtp', address: '127.0.0.2', port },
        { kind: 'submission', address: '127.0.0.2', port: submission },
      ],
      ...common,
      plugins: [
        'relay',
        { name: 'users', config: { usersFile: './users.json' } },
        'submission',
        { name: 'queue', config: { retry: '1h...' } },
        'bounce',
        { name: 'maildir', config: { root: './mail' } },
        'mime-7bit',
        dkim,
        { name: 'outbound', config: { port, addressFamilies: ['ipv4'] } },
      ],
    });
    hamburgerConfig = project.writeConfig('hamburger/petrel.yaml', {
      hostname: 'mail.hamburger.edu',
      localDomains: ['hamburger.edu'],
      listeners: [{ kind: 'smtp', address: '127.0.0.3', port }],
      ...common,
      plugins: [
        // Every client here is on loopback: judge them all, as an MX on the internet does.
        { name: 'mailauth', config: { trustedNetworks: [] } },
        'relay',
        { name: 'users', config: { usersFile: './users.json' } },
        'queue',
        'bounce',
        { name: 'maildir', config: { root: dovecot.mailRoot, uid: dovecot.uid, gid: dovecot.gid } },
        { name: 'outbound', config: { port, addressFamilies: ['ipv4'] } },
      ],
    });
    for (const [u, config] of [
      [alice, crepesConfig],
      [bob, hamburgerConfig],
    ] as const) {
      const added = await run(NODE, [CLI, 'user', 'add', u.address, '--config', config], {
        input: `${u.password}\n`,
        timeoutMs: 15_000,
      });
      assert.equal(added.code, 0, describeRun(added));
    }
    crepes = await PetrelProcess.start(crepesConfig, project.path('crepes'));
    cleanup.push(() => crepes.kill());
    await startHamburger();
    ready = true;
    return true;
  }

  async function submit(to: string, subject: string, body: string): Promise<string> {
    const r = await run(
      'swaks',
      [
        ...['--server', '127.0.0.2', '--port', String(submission), '--tls'],
        ...['--auth', 'PLAIN', '--auth-user', alice.address, '--auth-password', alice.password],
        ...['--from', alice.address, '--to', to, '--header', `Subject: ${subject}`, '--body', body],
      ],
      { timeoutMs: 30_000 },
    );
    assert.equal(r.code, 0, describeRun(r));
    return /queued as (\S+)/.exec(r.stdout)![1]!;
  }

  /** Submits over TLS with AUTH through Python's smtplib, asking for a success report (RFC 3461). */
  async function submitAskingForReport(to: string, subject: string): Promise<void> {
    const script = [
      'import smtplib, ssl, sys',
      'port, user, password, to, subject = sys.argv[1:6]',
      'ctx = ssl.create_default_context()',
      'ctx.check_hostname = False',
      'ctx.verify_mode = ssl.CERT_NONE',
      "s = smtplib.SMTP('127.0.0.2', int(port))",
      's.starttls(context=ctx)',
      's.login(user, password)',
      "msg = f'From: {user}\\r\\nTo: {to}\\r\\nSubject: {subject}\\r\\n\\r\\nTell me when it is there.\\r\\n'",
      "s.sendmail(user, [to], msg, mail_options=['ENVID=primer-dsn'], rcpt_options=['NOTIFY=SUCCESS'])",
      's.quit()',
    ].join('\n');
    const r = await run(
      'python3',
      ['-c', script, String(submission), alice.address, alice.password, to, subject],
      { timeoutMs: 30_000 },
    );
    assert.equal(r.code, 0, describeRun(r));
  }

  /** Reports about `subject` in Alice's Maildir at crepes.fr, once `count` have arrived (bounded wait). */
  async function reportsForAlice(subject: string, count = 1, waitMs = 30_000): Promise<string[]> {
    const box = project.path('crepes', 'mail', 'crepes.fr', 'alice', 'Maildir', 'new');
    const found = (): string[] => {
      try {
        return readdirSync(box)
          .map((f) => readFileSync(join(box, f), 'latin1'))
          .filter((text) => text.includes(subject) && /multipart\/report/i.test(text));
      } catch {
        return []; // the mailbox appears with the first message
      }
    };
    const deadline = Date.now() + waitMs;
    while (found().length < count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    return found();
  }

  it("Alice's message travels by MX to Bob's Maildir, and Bob reads it over IMAP", async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Bonjour Bob ${Date.now()}`;
    await submit(bob.address, subject, 'The crepes are ready.');
    const mail = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, { timeoutMs: 30_000 });
    assert.match(mail.body, /The crepes are ready\./);
    const raw = mail.raw.toString('latin1');
    assert.match(raw, /by mail\.hamburger\.edu \(Petrel\)/, "Bob's server received it");
    assert.match(
      raw,
      /^Received: from mail\.crepes\.fr \(\[127\.0\.0\.\d+\]\)\r\n\tby mail\.hamburger\.edu \(Petrel\) with ESMTPS /m,
      'straight from Alice’s server over TLS, no middle hop',
    );
  });

  it("Alice's server signs, Bob's server verifies, and Bob reads dkim=pass, spf=pass and dmarc=pass over IMAP", async (t) => {
    if (!(await setUp(t))) return;
    const subject = `Signed crepes ${Date.now()}`;
    await submit(bob.address, subject, 'Signed, sealed, delivered.');
    const mail = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, { timeoutMs: 30_000 });
    const raw = mail.raw.toString('latin1');
    assert.match(raw, /^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=crepes\.fr;/m);
    const results =
      /^Authentication-Results: mail\.hamburger\.edu;((?:\r\n[ \t][^\r\n]*)+)/m.exec(raw)?.[1] ?? '';
    assert.match(results, /dkim=pass header\.i=@crepes\.fr header\.s=s2026/, raw.slice(0, 3000));
    assert.match(results, /spf=pass .*smtp\.mailfrom=alice@crepes\.fr/);
    assert.match(results, /dmarc=pass .*header\.from=crepes\.fr/);
    assert.doesNotMatch(raw, /^Petrel-DKIM:/m, 'the signing mark stays inside Alice’s server');
  });

  it("when Bob's server is down the message waits, the queue says why, and a flush delivers it once", async (t) => {
    if (!(await setUp(t))) return;
    hamburger!.signal('SIGTERM');
    await hamburger!.waitForExit(15_000);
    hamburger = null;
    const subject = `While you were down ${Date.now()}`;
    const id = await submit(bob.address, subject, 'Patience.');
    let listing = '';
    for (let i = 0; i < 100 && !/deferred/.test(listing); i++) {
      await new Promise((r) => setTimeout(r, 100));
      const r = await petrel(['queue', 'list', '--config', crepesConfig], project.path('crepes'));
      listing = r.stdout;
    }
    assert.match(listing, new RegExp(id));
    assert.match(listing, /deferred/);
    assert.match(listing, /next attempt/i);
    assert.match(listing, /4\.\d\.\d/, 'the last reply says why');
    await startHamburger();
    const flushed = await petrel(['queue', 'flush', id, '--config', crepesConfig], project.path('crepes'));
    assert.equal(flushed.code, 0, describeRun(flushed));
    await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, { timeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 500));
    const copies = (await fetchMail(dovecot, 'imap', bob)).filter((m) => m.subject === subject).length;
    assert.equal(copies, 1, 'delivered once');
  });

  it('mail to an unknown user at hamburger.edu brings Alice a DSN in her own Maildir', async (t) => {
    if (!(await setUp(t))) return;
    const subject = `To nobody ${Date.now()}`;
    await submit('nobody@hamburger.edu', subject, 'Is anyone there?');
    const [report] = await reportsForAlice(subject);
    assert.ok(report, `a report arrived in Alice’s Maildir\n${crepes.dump().slice(-6000)}`);
    const parsed = await simpleParser(report!);
    assert.match(parsed.subject ?? '', /Undelivered/i);
    assert.match(report!, /Content-Type: multipart\/report; ?report-type=delivery-status/i);
    assert.match(report!, /Content-Type: message\/delivery-status/i);
    const fields = report!;
    assert.match(fields, /Reporting-MTA: dns; ?mail\.crepes\.fr/);
    assert.match(fields, /Final-Recipient: rfc822; ?nobody@hamburger\.edu/);
    assert.match(fields, /Action: failed/);
    assert.match(fields, /Status: 5\.1\.1/);
    assert.match(fields, /Remote-MTA: dns; ?mail\.hamburger\.edu/);
    assert.match(fields, /Diagnostic-Code: smtp; ?550 5\.1\.1/);
    assert.match(report!, /^Return-Path: <>/m, 'sent from the null sender');
    const mx = await SmtpClient.connect(port, '127.0.0.3');
    await mx.expect(/^220 mail\.hamburger\.edu /);
    mx.close();
  });

  it("Alice asks to hear of delivery: Bob's server reports it, and hers does not say 'relayed' as well", async (t) => {
    if (!(await setUp(t)) || !requirePeer(t, 'python3', 'apt-get install python3')) return;
    const subject = `Tell me ${Date.now()}`;
    await submitAskingForReport(bob.address, subject);
    await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, { timeoutMs: 30_000 });
    const [report] = await reportsForAlice(subject);
    assert.ok(report, `a success report arrived in Alice’s Maildir\n${hamburger?.dump().slice(-6000)}`);
    const parsed = await simpleParser(report);
    assert.equal(parsed.subject, 'Successful Mail Delivery Report');
    assert.match(report, /Reporting-MTA: dns; ?mail\.hamburger\.edu/, 'from the server that delivered it');
    assert.match(report, /Original-Envelope-Id: primer-dsn/);
    assert.match(report, /Final-Recipient: rfc822; ?bob@hamburger\.edu/);
    assert.match(report, /Action: delivered/);
    // crepes.fr passed NOTIFY on to a server that offers DSN: it sends no `relayed` report.
    await new Promise((r) => setTimeout(r, 1500));
    const all = await reportsForAlice(subject, 2, 0);
    assert.equal(all.length, 1, all.map((r) => /Action: \S+/.exec(r)?.[0]).join(', '));
  });
});
