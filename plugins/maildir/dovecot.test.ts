import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Hooks } from '../../core/hooks/catalogue.js';
import { Tokens } from '../../core/di/tokens.js';
import { validateConfig } from '../../core/config/load.js';
import { setupPlugin } from '../../core/testing/index.js';
import { has } from '../../test/harness/peers.js';
import { acceptAllRecipients, startServer } from '../../test/harness/server.js';
import {
  deliveryRecipient,
  DOVECOT,
  fetchMail,
  queuedMessage,
  requireDovecot,
  sendOverSmtp,
  startDovecot,
  waitForMail,
  type Dovecot,
} from '../../test/harness/dovecot.js';
import maildir from './index.js';

const BOB = { address: 'bob@example.test', password: 'bob-secret' };
const CAROL = { address: 'carol@example.test', password: 'carol-secret' };

const MESSAGE = [
  'From: Alice <alice@crepes.test>',
  'To: bob@example.test',
  'Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= from maildir',
  'MIME-Version: 1.0',
  'Content-Type: text/plain; charset=utf-8',
  'Content-Transfer-Encoding: 8bit',
  '',
  'Hallo Bob, ça marche.',
  '.a line with a leading dot',
  '',
].join('\r\n');

describe('maildir writes what Dovecot serves over IMAP and POP3', () => {
  let dovecot: Dovecot | null = null;
  let hooks: Hooks;

  before(async () => {
    if (!has(DOVECOT)) return;
    dovecot = await startDovecot([BOB, CAROL]);
    const config = validateConfig(
      { localDomains: ['example.test'], listeners: [{ kind: 'smtp', port: 0 }] },
      '(test)',
      '/',
    ).config;
    hooks = await setupPlugin(maildir, {
      config: {
        root: dovecot.mailRoot,
        uid: dovecot.uid,
        gid: dovecot.gid,
        fileMode: '0600',
        dirMode: '0700',
        subaddressFolders: true,
      } as never,
      services: new Map([[Tokens.Config, config]]),
    });
  });
  after(() => dovecot?.stop());

  async function deliver(rcpt: string, content: string): Promise<void> {
    const message = queuedMessage(content);
    const recipient = deliveryRecipient(rcpt);
    const signal = new AbortController().signal;
    const v = await hooks.route!({ message, recipient, signal });
    assert.ok(v.kind === 'route', `routed: ${JSON.stringify(v)}`);
    const out = await hooks.deliver!({
      message,
      sender: message.sender,
      route: v.route,
      recipients: [recipient],
      signal,
    });
    assert.ok(out.kind === 'results' && out.results[0]?.status === 'delivered', JSON.stringify(out));
  }

  it('a message delivered to bob is seen over IMAP and POP3, subject and body intact', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    await deliver('bob@example.test', MESSAGE);
    const box = join(dovecot.mailRoot, 'example.test', 'bob', 'Maildir');
    assert.equal(statSync(box).uid, dovecot.uid, 'the mailbox belongs to the mail user');
    const [file] = readdirSync(join(box, 'new'));
    assert.equal(statSync(join(box, 'new', file!)).uid, dovecot.uid);

    const imap = await fetchMail(dovecot, 'imap', BOB);
    assert.equal(imap.length, 1, dovecot.log());
    assert.equal(imap[0]!.subject, 'Grüße from maildir');
    assert.equal(imap[0]!.body, 'Hallo Bob, ça marche.\r\n.a line with a leading dot\r\n');
    assert.ok(
      imap[0]!.raw
        .toString()
        .startsWith('Return-Path: <alice@crepes.test>\r\nDelivered-To: bob@example.test\r\n'),
    );

    const pop = await fetchMail(dovecot, 'pop3', BOB);
    assert.equal(pop.length, 1, dovecot.log());
    assert.equal(pop[0]!.subject, 'Grüße from maildir');
    assert.equal(pop[0]!.body, imap[0]!.body);
    assert.deepEqual(await fetchMail(dovecot, 'imap', CAROL), [], 'nothing for carol');
  });

  it('a sub-addressed message lands in a folder Dovecot opens by its tag', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    await deliver('carol+lists@example.test', 'Subject: for the lists folder\r\n\r\nlist mail\r\n');
    const lists = await fetchMail(dovecot, 'imap', CAROL, 'lists');
    assert.deepEqual(
      lists.map((m) => [m.subject, m.body]),
      [['for the lists folder', 'list mail\r\n']],
    );
    assert.deepEqual(await fetchMail(dovecot, 'imap', CAROL), [], 'not in the inbox');
  });

  it('mail sent to Petrel over SMTP goes through the queue into maildir and out of Dovecot', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      entries: [
        acceptAllRecipients.name,
        'queue',
        { name: 'maildir', config: { root: dovecot.mailRoot, uid: dovecot.uid, gid: dovecot.gid } },
      ],
      config: { localDomains: ['example.test'] },
    });
    try {
      const content = 'Subject: through the queue\r\n\r\nSMTP, queue, maildir, IMAP.\r\n';
      await sendOverSmtp(srv.port, 'alice@crepes.test', ['bob@example.test', 'carol@example.test'], content);
      const match = (m: { subject: string }): boolean => m.subject === 'through the queue';
      for (const user of [BOB, CAROL]) {
        const got = await waitForMail(dovecot, 'imap', user, match);
        assert.equal(got.body, 'SMTP, queue, maildir, IMAP.\r\n');
        assert.match(
          got.raw.toString(),
          new RegExp(`^Return-Path: <alice@crepes.test>\r\nDelivered-To: ${user.address}\r\nReceived: `),
        );
      }
    } finally {
      await srv.close();
    }
  });
});
