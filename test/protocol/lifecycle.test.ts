import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { SmtpClient } from '../harness/smtp-client.js';
import { memoryQueue, startServer, type CapturedMessage } from '../harness/server.js';
import { definePlugin } from '../../core/plugins/define.js';
import { accept, deny, proceed } from '../../core/hooks/verdict.js';
import { z } from 'zod';

const events: string[] = [];
const gate = definePlugin({
  name: 'gate',
  config: z.object({ open: z.boolean() }).strict(),
  setup: ({ config, onClose }) => {
    onClose(() => {
      events.push(`closed open=${config.open}`);
    });
    return { rcpt: async () => (config.open ? accept() : deny(550, '5.7.1', 'Gate closed')) };
  },
});

describe('reload and shutdown', () => {
  it('a reload swaps the plugins for new sessions; sessions in flight finish on the old set', async () => {
    const srv = await startServer({ plugins: [gate], entries: [{ name: 'gate', config: { open: false } }] });
    try {
      const old = await SmtpClient.connect(srv.port);
      await old.expect(/^220 /);
      await old.ehlo();
      await srv.app.reload({
        ...srv.app.generation.config,
        listeners: srv.app.generation.config.listeners,
        plugins: [{ name: 'gate', config: { open: true } }],
      });
      assert.deepEqual(events, [], 'the old set stays open while a session uses it');
      const fresh = await SmtpClient.connect(srv.port);
      await fresh.expect(/^220 /);
      await fresh.ehlo();
      await fresh.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await fresh.cmd('RCPT TO:<b@example.test>', /^250 /);
      await old.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await old.cmd('RCPT TO:<b@example.test>', /^550 5\.7\.1 Gate closed/);
      await old.cmd('QUIT', /^221 /);
      await old.closed();
      for (let i = 0; i < 50 && events.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(events, ['closed open=false']);
      fresh.close();
    } finally {
      await srv.close();
    }
  });

  it('a reload whose plugin setup never finishes is refused at timeouts.setup, and its late resources are closed', async () => {
    let finishSetup: () => void = () => undefined;
    const lateClosed: string[] = [];
    const slow = definePlugin({
      name: 'slow',
      config: z.object({ hang: z.boolean() }).strict(),
      setup: async ({ config, onClose }) => {
        if (config.hang) {
          await new Promise<void>((resolve) => (finishSetup = resolve));
          onClose(() => void lateClosed.push('late'));
        }
        return { rcpt: async () => accept() };
      },
    });
    const srv = await startServer({ plugins: [slow], entries: [{ name: 'slow', config: { hang: false } }] });
    try {
      await assert.rejects(
        srv.app.reload({
          ...srv.app.generation.config,
          timeouts: { ...srv.app.generation.config.timeouts, setup: 200 },
          plugins: [{ name: 'slow', config: { hang: true } }],
        }),
        /plugins\[0\] \(slow\): expected setup to finish within 200 ms \(timeouts\.setup\)/,
      );
      assert.ok(srv.logs.some((l) => l.msg === 'reload refused; keeping the running config'));
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      c.close();
      // The setup that missed its deadline finishes after all: what it opened is closed at once.
      finishSetup();
      for (let i = 0; i < 50 && lateClosed.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual(lateClosed, ['late']);
    } finally {
      await srv.close();
    }
  });

  it('a bad config on reload is refused and the old one keeps running', async () => {
    const srv = await startServer({ plugins: [gate], entries: [{ name: 'gate', config: { open: true } }] });
    try {
      await assert.rejects(
        srv.app.reload({
          ...srv.app.generation.config,
          plugins: [{ name: 'gate', config: { open: 'yes' } }],
        }),
        /plugins\[0\] \(gate\)\.config\.open: expected boolean/,
      );
      await assert.rejects(
        srv.app.reload({ ...srv.app.generation.config, plugins: [{ name: 'no-such-plugin' }] }),
        /no-such-plugin/,
      );
      assert.ok(srv.logs.some((l) => l.msg === 'reload refused; keeping the running config'));
      const c = await SmtpClient.connect(srv.port);
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('MAIL FROM:<a@example.test>', /^250 /);
      await c.cmd('RCPT TO:<b@example.test>', /^250 /);
      c.close();
    } finally {
      await srv.close();
    }
  });

  it('stop lets a transaction finish, then answers 421 4.3.2; idle sessions get 421 4.3.2 at once', async () => {
    const queued: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [
        definePlugin({
          name: 'all',
          setup: () => ({ rcpt: async () => accept(), mail: async () => proceed() }),
        }),
        memoryQueue(queued),
      ],
    });
    const busy = await SmtpClient.connect(srv.port);
    await busy.expect(/^220 /);
    await busy.ehlo();
    await busy.cmd('MAIL FROM:<a@example.test>', /^250 /);
    await busy.cmd('RCPT TO:<b@example.test>', /^250 /);
    const idle = await SmtpClient.connect(srv.port);
    await idle.expect(/^220 /);
    const stopping = srv.app.stop(5000);
    await idle.expect(/^421 4\.3\.2 /);
    await idle.closed();
    await busy.cmd('DATA', /^354 /);
    busy.write('Subject: last one\r\n\r\nx\r\n.\r\n');
    await busy.expect(/^250 2\.0\.0 /);
    busy.send('MAIL FROM:<a@example.test>');
    await busy.expect(/^421 4\.3\.2 /);
    await busy.closed();
    await stopping;
    assert.equal(queued.length, 1);
  });

  it('stop closes sessions still busy at the deadline with 421 4.3.2', async () => {
    const srv = await startServer({
      plugins: [definePlugin({ name: 'all', setup: () => ({ rcpt: async () => accept() }) })],
    });
    const busy = await SmtpClient.connect(srv.port);
    await busy.expect(/^220 /);
    await busy.ehlo();
    await busy.cmd('MAIL FROM:<a@example.test>', /^250 /);
    const stopping = srv.app.stop(300);
    await busy.expect(/^421 4\.3\.2 /, 3000);
    await busy.closed();
    await stopping;
  });
});
