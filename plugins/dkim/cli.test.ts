import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { CLI, NODE } from '../../test/e2e/cli.js';
import { run, type RunResult } from '../../test/e2e/run.js';
import { startDnsmasq } from '../../test/harness/dnsmasq.js';
import { opendkimTestkey, opendkimVerify, requireOpendkim } from '../../test/harness/opendkim.js';
import { dkimpySign, requireDkimpy } from '../../test/harness/dkimpy.js';
import { recordText } from './dns-record.js';

/** `petrel dkim keygen` and `petrel dkim check`, run as a user would, against dnsmasq and opendkim-testkey. */

function project(t: { after(fn: () => void): void }): {
  dir: string;
  config: string;
  write(dns?: string): void;
} {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-cli-dkim-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'petrel.config.yaml');
  const write = (dns?: string): void =>
    writeFileSync(
      config,
      stringify({
        hostname: 'mx.crepes.test',
        listeners: [{ kind: 'smtp', address: '127.0.0.1', port: 0 }],
        ...(dns ? { dns: { servers: [dns], timeout: 2000 } } : {}),
        plugins: ['queue', { name: 'dkim', config: { domains: { 'crepes.test': ['s1', 'e1'] } } }],
      }),
    );
  write();
  return { dir, config, write };
}

const dkim = (p: { dir: string; config: string }, ...args: string[]): Promise<RunResult> =>
  run(NODE, [CLI, 'dkim', ...args, '--config', p.config], { cwd: p.dir, timeoutMs: 30_000 });

/** The TXT value of a printed zone line: its quoted strings, joined as a verifier joins them. */
function txtOf(zoneLine: string): { name: string; strings: string[] } {
  const name = zoneLine.split(/\s/)[0]!.replace(/\.$/, '');
  const strings = [...zoneLine.matchAll(/"([^"]*)"/g)].map((m) => m[1]!);
  return { name, strings };
}

describe('petrel dkim', () => {
  it('keygen writes a 0600 key where the config reads it, never overwrites, and prints records OpenDKIM accepts', async (t) => {
    if (!requireOpendkim(t)) return;
    const p = project(t);
    const rsa = await dkim(p, 'keygen', '--domain', 'crepes.test', '--selector', 's1');
    assert.equal(rsa.code, 0, rsa.stderr);
    const ed = await dkim(p, 'keygen', '--domain', 'crepes.test', '--selector', 'e1', '--type', 'ed25519');
    assert.equal(ed.code, 0, ed.stderr);
    const rsaFile = join(p.dir, 'dkim', 'crepes.test', 's1.pem');
    const edFile = join(p.dir, 'dkim', 'crepes.test', 'e1.pem');
    assert.equal(statSync(rsaFile).mode & 0o777, 0o600);
    assert.equal(statSync(edFile).mode & 0o777, 0o600);
    assert.match(rsa.stderr, /wrote an RSA-2048 private key to .*s1\.pem/);

    // The RSA record is longer than one TXT string may be: split into strings of at most 255.
    const rsaTxt = txtOf(rsa.stdout.trim());
    assert.equal(rsaTxt.name, 's1._domainkey.crepes.test');
    assert.ok(rsaTxt.strings.length > 1 && rsaTxt.strings.every((s) => s.length <= 255), rsa.stdout);
    assert.match(rsaTxt.strings.join(''), /^v=DKIM1; k=rsa; p=[A-Za-z0-9+/]+=*$/);
    const edTxt = txtOf(ed.stdout.trim());
    assert.match(edTxt.strings.join(''), /^v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=$/);

    const before = readFileSync(rsaFile);
    const again = await dkim(p, 'keygen', '--domain', 'crepes.test', '--selector', 's1');
    assert.equal(again.code, 73);
    assert.match(again.stderr, /exists; keygen never overwrites a key/);
    assert.deepEqual(readFileSync(rsaFile), before, 'the key is untouched');

    const dns = await startDnsmasq(t, {
      txt: [
        { name: rsaTxt.name, text: rsaTxt.strings.join('') },
        { name: edTxt.name, text: edTxt.strings.join('') },
      ],
    });
    if (!dns) return;
    const r = await opendkimTestkey({
      domain: 'crepes.test',
      selector: 's1',
      keyFile: rsaFile,
      dns: dns.server,
    });
    assert.ok(r.ok, `opendkim-testkey: ${r.output}`);
    // opendkim-testkey reads RSA keys only ("EVP_PKEY_get1_RSA() failed" for Ed25519): the
    // Ed25519 record is shown to hold the key by a message dkimpy signs with the key file and
    // OpenDKIM verifies against the record.
    if (!(await requireDkimpy(t))) return;
    const signed = await dkimpySign(
      Buffer.from('From: alice@crepes.test\r\nSubject: key check\r\n\r\nHi\r\n'),
      {
        domain: 'crepes.test',
        selector: 'e1',
        privateKey: readFileSync(edFile),
        algorithm: 'ed25519-sha256',
      },
    );
    const verdict = await opendkimVerify(signed, dns.server);
    assert.ok(verdict.ok, verdict.output);
  });

  it('check confirms a published key, and says plainly when the record is missing, different or malformed', async (t) => {
    const p = project(t);
    for (const selector of ['s1', 'e1', 'other', 'bad', 'absent']) {
      const r = await dkim(p, 'keygen', '--domain', 'crepes.test', '--selector', selector);
      assert.equal(r.code, 0, r.stderr);
      if (selector !== 's1') continue;
      assert.match(r.stderr, /run: petrel dkim check --domain crepes\.test --selector s1/);
    }
    // `check` reads the same file; the record is made from it as keygen makes it.
    const published = (selector: string): string =>
      recordText(createPrivateKey(readFileSync(join(p.dir, 'dkim', 'crepes.test', `${selector}.pem`))));
    const stranger = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    const dns = await startDnsmasq(t, {
      txt: [
        { name: 's1._domainkey.crepes.test', text: published('s1') },
        { name: 'e1._domainkey.crepes.test', text: published('e1') },
        { name: 'other._domainkey.crepes.test', text: recordText(stranger) },
        { name: 'bad._domainkey.crepes.test', text: 'v=DKIM1; k=rsa; p=not base64!' },
      ],
    });
    if (!dns) return;
    p.write(dns.server);

    const ok = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 's1');
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^ok: s1\._domainkey\.crepes\.test publishes the rsa key in .*s1\.pem/);
    const okEd = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 'e1');
    assert.equal(okEd.code, 0, okEd.stderr);

    const other = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 'other');
    assert.equal(other.code, 1);
    assert.match(
      other.stderr,
      /other\._domainkey\.crepes\.test publishes a different rsa key than the one in/,
    );

    const bad = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 'bad');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /bad\._domainkey\.crepes\.test is malformed \(p= is not base64\)/);

    const absent = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 'absent');
    assert.equal(absent.code, 1);
    assert.match(absent.stderr, /no TXT record at absent\._domainkey\.crepes\.test \(asked 127\.0\.0\.1/);

    const noKey = await dkim(p, 'check', '--domain', 'crepes.test', '--selector', 'never');
    assert.equal(noKey.code, 66);
    assert.match(noKey.stderr, /cannot read the key .*never\.pem: ENOENT/);

    const usage = await dkim(p, 'check', '--domain', 'crepes.test');
    assert.equal(usage.code, 64);
    assert.match(usage.stderr, /--selector is required/);
  });
});
