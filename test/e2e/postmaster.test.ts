/**
 * RFC 5321 §4.5.1: `RCPT TO:<postmaster>` (no domain) and `postmaster@` every local domain are
 * always accepted, and accepted means delivered: the message lands in a real Maildir, never in
 * the queue as "no route". `petrel start` runs as a child process with users, queue and maildir.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { hashPassword } from '../../plugins/users/password.js';
import { writeUsersFile } from '../../plugins/users/users-file.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { freePort, PetrelProcess, Project } from './cli.js';

const BOB = 'bob@first.test';

async function startMailServer(
  users: Record<string, unknown>,
  aliases: string | null,
): Promise<{ petrel: PetrelProcess; port: number; project: Project }> {
  const project = new Project([]);
  const port = await freePort();
  await writeUsersFile(project.path('users.json'), {
    users: { [BOB]: { password: await hashPassword('unused', { iterations: 4096 }) } },
  });
  if (aliases !== null) writeFileSync(project.path('aliases.yaml'), aliases);
  const file = project.writeConfig('petrel.yaml', {
    hostname: 'mx.first.test',
    localDomains: ['first.test', 'second.test'],
    listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
    spool: { dir: './spool' },
    log: { level: 'info', format: 'json' },
    plugins: [
      {
        name: 'users',
        config: {
          usersFile: './users.json',
          ...(aliases !== null ? { aliasesFile: './aliases.yaml' } : {}),
          ...users,
        },
      },
      'queue',
      { name: 'maildir', config: { root: './mail' } },
    ],
  });
  return { petrel: await PetrelProcess.start(file, project.dir), port, project };
}

async function send(port: number, rcpt: string, subject: string): Promise<void> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<someone@remote.test>', /^250 /);
    await c.cmd(`RCPT TO:<${rcpt}>`, /^250 2\.1\.5 /);
    await c.cmd('DATA', /^354 /);
    c.write(`Subject: ${subject}\r\n\r\nFor the postmaster.\r\n.\r\n`);
    await c.expect(/^250 2\.0\.0 Ok: queued as /);
    await c.cmd('QUIT', /^221 /);
  } finally {
    c.close();
  }
}

/** Waits until Bob's Maildir holds a message with this subject, and returns it. */
async function inBobsMaildir(project: Project, subject: string): Promise<string> {
  const dir = project.path('mail', 'first.test', 'bob', 'Maildir', 'new');
  for (let i = 0; i < 200; i++) {
    let files: string[] = [];
    try {
      files = readdirSync(dir);
    } catch {
      // not made yet
    }
    for (const f of files) {
      const text = readFileSync(join(dir, f), 'latin1');
      if (text.includes(`Subject: ${subject}\r\n`)) return text;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no message "${subject}" in ${dir}`);
}

describe('postmaster, end to end', () => {
  const cleanup: (() => void)[] = [];
  after(() => cleanup.forEach((f) => f()));

  it('delivers <postmaster> and postmaster@ each local domain into the mailbox the postmaster alias names', async () => {
    const { petrel, port, project } = await startMailServer({}, `postmaster@first.test: ${BOB}\n`);
    cleanup.push(
      () => petrel.kill(),
      () => project.remove(),
    );
    await send(port, 'postmaster', 'to postmaster without a domain');
    await send(port, 'Postmaster@second.test', 'to the postmaster of the second domain');
    // The alias was expanded when the message was queued: the mailbox is Bob's, and
    // X-Original-To keeps the address the mail was sent to.
    const first = await inBobsMaildir(project, 'to postmaster without a domain');
    assert.match(first, /^X-Original-To: postmaster@first\.test\r\nDelivered-To: bob@first\.test\r$/m);
    const second = await inBobsMaildir(project, 'to the postmaster of the second domain');
    assert.match(second, /^X-Original-To: Postmaster@second\.test\r\nDelivered-To: bob@first\.test\r$/m);
    assert.equal(
      petrel.logs.filter((l) => /reaches no mailbox/.test(String(l.msg))).length,
      0,
      'no warning when the postmaster reaches a mailbox',
    );
  });

  it("follows the users plugin's postmaster setting when no alias names one", async () => {
    const { petrel, port, project } = await startMailServer({ postmaster: BOB }, null);
    cleanup.push(
      () => petrel.kill(),
      () => project.remove(),
    );
    await send(port, 'postmaster', 'to the configured postmaster');
    assert.match(
      await inBobsMaildir(project, 'to the configured postmaster'),
      /^X-Original-To: postmaster@first\.test\r\nDelivered-To: bob@first\.test\r$/m,
    );
  });

  it('warns at startup when postmaster leads nowhere, and then refuses it rather than lose the mail', async () => {
    const { petrel, port, project } = await startMailServer({}, null);
    cleanup.push(
      () => petrel.kill(),
      () => project.remove(),
    );
    const warning = petrel.logs.find((l) => /^postmaster@first\.test reaches no mailbox/.test(String(l.msg)));
    assert.ok(warning, petrel.dump());
    assert.equal(warning.level, 40, 'a warning');
    const c = await SmtpClient.connect(port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<someone@remote.test>', /^250 /);
    await c.cmd('RCPT TO:<postmaster>', /^550 5\.1\.1 /);
    c.close();
  });
});
