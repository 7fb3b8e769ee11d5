import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { Resolver } from 'node:dns/promises';
import { join } from 'node:path';
import { dkimVerify } from 'mailauth';
import { startDnsmasq } from '../harness/dnsmasq.js';
import {
  dkimpyArcSign,
  dkimpyArcVerify,
  dkimpySign,
  dkimpyVerify,
  requireDkimpy,
} from '../harness/dkimpy.js';
import { opendkimSign, opendkimVerify, requireOpendkim } from '../harness/opendkim.js';
import { recordText } from '../../plugins/dkim/dns-record.js';

/**
 * The independent DKIM and ARC implementations the tests lean on (dkimpy, OpenDKIM) do what
 * test/harness/dkimpy.ts and opendkim.ts promise, checked against each other and mailauth.
 */

const MESSAGE = Buffer.from(
  'From: Alice <alice@crepes.test>\r\nTo: bob@galettes.test\r\nSubject: peers\r\n' +
    'Date: Wed, 02 Dec 2026 05:00:00 +0000\r\nMessage-ID: <peers@crepes.test>\r\n\r\nHello, Bob.\r\n',
);

describe('DKIM and ARC test peers', () => {
  it('dkimpy and OpenDKIM sign what the other and mailauth verify; dkimpy seals an ARC set it validates', async (t) => {
    if (!(await requireDkimpy(t)) || !requireOpendkim(t)) return;
    const dir = mkdtempSync(join(tmpdir(), 'petrel-dkim-peers-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    const ed = generateKeyPairSync('ed25519').privateKey;
    const rsaPem = rsa.export({ type: 'pkcs8', format: 'pem' });
    const edPem = ed.export({ type: 'pkcs8', format: 'pem' });
    const rsaFile = join(dir, 'rsa.pem');
    writeFileSync(rsaFile, rsaPem, { mode: 0o600 });
    const dns = await startDnsmasq(t, {
      txt: [
        { name: 's1._domainkey.crepes.test', text: recordText(rsa) },
        { name: 'e1._domainkey.crepes.test', text: recordText(ed) },
        { name: 'arc._domainkey.relay.test', text: recordText(rsa) },
      ],
    });
    if (!dns) return;
    const r = new Resolver({ timeout: 2000, tries: 1 });
    r.setServers([dns.server]);
    const resolver = (name: string, type: string): Promise<string[][]> =>
      r.resolve(name, type) as Promise<string[][]>;

    for (const [selector, privateKey, algorithm] of [
      ['s1', rsaPem, 'rsa-sha256'],
      ['e1', edPem, 'ed25519-sha256'],
    ] as const) {
      const signed = await dkimpySign(MESSAGE, { domain: 'crepes.test', selector, privateKey, algorithm });
      const v = await dkimVerify(signed, { resolver });
      assert.equal(v.results[0]?.status.result, 'pass', `dkimpy ${algorithm} → mailauth`);
      assert.ok((await opendkimVerify(signed, dns.server)).ok, `dkimpy ${algorithm} → OpenDKIM`);
    }
    const byOpendkim = await opendkimSign(MESSAGE, {
      domain: 'crepes.test',
      selector: 's1',
      keyFile: rsaFile,
    });
    assert.deepEqual(await dkimpyVerify(byOpendkim, dns.server), [{ ok: true, error: null }]);

    const withResults = Buffer.concat([
      Buffer.from(
        'Authentication-Results: relay.test; dkim=pass header.d=crepes.test; spf=pass smtp.mailfrom=crepes.test\r\n',
      ),
      await dkimpySign(MESSAGE, { domain: 'crepes.test', selector: 's1', privateKey: rsaPem }),
    ]);
    const sealed = await dkimpyArcSign(withResults, {
      domain: 'relay.test',
      selector: 'arc',
      privateKey: rsaPem,
      srvId: 'relay.test',
    });
    assert.equal(sealed.added, 3, 'ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results');
    assert.equal((await dkimpyArcVerify(sealed.message, dns.server)).cv, 'pass');
    const notOurs = await dkimpyArcSign(withResults, {
      domain: 'relay.test',
      selector: 'arc',
      privateKey: rsaPem,
      srvId: 'other.test',
    });
    assert.equal(notOurs.added, 0, 'no Authentication-Results of that authserv-id, no seal');
  });
});
