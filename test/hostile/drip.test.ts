/**
 * Clients that send slowly on purpose ("slowloris"): one octet a second in DATA, in a BDAT
 * chunk, and in many tiny BDAT chunks whose command lines each arrive in time. Every one is cut
 * off by the message's content deadline (`timeouts.data` plus its size at `timeouts.minDataRate`),
 * which a byte now and then does not reset. The tests assert the reply and the logged cause.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { SmtpClient } from '../harness/smtp-client.js';
import { BOB, deadlineLine, deadlineLines, probe, startHostileServer, type HostileServer } from './server.js';

/** Far more than any deadline here: only a server that never cuts the client off reaches it. */
const PATIENCE = 60_000;

async function transaction(port: number): Promise<SmtpClient> {
  const c = await SmtpClient.connect(port);
  await c.expect(/^220 /);
  await c.ehlo('drip.test');
  await c.cmd('MAIL FROM:<drip@remote.test>', /^250 /);
  await c.cmd(`RCPT TO:<${BOB}>`, /^250 /);
  return c;
}

/** Calls `send` every `ms` until the connection closes; returns how many times it did. */
async function dripUntilClosed(c: SmtpClient, ms: number, send: () => void): Promise<number> {
  let sent = 0;
  const timer = setInterval(() => {
    if (c.isClosed) return;
    send();
    sent++;
  }, ms);
  try {
    await c.closed(PATIENCE);
  } finally {
    clearInterval(timer);
  }
  return sent;
}

describe('a client that drips', () => {
  let srv: HostileServer;
  before(async () => {
    srv = await startHostileServer();
  });
  after(() => srv.stop());

  it('one octet a second in DATA is cut off at the content deadline with 421 4.4.2', async () => {
    const from = srv.petrel.logs.length;
    const c = await transaction(srv.port);
    await c.cmd('DATA', /^354 /);
    const probed = probe(srv.port, 'during a DATA drip');
    const drips = await dripUntilClosed(c, 1000, () => c.write('x'));
    assert.match(c.unread, /^421 4\.4\.2 mx\.hostile\.test Timeout exceeded/);
    assert.ok(drips >= 1, 'it was sending when it was cut off');
    const line = await deadlineLine(srv.petrel, 'content', from);
    assert.ok(Number(line.octets) >= 1);
    await probed;
    assert.equal(srv.bobsMail().filter((f) => f.includes('drip')).length, 0);
  });

  it('one octet a second inside a BDAT chunk is cut off the same way', async () => {
    const from = srv.petrel.logs.length;
    const c = await transaction(srv.port);
    c.write('BDAT 1000 LAST\r\n');
    const probed = probe(srv.port, 'during a BDAT drip');
    await dripUntilClosed(c, 1000, () => c.write('x'));
    assert.match(c.unread, /^421 4\.4\.2 /);
    await deadlineLine(srv.petrel, 'content', from);
    await probed;
  });

  it('tiny BDAT chunks, each command on time, are cut off by the deadline of the whole message', async () => {
    const from = srv.petrel.logs.length;
    const c = await transaction(srv.port);
    const probed = probe(srv.port, 'during a BDAT chunk drip');
    // Each BDAT line and its octet arrive well within timeouts.command; the message never ends.
    await dripUntilClosed(c, 500, () => c.write('BDAT 1\r\nx'));
    const replies = c.unread.split('\r\n').filter(Boolean);
    assert.ok(replies.length >= 2, `some chunks were taken first: ${JSON.stringify(c.unread)}`);
    assert.match(replies.at(-1)!, /^421 4\.4\.2 /);
    assert.ok(
      replies.slice(0, -1).every((r) => /^250 2\.0\.0 1 octets received$/.test(r)),
      JSON.stringify(replies),
    );
    const line = await deadlineLine(srv.petrel, 'content', from);
    assert.ok(line, 'the log names the content deadline, not the command deadline');
    assert.equal(deadlineLines(srv.petrel, 'command', from).length, 0);
    await probed;
  });

  it('a client sending at least timeouts.minDataRate may take longer than timeouts.data', async () => {
    // 2 s base at 500 octets/s: 3000 octets in 1000-octet pieces, one every 1.5 s, arrive after
    // the base alone would have cut them off, and each piece buys 2 s more.
    const c = await transaction(srv.port);
    await c.cmd('DATA', /^354 /);
    const piece = `${'y'.repeat(998)}\r\n`;
    c.write('Subject: steady\r\n\r\n');
    for (let i = 0; i < 3; i++) {
      c.write(piece);
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(c.isClosed, false, 'a client at the minimum rate is not cut off');
    }
    c.write('.\r\n');
    await c.expect(/^250 2\.0\.0 Ok: queued as /);
    c.close();
  });
});
