/**
 * A real DNS server for tests: dnsmasq on 127.0.0.1 with a free port, answering only from the
 * records given (no upstream, no /etc/hosts). Point Petrel's `dns.servers` at `server`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { createServer } from 'node:net';
import { Resolver } from 'node:dns/promises';
import type { TestContext } from 'node:test';
import { has, requirePeer } from './peers.js';

/** Debian keeps dnsmasq in /usr/sbin, which a non-root PATH may lack. */
export const DNSMASQ = ['dnsmasq', '/usr/sbin/dnsmasq'].find((p) => has(p)) ?? 'dnsmasq';
export const DNSMASQ_PACKAGE = 'apt-get install dnsmasq-base';

export interface DnsRecords {
  /** MX records: `{ domain, host, preference }`. */
  readonly mx?: readonly { readonly domain: string; readonly host: string; readonly preference: number }[];
  /** A and AAAA records: a name and its addresses (IPv4 and IPv6 mixed). */
  readonly hosts?: readonly { readonly name: string; readonly addresses: readonly string[] }[];
  /**
   * PTR records: a reverse name (`5.0.0.127.in-addr.arpa`) and the name it points to. List the
   * reverse zone in `local` to have other addresses in it answered NXDOMAIN.
   */
  readonly ptr?: readonly { readonly name: string; readonly target: string }[];
  /** TXT records (SPF, DKIM keys, DMARC): one string each, without commas. */
  readonly txt?: readonly { readonly name: string; readonly text: string }[];
  /** Records of any other type: the RR type number and the RDATA in hex (`--dns-rr`). */
  readonly raw?: readonly { readonly name: string; readonly type: number; readonly hex: string }[];
  /** Domains that publish a null MX (RFC 7505: one MX record `0 .`). */
  readonly nullMx?: readonly string[];
  /**
   * Domains answered from these records only: a name below them with no record is NXDOMAIN
   * (a name with records of other types only is NODATA). Default: `['test']`.
   */
  readonly local?: readonly string[];
  /** Domains whose queries go to a server that never answers: lookups time out. */
  readonly unanswered?: readonly string[];
}

export interface Dnsmasq {
  /** `127.0.0.1:<port>`, as `dns.servers` takes it. */
  readonly server: string;
  readonly port: number;
  /** What dnsmasq logged (queries included), for assertion messages. */
  log(): string;
  /** Stops dnsmasq (idempotent, bounded). */
  stop(): Promise<void>;
}

/** A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both). */
export async function freeDnsPort(): Promise<number> {
  for (let i = 0; i < 20; i++) {
    const port = await new Promise<number>((resolve, reject) => {
      const udp = createSocket('udp4');
      udp.once('error', reject);
      udp.bind(0, '127.0.0.1', () => {
        const p = udp.address().port;
        udp.close(() => resolve(p));
      });
    });
    const tcpFree = await new Promise<boolean>((resolve) => {
      const srv = createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (tcpFree) return port;
  }
  throw new Error('no free port for dnsmasq');
}

/** A UDP port nothing answers on: queries sent there time out. */
async function silentPort(): Promise<{ port: number; close(): void }> {
  const udp = createSocket('udp4');
  await new Promise<void>((resolve, reject) => {
    udp.once('error', reject);
    udp.bind(0, '127.0.0.1', () => resolve());
  });
  udp.on('message', () => undefined);
  return { port: udp.address().port, close: () => udp.close() };
}

function exited(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/**
 * Starts dnsmasq in the foreground with the given records, or skips the test when dnsmasq is
 * missing (a failure under PETREL_REQUIRE_PEERS=1). Resolves once it answers queries (at most
 * `timeoutMs`). Stop it in the test's `after`/`finally` (or pass `t` to have it stopped for you).
 */
export async function startDnsmasq(
  /** The test (null outside a test, for a benchmark: a missing dnsmasq then throws). */
  t: TestContext | null,
  records: DnsRecords,
  opts: {
    timeoutMs?: number;
    /** Stop it when `t` ends (default); false to share it across tests. */ stopWithTest?: boolean;
  } = {},
): Promise<Dnsmasq | null> {
  if (t === null) {
    if (!has(DNSMASQ)) throw new Error(`dnsmasq not installed (${DNSMASQ_PACKAGE})`);
  } else if (requirePeer(t, DNSMASQ, DNSMASQ_PACKAGE) === null) return null;
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const silent = records.unanswered?.length ? await silentPort() : null;
  const args: string[] = [];
  for (const d of records.local ?? ['test']) args.push(`--local=/${d}/`);
  for (const m of records.mx ?? []) args.push(`--mx-host=${m.domain},${m.host},${m.preference}`);
  for (const h of records.hosts ?? []) args.push(`--host-record=${h.name},${h.addresses.join(',')}`);
  for (const r of records.ptr ?? []) args.push(`--ptr-record=${r.name},${r.target}`);
  for (const r of records.txt ?? []) {
    if (r.text.includes(',')) throw new TypeError(`dnsmasq TXT records cannot hold commas: ${r.text}`);
    args.push(`--txt-record=${r.name},${r.text}`);
  }
  for (const r of records.raw ?? []) args.push(`--dns-rr=${r.name},${r.type},${r.hex}`);
  // RFC 7505: preference 0 (two octets), then the root name (one zero octet).
  for (const d of records.nullMx ?? []) args.push(`--dns-rr=${d},15,000000`);
  for (const d of records.unanswered ?? []) args.push(`--server=/${d}/127.0.0.1#${silent!.port}`);

  for (let attempt = 0; ; attempt++) {
    const port = await freeDnsPort();
    const child = spawn(
      DNSMASQ,
      [
        '--no-daemon',
        '--conf-file',
        '--pid-file',
        '--log-facility=-',
        '--log-queries',
        `--port=${port}`,
        '--listen-address=127.0.0.1',
        '--bind-interfaces',
        '--no-resolv',
        '--no-hosts',
        '--no-poll',
        '--cache-size=0',
        ...args,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    child.on('error', (err) => (output += `\n${String(err)}`));
    let stopped: Promise<void> | null = null;
    const stop = (): Promise<void> => {
      stopped ??= (async () => {
        silent?.close();
        if (!(await exited(child, 0))) {
          child.kill('SIGTERM');
          if (!(await exited(child, 3000))) {
            child.kill('SIGKILL');
            await exited(child, 3000);
          }
        }
      })();
      return stopped;
    };
    const server = `127.0.0.1:${port}`;
    const deadline = Date.now() + timeoutMs;
    const resolver = new Resolver({ timeout: 300, tries: 1 });
    resolver.setServers([server]);
    let ready = false;
    while (!ready && Date.now() < deadline && child.exitCode === null) {
      try {
        // Any answer at all (NXDOMAIN included) means dnsmasq is serving.
        await resolver.resolve4('probe.invalid');
        ready = true;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOTFOUND' || code === 'ENODATA' || code === 'EREFUSED') ready = true;
        else await new Promise((r) => setTimeout(r, 50));
      }
    }
    if (ready) {
      const handle: Dnsmasq = { server, port, log: () => output, stop };
      if (t && opts.stopWithTest !== false) t.after(() => handle.stop());
      return handle;
    }
    await stop();
    // Another program may have taken the port between the probe and dnsmasq's bind: try again.
    if (attempt < 2 && /Address already in use/i.test(output)) continue;
    throw new Error(`dnsmasq did not start within ${timeoutMs} ms:\n${output}`);
  }
}
