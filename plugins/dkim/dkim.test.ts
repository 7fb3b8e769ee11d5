import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { acceptAllRecipients, startServer, type TestServer } from '../../test/harness/server.js';
import { startDnsmasq, type Dnsmasq } from '../../test/harness/dnsmasq.js';
import { dkimpyVerify, requireDkimpy } from '../../test/harness/dkimpy.js';
import { opendkimVerify, requireOpendkim } from '../../test/harness/opendkim.js';
import { freePortOn, smtpPeer, type Peer } from '../outbound/test-support.js';
import queue from '../queue/index.js';
import outbound from '../outbound/index.js';
import mime7bit from '../mime-7bit/index.js';
import dkim from './index.js';
import type { PetrelConfigInput } from '../../core/index.js';
import { hashPassword } from '../users/password.js';
import { writeUsersFile } from '../users/users-file.js';
import { recordText } from './dns-record.js';

/**
 * Mail Petrel signs, delivered through `outbound` to a real SMTP peer, verified by two
 * independent DKIM implementations: dkimpy and OpenDKIM, with the keys served by dnsmasq.
 */

const DOMAIN = 'crepes.test';

interface Keys {
  readonly dir: string;
  readonly records: { name: string; text: string }[];
}

/** An RSA-2048 key `rsa1` and an Ed25519 key `ed1` for crepes.test under `<dir>/crepes.test/`. */
function makeKeys(t: TestContext): Keys {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-dkim-keys-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, DOMAIN));
  const records: { name: string; text: string }[] = [];
  for (const [selector, key] of [
    ['rsa1', generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey],
    ['ed1', generateKeyPairSync('ed25519').privateKey],
  ] as const) {
    writeFileSync(join(dir, DOMAIN, `${selector}.pem`), key.export({ type: 'pkcs8', format: 'pem' }), {
      mode: 0o600,
    });
    records.push({
      name: `${selector}._domainkey.${DOMAIN}`,
      text: recordText(createPrivateKey(key.export({ type: 'pkcs8', format: 'pem' }))),
    });
  }
  return { dir, records };
}

/** Petrel with dkim, mime-7bit (listed after dkim: the phases still put it first), queue and outbound to `peer`. */
async function startSigner(
  t: TestContext,
  dns: Dnsmasq,
  peer: Peer,
  dkimConfig: Record<string, unknown>,
  before: NonNullable<PetrelConfigInput['plugins']> = [],
  queueConfig: Record<string, unknown> = {},
): Promise<TestServer> {
  const srv = await startServer({
    plugins: [acceptAllRecipients, dkim, mime7bit, queue, outbound],
    config: { dns: { servers: [dns.server] }, localDomains: ['local.test'] },
    entries: [
      ...before,
      'test-accept-rcpt',
      { name: 'dkim', config: dkimConfig },
      'mime-7bit',
      { name: 'queue', config: queueConfig },
      {
        name: 'outbound',
        config: { smarthost: { host: '127.0.0.1', port: peer.port, tls: 'opportunistic' } },
      },
    ],
  });
  t.after(() => srv.close());
  return srv;
}

interface Mail {
  readonly from?: string;
  readonly mailFrom?: string;
  readonly params?: string;
  readonly headers?: string;
  readonly body: Buffer | string;
  readonly localAddress?: string;
  /** An `AUTH PLAIN …` line, sent after STARTTLS. */
  readonly auth?: string;
}

/** Sends one message over SMTP (to bob@remote.test) and returns the queue id. */
async function send(port: number, mail: Mail): Promise<string> {
  const c = await SmtpClient.connect(port, '127.0.0.1', { localAddress: mail.localAddress ?? '127.0.0.1' });
  await c.expect(/^220 /);
  await c.ehlo();
  if (mail.auth) {
    await c.cmd('STARTTLS', /^220 /);
    await c.upgrade();
    await c.ehlo();
    await c.cmd(mail.auth, /^235 /);
  }
  await c.cmd(`MAIL FROM:<${mail.mailFrom ?? 'alice@crepes.test'}>${mail.params ?? ''}`, /^250 /);
  await c.cmd('RCPT TO:<bob@remote.test>', /^250 /);
  await c.cmd('DATA', /^354 /);
  const head =
    `From: ${mail.from ?? 'Alice <alice@crepes.test>'}\r\nTo: Bob <bob@remote.test>\r\n` +
    `Date: Wed, 02 Dec 2026 05:00:00 +0000\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@crepes.test>\r\n` +
    (mail.headers ?? 'Subject: hello\r\n') +
    '\r\n';
  const body = typeof mail.body === 'string' ? Buffer.from(mail.body, 'utf8') : mail.body;
  c.write(Buffer.concat([Buffer.from(head, 'utf8'), body, Buffer.from('.\r\n')]));
  const r = await c.expect(/^250 /);
  c.close();
  return /queued as (\S+)/.exec(r.text)?.[1] ?? '';
}

async function until<T>(probe: () => T | undefined, what: string, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The message the peer received whose Message-ID… simply the n-th one. */
const nth = (peer: Peer, n: number): Promise<Buffer> =>
  until(() => peer.messages[n]?.data, `message ${n + 1} at the peer`);

/** The tags of each DKIM-Signature field, topmost first. */
function signatures(message: Buffer): Map<string, string>[] {
  const head = message.subarray(0, message.indexOf('\r\n\r\n') + 2).toString('latin1');
  const fields = head.replace(/\r\n[ \t]/g, ' ').split('\r\n');
  return fields
    .filter((f) => /^DKIM-Signature:/i.test(f))
    .map((f) => {
      const tags = new Map<string, string>();
      for (const part of f.slice(f.indexOf(':') + 1).split(';')) {
        const eq = part.indexOf('=');
        if (eq > 0) tags.set(part.slice(0, eq).trim(), part.slice(eq + 1).replace(/\s+/g, ''));
      }
      return tags;
    });
}

async function peers(t: TestContext): Promise<boolean> {
  return (await requireDkimpy(t)) && requireOpendkim(t);
}

const LATIN1_HEADERS =
  'Subject: dessert\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n';
const LATIN1_BODY = Buffer.from('Crème brûlée, déjà vu,\xa0garçon !\r\nÀ bientôt\xa0\r\n', 'latin1');

const CASES: { name: string; mail: Mail }[] = [
  {
    name: '7-bit',
    mail: { body: 'Hello Bob,  \r\nsee you at\t5.\r\n\r\n\r\n' },
  },
  {
    name: '8-bit Latin-1',
    mail: { params: ' BODY=8BITMIME', headers: LATIN1_HEADERS, body: LATIN1_BODY },
  },
  {
    name: 'UTF-8 with SMTPUTF8',
    mail: {
      params: ' BODY=8BITMIME SMTPUTF8',
      from: 'Älice Müller <alice@crepes.test>',
      headers:
        'Subject: Grüße aus Köln 李雷 🐦\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n',
      body: 'Liebe Grüße — 你好 🐦\r\n',
    },
  },
  {
    name: 'NBSP',
    mail: {
      params: ' BODY=8BITMIME',
      headers:
        'Subject: spaces\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n',
      body: 'a\u00a0 b \u00a0\r\n\u00a0\r\nend\u00a0\r\n',
    },
  },
  { name: 'empty body', mail: { headers: 'Subject: nothing\r\n', body: '' } },
];

describe('dkim: what Petrel signs verifies with dkimpy and OpenDKIM', () => {
  it('signs every kind of body with RSA-2048 and Ed25519 at once, relaxed/relaxed, oversigned', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1', 'ed1'] } });
    for (const [i, c] of CASES.entries()) {
      await send(srv.port, c.mail);
      const got = await nth(peer, i);
      assert.ok(!got.includes('Petrel-DKIM'), `${c.name}: the mark does not leave the server`);
      const sigs = signatures(got);
      assert.deepEqual(
        sigs.map((s) => [s.get('a'), s.get('d'), s.get('s'), s.get('c')]),
        [
          ['rsa-sha256', DOMAIN, 'rsa1', 'relaxed/relaxed'],
          ['ed25519-sha256', DOMAIN, 'ed1', 'relaxed/relaxed'],
        ],
        c.name,
      );
      // Oversigned: From, To, Subject and Date are each named once more than the message has them.
      const h = sigs[0]!.get('h')!.toLowerCase().split(':');
      for (const name of ['from', 'to', 'subject', 'date', 'cc', 'reply-to']) {
        const present = name === 'cc' || name === 'reply-to' ? 0 : 1;
        assert.equal(
          h.filter((x) => x === name).length,
          present + 1,
          `${c.name}: ${name} in h=${h.join(':')}`,
        );
      }
      const byDkimpy = await dkimpyVerify(got, dns.server);
      assert.deepEqual(
        byDkimpy,
        [
          { ok: true, error: null },
          { ok: true, error: null },
        ],
        `${c.name}: dkimpy`,
      );
      const byOpendkim = await opendkimVerify(got, dns.server);
      assert.deepEqual(
        byOpendkim.results.map((r) => [r.result, r.selector, r.algorithm]),
        [
          ['pass', 'rsa1', 'rsa-sha256'],
          ['pass', 'ed1', 'ed25519-sha256'],
        ],
        `${c.name}: opendkim said ${byOpendkim.output}`,
      );
    }
    // The 8-bit messages went out 8-bit: this peer offers 8BITMIME.
    assert.ok(peer.messages[1]!.data.includes(LATIN1_BODY));
  });

  it('signs after the 7-bit downgrade for a peer without 8BITMIME, so the signature verifies', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port, { hide8BITMIME: true, hideSMTPUTF8: true });
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1', 'ed1'] } });
    await send(srv.port, { params: ' BODY=8BITMIME', headers: LATIN1_HEADERS, body: LATIN1_BODY });
    const got = await nth(peer, 0);
    assert.ok(!got.some((b) => b > 0x7e), 'the message went out 7-bit');
    assert.match(got.toString('latin1'), /Content-Transfer-Encoding: quoted-printable/i);
    assert.equal(signatures(got).length, 2);
    assert.deepEqual(await dkimpyVerify(got, dns.server), [
      { ok: true, error: null },
      { ok: true, error: null },
    ]);
    const byOpendkim = await opendkimVerify(got, dns.server);
    assert.deepEqual(
      byOpendkim.results.map((r) => r.result),
      ['pass', 'pass'],
      byOpendkim.output,
    );
  });

  it('an oversigned field added after signing breaks the signature', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1'] } });
    await send(srv.port, { body: 'Pay the invoice.\r\n' });
    const got = await nth(peer, 0);
    assert.deepEqual(await dkimpyVerify(got, dns.server), [{ ok: true, error: null }]);
    assert.ok((await opendkimVerify(got, dns.server)).ok);
    // The verifiers are not easy to please: a changed body fails both.
    const tampered = Buffer.from(
      got.toString('latin1').replace('Pay the invoice.', 'Pay the invoice!'),
      'latin1',
    );
    assert.equal((await dkimpyVerify(tampered, dns.server))[0]!.ok, false);
    const byOpendkim = await opendkimVerify(tampered, dns.server);
    assert.equal(byOpendkim.ok, false, byOpendkim.output);
    assert.match(byOpendkim.lines.join('\n'), /failed/);
    for (const added of [
      'From: Mallory <mallory@crepes.test>\r\n',
      'Subject: URGENT\r\n',
      'Cc: eve@evil.test\r\n',
    ]) {
      const end = got.indexOf('\r\n\r\n') + 2;
      const forged = Buffer.concat([got.subarray(0, end), Buffer.from(added), got.subarray(end)]);
      const [verdict] = await dkimpyVerify(forged, dns.server);
      assert.equal(verdict!.ok, false, `a message with ${added.trim()} added must not verify`);
    }
  });
});

describe('dkim: which mail is signed', () => {
  it('signs mail from a trusted network, not mail from other servers', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, {
      keyDir: keys.dir,
      domains: { [DOMAIN]: ['rsa1'] },
      trustedNetworks: ['127.0.0.1'],
    });
    // From another server (127.0.0.9 is not trusted): a From: of ours must not get our signature,
    // not even with the plugin's own mark written into the message by the client.
    await send(srv.port, { localAddress: '127.0.0.9', body: 'forged\r\n' });
    assert.equal(signatures(await nth(peer, 0)).length, 0, 'mail from outside is not signed');
    await send(srv.port, {
      localAddress: '127.0.0.9',
      headers: 'Petrel-DKIM: sign\r\nSubject: sign me\r\n',
      body: 'forged, with the mark\r\n',
    });
    const forged = await nth(peer, 1);
    assert.equal(signatures(forged).length, 0, "a client's mark is not ours");
    assert.match(
      forged.toString('latin1'),
      /^Received: [^]*\r\nPetrel-DKIM: sign\r\n/,
      'and is left as it was',
    );
    await send(srv.port, { body: 'ours\r\n' });
    const ours = await nth(peer, 2);
    assert.equal(signatures(ours).length, 1, 'mail from a trusted network is signed');
    assert.deepEqual(await dkimpyVerify(ours, dns.server), [{ ok: true, error: null }]);
  });

  it('signs mail from an authenticated user on the MX listener, not the same mail without AUTH', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const usersFile = join(keys.dir, 'users.json');
    await writeUsersFile(usersFile, {
      users: {
        'alice@crepes.test': { password: await hashPassword('pancake batter', { iterations: 4096 }) },
      },
    });
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(
      t,
      dns,
      peer,
      { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1'] }, trustedNetworks: [] },
      [{ name: 'users', config: { usersFile, auth: { delayMs: 0 } } }],
    );
    await send(srv.port, { body: 'no AUTH\r\n' });
    assert.equal(signatures(await nth(peer, 0)).length, 0, 'no AUTH, not trusted: not signed');
    const auth = `AUTH PLAIN ${Buffer.from('\0alice@crepes.test\0pancake batter').toString('base64')}`;
    await send(srv.port, { auth, body: 'with AUTH\r\n' });
    const signed = await nth(peer, 1);
    assert.equal(signatures(signed).length, 1, 'an authenticated user: signed');
    assert.deepEqual(await dkimpyVerify(signed, dns.server), [{ ok: true, error: null }]);
  });

  it('signs a subdomain with its parent domain; a domain without a key goes unsigned, and the log says so', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['ed1'] } });
    await send(srv.port, { from: 'news@letters.crepes.test', body: 'news\r\n' });
    const sub = await nth(peer, 0);
    assert.deepEqual(
      signatures(sub).map((s) => s.get('d')),
      [DOMAIN],
    );
    assert.deepEqual(await dkimpyVerify(sub, dns.server), [{ ok: true, error: null }]);

    const id = await send(srv.port, {
      from: 'carol@galettes.test',
      mailFrom: 'carol@galettes.test',
      body: 'hi\r\n',
    });
    assert.equal(signatures(await nth(peer, 1)).length, 0);
    const line = srv.logs.find((l) => l.queueId === id && /not signed/.test(String(l.msg)));
    assert.ok(line, 'a log line for the unsigned message');
    assert.match(String(line.msg), /no DKIM key for galettes\.test.*sent unsigned/);
    assert.equal(line.onError, 'send-unsigned');
  });
});

describe('dkim: each delivery attempt is signed', () => {
  it('signs a retried delivery too: the decision travels with the queued message', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    let refused = 0;
    const peer = await smtpPeer(t, '127.0.0.1', port, {
      // The first attempt is refused after the message was sent: the queue tries again.
      data: () => (refused++ === 0 ? { code: 451, message: 'try again' } : null),
    });
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1'] } }, [], {
      retry: '1s...',
    });
    await send(srv.port, { body: 'second time lucky\r\n' });
    const got = await nth(peer, 0);
    assert.equal(refused, 2, 'delivered at the second attempt');
    assert.deepEqual(await dkimpyVerify(got, dns.server), [{ ok: true, error: null }]);
  });
});

describe('dkim: a key that cannot be read', () => {
  it('send-unsigned: the message goes out unsigned, and the log says which', async (t) => {
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, {
      keyDir: keys.dir,
      domains: { [DOMAIN]: [{ selector: 'gone', keyFile: join(keys.dir, 'missing.pem') }] },
    });
    const boot = srv.logs.find((l) => /DKIM key unusable/.test(String(l.msg)));
    assert.ok(boot, 'the unreadable key is reported at start');
    assert.equal(boot.level, 50, 'at error level');
    assert.match(String(boot.msg), /will be sent unsigned/);
    assert.match(String(boot.reason), /ENOENT/);
    const id = await send(srv.port, { body: 'still delivered\r\n' });
    const got = await nth(peer, 0);
    assert.equal(signatures(got).length, 0);
    const line = srv.logs.find((l) => l.queueId === id && /not signed/.test(String(l.msg)));
    assert.ok(line);
    assert.match(String(line.msg), /no usable DKIM key for crepes\.test.*sent unsigned/);
  });

  it('defer: the delivery is deferred and nothing is sent, and the log says which', async (t) => {
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, {
      keyDir: keys.dir,
      domains: { [DOMAIN]: [{ selector: 'gone', keyFile: join(keys.dir, 'missing.pem') }] },
      onError: 'defer',
    });
    assert.ok(
      srv.logs.some((l) => /DKIM key unusable; mail from crepes\.test will be deferred/.test(String(l.msg))),
    );
    const id = await send(srv.port, { body: 'held back\r\n' });
    const line = await until(
      () => srv.logs.find((l) => l.queueId === id && /not signed/.test(String(l.msg))),
      'the log line',
    );
    assert.match(String(line.msg), /delivery deferred/);
    await until(
      () => srv.logs.find((l) => l.hook === 'transform' && /hook failed/.test(String(l.msg))),
      'the failed transform',
    );
    assert.equal(peer.messages.length, 0, 'nothing was sent unsigned');
  });
});

describe('dkim: bounded memory, and keys read again on reload', () => {
  it('signs a message larger than memoryLimit through an unlinked temporary file', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const tempDir = mkdtempSync(join(tmpdir(), 'petrel-dkim-spill-'));
    t.after(() => rmSync(tempDir, { recursive: true, force: true }));
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const srv = await startSigner(t, dns, peer, {
      keyDir: keys.dir,
      domains: { [DOMAIN]: ['rsa1', 'ed1'] },
      memoryLimit: 64 * 1024,
      tempDir,
    });
    const line = 'The quick brown fox jumps over the lazy dog, again and again and again.\r\n';
    await send(srv.port, { body: line.repeat(6000) }); // ~440 KB
    const got = await nth(peer, 0);
    assert.ok(got.length > 400_000);
    assert.deepEqual(await dkimpyVerify(got, dns.server), [
      { ok: true, error: null },
      { ok: true, error: null },
    ]);
    assert.deepEqual(readdirSync(tempDir), [], 'nothing is left in the temporary folder');
  });

  it('reads the keys again on reload: a key added later signs the next message', async (t) => {
    if (!(await peers(t))) return;
    const keys = makeKeys(t);
    const dns = await startDnsmasq(t, { txt: keys.records });
    if (!dns) return;
    const port = await freePortOn(['127.0.0.1']);
    const peer = await smtpPeer(t, '127.0.0.1', port);
    const pem = join(keys.dir, DOMAIN, 'rsa1.pem');
    const hidden = join(keys.dir, 'rsa1.pem.away');
    renameSync(pem, hidden);
    const srv = await startSigner(t, dns, peer, { keyDir: keys.dir, domains: { [DOMAIN]: ['rsa1'] } });
    await send(srv.port, { body: 'before\r\n' });
    assert.equal(signatures(await nth(peer, 0)).length, 0);
    renameSync(hidden, pem);
    await srv.app.reload(srv.config);
    assert.ok(srv.logs.some((l) => l.msg === 'DKIM key loaded' && l.selector === 'rsa1'));
    await send(srv.port, { body: 'after\r\n' });
    const after = await nth(peer, 1);
    assert.deepEqual(await dkimpyVerify(after, dns.server), [{ ok: true, error: null }]);
  });
});
