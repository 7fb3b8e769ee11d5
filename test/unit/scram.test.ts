import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createHmac, pbkdf2Sync } from 'node:crypto';
import { checkClientFinal, parseClientFirst, type ClientFirst } from '../../core/smtp/scram.js';

const hmac = (key: Buffer, data: string): Buffer => createHmac('sha256', key).update(data).digest();

/** The credentials of RFC 7677 §3's example: user "user", password "pencil". */
function pencil() {
  const salt = Buffer.from('W22ZaJ0SNY7soEsUEjb6gQ==', 'base64');
  const salted = pbkdf2Sync('pencil', salt, 4096, 32, 'sha256');
  return {
    salt,
    iterations: 4096,
    storedKey: createHash('sha256').update(hmac(salted, 'Client Key')).digest(),
    serverKey: hmac(salted, 'Server Key'),
  };
}

// RFC 7677 §3, the exchange as it is printed there.
const CLIENT_FIRST = 'n,,n=user,r=rOprNGfwEbeRWgbNEkqO';
const SERVER_NONCE = 'rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0';
const SERVER_FIRST = `r=${SERVER_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096`;
const CLIENT_FINAL = `c=biws,r=${SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=`;

describe('SCRAM-SHA-256, server side (RFC 7677)', () => {
  it('checks the proof of the RFC 7677 example and makes its server signature', () => {
    const first = parseClientFirst(CLIENT_FIRST) as ClientFirst;
    assert.deepEqual(first, {
      gs2Header: 'n,,',
      authzid: '',
      username: 'user',
      nonce: 'rOprNGfwEbeRWgbNEkqO',
      bare: 'n=user,r=rOprNGfwEbeRWgbNEkqO',
    });
    const server = { nonce: SERVER_NONCE, message: SERVER_FIRST };
    const signature = checkClientFinal(CLIENT_FINAL, first, server, pencil());
    assert.equal(signature?.toString('base64'), '6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=');
  });

  it('refuses a wrong proof, another nonce, and another channel-binding header', () => {
    const first = parseClientFirst(CLIENT_FIRST) as ClientFirst;
    const server = { nonce: SERVER_NONCE, message: SERVER_FIRST };
    const wrongProof = CLIENT_FINAL.replace('p=dHzb', 'p=dHza');
    assert.equal(checkClientFinal(wrongProof, first, server, pencil()), null);
    assert.equal(checkClientFinal(CLIENT_FINAL.replace('$k0', '$k1'), first, server, pencil()), null);
    assert.equal(checkClientFinal(CLIENT_FINAL.replace('c=biws', 'c=eSws'), first, server, pencil()), null);
    const other = { ...pencil(), storedKey: Buffer.alloc(32) };
    assert.equal(checkClientFinal(CLIENT_FINAL, first, server, other), null, 'other credentials');
  });

  it('reads escaped names and an authzid, and refuses what it does not support', () => {
    const first = parseClientFirst('n,a=b=3Dob,n=al=2Cice,r=abc') as ClientFirst;
    assert.equal(first.username, 'al,ice');
    assert.equal(first.authzid, 'b=ob');
    assert.equal(parseClientFirst('p=tls-unique,,n=user,r=abc'), 'channel binding is not supported');
    assert.equal(parseClientFirst('n,,m=ext,n=user,r=abc'), 'mandatory extensions are not supported');
    assert.equal(parseClientFirst('n,,n=us=er,r=abc'), 'bad user name');
    assert.equal(parseClientFirst('user,r=abc'), 'expected a GS2 header');
  });
});
