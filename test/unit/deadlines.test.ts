/**
 * The hook runner's deadlines (core/hooks/deadlines.ts): each call's `expire` runs once its time is
 * up unless the call ended first, whatever order calls end in, and nothing is left waiting once
 * no call is in flight.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { Deadlines } from '../../core/hooks/deadlines.js';

const timers = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;

describe('hook deadlines', () => {
  it('expires the calls still in flight when their time is up, and only those', async () => {
    const deadlines = new Deadlines();
    const expired: string[] = [];
    const started = performance.now();
    const at: Record<string, number> = {};
    const add = (name: string, ms: number) =>
      deadlines.add(ms, () => {
        expired.push(name);
        at[name] = performance.now() - started;
      });
    const a = add('a', 60);
    const b = add('b', 60);
    const c = add('c', 60);
    const short = add('short', 20);
    const ended = add('ended', 20);
    assert.equal(deadlines.end(b, 60), true, 'ended in time');
    assert.equal(deadlines.end(ended, 20), true);
    await sleep(120);
    assert.deepEqual(expired, ['short', 'a', 'c']);
    assert.ok(at.short! >= 19 && at.a! >= 59, `no earlier than their time: ${JSON.stringify(at)}`);
    assert.equal(deadlines.end(a, 60), false, 'too late: it had expired');
    assert.equal(deadlines.end(c, 60), false);
    assert.equal(deadlines.end(short, 20), false);
    assert.equal(deadlines.end(b, 60), false, 'ending twice is a no-op');
  });

  it('keeps one timer per timeout length, cleared once no call of that length is in flight', async () => {
    const deadlines = new Deadlines();
    const before = timers();
    const calls = Array.from({ length: 100 }, () => deadlines.add(30_000, () => assert.fail('expired')));
    const other = deadlines.add(10_000, () => assert.fail('expired'));
    assert.equal(timers(), before + 2, 'one per length, not one per call');
    // Ended out of order, the oldest last.
    for (const d of calls.slice(1).reverse()) deadlines.end(d, 30_000);
    assert.equal(timers(), before + 2);
    deadlines.end(calls[0]!, 30_000);
    deadlines.end(other, 10_000);
    assert.equal(timers(), before, 'nothing keeps the process waiting');
    // A call after the quiet moment is timed again.
    let fired = false;
    deadlines.add(10, () => (fired = true));
    await sleep(40);
    assert.equal(fired, true);
  });
});
