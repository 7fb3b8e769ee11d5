import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SmtpClient } from '../harness/smtp-client.js';
import { CLI, freePort, NODE, PetrelProcess } from './cli.js';
import { describeRun, run } from './run.js';

/**
 * A plugin from npm has what a built-in has: it is packed with `npm pack`, installed into a
 * project outside this repository, named in the config by its package name, and uses the queue
 * and the user directory through their published contracts (`petrel/queue`, `petrel/users`).
 */

const PLUGIN = `import { accept, definePlugin, deny, makeAddress, proceed } from 'petrel';
import { Queue } from 'petrel/queue';
import { Directory } from 'petrel/users';

export default definePlugin({
  name: 'audit',
  setup({ resolve }) {
    return {
      async rcpt({ recipient }) {
        const known = await resolve(Directory).isDeliverable(recipient.address);
        return known ? accept({ text: 'Known to the directory' }) : deny(550, '5.1.1', 'Unknown here (audit)');
      },
      async data_post({ transaction }) {
        const to = transaction.recipients.map((r) => r.address.address).join(', ');
        const content = Buffer.from(
          'From: audit@example.test\\r\\nTo: audit@example.test\\r\\nSubject: audit\\r\\n\\r\\n' +
            'a message from <' + (transaction.sender?.address ?? '') + '> to ' + to + '\\r\\n',
        );
        await resolve(Queue).submit({
          sender: null,
          recipients: [{ address: makeAddress('audit', 'example.test') }],
          content,
        });
        return proceed();
      },
    };
  },
});
`;

function npm(args: string[], cwd: string) {
  return run('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, timeoutMs: 60_000 });
}

describe('a plugin installed from npm', () => {
  let dir: string;
  let server: PetrelProcess;
  let port: number;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'petrel-npm-plugin-'));
    const pkg = join(dir, 'petrel-plugin-audit');
    mkdirSync(pkg);
    writeFileSync(
      join(pkg, 'package.json'),
      JSON.stringify({ name: 'petrel-plugin-audit', version: '1.0.0', type: 'module', main: 'index.mjs' }),
    );
    writeFileSync(join(pkg, 'index.mjs'), PLUGIN);
    const packed = await npm(['pack', '--pack-destination', dir], pkg);
    assert.equal(packed.code, 0, describeRun(packed));
    const project = join(dir, 'project');
    mkdirSync(project);
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'mail-site', private: true }));
    const installed = await npm(
      ['install', '--offline', join(dir, 'petrel-plugin-audit-1.0.0.tgz')],
      project,
    );
    assert.equal(installed.code, 0, describeRun(installed));
    port = await freePort();
    writeFileSync(
      join(project, 'petrel.config.yaml'),
      [
        'hostname: mx.example.test',
        'localDomains: [example.test]',
        `listeners: [{ kind: smtp, address: 127.0.0.1, port: ${port} }]`,
        'spool: { dir: ./spool }',
        'plugins:',
        '  - audit',
        '  - { name: users, config: { usersFile: ./users.json } }',
        '  - queue',
        '  - { name: maildir, config: { root: ./mail } }',
        '',
      ].join('\n'),
    );
    for (const user of ['bob@example.test', 'audit@example.test']) {
      const r = await run(NODE, [CLI, 'user', 'add', user], { cwd: project, input: 's3cret pass\n' });
      assert.equal(r.code, 0, describeRun(r));
    }
    server = await PetrelProcess.start(join(project, 'petrel.config.yaml'), project);
  });

  after(() => {
    server?.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  it('is found by its package name and asks the user directory at RCPT', async () => {
    const started = server.logs.find((l) => l.msg === 'petrel started');
    assert.deepEqual(started?.plugins, ['audit', 'users', 'queue', 'maildir']);
    const c = await SmtpClient.connect(port);
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
    await c.cmd('RCPT TO:<nobody@example.test>', /^550 5\.1\.1 Unknown here \(audit\)/);
    await c.cmd('RCPT TO:<bob@example.test>', /^250 2\.1\.5 Known to the directory/);
    await c.cmd('DATA', /^354 /);
    c.write('Subject: hello\r\n\r\nhello bob\r\n.\r\n');
    await c.expect(/^250 /);
    c.close();
  });

  it('submits a message of its own through the queue service, which delivers it', async () => {
    const folder = join(dir, 'project', 'mail', 'example.test', 'audit', 'Maildir', 'new');
    const deadline = Date.now() + 15_000;
    let files: string[] = [];
    while (Date.now() < deadline) {
      try {
        files = readdirSync(folder);
      } catch {
        files = [];
      }
      if (files.length) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(files.length, 1, 'one audit copy');
    const text = readFileSync(join(folder, files[0]!), 'utf8');
    assert.match(text, /a message from <alice@crepes\.test> to bob@example\.test/);
    assert.match(text, /^Return-Path: <>/m);
  });
});
