import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:tls';
import { SmtpClient } from '../harness/smtp-client.js';
import {
  acceptAllRecipients,
  memoryQueue,
  startServer,
  type TestServer,
  type CapturedMessage,
} from '../harness/server.js';
import { definePlugin } from '../../core/plugins/define.js';
import { deny, proceed } from '../../core/hooks/verdict.js';
import { Tokens } from '../../core/di/tokens.js';

/**
 * The `http` listener of a Petrel on its own (no primary): its routes, the seam later features
 * add pages through, and the metrics of one process over a real socket.
 */

const slow = definePlugin({
  name: 'slow-helo',
  setup: ({ resolve, onClose }) => {
    const metrics = resolve(Tokens.Metrics);
    const seen = metrics.counter({ name: 'slowhelo_greetings_total', help: 'HELOs seen' }).labels();
    let ready = true;
    onClose(resolve(Tokens.Health).add('slow-helo', () => (ready ? null : 'switched off')));
    return {
      async helo({ hostname }) {
        seen.inc();
        if (hostname === 'switch.off') ready = false;
        await new Promise((r) => setTimeout(r, 30));
        return hostname === 'bad.test' ? deny(550, '5.7.1', 'no') : proceed();
      },
    };
  },
});

describe('the http listener of a single Petrel', () => {
  let server: TestServer;
  let base: string;
  const captured: CapturedMessage[] = [];

  before(async () => {
    server = await startServer({
      plugins: [slow, acceptAllRecipients, memoryQueue(captured)],
      config: {
        listeners: [
          { kind: 'smtp', address: '127.0.0.1', port: 0 },
          { kind: 'submissions', address: '127.0.0.1', port: 0 },
          { kind: 'http', port: 0 },
        ],
      },
    });
    base = `http://127.0.0.1:${server.app.port('http')}`;
  });
  after(() => server.close());

  it('binds 127.0.0.1 by default', () => {
    const l = server.app.listeners.find((x) => x.kind === 'http');
    assert.equal(l?.address, '127.0.0.1');
  });

  it('answers unknown paths 404 and another method 405 with Allow', async () => {
    assert.equal((await fetch(`${base}/nothing-here`)).status, 404);
    const r = await fetch(`${base}/metrics`, { method: 'POST' });
    assert.equal(r.status, 405);
    assert.equal(r.headers.get('allow'), 'GET, HEAD');
  });

  it('lets a later feature add routes to the same listener, refuses a taken one, and hides a failing handler', async () => {
    const http = server.app.http!;
    http.route('GET', '/console/*', (_req, res, url) => {
      res.end(`console at ${url.pathname}`);
    });
    http.route('GET', '/console/broken', () => {
      throw new Error('secret detail');
    });
    assert.throws(() => http.route('GET', '/metrics', () => undefined), /already taken/);
    assert.equal(await (await fetch(`${base}/console/queue`)).text(), 'console at /console/queue');
    const broken = await fetch(`${base}/console/broken`);
    assert.equal(broken.status, 500);
    assert.doesNotMatch(await broken.text(), /secret/);
    assert.ok(server.logs.some((l) => l.msg === 'HTTP route failed'));
  });

  it('times each hook per plugin, counts replies by class, and exports a plugin’s own counter', async () => {
    for (const name of ['good.test', 'bad.test']) {
      const c = await SmtpClient.connect(server.port);
      await c.expect(/^220 /);
      await c.cmd(`HELO ${name}`, name === 'bad.test' ? /^550 / : /^250 /);
      await c.cmd('QUIT', /^221 /);
      c.close();
    }
    const text = await (await fetch(`${base}/metrics`)).text();
    assert.match(text, /^petrel_hook_duration_seconds_count\{plugin="slow-helo",hook="helo"\} 2$/m);
    // Each call took at least 30 ms: none lands in a bucket under 25 ms.
    assert.match(
      text,
      /^petrel_hook_duration_seconds_bucket\{plugin="slow-helo",hook="helo",le="0.025"\} 0$/m,
    );
    assert.match(text, /^petrel_smtp_replies_total\{class="5xx"\} 1$/m);
    assert.match(text, /^slowhelo_greetings_total 2$/m);
    assert.match(text, /^petrel_process_memory_bytes\{worker="0",kind="rss"\} \d+/m);
  });

  it('counts inbound TLS handshakes by version', async () => {
    const socket = connect({ port: server.submissionsPort, host: '127.0.0.1', rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', resolve);
      socket.once('error', reject);
    });
    const version = socket.getProtocol();
    await new Promise<void>((resolve) => socket.once('data', () => resolve()));
    socket.end('QUIT\r\n');
    const text = await (await fetch(`${base}/metrics`)).text();
    assert.match(
      text,
      new RegExp(
        `^petrel_tls_handshakes_total\\{direction="inbound",result="ok",version="${version}"\\} 1$`,
        'm',
      ),
    );
  });

  it('is not ready while a plugin’s readiness check fails', async () => {
    assert.equal((await fetch(`${base}/readyz`)).status, 200);
    const c = await SmtpClient.connect(server.port);
    await c.expect(/^220 /);
    await c.cmd('HELO switch.off', /^250 /);
    c.close();
    const r = await fetch(`${base}/readyz`);
    assert.equal(r.status, 503);
    assert.equal(await r.text(), 'not ready\n- slow-helo: switched off\n');
  });
});
