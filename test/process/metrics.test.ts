import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { SmtpClient } from '../harness/smtp-client.js';
import { redisMissing, startRedis, type RedisPeer } from '../harness/redis.js';
import { PetrelProcess } from '../e2e/cli.js';

/**
 * The `http` listener of `petrel start` with two workers, scraped like Prometheus does: the
 * counters of both workers add up, refusals land under the right labels, and `/readyz` follows
 * the State service (a real redis-server) down and back up.
 */

const RULES = `import { definePlugin, accept, deny, proceed } from 'petrel';
export default definePlugin({
  name: 'rules',
  setup: () => ({
    async rcpt({ recipient }) {
      return recipient.domain === 'hamburger.test' ? accept() : proceed();
    },
    async data_post({ message }) {
      return message.headers.get('subject') === 'reject me' ? deny(550, '5.7.1', 'not this one') : proceed();
    },
  }),
});
`;

const TOKEN = 'a-scrape-token-of-some-length';

/** One sample line's value summed over every series of `name` whose labels include `labels`. */
function value(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  let seen = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || !line.trim()) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries(
      [...(m[2] ?? '').matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1]!, x[2]!]),
    );
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) {
      sum += Number(m[3]);
      seen = true;
    }
  }
  return seen ? sum : NaN;
}

async function send(port: number, n: number, subject = `probe ${n}`): Promise<string> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd(`RCPT TO:<bob${n % 3}@hamburger.test>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    c.write(`Message-ID: <m${n}@metrics.test>\r\nSubject: ${subject}\r\n\r\nhello ${n}\r\n.\r\n`);
    const r = await c.reply();
    await c.cmd('QUIT', /^221 /);
    return `${r.code}`;
  } finally {
    c.close();
  }
}

describe('metrics and health of petrel start with two workers', { skip: redisMissing }, () => {
  let dir: string;
  let redis: RedisPeer;
  let server: PetrelProcess;
  let smtp: number;
  let tight: number;
  let http: number;

  const scrape = async (token: string | null = TOKEN): Promise<Response> =>
    fetch(`http://127.0.0.1:${http}/metrics`, token ? { headers: { authorization: `Bearer ${token}` } } : {});
  const metrics = async (): Promise<string> => {
    const r = await scrape();
    assert.equal(r.status, 200);
    return r.text();
  };

  before(async () => {
    redis = await startRedis();
    dir = mkdtempSync(join(tmpdir(), 'petrel-metrics-'));
    writeFileSync(join(dir, 'rules.mjs'), RULES);
    const config = join(dir, 'petrel.yaml');
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.metrics.test',
        localDomains: ['hamburger.test'],
        workers: 2,
        listeners: [
          { kind: 'smtp', name: 'mx', port: 0, limits: { maxConnectionsPerIp: 200 } },
          { kind: 'smtp', name: 'tight', port: 0, limits: { maxConnectionsPerIp: 1 } },
          { kind: 'http', port: 0, metricsToken: TOKEN },
        ],
        spool: { dir: './spool' },
        state: { backend: 'redis', redis: { url: redis.url, timeout: '1s' } },
        log: { level: 'info' },
        plugins: ['./rules.mjs', 'queue', { name: 'maildir', config: { root: './mail' } }],
      }),
    );
    server = await PetrelProcess.start(config, dir, 30_000);
    const started = server.logs.find((l) => l.msg === 'petrel started')!;
    const listeners = started.listeners as { name: string; kind: string; port: number }[];
    smtp = listeners.find((l) => l.name === 'mx')!.port;
    tight = listeners.find((l) => l.name === 'tight')!.port;
    http = listeners.find((l) => l.kind === 'http')!.port;
  });

  after(async () => {
    server?.kill();
    await redis?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('answers /healthz and /readyz once serving, and /metrics only with the token', async () => {
    const h = await fetch(`http://127.0.0.1:${http}/healthz`);
    assert.equal(h.status, 200);
    assert.equal(await h.text(), 'ok\n');
    const r = await fetch(`http://127.0.0.1:${http}/readyz`);
    assert.equal(r.status, 200, await r.clone().text());
    assert.equal(await r.text(), 'ready\n');
    const denied = await scrape(null);
    assert.equal(denied.status, 401);
    assert.match(denied.headers.get('www-authenticate') ?? '', /^Bearer /);
    assert.equal((await scrape('wrong-token-wrong-token')).status, 401);
    const ok = await scrape();
    assert.equal(ok.status, 200);
    assert.match(ok.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  });

  it('sums the counters of both workers: accepted messages are the messages sent', async () => {
    const before = await metrics();
    const accepted0 = value(before, 'petrel_messages_accepted_total', { listener: 'mx' }) || 0;
    const N = 30;
    for (let i = 0; i < N; i++) assert.equal(await send(smtp, i), '250');
    const byWorker = new Set(server.logs.filter((l) => l.msg === 'message accepted').map((l) => l.worker));
    assert.deepEqual([...byWorker].sort(), [0, 1], 'both workers accepted some of them');
    const text = await metrics();
    assert.equal(value(text, 'petrel_messages_accepted_total', { listener: 'mx' }) - accepted0, N);
    assert.equal(value(text, 'petrel_smtp_commands_total', { command: 'MAIL' }), N);
    assert.equal(value(text, 'petrel_smtp_commands_total', { command: 'DATA' }), N);
    assert.equal(value(text, 'petrel_connections_total', { listener: 'mx' }), N);
    // Per connection: 220, 250 EHLO, 250 MAIL, 250 RCPT, 354, 250 queued, 221.
    assert.equal(value(text, 'petrel_smtp_replies_total', { class: '3xx' }), N);
    assert.equal(value(text, 'petrel_smtp_replies_total', { class: '2xx' }), 6 * N);
    // A histogram per plugin and hook, one observation per call.
    assert.equal(value(text, 'petrel_hook_duration_seconds_count', { plugin: 'rules', hook: 'rcpt' }), N);
    assert.equal(value(text, 'petrel_hook_duration_seconds_count', { plugin: 'queue', hook: 'queue' }), N);
    assert.equal(
      value(text, 'petrel_hook_duration_seconds_bucket', { plugin: 'rules', hook: 'rcpt', le: '+Inf' }),
      N,
    );
    assert.ok(value(text, 'petrel_journal_fsync_seconds_count') >= 1, 'journal syncs are timed');
    assert.ok(value(text, 'petrel_journal_batch_records_sum') >= N, 'every accepted message was journalled');
    // Per-process figures stay apart, by worker.
    for (const worker of ['0', '1', 'primary'])
      assert.ok(value(text, 'petrel_process_memory_bytes', { worker, kind: 'rss' }) > 0, `rss of ${worker}`);
    assert.equal(value(text, 'petrel_workers_serving', { state: 'serving' }), 2);
    // Deliveries happen after the 250: wait for the maildir to have taken them all.
    const deadline = Date.now() + 30_000;
    let delivered = 0;
    while (Date.now() < deadline) {
      delivered = value(await metrics(), 'petrel_delivery_attempts_total', {
        result: 'delivered',
        domain: 'hamburger.test',
      });
      if (delivered >= N) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(delivered, N);
  });

  it('counts a message refused by a plugin under its hook, plugin and reason', async () => {
    assert.equal(await send(smtp, 100, 'reject me'), '550');
    const text = await metrics();
    assert.equal(
      value(text, 'petrel_messages_refused_total', { hook: 'data_post', plugin: 'rules', reason: 'deny' }),
      1,
    );
  });

  it('counts a connection refused over the per-address limit under its listener and reason', async () => {
    const held = await SmtpClient.connect(tight);
    try {
      await held.expect(/^220 /);
      const second = await SmtpClient.connect(tight);
      try {
        await second.expect(/^421 .*Too many connections/);
      } finally {
        second.close();
      }
      const text = await metrics();
      assert.equal(
        value(text, 'petrel_connections_refused_total', { listener: 'tight', reason: 'limit' }),
        1,
      );
      assert.equal(value(text, 'petrel_connections_open', { listener: 'tight' }), 1);
    } finally {
      held.close();
    }
  });

  it('is not ready while the State service is down, and ready again when it is back', async () => {
    await redis.stop();
    const down = await fetch(`http://127.0.0.1:${http}/readyz`);
    const body = await down.text();
    assert.equal(down.status, 503);
    assert.match(body, /^not ready\n/);
    assert.match(body, /worker 0: state service unreachable/);
    assert.match(body, /worker 1: state service unreachable/);
    // Alive all the same.
    assert.equal((await fetch(`http://127.0.0.1:${http}/healthz`)).status, 200);
    await redis.start();
    const deadline = Date.now() + 20_000;
    let last = '';
    while (Date.now() < deadline) {
      const r = await fetch(`http://127.0.0.1:${http}/readyz`);
      last = await r.text();
      if (r.status === 200) break;
      await new Promise((res) => setTimeout(res, 250));
    }
    assert.equal(last, 'ready\n');
  });
});
