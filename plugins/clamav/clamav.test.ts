/**
 * clamav over the wire: a Petrel with the plugin, a real clamd with a signature database built
 * by the test (EICAR), and SMTP sessions sending clean and infected messages.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { definePlugin, proceed, type PluginDefinition } from '../../core/index.js';
import { resolveToken } from '../../core/di/tokens.js';
import {
  clamdMissing,
  EICAR,
  EICAR_SIGNATURE,
  startClamd,
  type ClamdPeer,
} from '../../test/harness/clamd.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type CapturedMessage,
  type TestServer,
} from '../../test/harness/server.js';
import { SmtpClient, type Reply } from '../../test/harness/smtp-client.js';
import { Queue } from '../queue/api.js';
import { ClamAV, type ClamAVResult } from './api.js';
import { parseReply } from './clamd.js';
import { clamavConfig } from './config.js';

/** The ClamAV note at data_post, as a plugin listed after clamav reads it. */
function noteReader(into: (ClamAVResult | undefined)[]): PluginDefinition {
  return definePlugin({
    name: 'test-note-reader',
    setup: () => ({
      async data_post({ transaction }) {
        into.push(transaction.notes.get(ClamAV));
        return proceed();
      },
    }),
  });
}

/** A MIME message with `attachment` as a base64 attachment. */
function withAttachment(attachment: string, padding = ''): string {
  const b64 = (
    Buffer.from(attachment, 'latin1')
      .toString('base64')
      .match(/.{1,76}/g) ?? []
  ).join('\r\n');
  return [
    'From: alice@example.test',
    'To: bob@mx.test',
    'Subject: the file you asked for',
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="b1"',
    '',
    '--b1',
    'Content-Type: text/plain',
    '',
    `Here it is.${padding}`,
    '--b1',
    'Content-Type: application/octet-stream; name="eicar.com"',
    'Content-Disposition: attachment; filename="eicar.com"',
    'Content-Transfer-Encoding: base64',
    '',
    b64,
    '--b1--',
    '',
  ].join('\r\n');
}

const CLEAN = 'From: alice@example.test\r\nTo: bob@mx.test\r\nSubject: lunch\r\n\r\nLunch tomorrow?\r\n';

/** One transaction; resolves to the reply after the final dot. */
async function send(port: number, data: string): Promise<Reply> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
    await c.cmd('RCPT TO:<bob@mx.test>', /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`${data}.\r\n`);
    const reply = await c.reply(30_000);
    c.send('QUIT');
    return reply;
  } finally {
    c.close();
  }
}

const scans = (srv: TestServer) => srv.logs.filter((l) => l.msg === 'clamav scan');

describe('clamav: scanning with a real clamd', { skip: clamdMissing }, () => {
  let clamd: ClamdPeer;
  before(async () => {
    clamd = await startClamd();
  });
  after(() => clamd?.stop());

  async function server(config: Record<string, unknown>, extra: PluginDefinition[] = []) {
    const captured: CapturedMessage[] = [];
    const notes: (ClamAVResult | undefined)[] = [];
    const plugins = [acceptAllRecipients, noteReader(notes), ...extra, memoryQueue(captured)];
    const srv = await startServer({
      plugins,
      entries: [
        'test-accept-rcpt',
        { name: 'clamav', config: { host: clamd.host, port: clamd.port, ...config } },
        ...plugins.slice(1).map((p) => p.name),
      ],
    });
    return { srv, captured, notes };
  }

  it('refuses a message with a virus in an attachment with 554 5.7.1 naming it', async (t) => {
    const { srv, captured } = await server({});
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR));
    assert.equal(reply.code, 554, reply.raw);
    assert.equal(reply.text, `5.7.1 Message contains a virus (${EICAR_SIGNATURE})`);
    assert.equal(captured.length, 0);
    const [line] = scans(srv);
    assert.equal(line?.result, 'infected');
    assert.equal(line?.signature, EICAR_SIGNATURE);
    assert.ok((line?.bytes as number) > 68);
    assert.equal(typeof line?.ms, 'number');
  });

  it('passes a clean message and leaves the result for later plugins', async (t) => {
    const { srv, captured, notes } = await server({});
    t.after(() => srv.close());
    const reply = await send(srv.port, CLEAN);
    assert.equal(reply.code, 250, reply.raw);
    assert.equal(captured.length, 1);
    assert.equal(notes[0]?.status, 'clean');
    assert.equal(notes[0]?.signature, null);
    // What was scanned is the whole stored message: the received octets and the added headers.
    assert.equal(notes[0]?.bytes, captured[0]!.data.length);
    assert.equal(scans(srv)[0]?.result, 'clean');
  });

  it('publishes the note as petrel/clamav, for a plugin outside the tree', async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-clamav-reader-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const file = join(dir, 'reader.mjs');
    writeFileSync(
      file,
      `import { definePlugin, proceed } from 'petrel';
import { ClamAV } from 'petrel/clamav';
export default definePlugin({
  name: 'scan-reader',
  setup: () => ({
    async data_post({ transaction, prependHeader }) {
      const scan = transaction.notes.get(ClamAV);
      prependHeader('X-Scan', scan ? scan.status + ' ' + scan.bytes : 'none');
      return proceed();
    },
  }),
});
`,
    );
    const captured: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured)],
      entries: [
        'test-accept-rcpt',
        { name: 'clamav', config: { host: clamd.host, port: clamd.port } },
        file,
        'test-memory-queue',
      ],
    });
    t.after(() => srv.close());
    const reply = await send(srv.port, CLEAN);
    assert.equal(reply.code, 250, reply.raw);
    assert.match(captured[0]!.data.toString('latin1'), /^X-Scan: clean \d+\r\n/m);
  });

  it('scans through the unix socket too', async (t) => {
    const { srv } = await server({ socket: clamd.socket, port: 1 });
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR));
    assert.equal(reply.code, 554, reply.raw);
    assert.equal(scans(srv)[0]?.clamd, clamd.socket);
  });

  it('does not scan a message larger than maxSize, and says so', async (t) => {
    const { srv, captured, notes } = await server({ maxSize: 2000 });
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR, 'x'.repeat(3000)));
    assert.equal(reply.code, 250, reply.raw);
    assert.equal(captured.length, 1);
    assert.equal(notes[0]?.status, 'skipped');
    assert.equal(notes[0]?.bytes, 0);
    assert.match(scans(srv)[0]?.reason as string, /^too large \(\d+ > maxSize 2000\)$/);
  });

  it('does not scan mail from trustedNetworks', async (t) => {
    const { srv, captured } = await server({ trustedNetworks: ['127.0.0.0/8'] });
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR));
    assert.equal(reply.code, 250, reply.raw);
    assert.equal(captured.length, 1);
    assert.equal(scans(srv)[0]?.reason, 'trusted network');
  });

  it('with action quarantine, holds the message in the queue with the signature as reason', async (t) => {
    const srv = await startServer({
      plugins: [acceptAllRecipients],
      entries: [
        'test-accept-rcpt',
        { name: 'clamav', config: { host: clamd.host, port: clamd.port, action: 'quarantine' } },
        { name: 'queue', config: {} },
      ],
    });
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR));
    assert.equal(reply.code, 250, reply.raw);
    const id = /queued as (\S+)/.exec(reply.text)?.[1];
    assert.ok(id, reply.raw);
    const held = await resolveToken(srv.app.generation.container, Queue).get(id);
    assert.equal(held?.held, true);
    assert.equal(held?.heldReason, `clamav: virus ${EICAR_SIGNATURE}`);
    assert.equal(scans(srv)[0]?.action, 'quarantine');
  });

  it('fails on time when clamd does not answer (fail closed: 451 4.3.0)', async (t) => {
    const { srv, captured } = await server({ timeout: 500 });
    t.after(() => srv.close());
    clamd.pause();
    t.after(() => clamd.resume());
    const reply = await send(srv.port, CLEAN);
    assert.equal(reply.code, 451, reply.raw);
    assert.equal(reply.text, '4.3.0 Virus scanner unavailable, try again later');
    assert.equal(captured.length, 0);
    assert.match(scans(srv)[0]?.reason as string, /^timeout: no reply from clamd within 500 ms$/);
  });
});

describe("clamav: clamd's own limit (StreamMaxLength)", { skip: clamdMissing }, () => {
  let clamd: ClamdPeer;
  before(async () => {
    clamd = await startClamd({ streamMaxLength: '1M' });
  });
  after(() => clamd?.stop());

  async function server(maxSize: number) {
    const captured: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured)],
      entries: [
        'test-accept-rcpt',
        { name: 'clamav', config: { host: clamd.host, port: clamd.port, maxSize } },
        'test-memory-queue',
      ],
    });
    return { srv, captured };
  }

  it('finds a virus after many chunks of text', async (t) => {
    const { srv } = await server(1_000_000);
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR, '\r\nfiller line of text'.repeat(40_000)));
    assert.equal(reply.code, 554, reply.raw);
    assert.ok((scans(srv)[0]?.bytes as number) > 800_000);
  });

  it('a maxSize above it is an error clamd reports: fail closed, with its reason logged', async (t) => {
    const { srv, captured } = await server(4_000_000);
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR, '\r\nfiller line of text'.repeat(100_000)));
    assert.equal(reply.code, 451, reply.raw);
    assert.equal(captured.length, 0);
    // clamd's reply when it arrives before the reset, else what the reset means.
    assert.match(
      scans(srv)[0]?.reason as string,
      /^(INSTREAM size limit exceeded\. ERROR|clamd closed the connection during the stream \((EPIPE|ECONNRESET); over its StreamMaxLength\?\))$/,
    );
  });
});

describe('clamav: clamd down', { skip: clamdMissing }, () => {
  let down: ClamdPeer;
  before(async () => {
    // A clamd that was there and is gone: its port is closed.
    down = await startClamd();
    await down.stop();
  });

  async function server(fail: 'open' | 'closed') {
    const captured: CapturedMessage[] = [];
    const srv = await startServer({
      plugins: [acceptAllRecipients, memoryQueue(captured)],
      entries: [
        'test-accept-rcpt',
        { name: 'clamav', config: { host: down.host, port: down.port, fail } },
        'test-memory-queue',
      ],
    });
    return { srv, captured };
  }

  it('fail closed (the default): 451 4.3.0, the client keeps the message', async (t) => {
    const { srv, captured } = await server('closed');
    t.after(() => srv.close());
    const reply = await send(srv.port, withAttachment(EICAR));
    assert.equal(reply.code, 451, reply.raw);
    assert.equal(captured.length, 0);
    const [line] = scans(srv);
    assert.equal(line?.result, 'error');
    assert.equal(line?.level, 50);
    assert.match(line?.reason as string, /ECONNREFUSED/);
  });

  it('fail open: accepted, logged at error', async (t) => {
    const { srv, captured } = await server('open');
    t.after(() => srv.close());
    const reply = await send(srv.port, CLEAN);
    assert.equal(reply.code, 250, reply.raw);
    assert.equal(captured.length, 1);
    const [line] = scans(srv);
    assert.equal(line?.result, 'error');
    assert.equal(line?.action, 'accept');
    assert.equal(line?.level, 50);
  });
});

describe('clamav: the pieces', () => {
  it('reads the replies of INSTREAM', () => {
    assert.deepEqual(parseReply('stream: OK\0'), { status: 'clean' });
    assert.deepEqual(parseReply('stream: Win.Test.EICAR_HDB-1 FOUND\0'), {
      status: 'infected',
      signature: 'Win.Test.EICAR_HDB-1',
    });
    assert.deepEqual(parseReply('INSTREAM size limit exceeded. ERROR\0'), {
      status: 'error',
      reason: 'INSTREAM size limit exceeded. ERROR',
    });
    assert.equal(parseReply('PONG').status, 'error');
  });

  it('scans everything by default, refuses viruses and fails closed', () => {
    const c = clamavConfig.parse({});
    assert.deepEqual(c.trustedNetworks, []);
    assert.equal(c.action, 'reject');
    assert.equal(c.fail, 'closed');
    assert.equal(c.port, 3310);
    assert.throws(() => clamavConfig.parse({ trustedNetworks: ['not a net'] }));
  });
});
