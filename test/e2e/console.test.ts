/**
 * The web console in a real browser (Debian's chromium through playwright-core), against
 * `petrel start` with a queue relaying to a peer that first answers 451: the operator logs in,
 * finds the deferred message, reads why it waits (the peer's 451 from the history), flushes it
 * once the peer accepts, and sees its story end in `delivered`. Over plain HTTP: a wrong token,
 * a form without its CSRF token, and an oversized form are refused.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type Browser, type Locator } from 'playwright-core';
import { stringify } from 'yaml';
import { freePort, PetrelProcess } from './cli.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { smtpPeer } from '../../plugins/outbound/test-support.js';

const TOKEN = 'console-test-token-0123456789abcdef';
/** A sender and a Message-ID that would run as script if a page did not escape them. */
const HOSTILE_SENDER = '"<script>window.pwned=1</script>"@evil.test';
const HOSTILE_MESSAGE_ID = '<img src=x onerror="window.pwned=2">@evil.test';

/** Text as a reader sees it: runs of white space as one space. */
const squeeze = (s: string): string => s.replace(/\s+/g, ' ').trim();
const text = async (l: Locator): Promise<string> => squeeze((await l.textContent()) ?? '');

describe('web console', { timeout: 120_000 }, () => {
  let dir: string;
  let browser: Browser;
  let server: PetrelProcess | null = null;
  let base = '';
  let smtpPort = 0;
  let peerAccepts = false;
  let peerGot = 0;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-console-'));
    browser = await chromium.launch({
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
    });
  });
  after(async () => {
    server?.kill();
    await browser?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function start(t: import('node:test').TestContext): Promise<PetrelProcess> {
    if (server) return server;
    // The peer refuses every recipient with 451 until the test lets it accept.
    const peer = await smtpPeer(t, '127.0.0.1', await freePort(), {
      rcpt: () => (peerAccepts ? null : { code: 451, message: 'Greylisted, come back later' }),
      data: () => {
        peerGot++;
        return null;
      },
    });
    const config = join(dir, 'petrel.config.yaml');
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.console.test',
        workers: 2,
        listeners: [
          { kind: 'smtp', name: 'mx', address: '127.0.0.1', port: 0 },
          { kind: 'http', address: '127.0.0.1', port: 0, console: { token: TOKEN } },
        ],
        spool: { dir: './spool' },
        log: { level: 'info', format: 'json' },
        plugins: [
          'relay',
          { name: 'queue', config: { retry: '1h...' } },
          'bounce',
          {
            name: 'outbound',
            config: { smarthost: { host: peer.host, port: peer.port, tls: 'opportunistic' } },
          },
        ],
      }),
    );
    server = await PetrelProcess.start(config, dir, 30_000);
    // Both listeners on port 0: the ports bound are in the start line.
    const started = server.logs.find((l) => l.msg === 'petrel started')!;
    const bound = started.listeners as { kind: string; port: number }[];
    smtpPort = bound.find((l) => l.kind === 'smtp')!.port;
    base = `http://127.0.0.1:${bound.find((l) => l.kind === 'http')!.port}`;
    return server;
  }

  async function send(from: string, to: string, messageId: string): Promise<string> {
    const c = await SmtpClient.connect(smtpPort);
    try {
      await c.expect(/^220 /);
      await c.ehlo('client.test');
      await c.cmd(`MAIL FROM:<${from}>`, /^250 /);
      await c.cmd(`RCPT TO:<${to}>`, /^250 /);
      await c.cmd('DATA', /^354 /);
      c.write(`Message-ID: ${messageId}\r\nSubject: <script>alert(1)</script>\r\n\r\nHello.\r\n.\r\n`);
      const reply = await c.expect(/^250 /, 30_000);
      await c.cmd('QUIT', /^221 /);
      return /queued as (\S+)/.exec(reply.text)![1]!;
    } finally {
      c.close();
    }
  }

  async function until<T>(check: () => T | undefined | false, what: string, ms = 20_000): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = check();
      if (v) return v;
      if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms\n${server?.dump() ?? ''}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Logs in over plain HTTP and returns the session cookie and a page's CSRF token. */
  async function login(): Promise<{ cookie: string; csrf: string }> {
    const res = await fetch(`${base}/console/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token: TOKEN }),
      redirect: 'manual',
    });
    assert.equal(res.status, 303);
    const set = res.headers.get('set-cookie') ?? '';
    assert.match(set, /HttpOnly/);
    assert.match(set, /SameSite=Strict/);
    const cookie = set.split(';')[0]!;
    const page = await (await fetch(`${base}/console/`, { headers: { cookie } })).text();
    const csrf = /name="csrf" value="([^"]+)"/.exec(page)?.[1];
    assert.ok(csrf, 'the overview carries a CSRF token in its forms');
    return { cookie, csrf };
  }

  it('in a browser: finds the deferred message, reads the 451, flushes it and sees it delivered', async (t) => {
    const srv = await start(t);
    const id = await send('alice@evil.test', 'bob@dest.test', HOSTILE_MESSAGE_ID);
    // The peer refuses this sender's syntax (501): it bounces at once, and its story is kept.
    const hostile = await send(HOSTILE_SENDER, 'carol@dest.test', '<plain@evil.test>');
    await until(
      () => srv.logs.some((l) => l.msg === 'delivery attempt' && l.queueId === id),
      'the message tried and deferred by the peer',
    );

    const context = await browser.newContext();
    const page = await context.newPage();
    const dialogs: string[] = [];
    page.on('dialog', (d) => {
      dialogs.push(d.message());
      void d.dismiss();
    });

    await page.goto(`${base}/console/`);
    assert.equal(new URL(page.url()).pathname, '/console/login');
    await page.getByLabel('Console token').fill(TOKEN);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.waitForURL(`${base}/console/`);
    assert.equal(await page.getByRole('heading', { name: 'Overview' }).count(), 1);

    // The queue, filtered to deferred messages from the hostile sender's domain.
    await page.getByRole('link', { name: 'Queue' }).click();
    await page.getByLabel('State').selectOption('deferred');
    await page.getByLabel('Sender').fill('evil.test');
    await page.getByRole('button', { name: 'Filter' }).click();
    await page.waitForURL(/state=deferred/);
    assert.match(await text(page.locator('main')), /1 of \d+ queued messages match/);
    await page.getByRole('link', { name: id }).click();
    await page.waitForURL(/\/console\/message\?id=/);

    // Why it waits: the peer's 451, from the recipient's history.
    const why = await text(page.locator('.why').first());
    assert.match(why, /deferred: 451 .*Greylisted, come back later/);
    const attempt = await text(page.locator('table.attempts tbody tr').first());
    assert.match(attempt, /451/);
    // The hostile sender and Message-ID are shown as text and ran nothing.
    assert.ok(
      (await text(page.locator('main'))).includes(HOSTILE_MESSAGE_ID),
      'the Message-ID is shown as text',
    );
    assert.equal(await page.locator('main script, main img').count(), 0);
    assert.equal(await page.evaluate(() => (globalThis as { pwned?: number }).pwned), undefined);

    // Flush, through its confirmation page, once the peer accepts.
    peerAccepts = true;
    await page.getByRole('link', { name: 'Flush…' }).click();
    await page.waitForURL(/\/console\/confirm\?/);
    assert.match(await text(page.locator('main')), /tries its deferred recipients now/);
    await page.getByRole('button', { name: 'Flush' }).click();
    await page.waitForURL(/done=flush/);
    assert.match(await text(page.locator('.notice').first()), /Flushed/);

    // Its story ends delivered: the page shows the finished story from the history.
    const deadline = Date.now() + 20_000;
    for (;;) {
      if ((await page.locator('.outcome').count()) > 0) break;
      if (Date.now() > deadline) throw new Error(`not delivered in time\n${srv.dump()}`);
      await new Promise((r) => setTimeout(r, 250));
      await page.reload();
    }
    assert.equal(await page.locator('.outcome').textContent(), 'delivered');
    assert.equal(peerGot, 1);
    const attempts = (await page.locator('table.attempts tbody tr').allTextContents()).map(squeeze);
    assert.ok(
      attempts.some((a) => /delivered/.test(a) && /250/.test(a)),
      attempts.join('\n'),
    );
    assert.ok(
      attempts.some((a) => /451/.test(a)),
      'the refused attempt is kept in the story',
    );

    // The bounced message from the hostile sender: its story, the sender shown as text.
    await until(
      () => srv.logs.some((l) => l.msg === 'delivery report queued' && l.queueId === hostile),
      'the hostile message bounced',
    );
    for (let i = 0; ; i++) {
      await page.goto(`${base}/console/message?id=${hostile}`);
      if ((await page.locator('.outcome').count()) > 0 || i === 40) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    assert.equal(await text(page.locator('.outcome')), 'bounced');
    assert.ok((await text(page.locator('main'))).includes('<script>window.pwned=1</script>'));
    assert.equal(await page.locator('main script, main img').count(), 0);
    assert.equal(await page.evaluate(() => (globalThis as { pwned?: number }).pwned), undefined);

    // The open sessions: a client connected now, asked of the worker that serves it.
    const c = await SmtpClient.connect(smtpPort);
    try {
      await c.expect(/^220 /);
      await c.ehlo('watcher.test');
      await page.getByRole('link', { name: 'Sessions' }).click();
      const row = page.locator('tr', { hasText: 'watcher.test' });
      assert.equal(await row.count(), 1);
      const cells = (await row.locator('td').allTextContents()).map(squeeze);
      assert.equal(cells[2], 'mx');
      assert.equal(cells[3], 'greeted');
      assert.match(cells[1]!, /^127\.0\.0\.1:\d+$/);
    } finally {
      c.close();
    }

    // The overview: the whole server's counters, and the rate graph once two intervals are sampled.
    await page.getByRole('link', { name: 'Overview' }).click();
    const accepted = await text(page.locator('.figure', { hasText: 'Accepted' }));
    assert.ok(Number(/\d+/.exec(accepted)?.[0]) >= 2, accepted);
    for (let i = 0; (await page.locator('svg polyline').count()) < 2; i++) {
      if (i === 60) throw new Error('no rate graph after 15 s of sampling');
      await new Promise((r) => setTimeout(r, 250));
      await page.reload();
    }
    assert.match(await text(page.locator('svg')), /accepted [\d.]+\/s delivered [\d.]+\/s/);

    assert.deepEqual(dialogs, []);
    await context.close();
  });

  it('refuses a wrong token, a form without its CSRF token, and an oversized form', async (t) => {
    await start(t);
    const form = (path: string, body: Record<string, string>, cookie = ''): Promise<Response> =>
      fetch(`${base}${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...(cookie ? { cookie } : {}) },
        body: new URLSearchParams(body),
        redirect: 'manual',
      });

    const wrong = await form('/console/login', { token: 'not-the-token-at-all-0123456789' });
    assert.equal(wrong.status, 401);
    assert.equal(wrong.headers.get('set-cookie'), null);
    const anonymous = await fetch(`${base}/console/queue`, { redirect: 'manual' });
    assert.equal(anonymous.status, 303);
    assert.equal(anonymous.headers.get('location'), '/console/login');

    const { cookie, csrf } = await login();
    const queued = await fetch(`${base}/console/queue`, { headers: { cookie } });
    assert.equal(queued.status, 200);
    assert.match(queued.headers.get('content-security-policy') ?? '', /default-src 'none'/);

    const noCsrf = await form('/console/action', { action: 'flush', id: 'x', confirm: 'yes' }, cookie);
    assert.equal(noCsrf.status, 403);
    const badCsrf = await form(
      '/console/action',
      { action: 'flush', id: 'x', confirm: 'yes', csrf: 'forged' },
      cookie,
    );
    assert.equal(badCsrf.status, 403);
    const noCookie = await form('/console/action', { action: 'flush', id: 'x', confirm: 'yes', csrf });
    assert.equal(noCookie.status, 403);
    const big = await form('/console/login', { token: 'x'.repeat(10_000) });
    assert.equal(big.status, 413);
    // The session still works: the refusals changed nothing.
    assert.equal((await form('/console/logout', { csrf }, cookie)).status, 303);
    const after = await fetch(`${base}/console/`, { headers: { cookie }, redirect: 'manual' });
    assert.equal(after.status, 303, 'logged out');
  });
});
