import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { existsSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FIXTURES } from '../../test/harness/server.js';
import { launchCommand, namespacesWork } from './launch.js';

interface Attempt {
  readonly ok: boolean;
  readonly code?: string;
  readonly value?: string;
}

/**
 * The walls around a script process, without vm2: a stand-in for a script that got out of vm2
 * runs under the plugin's own launch command and reports what it could reach.
 */
describe('script: the walls outside vm2', () => {
  let tcp: Server;
  let udp: UdpSocket;
  let tcpSeen = 0;
  let udpSeen = 0;
  const target = join(tmpdir(), `petrel-script-layers-${process.pid}`);

  before(async () => {
    tcp = createServer((s) => {
      tcpSeen++;
      s.destroy();
    });
    await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
    udp = createSocket('udp4').on('message', () => udpSeen++);
    await new Promise<void>((resolve) => udp.bind(0, '127.0.0.1', resolve));
  });
  after(async () => {
    await new Promise((resolve) => tcp.close(resolve));
    udp.close();
  });

  it('leaves an escaped script no files, processes, workers, addons, signals, secrets or network', async () => {
    assert.equal(await namespacesWork(), true, 'this system must allow user namespaces (unshare)');
    const entry = join(FIXTURES, 'script', 'escaped.mjs');
    const { file, args, env, cwd } = launchCommand({
      entry,
      readable: [entry],
      maxHeapMb: 32,
      maxMemoryMb: 128,
      namespaces: true,
      args: [
        String((tcp.address() as { port: number }).port),
        String(udp.address().port),
        target,
        String(process.pid),
      ],
    });
    const stdout = await new Promise<string>((resolve, reject) =>
      execFile(file, args, { env, cwd, timeout: 20_000 }, (err, out, errOut) =>
        err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(out),
      ),
    );
    const r = JSON.parse(stdout) as Record<string, Attempt>;
    // Node's permission model:
    assert.deepEqual(r.read, { ok: false, code: 'ERR_ACCESS_DENIED' });
    assert.deepEqual(r.write, { ok: false, code: 'ERR_ACCESS_DENIED' });
    assert.equal(existsSync(target), false);
    assert.deepEqual(r.spawn, { ok: false, code: 'ERR_ACCESS_DENIED' });
    assert.deepEqual(r.worker, { ok: false, code: 'ERR_ACCESS_DENIED' });
    assert.deepEqual(r.addon, { ok: false, code: 'ERR_DLOPEN_DISABLED' });
    // The PID namespace: Petrel's process is not there to signal.
    assert.deepEqual(r.signal, { ok: false, code: 'ESRCH' });
    // The network namespace: no route anywhere, loopback included.
    assert.deepEqual(r.tcp, { ok: false, code: 'ENETUNREACH' });
    assert.deepEqual(r.udp, { ok: false, code: 'ENETUNREACH' });
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(tcpSeen, 0);
    assert.equal(udpSeen, 0);
    // Petrel's environment is not passed on.
    assert.deepEqual(r.env, { ok: true, value: '0' });
  });
});
