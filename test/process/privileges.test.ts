import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import {
  chmodSync,
  chownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { mailIds } from '../harness/maildir.js';
import { REQUIRE_PEERS } from '../harness/peers.js';
import { FIXTURES } from '../harness/server.js';
import { SmtpClient } from '../harness/smtp-client.js';
import { petrel, PetrelProcess, Project } from '../e2e/cli.js';

/**
 * `petrel start` as root: it binds a port below 1024, then every process runs as the configured
 * user; without `user` it refuses, unless told `--run-as-root`. Real processes, real sockets, the
 * kernel's own view of their credentials in /proc.
 */

const NOBODY = { user: 'nobody', uid: 65534, gid: 65534 };
const HOST = '127.0.0.2';

function requireRoot(t: TestContext): boolean {
  if (process.getuid?.() === 0) return true;
  const why = 'binding a port below 1024 and changing user need root';
  if (REQUIRE_PEERS) throw new Error(`${why}; this test runs as uid ${String(process.getuid?.())}`);
  t.skip(why);
  return false;
}

/** A port below 1024 that nothing listens on at HOST (the usual ones first). */
async function freePrivilegedPort(): Promise<number> {
  for (const port of [587, 25, 465, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24]) {
    const free = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(port, HOST, () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error(`no free port below 1024 on ${HOST}`);
}

/** Uid, Gid (real, effective, saved, fs) and supplementary Groups of a process, from the kernel. */
function credentials(pid: number): { uid: number[]; gid: number[]; groups: number[] } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number[] =>
    (new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(status)?.[1] ?? '').split(/\s+/).filter(Boolean).map(Number);
  return { uid: field('Uid'), gid: field('Gid'), groups: field('Groups') };
}

/** Every path under `dir` whose owner is not `uid`. */
function notOwnedBy(dir: string, uid: number): string[] {
  const out: string[] = [];
  const visit = (p: string): void => {
    const st = lstatSync(p);
    if (st.uid !== uid) out.push(`${p} (uid ${st.uid})`);
    if (st.isDirectory()) for (const name of readdirSync(p)) visit(join(p, name));
  };
  visit(dir);
  return out;
}

/** Takes mail for privileges.test, and says, from its setup, which user its code runs as. */
const ACCEPT = `import { definePlugin, accept, proceed } from 'petrel';
export default definePlugin({
  name: 'accept',
  setup: ({ log }) => {
    log.info({ uid: process.getuid(), gid: process.getgid() }, 'plugin set up');
    return {
      async rcpt({ recipient }) {
        return recipient.domain === 'privileges.test' ? accept() : proceed();
      },
    };
  },
});
`;

/** A project folder the service user can read, with a spool and a mail root it owns. */
function serviceProject(): Project {
  const project = new Project([]);
  chmodSync(project.dir, 0o755);
  writeFileSync(project.path('accept.mjs'), ACCEPT);
  for (const d of ['spool', 'mail']) {
    mkdirSync(project.path(d));
    chownSync(project.path(d), NOBODY.uid, NOBODY.gid);
  }
  return project;
}

function config(port: number, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    hostname: 'mx.privileges.test',
    localDomains: ['privileges.test'],
    listeners: [{ kind: 'smtp', address: HOST, port }],
    spool: { dir: './spool' },
    log: { level: 'info', format: 'json' },
    workers: 2,
    plugins: ['./accept.mjs', 'queue', { name: 'maildir', config: { root: './mail' } }],
    ...extra,
  };
}

describe('petrel start as root', () => {
  const projects: Project[] = [];
  const procs: PetrelProcess[] = [];
  after(() => {
    for (const p of procs) p.kill();
    for (const p of projects) p.remove();
  });

  describe('with user: nobody, on a port below 1024', () => {
    let project: Project;
    let server: PetrelProcess;
    let port: number;
    let file: string;

    before(async () => {
      if (process.getuid?.() !== 0) return;
      project = serviceProject();
      projects.push(project);
      port = await freePrivilegedPort();
      file = project.writeConfig('petrel.yaml', config(port, { user: NOBODY.user }));
      server = await PetrelProcess.start(file, project.dir, 30_000, ['start']);
      procs.push(server);
    });

    it('binds the port as root, then the primary and every worker run as nobody, without root in their groups', (t) => {
      if (!requireRoot(t)) return;
      const dropped = server.logs.find((l) => l.msg === 'running as the service user');
      assert.ok(dropped, server.dump());
      assert.equal(dropped.uid, NOBODY.uid);
      const started = server.logs.find((l) => l.msg === 'petrel started');
      assert.deepEqual(
        (started?.listeners as { address: string; port: number }[]).map((l) => [l.address, l.port]),
        [[HOST, port]],
      );
      const plugins = server.logs.filter((l) => l.msg === 'plugin set up');
      assert.deepEqual(
        plugins.map((l) => [l.uid, l.gid]),
        [
          [NOBODY.uid, NOBODY.gid],
          [NOBODY.uid, NOBODY.gid],
        ],
        'the plugin runs as nobody in both workers',
      );
      const workers = started?.pids as number[];
      assert.equal(workers.length, 2);
      for (const pid of [server.pid!, ...workers]) {
        const c = credentials(pid);
        assert.deepEqual(c.uid, [NOBODY.uid, NOBODY.uid, NOBODY.uid, NOBODY.uid], `uids of ${pid}`);
        assert.deepEqual(c.gid, [NOBODY.gid, NOBODY.gid, NOBODY.gid, NOBODY.gid], `gids of ${pid}`);
        assert.ok(!c.groups.includes(0), `no root group for ${pid}: ${c.groups.join(' ')}`);
        assert.ok(c.groups.includes(NOBODY.gid), `the user's groups for ${pid}: ${c.groups.join(' ')}`);
      }
    });

    it('accepts and queues a message; everything it wrote belongs to nobody', async (t) => {
      if (!requireRoot(t)) return;
      const c = await SmtpClient.connect(port, HOST);
      try {
        await c.expect(/^220 mx\.privileges\.test /);
        await c.ehlo();
        await c.cmd('MAIL FROM:<alice@crepes.test>', /^250 /);
        await c.cmd('RCPT TO:<bob@privileges.test>', /^250 /);
        await c.cmd('DATA', /^354 /);
        c.write('Message-ID: <drop@privileges.test>\r\nSubject: as nobody\r\n\r\nhello\r\n.\r\n');
        await c.expect(/^250 /);
        await c.cmd('QUIT', /^221 /);
      } finally {
        c.close();
      }
      const mail = project.path('mail');
      for (let i = 0; i < 200 && !mailIds(mail).includes('drop@privileges.test'); i++)
        await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(mailIds(mail), ['drop@privileges.test'], server.dump());
      assert.ok(readdirSync(project.path('spool')).includes('queue'), 'the queue is under the spool');
      assert.deepEqual(notOwnedBy(project.path('spool'), NOBODY.uid), []);
      assert.deepEqual(notOwnedBy(mail, NOBODY.uid), []);
    });

    it('reloads on SIGHUP as nobody, saying a new low port needs a restart, and stops on SIGTERM', async (t) => {
      if (!requireRoot(t)) return;
      const from = server.logs.length;
      const moved = port === 587 ? 25 : 587;
      project.writeConfig('petrel.yaml', config(moved, { user: NOBODY.user }));
      server.signal('SIGHUP');
      await server.waitForLog((l) => l.msg === 'config reloaded' && l.worker === undefined, 20_000, from);
      const warning = server.logs
        .slice(from)
        .find((l) => l.worker === undefined && String(l.msg).startsWith('listeners changed in the config'));
      assert.equal(warning?.level, 40, server.dump());
      assert.match(String(warning?.msg), /cannot bind a port below 1024 until it is started again/);
      // Still served where it was bound.
      const c = await SmtpClient.connect(port, HOST);
      await c.expect(/^220 /);
      c.close();
      server.signal('SIGTERM');
      assert.deepEqual(await server.waitForExit(30_000), { code: 0, signal: null }, server.dump());
    });
  });

  it('refuses to start without user, naming the key and the --run-as-root switch (exit 78)', async (t) => {
    if (!requireRoot(t)) return;
    const project = serviceProject();
    projects.push(project);
    const file = project.writeConfig('petrel.yaml', config(0));
    const r = await petrel(['start', '--config', file], project.dir, 20_000);
    assert.equal(r.code, 78, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stderr, /petrel: invalid configuration/);
    assert.ok(r.stderr.includes(`${file}: user: expected the unprivileged account to run as`), r.stderr);
    assert.match(r.stderr, /--run-as-root/);
    assert.doesNotMatch(r.stdout, /petrel started/);
  });

  it('runs as root with --run-as-root, and says so at level warn', async (t) => {
    if (!requireRoot(t)) return;
    const project = serviceProject();
    projects.push(project);
    const file = project.writeConfig('petrel.yaml', config(0, { workers: 1 }));
    const server = await PetrelProcess.start(file, project.dir, 30_000, ['start', '--run-as-root']);
    procs.push(server);
    const warning = server.logs.find((l) => /^running as root \(--run-as-root\)/.test(String(l.msg)));
    assert.equal(warning?.level, 40, server.dump());
    const workers = server.logs.find((l) => l.msg === 'petrel started')?.pids as number[];
    assert.equal(credentials(workers[0]!).uid[1], 0);
    server.signal('SIGTERM');
    assert.deepEqual(await server.waitForExit(30_000), { code: 0, signal: null }, server.dump());
  });

  it('config check as root reads the config as the user: a key only root can read fails', async (t) => {
    if (!requireRoot(t)) return;
    const project = serviceProject();
    projects.push(project);
    for (const f of ['cert.pem', 'key.pem']) {
      writeFileSync(project.path(f), readFileSync(join(FIXTURES, 'tls', f)));
      chmodSync(project.path(f), 0o600); // root's alone
    }
    const tls = { tls: { cert: './cert.pem', key: './key.pem' } };
    const asNobody = project.writeConfig('nobody.yaml', config(0, { user: NOBODY.user, ...tls }));
    const r = await petrel(['config', 'check', '--config', asNobody], project.dir, 20_000);
    assert.equal(r.code, 78, `${r.stdout}\n${r.stderr}`);
    assert.ok(r.stderr.includes(project.path('cert.pem')), r.stderr);
    // The same files, checked by root for a config without user: readable.
    const asRoot = project.writeConfig('root.yaml', config(0, tls));
    const ok = await petrel(['config', 'check', '--config', asRoot], project.dir, 20_000);
    assert.equal(ok.code, 0, ok.stderr);
  });

  it('names spool files left by an earlier run as root, and the chown that fixes them (exit 78)', async (t) => {
    if (!requireRoot(t)) return;
    const project = serviceProject();
    projects.push(project);
    // What a run as root leaves: a queue folder owned by root inside the service user's spool.
    mkdirSync(project.path('spool', 'queue', 'part-0'), { recursive: true });
    const file = project.writeConfig('petrel.yaml', config(0, { user: NOBODY.user }));
    const r = await petrel(['start', '--config', file], project.dir, 20_000);
    assert.equal(r.code, 78, `${r.stdout}\n${r.stderr}`);
    assert.ok(r.stderr.includes(`${file}: spool.dir: `), r.stderr);
    assert.ok(r.stderr.includes(`${project.path('spool', 'queue')} (owner uid 0)`), r.stderr);
    assert.ok(r.stderr.includes(`Fix: chown -R nobody:nogroup ${project.path('spool')}`), r.stderr);
    assert.doesNotMatch(r.stdout, /petrel started/);
  });
});
