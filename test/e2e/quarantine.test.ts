/**
 * Quarantine from end to end: `petrel start` with clamav (`action: quarantine`) against a real
 * clamd, relaying through the queue and outbound to an smtp-server peer. An infected message is
 * accepted and held with the scanner's reason; `petrel queue list --held` shows it and only it;
 * `release` delivers it to the peer; `delete` removes another without a bounce.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { freePort, petrel, PetrelProcess } from './cli.js';
import { describeRun, killRunning, type RunResult } from './run.js';
import { clamdMissing, EICAR, EICAR_SIGNATURE, startClamd, type ClamdPeer } from '../harness/clamd.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { smtpPeer } from '../../plugins/outbound/test-support.js';

interface Listed {
  id: string;
  held: boolean;
  heldReason?: string;
  recipients: { address: string; status: string; attempts: number }[];
}

/** `petrel queue list --json`: a message per line. */
function ndjson<T>(stdout: string): T[] {
  return stdout
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as T);
}

const INFECTED = (subject: string): string =>
  [
    'From: alice@example.test',
    'To: bob@dest.test',
    `Subject: ${subject}`,
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="b1"',
    '',
    '--b1',
    'Content-Type: text/plain',
    '',
    'The file you asked for.',
    '--b1',
    'Content-Type: application/octet-stream; name="eicar.com"',
    'Content-Transfer-Encoding: base64',
    '',
    Buffer.from(EICAR, 'latin1').toString('base64'),
    '--b1--',
    '',
  ].join('\r\n');

async function until<T>(check: () => T | undefined | false, what: string, ms = 20_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe(
  'quarantine: held by a scanner, released or deleted by an administrator',
  {
    skip: clamdMissing,
    timeout: 180_000,
  },
  () => {
    let clamd: ClamdPeer;
    let dir: string;
    let server: PetrelProcess | null = null;
    before(async () => {
      clamd = await startClamd();
      dir = mkdtempSync(join(tmpdir(), 'petrel-quarantine-'));
    });
    after(async () => {
      server?.kill();
      killRunning();
      await clamd?.stop();
      rmSync(dir, { recursive: true, force: true });
    });

    it('list --held shows the infected message with clamav as the reason; release delivers it, delete removes another', async (t) => {
      // The peer takes everything but `later@`, which it keeps deferring (a message that waits
      // without being held).
      const peer = await smtpPeer(t, '127.0.0.1', await freePort(), {
        rcpt: (a) => (a.startsWith('later@') ? { code: 451, message: 'Try again later' } : null),
      });
      const port = await freePort();
      const config = join(dir, 'petrel.config.yaml');
      writeFileSync(
        config,
        stringify({
          hostname: 'mx.quarantine.test',
          listeners: [{ kind: 'smtp', address: '127.0.0.1', port }],
          spool: { dir: './spool' },
          log: { level: 'info', format: 'json' },
          plugins: [
            { name: 'clamav', config: { host: clamd.host, port: clamd.port, action: 'quarantine' } },
            'relay', // 127.0.0.1 may relay
            { name: 'queue', config: { retry: '1h...' } },
            'bounce',
            {
              name: 'outbound',
              config: { smarthost: { host: peer.host, port: peer.port, tls: 'opportunistic' } },
            },
          ],
        }),
      );
      const srv = await PetrelProcess.start(config, dir, 30_000);
      server = srv;
      const queue = (...args: string[]): Promise<RunResult> =>
        petrel(['queue', ...args, '--config', config], dir, 20_000);

      const send = async (to: string, content: string): Promise<string> => {
        const c = await SmtpClient.connect(port);
        try {
          await c.expect(/^220 /);
          await c.ehlo('client.test');
          await c.cmd('MAIL FROM:<alice@example.test>', /^250 /);
          await c.cmd(`RCPT TO:<${to}>`, /^250 /);
          await c.cmd('DATA', /^354 /);
          c.write(`${content}.\r\n`);
          const reply = await c.expect(/^250 /, 30_000);
          await c.cmd('QUIT', /^221 /);
          return /queued as (\S+)/.exec(reply.text)![1]!;
        } finally {
          c.close();
        }
      };

      const released = await send('bob@dest.test', INFECTED('first'));
      const deleted = await send('carol@dest.test', INFECTED('second'));
      const waiting = await send('later@dest.test', 'Subject: not held\r\n\r\nJust waiting.\r\n');
      await until(
        () => srv.logs.some((l) => l.msg === 'delivery attempt' && l.queueId === waiting),
        'the clean message tried (and deferred by the peer)',
      );
      for (const id of [released, deleted]) {
        const line = srv.logs.find((l) => l.msg === 'message held at acceptance' && l.queueId === id);
        assert.equal(line?.reason, `clamav: virus ${EICAR_SIGNATURE}`);
      }

      // `list --held`: the two quarantined messages, with who held them and why; not the other.
      let r = await queue('list', '--held');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /^2 held messages shown, 2 recipients waiting \(/m);
      for (const id of [released, deleted]) {
        assert.match(r.stdout, new RegExp(`^${id} `, 'm'));
        assert.match(r.stdout, new RegExp(`held: {2}no delivery attempts until petrel queue release ${id}`));
      }
      assert.equal(
        r.stdout.match(/^ {2}why: {3}quarantined at acceptance by clamav: virus (\S+)$/gm)?.length,
        2,
        r.stdout,
      );
      assert.ok(r.stdout.includes(EICAR_SIGNATURE), r.stdout);
      assert.doesNotMatch(r.stdout, new RegExp(waiting));
      r = await queue('list', '--held', '--json');
      const held = ndjson<Listed>(r.stdout);
      assert.deepEqual(
        held.map((m) => [m.id, m.held, m.heldReason, m.recipients[0]!.attempts]),
        [
          [released, true, `clamav: virus ${EICAR_SIGNATURE}`, 0],
          [deleted, true, `clamav: virus ${EICAR_SIGNATURE}`, 0],
        ],
      );
      // The whole list has the waiting message too.
      r = await queue('list');
      assert.match(r.stdout, /^3 messages shown, /m);
      r = await queue('show', released);
      assert.match(r.stdout, /why: {3}quarantined at acceptance by clamav: virus /);
      assert.equal(peer.messages.length, 0, 'nothing held was delivered');

      // release: delivered now, to the peer.
      r = await queue('release', released);
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, new RegExp(`^Released ${released}: it is due now;`, 'm'));
      await until(
        () =>
          srv.logs.find(
            (l) => l.msg === 'delivery attempt' && l.queueId === released && l.status === 'delivered',
          ),
        'the released message delivered',
      );
      assert.equal(peer.messages.length, 1);
      assert.deepEqual(
        peer.messages[0]!.rcpts.map((x) => x.address),
        ['bob@dest.test'],
      );
      assert.match(peer.messages[0]!.data.toString('latin1'), /Subject: first/);

      // delete: gone, never delivered, and nobody told (no bounce to the sender).
      r = await queue('delete', deleted);
      assert.equal(r.code, 0, describeRun(r));
      assert.match(
        r.stdout,
        new RegExp(`^Deleted ${deleted}: 1 recipient dropped; the sender is not told\\.$`, 'm'),
      );
      r = await queue('list', '--held');
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /^No message is held \(/);
      r = await queue('show', deleted);
      assert.equal(r.code, 1, describeRun(r));
      r = await queue('list', '--json');
      assert.deepEqual(
        ndjson<Listed>(r.stdout).map((m) => m.id),
        [waiting],
      );
      assert.equal(peer.messages.length, 1, 'the deleted message was not delivered, and no bounce went out');
    });
  },
);
