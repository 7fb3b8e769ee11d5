import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeAddress } from '../../core/index.js';
import { loadSecrets, Srs } from './srs.js';

const DAY = 86_400_000;
const at = (now: number) => () => now;
const T0 = Date.UTC(2026, 11, 2);
const alice = makeAddress('alice', 'example.org');

describe('srs: SRS0 and SRS1 addresses', () => {
  const srs = new Srs({ secrets: ['current secret'], domain: 'fwd.test', maxAgeDays: 21, now: at(T0) });

  it('rewrites a sender to SRS0 at our domain and reads it back, whatever the case on the way', () => {
    const out = srs.forward(alice);
    assert.match(out.address, /^SRS0=[a-z2-7]{8}=[a-z2-7]{2}=example\.org=alice@fwd\.test$/);
    const back = srs.reverse(out.local.toUpperCase());
    assert.ok(back.ok);
    assert.equal(back.address.address.toLowerCase(), 'alice@example.org');
    const same = srs.reverse(out.local);
    assert.ok(same.ok && same.address.address === 'alice@example.org', 'unchanged, it reads back exactly');
  });

  it('keeps a local part with "=" and "+" whole', () => {
    const odd = makeAddress('a=b+c', 'example.org');
    const back = srs.reverse(srs.forward(odd).local);
    assert.ok(back.ok && back.address.address === 'a=b+c@example.org');
  });

  it('refuses a changed hash, a changed payload, and an address older than maxAge', () => {
    const made = srs.forward(alice).local;
    assert.deepEqual(srs.reverse(made.replace(/^SRS0=[a-z2-7]{8}/, 'SRS0=aaaaaaaa')), {
      ok: false,
      reason: 'hash',
    });
    assert.deepEqual(srs.reverse(made.replace('=alice', '=mallory')), { ok: false, reason: 'hash' });
    const later = new Srs({
      secrets: ['current secret'],
      domain: 'fwd.test',
      maxAgeDays: 21,
      now: at(T0 + 22 * DAY),
    });
    assert.deepEqual(later.reverse(made), { ok: false, reason: 'expired' });
    const stillOk = new Srs({
      secrets: ['current secret'],
      domain: 'fwd.test',
      maxAgeDays: 21,
      now: at(T0 + 21 * DAY),
    });
    assert.equal(stillOk.reverse(made).ok, true);
  });

  it('accepts addresses made with the previous secret during a rotation, and signs with the first', () => {
    const old = new Srs({ secrets: ['old secret'], domain: 'fwd.test', maxAgeDays: 21, now: at(T0) });
    const rotated = new Srs({
      secrets: ['new secret', 'old secret'],
      domain: 'fwd.test',
      maxAgeDays: 21,
      now: at(T0),
    });
    const made = old.forward(alice).local;
    assert.equal(rotated.reverse(made).ok, true);
    assert.equal(old.reverse(rotated.forward(alice).local).ok, false, 'new addresses use the new secret');
    assert.equal(
      new Srs({ secrets: ['new secret'], domain: 'fwd.test', maxAgeDays: 21 }).reverse(made).ok,
      false,
    );
  });

  it("turns another forwarder's SRS0 into SRS1 that leads back to that forwarder, and re-hashes an SRS1", () => {
    const first = new Srs({ secrets: ['first'], domain: 'first.test', maxAgeDays: 21, now: at(T0) });
    const srs0 = first.forward(alice);
    const srs1 = srs.forward(srs0);
    assert.match(
      srs1.address,
      /^SRS1=[a-z2-7]{8}=first\.test==[a-z2-7]{8}=[a-z2-7]{2}=example\.org=alice@fwd\.test$/,
    );
    const back = srs.reverse(srs1.local);
    assert.ok(back.ok);
    assert.equal(back.address.address, srs0.address, 'back to the first forwarder');
    const third = new Srs({ secrets: ['third'], domain: 'third.test', maxAgeDays: 21, now: at(T0) });
    const again = third.forward(srs1);
    assert.match(again.address, /^SRS1=[a-z2-7]{8}=first\.test==/, 'the first hop stays');
    const fromThird = third.reverse(again.local);
    assert.ok(fromThird.ok && fromThird.address.address === srs0.address);
    assert.equal(srs.reverse(again.local).ok, false, 'each forwarder checks only its own hash');
  });

  it('leaves a sender at our own domain alone', () => {
    const own = makeAddress('bob', 'fwd.test');
    assert.equal(srs.forward(own), own);
  });
});

describe('srs: the secret file', () => {
  it('is created once with a random secret, mode 0600, even by several processes at once', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-srs-'));
    try {
      const file = join(dir, 'spool', 'srs.secret');
      const all = await Promise.all([loadSecrets(file), loadSecrets(file), loadSecrets(file)]);
      assert.equal(all[0]!.length, 1);
      assert.match(all[0]![0]!, /^[0-9a-f]{64}$/);
      assert.ok(
        all.every((s) => s[0] === all[0]![0]),
        'every reader got the same secret',
      );
      assert.equal(statSync(file).mode & 0o777, 0o600);
      assert.match(readFileSync(file, 'utf8'), /^# SRS secrets/);
      assert.deepEqual(await loadSecrets(file), all[0], 'read back, not replaced');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
