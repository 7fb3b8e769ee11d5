import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { SmtpClient } from '../harness/smtp-client.js';
import { acceptAllRecipients, memoryQueue, startServer, type CapturedMessage } from '../harness/server.js';
import { definePlugin } from '../../core/plugins/define.js';
import { accept, defer, deny, disconnect, proceed } from '../../core/hooks/verdict.js';
import { defineNote } from '../../core/message/notes.js';

async function greeted(port: number): Promise<SmtpClient> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  return c;
}

describe('hooks drive the session', () => {
  it('connect deny: 554 greeting, then only QUIT', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'blocklist',
          setup: () => ({ connect: async () => deny(554, '5.7.1', 'Listed on a blocklist') }),
        }),
      ],
    });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^554 Listed on a blocklist\r\n$/);
      await c.cmd('EHLO x.test', /^503 5\.5\.1 /);
      await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 /);
      await c.cmd('QUIT', /^221 2\.0\.0 /);
      await c.closed();
    } finally {
      await srv.close();
    }
  });

  it('connect deny with another 5xx code still greets with 554, and the log says what was sent', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'blocklist',
          setup: () => ({ connect: async () => deny(550, '5.7.1', 'Go away') }),
        }),
      ],
    });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^554 Go away\r\n$/);
      await c.cmd('QUIT', /^221 2\.0\.0 /);
      await c.closed();
      const line = srv.logs.find((l) => l.msg === 'verdict' && l.hook === 'connect');
      assert.deepEqual([line?.plugin, line?.verdict, line?.code], ['blocklist', 'deny', 554]);
    } finally {
      await srv.close();
    }
  });

  it('connect defer: 421 and close', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'busy',
          setup: () => ({ connect: async () => defer(421, '4.7.0', 'Busy, come back later') }),
        }),
      ],
    });
    try {
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^421 Busy, come back later/);
      await c.closed();
    } finally {
      await srv.close();
    }
  });

  it('helo deny is answered at HELO, and MAIL then needs a new HELO', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'helo-check',
          setup: () => ({
            helo: async ({ hostname, verb }) =>
              hostname === 'localhost' ? deny(550, '5.7.1', `${verb} localhost refused`) : proceed(),
          }),
        }),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.cmd('EHLO localhost', /^550 5\.7\.1 EHLO localhost refused/);
      await c.cmd('HELO localhost', /^550 5\.7\.1 HELO localhost refused/);
      await c.cmd('MAIL FROM:<a@example.test>', /^503 5\.5\.1 /);
      await c.cmd('EHLO real.test', /^250-/);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('capabilities: plugins add EHLO keywords, invalid ones are dropped', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'xclient',
          setup: () => ({ capabilities: async () => ['XCLIENT ADDR NAME', 'BAD\r\n250 INJECTED'] }),
        }),
      ],
    });
    try {
      const c = await greeted(srv.port);
      const words = await c.ehlo();
      assert.ok(words.includes('XCLIENT ADDR NAME'));
      assert.ok(!words.some((w) => w.includes('INJECTED')));
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('mail, rcpt and data verdicts choose the reply, enhanced code included', async () => {
    const queued: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'policy',
          setup: () => ({
            mail: async ({ sender }) =>
              sender?.domain === 'spam.test' ? deny(550, '5.7.1', 'Sender refused') : proceed(),
            rcpt: async ({ recipient }) =>
              recipient.local === 'nobody'
                ? deny(550, '5.1.1', 'No such user')
                : recipient.local === 'later'
                  ? defer(450, '4.2.1', 'Mailbox busy')
                  : recipient.local === 'custom'
                    ? accept({ text: 'Welcome aboard' })
                    : proceed(),
            data: async ({ transaction }) =>
              transaction.recipients.length > 2 ? deny(554, '5.7.0', 'Too many for one message') : proceed(),
          }),
        }),
        acceptAllRecipients,
        memoryQueue(queued),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<x@spam.test>', /^550 5\.7\.1 Sender refused/);
      await c.cmd('MAIL FROM:<x@good.test>', /^250 /);
      await c.cmd('RCPT TO:<nobody@good.test>', /^550 5\.1\.1 No such user/);
      await c.cmd('RCPT TO:<later@good.test>', /^450 4\.2\.1 Mailbox busy/);
      await c.cmd('RCPT TO:<custom@good.test>', /^250 2\.1\.5 Welcome aboard/);
      await c.cmd('RCPT TO:<b@good.test>', /^250 /);
      await c.cmd('RCPT TO:<c@good.test>', /^250 /);
      await c.cmd('DATA', /^554 5\.7\.0 Too many for one message/);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a recipient no plugin accepts is refused: nothing is accepted that no one owns', async () => {
    const srv = await startServer();
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@elsewhere.test>', /^550 5\.7\.1 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a message no plugin queues gets 451 4.3.0', async () => {
    const srv = await startServer({ plugins: [acceptAllRecipients] });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('Subject: orphan\r\n\r\nx\r\n.\r\n');
      await c.expect(/^451 4\.3\.0 /);
      assert.ok(srv.logs.some((l) => l.msg === 'no plugin accepted the message at queue'));
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('data_post sees parsed headers and may add headers above Received', async () => {
    const queued: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [
        acceptAllRecipients,
        definePlugin({
          name: 'tagger',
          setup: () => ({
            async data_post({ message, prependHeader }) {
              if (message.headers.get('subject') === 'reject me')
                return deny(550, '5.7.1', 'Content refused');
              prependHeader('X-Seen-Subject', message.headers.get('Subject') ?? '');
              prependHeader('X-Size', String(message.size));
              return proceed();
            },
          }),
        }),
        memoryQueue(queued),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      for (const subject of ['hello\r\n folded', 'reject me']) {
        await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
        await c.cmd('RCPT TO:<b@example.test>', /^250 /);
        await c.cmd('DATA', /^354 /);
        c.write(`Subject: ${subject}\r\nFrom: a@example.test\r\n\r\nbody\r\n.\r\n`);
        await c.expect(subject === 'reject me' ? /^550 5\.7\.1 Content refused/ : /^250 /);
      }
      assert.equal(queued.length, 1);
      const text = queued[0]!.data.toString();
      const rawSize = queued[0]!.raw.length;
      assert.match(
        text,
        new RegExp(`^X-Size: ${rawSize}\\r\\nX-Seen-Subject: hello folded\\r\\nReceived: from `),
      );
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a plugin that throws gives 451 4.3.0 and a log line naming plugin and hook; the server keeps serving', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'buggy',
          setup: () => ({
            rcpt: async () => {
              throw new Error('boom: secret detail');
            },
          }),
        }),
        acceptAllRecipients,
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      const r = await c.cmd('RCPT TO:<b@example.test>', /^451 4\.3\.0 /);
      assert.ok(!r.text.includes('boom'), 'the error text never reaches the client');
      const line = srv.logs.find((l) => l.msg === 'hook failed');
      assert.equal(line?.plugin, 'buggy');
      assert.equal(line?.hook, 'rcpt');
      c.close();
      const next = await greeted(srv.port);
      await next.cmd('NOOP', /^250 /);
      next.close();
    } finally {
      await srv.close();
    }
  });

  it('a plugin that hangs past its timeout gives 451 4.3.0 and its signal is aborted', async () => {
    let aborted = false;
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'stuck',
          setup: () => ({
            mail: ({ signal }) =>
              new Promise(() => {
                signal.addEventListener('abort', () => (aborted = true));
              }),
          }),
        }),
      ],
      entries: [{ name: 'stuck', timeout: '200ms' }],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^451 4\.3\.0 /);
      assert.ok(aborted);
      const line = srv.logs.find((l) => l.msg === 'hook failed');
      assert.equal(line?.plugin, 'stuck');
      assert.equal(line?.hook, 'mail');
      await c.cmd('NOOP', /^250 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a hook that returns something that is not a verdict is a failure, not an accept', async () => {
    const srv = await startServer({
      plugins: [definePlugin({ name: 'sloppy', setup: () => ({ rcpt: (async () => 'yes') as never }) })],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^451 4\.3\.0 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('hooks get a read-only view of the session: setting the user fails the hook, and there is no socket to reach', async () => {
    const seen: Record<string, unknown> = {};
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'meddler',
          setup: () => ({
            // As a JavaScript plugin would, with nothing from TypeScript to stop it.
            mail: async ({ session }) => {
              const s = session as unknown as Record<string, unknown>;
              seen.keys = Object.keys(s);
              seen.socket = s.socket ?? s.raw ?? s.reader;
              seen.frozen = Object.isFrozen(s);
              s.user = 'postmaster@example.test'; // throws: the hook fails
              return proceed();
            },
          }),
        }),
        acceptAllRecipients,
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^451 4\.3\.0 /);
      assert.deepEqual(seen.keys, []);
      assert.equal(seen.socket, undefined);
      assert.equal(seen.frozen, true);
      assert.ok(
        srv.logs.some((l) => l.msg === 'hook failed' && l.plugin === 'meddler' && l.hook === 'mail'),
        'the assignment failed the hook, and the log says which',
      );
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('a transaction view cannot be changed by a plugin', async () => {
    const seen: Record<string, unknown> = {};
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'meddler',
          setup: () => ({
            rcpt: async ({ session, transaction }) => {
              seen.user = session.user;
              try {
                (transaction.recipients as unknown as unknown[]).push({ address: 'x@evil.test' });
              } catch (err) {
                seen.push = (err as Error).name;
              }
              try {
                (transaction.sender as unknown as Record<string, unknown>).domain = 'evil.test';
              } catch (err) {
                seen.sender = (err as Error).name;
              }
              return proceed();
            },
          }),
        }),
        acceptAllRecipients,
        memoryQueue([]),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      assert.equal(seen.user, null);
      assert.equal(seen.push, 'TypeError');
      assert.equal(seen.sender, 'TypeError');
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('disconnect verdict replies and closes', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'bouncer',
          setup: () => ({ mail: async () => disconnect(421, '4.7.0', 'Go away') }),
        }),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^421 4\.7\.0 Go away/);
      await c.closed();
    } finally {
      await srv.close();
    }
  });

  it('unrecognized_command lets a plugin implement a command', async () => {
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'xping',
          setup: () => ({
            unrecognized_command: async ({ verb, args }) =>
              verb === 'XPING' ? accept({ code: 250, enhanced: '2.0.0', text: `PONG ${args}` }) : proceed(),
          }),
        }),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.cmd('XPING hello', /^250 2\.0\.0 PONG hello/);
      await c.cmd('XPONG', /^500 5\.5\.1 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('typed notes carry state from one plugin to another within a transaction, and reset clears them', async () => {
    const score = defineNote<number>('spam-score');
    const seen: (number | undefined)[] = [];
    const outcomes: string[] = [];
    let disconnects = 0;
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'scorer',
          setup: () => ({
            rcpt: async ({ transaction }) => {
              transaction.notes.set(score, (transaction.notes.get(score) ?? 0) + 1);
              return proceed();
            },
          }),
        }),
        acceptAllRecipients,
        definePlugin({
          name: 'reader',
          setup: () => ({
            data: async ({ transaction }) => {
              seen.push(transaction.notes.get(score));
              return proceed();
            },
            reset: async ({ outcome }) => {
              outcomes.push(outcome);
            },
            disconnect: async () => {
              disconnects++;
            },
          }),
        }),
      ],
    });
    try {
      const c = await greeted(srv.port);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('RCPT TO:<c@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('x\r\n.\r\n');
      await c.expect(/^451 /); // no queue plugin
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write('x\r\n.\r\n');
      await c.expect(/^451 /);
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      c.close(); // gone mid-transaction: reset and disconnect still run
      for (let i = 0; i < 50 && disconnects === 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(seen, [2, 1]);
      assert.deepEqual(outcomes, ['rejected', 'rejected', 'aborted']);
      assert.equal(disconnects, 1);
    } finally {
      await srv.close();
    }
  });
});
