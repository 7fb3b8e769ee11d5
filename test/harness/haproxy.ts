import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, stopChild } from './peers.js';

export interface HaproxyFrontend {
  /** A name for the frontend (a `listen` section). */
  readonly name: string;
  /** The backend port on 127.0.0.1 (Petrel's listener). */
  readonly backend: number;
  /** How the header is sent: v1 (`send-proxy`) or v2 (`send-proxy-v2`). */
  readonly send: 'send-proxy' | 'send-proxy-v2';
}

export interface Haproxy {
  /** The port HAProxy listens on for each frontend, by name. */
  readonly ports: Readonly<Record<string, number>>;
  /** What HAProxy wrote to stderr (its log). */
  log(): string;
  stop(): Promise<void>;
}

/** Waits until something accepts connections on 127.0.0.1:port, or the process has exited. */
async function listening(port: number, child: ChildProcess, log: () => string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`haproxy exited (${child.exitCode}): ${log()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ port, host: '127.0.0.1' }, () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`haproxy did not listen on ${port}: ${log()}`);
}

/**
 * Starts Debian's HAProxy in TCP mode in the foreground: one frontend per entry on a free port of
 * 127.0.0.1, each forwarding to its backend with a PROXY header (PEERS-DEFENCE-OPS §6). HAProxy
 * connects to the backend from 127.0.0.1 and keeps the client's own address in the header.
 */
export async function startHaproxy(frontends: readonly HaproxyFrontend[]): Promise<Haproxy> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-haproxy-'));
  const ports: Record<string, number> = {};
  for (const f of frontends) ports[f.name] = await freePort();
  const cfg = [
    'global',
    '    log stderr format short local0 info',
    'defaults',
    '    mode tcp',
    '    log global',
    '    option tcplog',
    '    timeout connect 2s',
    '    timeout client 30s',
    '    timeout server 30s',
    ...frontends.flatMap((f) => [
      `listen ${f.name}`,
      `    bind 127.0.0.1:${ports[f.name]}`,
      `    server petrel 127.0.0.1:${f.backend} ${f.send}`,
    ]),
    '',
  ].join('\n');
  const file = join(dir, 'haproxy.cfg');
  writeFileSync(file, cfg);
  let stderr = '';
  const child = spawn('haproxy', ['-f', file, '-db'], { stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const log = (): string => stderr;
  try {
    for (const f of frontends) await listening(ports[f.name]!, child, log);
  } catch (err) {
    await stopChild(child);
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    ports,
    log,
    async stop() {
      await stopChild(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
