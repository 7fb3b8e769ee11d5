import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, verify } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { checkRecord, parseTagList, recordText, splitTxt, zoneLine } from './dns-record.js';
import { signingDomainFor } from './keys.js';
import { fromDomain, signCopy } from './sign.js';
import { SigningThreads } from './signer.js';
import { MessageCopy } from '../../core/index.js';
import { tmpdir } from 'node:os';
import { dkimVerify } from 'mailauth';
import { readHead, rejoined } from './mark.js';
import { Readable } from 'node:stream';
import { dkimConfig } from './config.js';

describe('dkim: config', () => {
  it('keeps domains as lower-case A-labels and refuses a default domain without keys', () => {
    const ok = dkimConfig.parse({ domains: { 'Crêpes.TEST.': ['s1'] }, defaultDomain: 'crêpes.test' });
    assert.deepEqual(Object.keys(ok.domains), ['xn--crpes-isa.test']);
    assert.equal(ok.defaultDomain, 'xn--crpes-isa.test');
    assert.equal(ok.onError, 'send-unsigned');
    const bad = dkimConfig.safeParse({ domains: { 'crepes.test': ['s1'] }, defaultDomain: 'galettes.test' });
    assert.ok(!bad.success);
    assert.deepEqual(bad.error.issues[0]?.path, ['defaultDomain']);
    assert.ok(!dkimConfig.safeParse({ domains: { 'crepes.test': ['bad selector'] } }).success);
    assert.ok(!dkimConfig.safeParse({ trustedNetworks: ['10.0.0.0/33'] }).success);
  });
});

describe('dkim: the From: domain', () => {
  const of = (from: string): string | null =>
    fromDomain(Buffer.from(`To: x@y.test\r\nFrom: ${from}\r\n\r\nbody`));
  it('reads the address in angle brackets, past quoted strings and comments that hold @ or <', () => {
    assert.equal(of('Alice <alice@Crepes.TEST>'), 'crepes.test');
    assert.equal(of('"bob@evil.test <x@evil.test>" <alice@crepes.test>'), 'crepes.test');
    assert.equal(of('alice@crepes.test (from evil@evil.test)'), 'crepes.test');
    assert.equal(of('alice@crepes.test.'), 'crepes.test');
  });
  it('gives an A-label for an internationalised domain', () => {
    assert.equal(of('李雷 <li@例子.test>'), 'xn--fsqu00a.test');
  });
  it('gives none for no From:, two From: fields, or no address', () => {
    assert.equal(fromDomain(Buffer.from('Subject: x\r\n\r\n')), null);
    assert.equal(fromDomain(Buffer.from('From: a@crepes.test\r\nFrom: b@evil.test\r\n\r\n')), null);
    assert.equal(of('undisclosed'), null);
  });
});

describe('dkim: choosing the signing domain', () => {
  const keys = new Set(['crepes.test', 'other.test']);
  it('takes the From: domain, then its parents (not the top-level domain), then the default', () => {
    const opts = { parentDomains: true, defaultDomain: 'other.test' };
    assert.equal(signingDomainFor('crepes.test', keys, opts), 'crepes.test');
    assert.equal(signingDomainFor('a.b.crepes.test', keys, opts), 'crepes.test');
    assert.equal(signingDomainFor('galettes.test', keys, opts), 'other.test');
    assert.equal(signingDomainFor(null, keys, opts), 'other.test');
    assert.equal(signingDomainFor('test', new Set(['test']), opts), 'test');
    assert.equal(signingDomainFor('a.test', new Set(['test']), { parentDomains: true }), null);
  });
  it('without parentDomains or a default, only the exact domain', () => {
    assert.equal(signingDomainFor('news.crepes.test', keys, { parentDomains: false }), null);
  });
});

describe('dkim: key records', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ed = generateKeyPairSync('ed25519').privateKey;
  it('splits a TXT value into strings of at most 255 octets (RFC 1035 §3.3.14)', () => {
    const text = recordText(rsa);
    const parts = splitTxt(text);
    assert.equal(parts.join(''), text);
    assert.ok(parts.length === 2 && parts.every((p) => p.length <= 255));
    assert.match(
      zoneLine('crepes.test', 's1', text),
      /^s1\._domainkey\.crepes\.test\. IN TXT \( "v=DKIM1; k=rsa; p=.{237}"\n\s+".+" \)$/,
    );
    assert.match(
      zoneLine('crepes.test', 'e1', recordText(ed)),
      /^e1\._domainkey\.crepes\.test\. IN TXT "v=DKIM1; k=ed25519; p=.{44}"$/,
    );
  });
  it('matches a record to its key, across strings, and names what is wrong otherwise', () => {
    const text = recordText(rsa);
    assert.deepEqual(checkRecord([splitTxt(text)], rsa), { kind: 'match', k: 'rsa' });
    assert.deepEqual(checkRecord([[recordText(ed)]], ed), { kind: 'match', k: 'ed25519' });
    assert.deepEqual(checkRecord([[recordText(ed)]], rsa), { kind: 'mismatch', k: 'ed25519' });
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    assert.deepEqual(checkRecord([[recordText(other)]], rsa), { kind: 'mismatch', k: 'rsa' });
    assert.deepEqual(checkRecord([['v=DKIM1; p=']], rsa), { kind: 'revoked' });
    assert.deepEqual(checkRecord([[text], [text]], rsa), { kind: 'several' });
    assert.equal(checkRecord([['v=DKIM1; k=rsa']], rsa).kind, 'malformed');
    assert.equal(checkRecord([['v=spf1 -all']], rsa).kind, 'malformed');
    assert.equal(checkRecord([['v=DKIM1; k=ed25519; p=AAAA']], ed).kind, 'malformed');
  });
  it('reads a tag list, refusing a tag given twice (RFC 6376 §3.2)', () => {
    assert.deepEqual(
      [...parseTagList('v=DKIM1; k=rsa;\r\n p=ab cd')!],
      [
        ['v', 'DKIM1'],
        ['k', 'rsa'],
        ['p', 'abcd'],
      ],
    );
    assert.equal(parseTagList('p=a; p=b'), null);
  });
});

describe('dkim: the mark', () => {
  const read = async (chunks: string[]): Promise<{ marked: boolean; text: string }> => {
    const source = Readable.from(chunks.map((c) => Buffer.from(c)));
    const head = await readHead(source);
    const out: Buffer[] = [];
    for await (const c of rejoined(head, source)) out.push(c as Buffer);
    return { marked: head.marked, text: Buffer.concat(out).toString() };
  };
  const received =
    'Received: from a (a [192.0.2.1])\r\n\tby mx.test (Petrel) with ESMTP id 1;\r\n\tWed, 02 Dec 2026 05:00:00 +0000\r\n';
  const rest = 'From: alice@crepes.test\r\nSubject: x\r\n\r\nbody\r\n';

  it('counts above the server’s Received: field, and is taken out of the message', async () => {
    const r = await read([`X-Other: 1\r\nPetrel-DKIM: sign\r\n${received}${rest}`]);
    assert.equal(r.marked, true);
    assert.equal(r.text, `X-Other: 1\r\n${received}${rest}`);
  });
  it('is found across chunk boundaries', async () => {
    const whole = `Petrel-DKIM: sign\r\n${received}${rest}`;
    const r = await read(whole.match(/[^]{1,5}/g)!);
    assert.equal(r.marked, true);
    assert.equal(r.text, `${received}${rest}`);
  });
  it('does not count below the Received: field, nor inside another field, and is then left alone', async () => {
    for (const text of [
      `${received}Petrel-DKIM: sign\r\n${rest}`,
      `X-Note: Petrel-DKIM: sign\r\n${received}${rest}`,
      `Subject: no received field\r\n\r\nPetrel-DKIM: sign\r\n`,
    ]) {
      const r = await read([text]);
      assert.equal(r.marked, false, text);
      assert.equal(r.text, text);
    }
  });
});

describe('dkim: signing, checked by mailauth', () => {
  it('signs CRLF, bare-LF, 8-bit, NBSP and empty bodies, whatever the chunking, in memory or not, so that they verify', async (t) => {
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    const key = {
      domain: 'crepes.test',
      selector: 's1',
      algorithm: 'rsa-sha256' as const,
      key: rsa,
      file: '',
    };
    const zone = new Map([['s1._domainkey.crepes.test', [[recordText(rsa)]]]]);
    const resolver = async (name: string): Promise<string[][]> => {
      const r = zone.get(name);
      if (r) return r;
      throw Object.assign(new Error('not found'), { code: 'ENOTFOUND' });
    };
    const crlf = 'From: alice@crepes.test\r\nSubject: lines\r\n\r\nfirst  \r\nsecond\t\r\n\r\n';
    const signer = new SigningThreads(1, 10);
    t.after(() => signer.close());
    const head = 'From: alice@crepes.test\r\nSubject: a subject folded\r\n\tover  two lines \r\n';
    const messages = [
      Buffer.from(crlf),
      Buffer.from(crlf.replace(/\r\n/g, '\n')),
      Buffer.from(crlf.replace('second\t\r\n', 'second\t\n')),
      // Latin-1 8-bit octets, UTF-8 NBSP next to spaces, an empty body, no body at all.
      Buffer.from(`${head}\r\ncaf\xe9 cr\xe8me \t\r\n\r\n\r\n`, 'latin1'),
      Buffer.from(`${head}\r\nnon\u00a0breaking \u00a0 space\u00a0\r\n`),
      Buffer.from(`${head}\r\n`),
      Buffer.from(head),
    ];
    for (const whole of messages) {
      const text = whole.toString('latin1');
      // One chunk, and chunks of 3 octets (CR and LF apart at some boundaries); the whole copy
      // in memory, or only the first 64 octets with the rest in a file.
      for (const [size, memoryLimit] of [
        [whole.length, 1 << 20],
        [3, 1 << 20],
        [3, 64],
      ] as const) {
        const chunks: Buffer[] = [];
        for (let i = 0; i < whole.length; i += size) chunks.push(whole.subarray(i, i + size));
        const copy = await MessageCopy.of(chunks.slice(1), {
          memoryLimit,
          tempDir: tmpdir(),
          first: chunks[0]!,
        });
        const { signatures, failures } = await signCopy(copy, {
          keys: [key],
          signer,
          headers: ['From', 'Subject'],
          oversign: ['From'],
        });
        assert.deepEqual(failures, []);
        const v = await dkimVerify(Buffer.concat([signatures, whole]), { resolver });
        await copy.discard();
        assert.equal(
          v.results[0]?.status.result,
          'pass',
          `${JSON.stringify(text)} in chunks of ${size}, ${memoryLimit} in memory`,
        );
        // Folded into lines a reader can take (RFC 5322 §2.1.1: 78 characters).
        for (const line of signatures.toString().split('\r\n')) assert.ok(line.length <= 78, line);
      }
    }
  });
});

describe('dkim: signing threads', () => {
  it('signs with RSA and Ed25519 on lower-priority threads, in turn, and says when it cannot', async () => {
    const signer = new SigningThreads(2, 10);
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const ed = generateKeyPairSync('ed25519');
    const data = Buffer.from('from:alice@crepes.test\r\ndkim-signature:v=1; b=');
    const sigs = await Promise.all([signer.sign(rsa.privateKey, data), signer.sign(ed.privateKey, data)]);
    assert.ok(verify('sha256', data, rsa.publicKey, sigs[0]!), 'RSA-SHA256 over the data');
    assert.ok(
      verify(null, createHash('sha256').update(data).digest(), ed.publicKey, sigs[1]!),
      'Ed25519 over its digest',
    );
    // Both threads run below the event loop's priority (Linux: `nice` in /proc/<pid>/task/<tid>/stat).
    const niceOf = (tid: string): number =>
      Number(readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').split(') ')[1]!.split(' ')[16]);
    const nices = readdirSync('/proc/self/task').map(niceOf);
    assert.equal(nices.filter((n) => n === 10).length, 2, `two threads at nice 10: ${nices.join(' ')}`);
    // A key that cannot sign rejects with the reason, and the thread goes on signing.
    const dh = generateKeyPairSync('x25519');
    await assert.rejects(signer.sign(dh.privateKey, data));
    assert.ok(verify('sha256', data, rsa.publicKey, await signer.sign(rsa.privateKey, data)));
    await signer.close();
    await assert.rejects(signer.sign(rsa.privateKey, data), /closed/);
  });
});
