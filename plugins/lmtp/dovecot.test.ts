import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { DeliveryRecipient, Hooks, RecipientResult } from '../../core/hooks/catalogue.js';
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
import lmtp from './index.js';

const BOB = { address: 'bob@example.test', password: 'bob-secret' };
const CAROL = { address: 'carol@example.test', password: 'carol-secret' };

function message(subject: string, body: string) {
  return queuedMessage(
    [
      'From: alice@crepes.test',
      'To: bob@example.test',
      `Subject: ${subject}`,
      'MIME-Version: 1.0',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      body,
    ].join('\r\n'),
    { mailParams: { body: '8BITMIME', smtputf8: false } },
  );
}

describe('lmtp into a real Dovecot', () => {
  let dovecot: Dovecot | null = null;
  const config = validateConfig(
    { hostname: 'mx.test', localDomains: ['example.test'], listeners: [{ kind: 'smtp', port: 0 }] },
    '(test)',
    '/',
  ).config;

  before(async () => {
    if (has(DOVECOT)) dovecot = await startDovecot([BOB, CAROL]);
  });
  after(() => dovecot?.stop());

  async function deliver(
    pluginConfig: Record<string, unknown>,
    recipients: DeliveryRecipient[],
    msg = message('x', 'x\r\n'),
  ): Promise<RecipientResult[]> {
    const hooks: Hooks = await setupPlugin(lmtp, {
      config: pluginConfig as never,
      services: new Map([[Tokens.Config, config]]),
    });
    const signal = new AbortController().signal;
    const v = await hooks.route!({ message: msg, recipient: recipients[0]!, signal });
    assert.ok(v.kind === 'route');
    const out = await hooks.deliver!({
      message: msg,
      sender: msg.sender,
      route: v.route,
      recipients,
      signal,
    });
    assert.ok(out.kind === 'results');
    return [...out.results];
  }

  it('delivers to an existing user (seen over IMAP) and fails an unknown one with Dovecot’s 5xx', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    const results = await deliver(
      { host: '127.0.0.1', port: dovecot.lmtpPort },
      [deliveryRecipient('bob@example.test'), deliveryRecipient('nobody@example.test')],
      message('Über LMTP', 'Grüße, Bob.\r\n.leading dot\r\n'),
    );
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code, r.reply.enhanced]),
      [
        ['bob@example.test', 'delivered', 250, '2.0.0'],
        ['nobody@example.test', 'failed', 550, '5.1.1'],
      ],
      dovecot.log(),
    );
    assert.match(String(results[1]!.reply.text), /User doesn't exist/);
    const inbox = await fetchMail(dovecot, 'imap', BOB);
    assert.deepEqual(
      inbox.map((m) => [m.subject, m.body]),
      [['Über LMTP', 'Grüße, Bob.\r\n.leading dot\r\n']],
    );
    assert.match(inbox[0]!.raw.toString(), /^Return-Path: <alice@crepes\.test>\r\n/);
  });

  it('delivers over Dovecot’s unix socket too', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    const results = await deliver({ socket: dovecot.lmtpSocket }, [deliveryRecipient('carol@example.test')]);
    assert.equal(results[0]!.status, 'delivered', dovecot.log());
    assert.equal((await fetchMail(dovecot, 'pop3', CAROL)).length, 1);
  });

  it('mail sent to Petrel over SMTP goes through the queue and LMTP into Dovecot', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      entries: [
        acceptAllRecipients.name,
        'queue',
        { name: 'lmtp', config: { host: '127.0.0.1', port: dovecot.lmtpPort } },
      ],
      config: { localDomains: ['example.test'] },
    });
    try {
      const content = 'Subject: queued for LMTP\r\n\r\nSMTP, queue, LMTP, POP3.\r\n';
      await sendOverSmtp(srv.port, 'alice@crepes.test', ['bob@example.test', 'carol@example.test'], content);
      for (const user of [BOB, CAROL]) {
        const got = await waitForMail(dovecot, 'pop3', user, (m) => m.subject === 'queued for LMTP');
        assert.equal(got.body, 'SMTP, queue, LMTP, POP3.\r\n');
      }
    } finally {
      await srv.close();
    }
  });

  it('defers every recipient once Dovecot is stopped', async (t) => {
    if (!requireDovecot(t) || !dovecot) return;
    const port = dovecot.lmtpPort;
    await dovecot.stop();
    const results = await deliver({ host: '127.0.0.1', port }, [
      deliveryRecipient('bob@example.test'),
      deliveryRecipient('carol@example.test'),
    ]);
    assert.deepEqual(
      results.map((r) => [r.status, r.reply.code, r.reply.enhanced]),
      [
        ['deferred', 451, '4.4.1'],
        ['deferred', 451, '4.4.1'],
      ],
    );
  });
});
