import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { SMTPServer } from 'smtp-server';
import { SmtpClient } from '../harness/smtp-client.js';
import { acceptAllRecipients, startServer } from '../harness/server.js';
import { definePlugin, type TransformPhase } from '../../core/plugins/define.js';
import type { PeerCapabilities } from '../../core/hooks/catalogue.js';
import queue from '../../plugins/queue/index.js';
import maildir from '../../plugins/maildir/index.js';
import lmtp from '../../plugins/lmtp/index.js';

/**
 * Every transport runs the same transform chain, in phases: a `sign` transform sees the message
 * only after every `rewrite` transform, whatever order the config lists them in.
 */

const peers: PeerCapabilities[] = [];

/** Listed first, but signs: it says whether the rewrite had happened when it saw the message. */
const signer = definePlugin({
  name: 'test-signer',
  transformPhase: 'sign',
  setup: () => ({
    async transform({ content, peer }) {
      peers.push(peer);
      const parts: Buffer[] = [];
      for await (const c of content) parts.push(c as Buffer);
      const body = Buffer.concat(parts);
      const saw = body.includes('FOOTER') ? 'yes' : 'no';
      return Readable.from([Buffer.from(`X-Signed: saw-footer=${saw}\r\n`), body]);
    },
  }),
});

/** Listed second, rewrites: adds a footer line to the body. */
const footer = definePlugin({
  name: 'test-footer',
  transformPhase: 'rewrite' satisfies TransformPhase,
  setup: () => ({
    async transform({ content }) {
      return Readable.from(
        (async function* () {
          yield* content;
          yield Buffer.from('FOOTER\r\n');
        })(),
      );
    },
  }),
});

async function send(port: number, to: string, body: string): Promise<void> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo();
  await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
  await c.cmd(`RCPT TO:<${to}>`, /^250 /);
  await c.cmd('DATA', /^354 /);
  c.write(`Subject: chain\r\n\r\n${body}\r\n.\r\n`);
  await c.expect(/^250 /);
  c.close();
}

async function until<T>(probe: () => T | undefined, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error('not in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('the transform chain on every transport', () => {
  const cleanup: (() => Promise<void> | void)[] = [];
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });

  it('refuses a transform phase that does not exist', () => {
    assert.throws(
      () => definePlugin({ name: 'x', transformPhase: 'encrypt' as never, setup: () => ({}) }),
      /transformPhase must be one of rewrite, sign/,
    );
  });

  it('maildir: a signer listed before a rewrite still signs the rewritten message', async () => {
    const root = mkdtempSync(join(tmpdir(), 'petrel-transform-'));
    cleanup.push(() => rmSync(root, { recursive: true, force: true }));
    const srv = await startServer({
      plugins: [signer, footer, acceptAllRecipients, queue, maildir],
      config: { localDomains: ['hamburger.test'] },
      entries: [
        'test-signer',
        'test-footer',
        'test-accept-rcpt',
        'queue',
        { name: 'maildir', config: { root } },
      ],
    });
    cleanup.push(() => srv.close());
    peers.length = 0;
    await send(srv.port, 'bob@hamburger.test', 'hello bob');
    const folder = join(root, 'hamburger.test', 'bob', 'Maildir', 'new');
    const file = await until(() => {
      try {
        return readdirSync(folder)[0];
      } catch {
        return undefined;
      }
    });
    const text = readFileSync(join(folder, file), 'latin1');
    assert.match(text, /\r\nX-Signed: saw-footer=yes\r\n/);
    assert.match(text, /hello bob\r\nFOOTER\r\n$/);
    assert.deepEqual(peers, [{ eightBitMime: true, smtputf8: true }], 'a mailbox takes everything');
  });

  it('lmtp: the chain runs for the LMTP server, with the capabilities it offered in LHLO', async () => {
    const received: Buffer[] = [];
    const server = new SMTPServer({
      lmtp: true,
      authOptional: true,
      disabledCommands: ['AUTH', 'STARTTLS'],
      hide8BITMIME: true,
      logger: false,
      onData(stream, _session, cb) {
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        stream.on('end', () => {
          received.push(Buffer.concat(chunks));
          cb(null, ['Saved'] as never);
        });
      },
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    cleanup.push(() => new Promise<void>((r) => server.close(() => r())));
    const port = (server.server.address() as { port: number }).port;
    const srv = await startServer({
      plugins: [signer, footer, acceptAllRecipients, queue, lmtp],
      config: { localDomains: ['hamburger.test'] },
      entries: [
        'test-signer',
        'test-footer',
        'test-accept-rcpt',
        'queue',
        { name: 'lmtp', config: { host: '127.0.0.1', port } },
      ],
    });
    cleanup.push(() => srv.close());
    peers.length = 0;
    await send(srv.port, 'bob@hamburger.test', 'hello over lmtp');
    const data = await until(() => received[0]);
    const text = data.toString('latin1');
    assert.match(text, /^X-Signed: saw-footer=yes\r\n/);
    assert.match(text, /hello over lmtp\r\nFOOTER\r\n$/);
    assert.equal(peers[0]?.eightBitMime, false, 'the LMTP server did not offer 8BITMIME');
  });
});
