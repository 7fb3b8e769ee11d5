import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { parsePath } from '../../core/message/address.js';

const opts = { utf8: false, allowNull: true, allowPostmaster: true };

describe('RFC 5321 path parsing', () => {
  it('parses a plain address and lower-cases the domain only', () => {
    const r = parsePath('<Bob.Smith@Hamburger.EDU>', opts);
    assert.ok(r.ok && r.address);
    assert.equal(r.address.local, 'Bob.Smith');
    assert.equal(r.address.domain, 'hamburger.edu');
    assert.equal(r.address.address, 'Bob.Smith@hamburger.edu');
  });

  it('returns the parameters after the path', () => {
    const r = parsePath('<a@b.test> SIZE=100 BODY=8BITMIME', opts);
    assert.ok(r.ok);
    assert.equal(r.rest, 'SIZE=100 BODY=8BITMIME');
  });

  it('unquotes a quoted local part and re-quotes it only when needed', () => {
    const r = parsePath('<"john \\"jj\\" smith"@example.test>', opts);
    assert.ok(r.ok && r.address);
    assert.equal(r.address.local, 'john "jj" smith');
    assert.equal(r.address.address, '"john \\"jj\\" smith"@example.test');
    const plain = parsePath('<"john"@example.test>', opts);
    assert.ok(plain.ok && plain.address);
    assert.equal(plain.address.address, 'john@example.test');
  });

  it('keeps a quoted > inside the local part', () => {
    const r = parsePath('<"a>b"@example.test>', opts);
    assert.ok(r.ok && r.address);
    assert.equal(r.address.local, 'a>b');
  });

  it('keeps but does not route by a source route', () => {
    const r = parsePath('<@relay.test,@other.test:user@final.test>', opts);
    assert.ok(r.ok && r.address);
    assert.equal(r.address.address, 'user@final.test');
    assert.deepEqual(r.address.route, ['relay.test', 'other.test']);
  });

  it('accepts address literals and refuses bad ones', () => {
    for (const good of ['<a@[192.0.2.1]>', '<a@[IPv6:2001:db8::1]>'])
      assert.ok(parsePath(good, opts).ok, good);
    for (const bad of ['<a@[192.0.2.256]>', '<a@[IPv6:zz::1]>', '<a@[tag:x]>'])
      assert.ok(!parsePath(bad, opts).ok, bad);
    const r = parsePath('<a@[192.0.2.1]>', opts);
    assert.ok(r.ok && r.address?.literal);
  });

  it('refuses UTF-8 without SMTPUTF8 with reason utf8, and accepts IDN with it', () => {
    const r = parsePath('<jos\u00e9@b\u00fccher.test>', opts);
    assert.ok(!r.ok && r.reason === 'utf8');
    const u = parsePath('<jos\u00e9@B\u00fccher.test>', { ...opts, utf8: true });
    assert.ok(u.ok && u.address);
    assert.equal(u.address.domain, 'b\u00fccher.test');
    assert.equal(u.address.domainAscii, 'xn--bcher-kva.test');
    assert.ok(u.address.utf8);
  });

  it('enforces RFC 5321 length limits', () => {
    assert.ok(!parsePath(`<${'a'.repeat(65)}@example.test>`, opts).ok, 'local part over 64 octets');
    const long = parsePath(`<a@${Array.from({ length: 5 }, () => 'b'.repeat(60)).join('.')}.test>`, opts);
    assert.ok(!long.ok && long.reason === 'length');
  });

  it('treats <> as the null path only where allowed, and <postmaster> specially', () => {
    const n = parsePath('<>', opts);
    assert.ok(n.ok && n.address === null);
    assert.ok(!parsePath('<>', { ...opts, allowNull: false }).ok);
    const p = parsePath('<Postmaster>', opts);
    assert.ok(p.ok && p.address?.local === 'postmaster' && p.address.domain === '');
  });

  it('refuses the tricks that dress up a relay', () => {
    for (const bad of [
      '<user@remote.test.>',
      '<a b@x.test>',
      '<a@x..test>',
      '<@x.test>',
      '<a@-x.test>',
      '<.a@x.test>',
      'a@x.test',
      '<a@x.test',
    ]) {
      assert.ok(!parsePath(bad, opts).ok, bad);
    }
  });
});
