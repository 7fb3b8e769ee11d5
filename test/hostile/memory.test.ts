/**
 * Clients that try to make the server hold memory: by pipelining commands and never reading the
 * replies, and by sending a large message. The server runs as its own process; its resident
 * memory is read from /proc and held to the per-session budget of docs/security.md.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { Socket } from 'node:net';
import { REPLY_BOUND } from '../../core/smtp/session.js';
import { SmtpClient } from '../harness/smtp-client.js';
import {
  BOB,
  deadlineLines,
  greeted,
  IDLE_SESSION_BUDGET,
  KiB,
  MARGIN,
  MiB,
  probe,
  RssWatch,
  startHostileServer,
  type HostileServer,
} from './server.js';

interface NeverReader {
  readonly socket: Socket;
  readonly closed: Promise<void>;
  /** Octets of commands the kernel has taken so far. */
  sent(): number;
}

/** Pipelines `commands` over and over, as fast as the connection takes them, and reads nothing. */
async function neverReads(port: number, commands: string): Promise<NeverReader> {
  const socket = await greeted(port);
  socket.pause(); // from now on, not one more octet is read
  const batch = Buffer.from(commands.repeat(Math.ceil((64 * KiB) / commands.length)));
  let sent = 0;
  let open = true;
  const closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      open = false;
      resolve();
    }),
  );
  void (async () => {
    while (open) {
      const more = socket.write(batch);
      sent += batch.length;
      if (!more) await Promise.race([once(socket, 'drain').catch(() => undefined), closed]);
    }
  })();
  return { socket, closed, sent: () => sent };
}

describe('a client that does not read its replies', () => {
  let srv: HostileServer;
  before(async () => {
    srv = await startHostileServer();
  });
  after(() => srv.stop());

  it('cannot grow the server past its memory budget, is cut off at the idle deadline, and the memory is given back', async (t) => {
    await probe(srv.port, 'warm-up');
    const baseline = srv.rssKiB() * KiB;
    const from = srv.petrel.logs.length;
    const watch = new RssWatch(() => srv.rssKiB() * KiB);
    const attackers = await Promise.all(
      ['NOOP\r\n', 'HELP\r\n', 'RSET\r\nVRFY x\r\nNOOP\r\n'].map((c) => neverReads(srv.port, c)),
    );
    try {
      // While they push, another client is served.
      await probe(srv.port, 'during the never-reading attack');
      // Each is cut off, and the log says why: its replies were not read.
      await srv.petrel.waitForLog(() => deadlineLines(srv.petrel, 'replies', from).length >= 3, 60_000);
      await Promise.all(attackers.map((a) => a.closed));
    } finally {
      for (const a of attackers) a.socket.destroy();
    }
    const peak = watch.stop();
    const sent = attackers.reduce((n, a) => n + a.sent(), 0);
    assert.ok(sent > 4 * MiB, `the attackers pushed a real load (${sent} octets)`);
    for (const line of deadlineLines(srv.petrel, 'replies', from)) {
      assert.ok(Number(line.unsent) > REPLY_BOUND, 'cut off with more than the bound unsent');
    }
    const budget = attackers.length * IDLE_SESSION_BUDGET + MARGIN;
    t.diagnostic(
      `sent ${(sent / MiB).toFixed(1)} MiB; RSS +${((peak - baseline) / MiB).toFixed(1)} MiB at most`,
    );
    assert.ok(
      peak - baseline < budget,
      `RSS grew by ${((peak - baseline) / MiB).toFixed(1)} MiB under ${attackers.length} never-reading clients (budget ${(budget / MiB).toFixed(1)} MiB)`,
    );

    // Gone, and what they took is given back.
    await srv.petrel.waitForLog(
      () =>
        srv.petrel.logs
          .slice(from)
          .filter((l) => l.msg === 'connection closed' && /^421 4\.4\.2 /.test(String(l.last))).length >= 3,
    );
    await probe(srv.port, 'after the never-reading attack');
    const afterwards = srv.rssKiB() * KiB;
    t.diagnostic(`RSS +${((afterwards - baseline) / MiB).toFixed(1)} MiB after they left`);
    assert.ok(
      afterwards - baseline < MARGIN,
      `RSS is ${((afterwards - baseline) / MiB).toFixed(1)} MiB above where it started after the attackers left`,
    );
  });

  it('holds a large message on disk past spool.memoryThreshold, and gives its memory back', async (t) => {
    const baseline = srv.rssKiB() * KiB;
    const watch = new RssWatch(() => srv.rssKiB() * KiB);
    const c = await SmtpClient.connect(srv.port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<big@remote.test>', /^250 /);
    await c.cmd(`RCPT TO:<${BOB}>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    const line = Buffer.from(`${'x'.repeat(998)}\r\n`);
    const block = Buffer.concat(Array.from({ length: 1024 }, () => line)); // 1000 KiB
    c.write('Subject: a large message\r\n\r\n');
    for (let i = 0; i < 20; i++) c.write(block);
    c.write('.\r\n');
    await c.expect(/^250 2\.0\.0 Ok: queued as /, 60_000);
    await c.cmd('QUIT', /^221 /);
    c.close();
    const peak = watch.stop();
    // In a transaction a session may also hold the header block, the in-memory body and the spool
    // file's write buffer (docs/security.md); the queue reads the file back in streams.
    const budget = IDLE_SESSION_BUDGET + 1 * MiB + 256 * KiB + 256 * KiB + MARGIN;
    t.diagnostic(`RSS +${((peak - baseline) / MiB).toFixed(1)} MiB at most for a 20 MB message`);
    assert.ok(
      peak - baseline < budget,
      `RSS grew by ${((peak - baseline) / MiB).toFixed(1)} MiB for one 20 MB message (budget ${(budget / MiB).toFixed(1)} MiB)`,
    );
    await probe(srv.port, 'after the large message');
    assert.ok(srv.rssKiB() * KiB - baseline < MARGIN, 'the memory of the large message is given back');
  });
});
