import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { Readable } from 'node:stream';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import pino, { type Logger } from 'pino';
import type {
  DeliveryRecipient,
  Hooks,
  QueuedMessageView,
  RecipientResult,
} from '../../core/hooks/catalogue.js';
import { Tokens } from '../../core/di/tokens.js';
import { validateConfig } from '../../core/config/load.js';
import { setupPlugin } from '../../core/testing/index.js';
import { deliveryRecipient, queuedMessage } from '../../test/harness/dovecot.js';
import { dotStuffed } from '../../core/index.js';
import lmtp from './index.js';

async function collect(source: AsyncIterable<Buffer>): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for await (const c of source) out.push(c);
  return out;
}

async function stuff(pieces: string[], chunkSize?: number): Promise<string> {
  return Buffer.concat(
    await collect(dotStuffed(Readable.from(pieces.map((p) => Buffer.from(p))), chunkSize)),
  ).toString();
}

describe('lmtp: dot-stuffing', () => {
  it('doubles a dot at the start of every line, across chunk boundaries too', async () => {
    assert.equal(await stuff(['.a\r\nb\r\n..c\r\n']), '..a\r\nb\r\n...c\r\n.\r\n');
    assert.equal(await stuff(['a\r\n', '.b\r\n']), 'a\r\n..b\r\n.\r\n');
    assert.equal(await stuff(['a\r', '\n', '.', '\r\n']), 'a\r\n..\r\n.\r\n');
    assert.equal(await stuff(['a.b\r\n x.\r\n']), 'a.b\r\n x.\r\n.\r\n', 'dots inside lines stay');
  });

  it('ends the last line before the final dot, and sends just the dot for an empty message', async () => {
    assert.equal(await stuff(['no final line end']), 'no final line end\r\n.\r\n');
    assert.equal(await stuff(['ends in CR\r']), 'ends in CR\r\r\n.\r\n');
    assert.equal(await stuff([]), '.\r\n');
  });

  it('writes in large chunks however small the pieces it reads', async () => {
    const lines = Array.from({ length: 20_000 }, (_, i) => `.line ${i}\r\n`);
    const chunks = await collect(dotStuffed(Readable.from(lines.map((l) => Buffer.from(l))), 65_536));
    assert.ok(chunks.length <= 5, `${chunks.length} writes for 20,000 lines`);
    chunks.slice(0, -1).forEach((c) => assert.ok(c.length >= 65_536));
    assert.equal(Buffer.concat(chunks).toString(), lines.map((l) => `.${l}`).join('') + '.\r\n');
  });
});

// ------------------------------------------------------------------ against smtp-server's LMTP mode

interface Received {
  readonly mailArgs: Record<string, unknown>;
  readonly rcpts: string[];
  readonly data: Buffer;
}

const servers: { close(cb?: () => void): unknown }[] = [];
after(async () => {
  await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
});

/**
 * An LMTP server (smtp-server with `lmtp: true`): `refuse` answers RCPT with 550; `verdicts`
 * gives each accepted recipient's end-of-data reply (an Error with responseCode, or accept).
 */
async function lmtpServer(
  opts: Partial<SMTPServerOptions> & {
    refuse?: string[];
    verdicts?: (rcpts: string[]) => (string | Error)[];
  } = {},
): Promise<{ port: number; received: Received[] }> {
  const received: Received[] = [];
  const { refuse = [], verdicts, ...options } = opts;
  const server = new SMTPServer({
    lmtp: true,
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    logger: false,
    ...options,
    onRcptTo(address, _session, cb) {
      if (refuse.includes(address.address))
        cb(Object.assign(new Error('No such user here'), { responseCode: 550 }));
      else cb();
    },
    onData(stream, session, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const rcpts = session.envelope.rcptTo.map((r) => r.address);
        received.push({
          mailArgs: (session.envelope.mailFrom || { args: {} }).args as Record<string, unknown>,
          rcpts,
          data: Buffer.concat(chunks),
        });
        cb(null, (verdicts?.(rcpts) ?? rcpts.map(() => 'Saved')) as never);
      });
    },
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.server.address() as { port: number }).port, received };
}

function petrelConfig() {
  return validateConfig(
    { hostname: 'mx.test', localDomains: ['example.test'], listeners: [{ kind: 'smtp', port: 0 }] },
    '(test)',
    '/',
  ).config;
}

async function plugin(config: Record<string, unknown>, logger?: Logger): Promise<Hooks> {
  return setupPlugin(lmtp, {
    config: config as never,
    services: new Map([[Tokens.Config, petrelConfig()]]),
    ...(logger ? { logger } : {}),
  });
}

/** A logger that keeps the messages of the errors logged, for checking why a delivery stopped. */
function errorLog(): { logger: Logger; errors: string[] } {
  const errors: string[] = [];
  const logger = pino(
    { level: 'warn' },
    {
      write: (line: string) => {
        const err = (JSON.parse(line) as { err?: { message?: string } }).err;
        if (err?.message) errors.push(err.message);
      },
    },
  );
  return { logger, errors };
}

async function deliver(
  hooks: Hooks,
  recipients: DeliveryRecipient[],
  message: QueuedMessageView,
  signal = new AbortController().signal,
): Promise<RecipientResult[]> {
  const out = await hooks.deliver!({
    route: { transport: 'lmtp', key: 'lmtp:x', data: {} },
    recipients,
    message,
    sender: message.sender,
    signal,
  });
  assert.equal(out.kind, 'results');
  return out.kind === 'results' ? [...out.results] : [];
}

const summary = (rs: RecipientResult[]) => rs.map((r) => [r.recipient, r.status, r.reply.code]);

describe('lmtp: deliver', () => {
  it('routes recipients of its domains (default: the local domains) and leaves others', async () => {
    const hooks = await plugin({ host: '127.0.0.1', port: 24 });
    const message = queuedMessage('x');
    const signal = new AbortController().signal;
    const mine = await hooks.route!({ recipient: deliveryRecipient('bob@example.test'), message, signal });
    assert.deepEqual(mine, {
      kind: 'route',
      route: { transport: 'lmtp', key: 'lmtp:127.0.0.1:24', data: {} },
    });
    const other = await hooks.route!({ recipient: deliveryRecipient('bob@other.test'), message, signal });
    assert.equal(other.kind, 'proceed');
    const only = await plugin({ socket: '/run/lmtp', domains: ['Other.test'] });
    const r = await only.route!({ recipient: deliveryRecipient('bob@other.test'), message, signal });
    assert.ok(r.kind === 'route' && r.route.key === 'lmtp:unix:/run/lmtp');
    assert.equal(
      (await only.route!({ recipient: deliveryRecipient('bob@example.test'), message, signal })).kind,
      'proceed',
    );
  });

  it('sends the message byte for byte, dot-stuffed, and takes one reply per recipient after the dot', async () => {
    const { port, received } = await lmtpServer({
      refuse: ['gone@example.test'],
      verdicts: (rcpts) =>
        rcpts.map((r) =>
          r === 'full@example.test'
            ? Object.assign(new Error('Mailbox full'), { responseCode: 452 })
            : 'Saved',
        ),
    });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const body = Buffer.concat([
      Buffer.from('Subject: dots\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n'),
      Buffer.from(
        randomBytes(200_000)
          .toString('base64')
          .replace(/(.{76})/g, '$1\r\n.'),
      ),
      Buffer.from('\r\n.\r\n'),
    ]);
    const results = await deliver(
      hooks,
      ['bob@example.test', 'gone@example.test', 'full@example.test'].map((a) => deliveryRecipient(a)),
      queuedMessage(body, { chunkSize: 1000 }),
    );
    assert.deepEqual(summary(results), [
      ['bob@example.test', 'delivered', 250],
      ['gone@example.test', 'failed', 550],
      ['full@example.test', 'deferred', 452],
    ]);
    assert.equal(results[1]!.reply.text, 'No such user here');
    assert.equal(results[2]!.reply.text, 'Mailbox full');
    assert.equal(results[0]!.reply.remote, `127.0.0.1:${port}`);
    assert.equal(received.length, 1);
    assert.deepEqual(received[0]!.rcpts, ['bob@example.test', 'full@example.test']);
    assert.ok(received[0]!.data.equals(body), 'the server unstuffed exactly what was stored');
  });

  it('asks for BODY=8BITMIME and SMTPUTF8 when the message needs them and the server offers them', async () => {
    const { port, received } = await lmtpServer({ size: 1_000_000 });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const message = queuedMessage('Subject: ü\r\n\r\nü\r\n', {
      mailParams: { body: '8BITMIME', smtputf8: true },
    });
    const results = await deliver(hooks, [deliveryRecipient('bob@example.test')], message);
    assert.deepEqual(summary(results), [['bob@example.test', 'delivered', 250]]);
    assert.equal(received[0]!.mailArgs.BODY, '8BITMIME');
    assert.equal(received[0]!.mailArgs.SMTPUTF8, true);
    assert.equal(received[0]!.mailArgs.SIZE, String(message.size), 'SIZE, since the server offers it');
    await deliver(hooks, [deliveryRecipient('bob@example.test')], queuedMessage('x'));
    assert.equal(received[1]!.mailArgs.BODY, undefined, 'a 7-bit message asks for nothing');
  });

  it('without 8BITMIME, SMTPUTF8 and PIPELINING on offer: no parameters, lock-step, UTF-8 recipients failed', async () => {
    const { port, received } = await lmtpServer({
      hide8BITMIME: true,
      hideSMTPUTF8: true,
      hidePIPELINING: true,
    });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const message = queuedMessage('Subject: x\r\n\r\nx\r\n', {
      mailParams: { body: '8BITMIME', smtputf8: true },
    });
    const results = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test'), deliveryRecipient('jörg@example.test')],
      message,
    );
    assert.deepEqual(summary(results), [
      ['bob@example.test', 'delivered', 250],
      ['jörg@example.test', 'failed', 553],
    ]);
    assert.equal(results[1]!.reply.enhanced, '5.6.7');
    // Decided here, not said by the server: it is not reported as the server's reply.
    assert.equal(results[1]!.reply.remote, undefined);
    assert.equal(results[0]!.reply.remote, `127.0.0.1:${port}`);
    assert.deepEqual(received[0]!.rcpts, ['bob@example.test']);
    assert.deepEqual(received[0]!.mailArgs.BODY, undefined);
    assert.deepEqual(received[0]!.mailArgs.SMTPUTF8, undefined);
  });

  it('gives every recipient the reply to MAIL when the server refuses the sender', async () => {
    const { port, received } = await lmtpServer({
      onMailFrom(_address, _session, cb) {
        cb(Object.assign(new Error('Sender refused for now'), { responseCode: 451 }));
      },
    });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const results = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test'), deliveryRecipient('carol@example.test')],
      queuedMessage('x'),
    );
    assert.deepEqual(summary(results), [
      ['bob@example.test', 'deferred', 451],
      ['carol@example.test', 'deferred', 451],
    ]);
    assert.equal(results[0]!.reply.text, 'Sender refused for now');
    assert.equal(received.length, 0);
  });

  it('defers every recipient when nothing listens (4.4.1)', async () => {
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', () => r()));
    const port = (closed.address() as { port: number }).port;
    await new Promise<void>((r) => closed.close(() => r()));
    const hooks = await plugin({ host: '127.0.0.1', port });
    const results = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test'), deliveryRecipient('carol@example.test')],
      queuedMessage('x'),
    );
    assert.deepEqual(
      results.map((r) => [r.status, r.reply.code, r.reply.enhanced]),
      [
        ['deferred', 451, '4.4.1'],
        ['deferred', 451, '4.4.1'],
      ],
    );
  });
});

// ------------------------------------------------------------------ servers that misbehave

/** A scripted server: `script` gets each line the client sends and may answer or hang up. */
async function scripted(
  script: (line: string, socket: Socket) => void,
): Promise<{ port: number; server: Server }> {
  const server = createServer((socket) => {
    socket.write('220 scripted LMTP\r\n');
    let buf = '';
    socket.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      let i: number;
      while ((i = buf.indexOf('\r\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        script(line, socket);
      }
    });
    socket.on('error', () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as { port: number }).port, server };
}

describe('lmtp: failures', () => {
  it('a server that stops answering is given up on within the command timeout, and all are deferred', async () => {
    const { port } = await scripted(() => undefined);
    const { logger, errors } = errorLog();
    const hooks = await plugin({ host: '127.0.0.1', port, timeouts: { command: '200ms' } }, logger);
    const results = await deliver(hooks, [deliveryRecipient('bob@example.test')], queuedMessage('x'));
    assert.deepEqual(summary(results), [['bob@example.test', 'deferred', 451]]);
    assert.equal(results[0]!.reply.enhanced, '4.4.2');
    assert.deepEqual(errors, ['timed out waiting for command'], 'ended by the command timeout');
  });

  it('a server that drips its LHLO reply a line at a time is given up on at the command timeout', async () => {
    const { port } = await scripted((line, socket) => {
      if (!/^LHLO /.test(line)) return;
      const timer = setInterval(() => socket.write('250-still here\r\n'), 50);
      socket.on('close', () => clearInterval(timer));
    });
    const { logger, errors } = errorLog();
    const hooks = await plugin({ host: '127.0.0.1', port, timeouts: { command: '300ms' } }, logger);
    const results = await deliver(hooks, [deliveryRecipient('bob@example.test')], queuedMessage('x'));
    assert.deepEqual(summary(results), [['bob@example.test', 'deferred', 451]]);
    assert.deepEqual(errors, ['timed out waiting for command'], 'one deadline for the whole reply');
  });

  it('a connection lost after the dot keeps the replies already given and defers the rest', async () => {
    let inData = false;
    const { port } = await scripted((line, socket) => {
      if (inData) {
        if (line === '.') {
          socket.write('250 2.0.0 <bob@example.test> Saved\r\n');
          socket.destroy();
        }
        return;
      }
      if (line.startsWith('LHLO'))
        socket.write('250-scripted\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n');
      else if (line === 'DATA') {
        inData = true;
        socket.write('354 go ahead\r\n');
      } else socket.write('250 2.1.0 OK\r\n');
    });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const results = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test'), deliveryRecipient('carol@example.test')],
      queuedMessage('Subject: x\r\n\r\nx\r\n'),
    );
    assert.deepEqual(summary(results), [
      ['bob@example.test', 'delivered', 250],
      ['carol@example.test', 'deferred', 451],
    ]);
    assert.deepEqual(
      [results[0]!.reply.enhanced, results[0]!.reply.text],
      ['2.0.0', '<bob@example.test> Saved'],
    );
  });

  it('a refusal of DATA decides every accepted recipient', async () => {
    const { port } = await scripted((line, socket) => {
      if (line.startsWith('LHLO')) socket.write('250-scripted\r\n250 PIPELINING\r\n');
      else if (line === 'DATA') socket.write('452 4.3.1 Out of disk space\r\n');
      else if (line === 'RCPT TO:<gone@example.test>') socket.write('550 5.1.1 No such user\r\n');
      else if (line === 'QUIT') socket.end('221 2.0.0 Bye\r\n');
      else socket.write('250 2.1.0 OK\r\n');
    });
    const hooks = await plugin({ host: '127.0.0.1', port });
    const results = await deliver(
      hooks,
      ['bob@example.test', 'gone@example.test', 'carol@example.test'].map((a) => deliveryRecipient(a)),
      queuedMessage('x'),
    );
    assert.deepEqual(summary(results), [
      ['bob@example.test', 'deferred', 452],
      ['gone@example.test', 'failed', 550],
      ['carol@example.test', 'deferred', 452],
    ]);
    assert.deepEqual([results[0]!.reply.enhanced, results[0]!.reply.text], ['4.3.1', 'Out of disk space']);
  });

  it('stops when the hook is aborted (its time is up) and defers everyone', async () => {
    const { port } = await scripted(() => undefined);
    const { logger, errors } = errorLog();
    const hooks = await plugin({ host: '127.0.0.1', port }, logger);
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('hook timed out')), 100);
    const results = await deliver(
      hooks,
      [deliveryRecipient('bob@example.test')],
      queuedMessage('x'),
      controller.signal,
    );
    assert.equal(results[0]!.status, 'deferred');
    assert.equal(errors.length, 1);
    assert.match(errors[0]!, /hook timed out$/, 'ended by the abort, not a timeout of its own');
  });
});

describe('lmtp: a message that stalls', () => {
  it('is given up on when the hook is aborted, and its recipients deferred', async () => {
    const { port } = await lmtpServer();
    const { logger, errors } = errorLog();
    const hooks = await plugin({ host: '127.0.0.1', port }, logger);
    const stalled: QueuedMessageView = { ...queuedMessage('x'), stream: () => new Readable({ read() {} }) };
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('hook timed out')), 300);
    const results = await deliver(hooks, [deliveryRecipient('bob@example.test')], stalled, controller.signal);
    assert.deepEqual(summary(results), [['bob@example.test', 'deferred', 451]]);
    assert.equal(errors.length, 1);
    assert.match(errors[0]!, /hook timed out$/, 'ended by the abort');
  });
});

describe('lmtp: config', () => {
  it('needs exactly one destination: host and port, or socket', async () => {
    await assert.rejects(plugin({}), /either host and port, or socket/);
    await assert.rejects(
      plugin({ host: 'x', port: 24, socket: '/run/lmtp' }),
      /either host and port, or socket/,
    );
    await assert.rejects(plugin({ host: 'x' }), /both host and port/);
    await assert.rejects(plugin({ socket: '/run/lmtp', timeouts: { data: 'soon' } }), /duration/);
  });
});
