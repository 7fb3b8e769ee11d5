/**
 * A certificate authority for one test, made with openssl: certificates it issues for host
 * names, and self-signed ones it does not vouch for. Files live in a temporary folder removed
 * when the test ends.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { requirePeer } from './peers.js';

export interface CertFiles {
  /** PEM file paths. */
  readonly cert: string;
  readonly key: string;
}

export interface TestCa {
  /** The CA certificate's PEM file, and its text. */
  readonly certFile: string;
  readonly pem: string;
  /** A certificate for `name` (subjectAltName DNS:name) signed by this CA. */
  issue(name: string): CertFiles;
  /** A self-signed certificate for `name`, which nothing trusts. */
  selfSigned(name: string): CertFiles;
}

/** Makes a test CA, or skips the test without openssl (a failure under PETREL_REQUIRE_PEERS=1). */
export function makeTestCa(t: TestContext): TestCa | null {
  const openssl = requirePeer(t, 'openssl', 'apt-get install openssl');
  if (!openssl) return null;
  const dir = mkdtempSync(join(tmpdir(), 'petrel-ca-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const run = (...args: string[]): void => {
    execFileSync(openssl, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  };
  const certFile = join(dir, 'ca.crt');
  run(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    'ca.key',
    '-out',
    'ca.crt',
    '-days',
    '30',
    '-subj',
    '/CN=Petrel Test CA',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  );
  let serial = 0;
  const ext = (name: string): string => {
    const f = join(dir, `${name}.ext`);
    writeFileSync(f, `subjectAltName=DNS:${name}\nextendedKeyUsage=serverAuth\n`);
    return f;
  };
  return {
    certFile,
    pem: readFileSync(certFile, 'utf8'),
    issue(name) {
      const base = join(dir, `${name}.${++serial}`);
      run(
        'req',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        `${base}.key`,
        '-out',
        `${base}.csr`,
        '-subj',
        `/CN=${name}`,
      );
      run(
        'x509',
        '-req',
        '-in',
        `${base}.csr`,
        '-CA',
        'ca.crt',
        '-CAkey',
        'ca.key',
        '-set_serial',
        String(1000 + serial),
        '-out',
        `${base}.crt`,
        '-days',
        '30',
        '-extfile',
        ext(name),
      );
      return { cert: `${base}.crt`, key: `${base}.key` };
    },
    selfSigned(name) {
      const base = join(dir, `${name}.self.${++serial}`);
      run(
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        `${base}.key`,
        '-out',
        `${base}.crt`,
        '-days',
        '30',
        '-subj',
        `/CN=${name}`,
        '-addext',
        `subjectAltName=DNS:${name}`,
      );
      return { cert: `${base}.crt`, key: `${base}.key` };
    },
  };
}
