import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { TLS } from '../harness/server.js';
import { requirePeer } from '../harness/peers.js';
import { requireDovecot, startDovecot, waitForMail, type Dovecot } from '../harness/dovecot.js';
import { CLI, freePort, NODE, PetrelProcess, Project } from './cli.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { run, describeRun } from './run.js';

/**
 * The primer's second half: Alice's user agent submits to the server with AUTH over STARTTLS;
 * the server queues the message and puts it in Bob's Maildir; Bob, authenticated by user name
 * and password, reads it with Dovecot over IMAP and over POP3.
 */
describe("Bob's server, end to end", () => {
  const cleanup: (() => Promise<void> | void)[] = [];
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });

  it('a message submitted with swaks over STARTTLS + AUTH reaches Bob over IMAP and POP3', async (t) => {
    if (!requirePeer(t, 'swaks', 'apt-get install swaks') || !requireDovecot(t)) return;
    const bob = { address: 'bob@hamburger.test', password: 'bob reads mail' };
    const alice = { address: 'alice@hamburger.test', password: 'alice writes mail' };
    const dovecot: Dovecot = await startDovecot([bob, alice]);
    cleanup.push(() => dovecot.stop());
    const project = new Project([]);
    cleanup.push(() => project.remove());
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
        { name: 'users', config: { usersFile: './users.json' } },
        'submission',
        'queue',
        { name: 'maildir', config: { root: dovecot.mailRoot, uid: dovecot.uid, gid: dovecot.gid } },
      ],
    });
    for (const u of [alice, bob]) {
      const added = await run(NODE, [CLI, 'user', 'add', u.address, '--config', config], {
        cwd: project.dir,
        input: `${u.password}\n`,
        timeoutMs: 15_000,
      });
      assert.equal(added.code, 0, describeRun(added));
    }
    const server = await PetrelProcess.start(config, project.dir);
    cleanup.push(() => server.kill());

    const subject = `Hello Bob ${Date.now()}`;
    const swaks = await run(
      'swaks',
      [
        '--server',
        '127.0.0.1',
        '--port',
        String(submission),
        '--tls',
        '--auth',
        'PLAIN',
        '--auth-user',
        alice.address,
        '--auth-password',
        alice.password,
        '--from',
        alice.address,
        '--to',
        bob.address,
        '--header',
        `Subject: ${subject}`,
        '--body',
        'Bonjour Bob, this is Alice.',
      ],
      { timeoutMs: 30_000 },
    );
    assert.equal(swaks.code, 0, describeRun(swaks));
    assert.match(swaks.stdout, /<~ {2}250 2\.0\.0 Ok: queued as /);

    const viaImap = await waitForMail(dovecot, 'imap', bob, (m) => m.subject === subject, {
      timeoutMs: 20_000,
    });
    assert.match(viaImap.body, /Bonjour Bob, this is Alice\./);
    const raw = viaImap.raw.toString('latin1');
    assert.match(raw, /^Return-Path: <alice@hamburger\.test>\r?\n/);
    assert.match(raw, /Delivered-To: bob@hamburger\.test/);
    assert.match(raw, /with ESMTPSA id /, 'submitted over TLS with AUTH');
    assert.match(raw, /^Message-ID: </im);
    const viaPop = await waitForMail(dovecot, 'pop3', bob, (m) => m.subject === subject);
    assert.match(viaPop.body, /Bonjour Bob/);

    // A wrong password is refused, and nothing is queued for it.
    const wrong = await run(
      'swaks',
      [
        '--server',
        '127.0.0.1',
        '--port',
        String(submission),
        '--tls',
        '--auth',
        'PLAIN',
        '--auth-user',
        alice.address,
        '--auth-password',
        'guess',
        '--from',
        alice.address,
        '--to',
        bob.address,
      ],
      { timeoutMs: 30_000 },
    );
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stdout, /535 5\.7\.8/);
    // On the MX port: an unknown local user is refused at RCPT, and relaying is denied.
    const mx = await SmtpClient.connect(smtp);
    await mx.expect(/^220 mx\.hamburger\.test /);
    await mx.ehlo('mail.crepes.test');
    await mx.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await mx.cmd('RCPT TO:<nobody@hamburger.test>', /^550 5\.1\.1 /);
    await mx.cmd('RCPT TO:<bob@HAMBURGER.test>', /^250 /);
    mx.close();
  });
});
