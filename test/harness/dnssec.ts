/**
 * A DNSSEC-signed zone behind a validating resolver, for DANE tests: the zone is signed afresh
 * with new keys on every start (ldns-keygen, ldns-signzone: signatures expire, so fixtures would
 * not keep), served by nsd, and resolved by unbound, which validates it against the zone's own
 * DS as trust anchor and sets the AD bit on what it validated. Point Petrel's `dns.servers` at
 * `server`. Both daemons run in the foreground on free 127.0.0.1 ports and stop with the test.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { Resolver } from 'node:dns/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { freeDnsPort } from './dnsmasq.js';
import { has, requirePeer, stopChild } from './peers.js';

const NSD = ['nsd', '/usr/sbin/nsd'].find((p) => has(p)) ?? 'nsd';
const UNBOUND = ['unbound', '/usr/sbin/unbound'].find((p) => has(p)) ?? 'unbound';

export interface SignedZone {
  /** `127.0.0.1:<port>` of the validating resolver. */
  readonly server: string;
  /** What nsd and unbound printed, for assertion messages. */
  log(): string;
  stop(): Promise<void>;
}

function daemon(cmd: string, args: string[], out: { text: string }): ChildProcess {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.on('data', (d: Buffer) => (out.text += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out.text += d.toString()));
  child.on('error', (err) => (out.text += `\n${String(err)}`));
  return child;
}

/**
 * Signs `zone` (e.g. `secure.test`) holding `records` (zone-file lines, names relative to the
 * zone) and starts nsd and unbound for it. Skips the test when a peer is missing (a failure
 * under PETREL_REQUIRE_PEERS=1).
 */
export async function startSignedZone(
  t: TestContext,
  zone: string,
  records: readonly string[],
): Promise<SignedZone | null> {
  for (const [cmd, pkg] of [
    [NSD, 'apt-get install nsd'],
    [UNBOUND, 'apt-get install unbound'],
    ['ldns-signzone', 'apt-get install ldnsutils'],
  ] as const) {
    if (requirePeer(t, cmd, pkg) === null) return null;
  }
  const dir = mkdtempSync(join(tmpdir(), 'petrel-dnssec-'));
  const out = { text: '' };
  const children: ChildProcess[] = [];
  let stopped: Promise<void> | null = null;
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      await Promise.all(children.map((c) => stopChild(c)));
      rmSync(dir, { recursive: true, force: true });
    })());
  t.after(stop);

  const zoneFile = join(dir, `${zone}.zone`);
  writeFileSync(
    zoneFile,
    [
      `$ORIGIN ${zone}.`,
      '$TTL 300',
      `@ IN SOA ns1.${zone}. hostmaster.${zone}. 1 3600 600 86400 300`,
      `@ IN NS ns1.${zone}.`,
      'ns1 IN A 127.0.0.1',
      ...records,
      '',
    ].join('\n'),
  );
  const run = (cmd: string, args: string[]): string =>
    execFileSync(cmd, args, { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  const ksk = run('ldns-keygen', ['-a', 'ECDSAP256SHA256', '-k', zone]);
  const zsk = run('ldns-keygen', ['-a', 'ECDSAP256SHA256', zone]);
  run('ldns-signzone', ['-n', zoneFile, ksk, zsk]);
  copyFileSync(join(dir, `${ksk}.ds`), join(dir, 'trust-anchor.ds'));

  const nsdPort = await freeDnsPort();
  writeFileSync(
    join(dir, 'nsd.conf'),
    [
      'server:',
      `  ip-address: 127.0.0.1@${nsdPort}`,
      `  port: ${nsdPort}`,
      '  do-ip6: no',
      '  username: ""',
      '  chroot: ""',
      `  zonesdir: "${dir}"`,
      '  database: ""',
      `  pidfile: "${dir}/nsd.pid"`,
      `  xfrdfile: "${dir}/xfrd.state"`,
      `  zonelistfile: "${dir}/zone.list"`,
      `  xfrdir: "${dir}"`,
      '  server-count: 1',
      'remote-control:',
      '  control-enable: no',
      'zone:',
      `  name: ${zone}`,
      `  zonefile: ${zone}.zone.signed`,
      '',
    ].join('\n'),
  );
  children.push(daemon(NSD, ['-d', '-c', join(dir, 'nsd.conf')], out));

  const port = await freeDnsPort();
  writeFileSync(
    join(dir, 'unbound.conf'),
    [
      'server:',
      `  interface: 127.0.0.1@${port}`,
      `  port: ${port}`,
      '  do-ip6: no',
      '  access-control: 127.0.0.0/8 allow',
      '  username: ""',
      '  chroot: ""',
      `  directory: "${dir}"`,
      `  pidfile: "${dir}/unbound.pid"`,
      '  use-syslog: no',
      '  logfile: ""',
      '  do-not-query-localhost: no',
      '  local-zone: "test." nodefault',
      '  module-config: "validator iterator"',
      `  trust-anchor-file: "${dir}/trust-anchor.ds"`,
      'remote-control:',
      '  control-enable: no',
      'stub-zone:',
      `  name: "${zone}"`,
      `  stub-addr: 127.0.0.1@${nsdPort}`,
      '',
    ].join('\n'),
  );
  children.push(daemon(UNBOUND, ['-d', '-c', join(dir, 'unbound.conf')], out));

  const server = `127.0.0.1:${port}`;
  const resolver = new Resolver({ timeout: 500, tries: 1 });
  resolver.setServers([server]);
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      await resolver.resolveSoa(zone);
      break;
    } catch {
      if (Date.now() > deadline || children.some((c) => c.exitCode !== null)) {
        await stop();
        throw new Error(`the signed zone ${zone} did not come up:\n${out.text}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return { server, log: () => out.text, stop };
}
