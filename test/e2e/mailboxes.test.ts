import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { TLS } from '../harness/server.js';
import { requirePeer } from '../harness/peers.js';
import { requireDovecot } from '../harness/dovecot.js';
import {
  readMailbox,
  startPairedDovecot,
  waitForSubject,
  type PairedDovecot,
} from '../harness/paired-dovecot.js';
import { CLI, freePort, NODE, PetrelProcess, Project } from './cli.js';
import { describeRun, run } from './run.js';

/**
 * docs/mailboxes.md, end to end: a user added once with `petrel user add` sends with AUTH over
 * STARTTLS and reads with the same password over IMAP and POP3, from a Dovecot run with the config
 * in contrib/dovecot/ — with Petrel writing the Maildirs (as root, giving them to vmail), and with
 * Petrel handing the mail to Dovecot over LMTP.
 */

const BOB = 'bob@hamburger.test';

/** vmail, the mail user of contrib/dovecot; made here (and removed after) when the system lacks one. */
async function ensureVmail(): Promise<{ uid: number; gid: number; made: boolean }> {
  const look = async (): Promise<{ uid: number; gid: number } | null> => {
    const r = await run('getent', ['passwd', 'vmail'], { timeoutMs: 10_000 });
    if (r.code !== 0) return null;
    const f = r.stdout.trim().split(':');
    return { uid: Number(f[2]), gid: Number(f[3]) };
  };
  const found = await look();
  if (found) return { ...found, made: false };
  // The command docs/mailboxes.md gives.
  const add = await run(
    'useradd',
    [
      '--system',
      '--user-group',
      '--home-dir',
      '/var/mail/petrel',
      '--no-create-home',
      '--shell',
      '/usr/sbin/nologin',
      'vmail',
    ],
    { timeoutMs: 20_000 },
  );
  assert.equal(add.code, 0, describeRun(add));
  return { ...(await look())!, made: true };
}

async function petrelUser(args: string[], password: string, cwd: string): Promise<void> {
  const r = await run(NODE, [CLI, 'user', ...args], { cwd, input: `${password}\n`, timeoutMs: 20_000 });
  assert.equal(r.code, 0, describeRun(r));
}

/** swaks: STARTTLS, AUTH PLAIN, one message to `to`; the exit code and transcript. */
function swaks(port: number, user: string, password: string, to: string, subject: string) {
  return run(
    'swaks',
    [
      ...['--server', '127.0.0.1', '--port', String(port), '--tls', '--auth', 'PLAIN'],
      ...['--auth-user', user, '--auth-password', password, '--from', user, '--to', to],
      ...['--header', `Subject: ${subject}`, '--body', 'Sent once, read twice.', '--timeout', '20'],
    ],
    { timeoutMs: 30_000 },
  );
}

function peersHere(t: TestContext): boolean {
  if (process.getuid?.() !== 0) {
    t.skip('needs root: Dovecot runs mail processes as vmail, and Petrel gives the Maildirs to it');
    return false;
  }
  return !!requirePeer(t, 'swaks', 'apt-get install swaks') && requireDovecot(t);
}

describe('one password for sending and reading, with Dovecot from contrib/dovecot', () => {
  const cleanup: (() => Promise<void> | void)[] = [];
  let vmail: { uid: number; gid: number };
  before(async () => {
    if (process.getuid?.() !== 0) return;
    const v = await ensureVmail();
    vmail = v;
    if (v.made) cleanup.push(async () => void (await run('userdel', ['vmail'], { timeoutMs: 20_000 })));
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });

  /** A project like the docs': users with a passwd-file for Dovecot, submission, the queue, and `delivery`. */
  async function petrel(delivery: (project: Project) => object) {
    const project = new Project([]);
    cleanup.push(() => project.remove());
    chmodSync(project.dir, 0o755); // Dovecot's auth process (user dovecot) reads the passwd-file here
    const [smtp, submission] = [await freePort(), await freePort()];
    const config = project.writeConfig('petrel.yaml', {
      hostname: 'mx.hamburger.test',
      localDomains: ['hamburger.test'],
      listeners: [
        { kind: 'smtp', address: '127.0.0.1', port: smtp },
        { kind: 'submission', address: '127.0.0.1', port: submission },
      ],
      tls: TLS,
      spool: { dir: './spool' },
      plugins: [
        'relay',
        {
          name: 'users',
          config: { passwdFile: './petrel.passwd', passwdFileGroup: 'dovecot', auth: { delayMs: 0 } },
        },
        'submission',
        'queue',
        delivery(project),
      ],
    });
    return { project, config, submission, passwd: project.path('petrel.passwd') };
  }

  it('maildir: Petrel, as root, writes Maildirs that Dovecot opens as vmail; one password for SMTP, IMAP and POP3', async (t) => {
    if (!peersHere(t)) return;
    const p = await petrel((project) => ({
      name: 'maildir',
      config: { root: project.path('mail'), uid: 'vmail' },
    }));
    await petrelUser(['add', BOB, '--config', p.config], 'first secret', p.project.dir);
    const dovecot: PairedDovecot = await startPairedDovecot({
      variant: 'maildir',
      passwdFile: p.passwd,
      mailRoot: p.project.path('mail'),
    });
    cleanup.push(() => dovecot.stop());
    const server = await PetrelProcess.start(p.config, p.project.dir);
    cleanup.push(() => server.kill());

    const sent = await swaks(p.submission, BOB, 'first secret', BOB, 'to myself');
    assert.equal(sent.code, 0, describeRun(sent));
    assert.match(sent.stdout, /<~ {2}235 2\.7\.0 /);
    const raw = await waitForSubject(dovecot, 'imap', BOB, 'first secret', 'to myself');
    assert.match(raw, /with ESMTPSA id /, 'submitted over TLS with AUTH');
    await waitForSubject(dovecot, 'pop3', BOB, 'first secret', 'to myself');
    const scram = await readMailbox(dovecot, 'imap', BOB, 'first secret', 'SCRAM-SHA-256');
    assert.ok(scram.ok && scram.subjects.includes('to myself'), `IMAP SCRAM-SHA-256: ${scram.error}`);

    // Nobody chowned anything: every folder Petrel made belongs to vmail.
    const box = p.project.path('mail', 'hamburger.test', 'bob', 'Maildir');
    for (const dir of [
      p.project.path('mail'),
      p.project.path('mail', 'hamburger.test'),
      box,
      join(box, 'new'),
    ])
      assert.equal(`${statSync(dir).uid}:${statSync(dir).gid}`, `${vmail.uid}:${vmail.gid}`, dir);

    // A wrong password fails on both sides.
    const wrong = await swaks(p.submission, BOB, 'first secreT', BOB, 'never');
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stdout, /<~\* {1,2}535 5\.7\.8 /);
    const imapWrong = await readMailbox(dovecot, 'imap', BOB, 'first secreT');
    assert.equal(imapWrong.ok, false, 'IMAP refuses a wrong password');
    assert.match(imapWrong.error!, /\[AUTHENTICATIONFAILED\] Authentication failed/);
    const popWrong = await readMailbox(dovecot, 'pop3', BOB, 'first secreT');
    assert.equal(popWrong.ok, false, 'POP3 refuses a wrong password');
    assert.match(popWrong.error!, /-ERR \[AUTH\] Authentication failed/);

    // A new password takes effect on both sides at once, with neither server restarted.
    await petrelUser(['passwd', BOB, '--config', p.config], 'second secret', p.project.dir);
    const again = await swaks(p.submission, BOB, 'second secret', BOB, 'after the change');
    assert.equal(again.code, 0, describeRun(again));
    await waitForSubject(dovecot, 'imap', BOB, 'second secret', 'after the change');
    await waitForSubject(dovecot, 'pop3', BOB, 'second secret', 'after the change');
    const old = await swaks(p.submission, BOB, 'first secret', BOB, 'never');
    assert.match(old.stdout, /<~\* {1,2}535 5\.7\.8 /);
    for (const protocol of ['imap', 'pop3'] as const)
      assert.equal((await readMailbox(dovecot, protocol, BOB, 'first secret')).ok, false);
    assert.ok(
      !server.logs.some((l) => /no mailbox owner/.test(String(l.msg))),
      'no warning about the mailbox owner when one is set',
    );
  });

  it('lmtp: Petrel hands the mail to Dovecot over LMTP; one password for SMTP, IMAP and POP3', async (t) => {
    if (!peersHere(t)) return;
    const lmtpPort = await freePort();
    const p = await petrel(() => ({ name: 'lmtp', config: { host: '127.0.0.1', port: lmtpPort } }));
    // Dovecot creates the mailboxes as vmail under a root that vmail owns (docs: install -d -o vmail).
    const mailRoot = p.project.path('mail');
    mkdirSync(mailRoot, { mode: 0o750 });
    chownSync(mailRoot, vmail.uid, vmail.gid);
    await petrelUser(['add', BOB, '--config', p.config], 'lmtp secret', p.project.dir);
    const dovecot = await startPairedDovecot({
      variant: 'lmtp',
      passwdFile: p.passwd,
      mailRoot,
      lmtpPort,
    });
    cleanup.push(() => dovecot.stop());
    const server = await PetrelProcess.start(p.config, p.project.dir);
    cleanup.push(() => server.kill());

    const sent = await swaks(p.submission, BOB, 'lmtp secret', BOB, 'through lmtp');
    assert.equal(sent.code, 0, describeRun(sent));
    const raw = await waitForSubject(dovecot, 'imap', BOB, 'lmtp secret', 'through lmtp');
    assert.match(raw, /^Return-Path: <bob@hamburger\.test>/m);
    await waitForSubject(dovecot, 'pop3', BOB, 'lmtp secret', 'through lmtp');
    assert.deepEqual(readdirSync(join(mailRoot, 'hamburger.test')), ['bob']);
    assert.equal(statSync(join(mailRoot, 'hamburger.test', 'bob')).uid, vmail.uid);

    const wrong = await swaks(p.submission, BOB, 'lmtp secreT', BOB, 'never');
    assert.match(wrong.stdout, /<~\* {1,2}535 5\.7\.8 /);
    for (const protocol of ['imap', 'pop3'] as const)
      assert.equal((await readMailbox(dovecot, protocol, BOB, 'lmtp secreT')).ok, false);

    await petrelUser(['passwd', BOB, '--config', p.config], 'lmtp secret 2', p.project.dir);
    assert.equal((await swaks(p.submission, BOB, 'lmtp secret 2', BOB, 'changed')).code, 0);
    await waitForSubject(dovecot, 'imap', BOB, 'lmtp secret 2', 'changed');
    assert.equal((await readMailbox(dovecot, 'pop3', BOB, 'lmtp secret')).ok, false);
  });
});
