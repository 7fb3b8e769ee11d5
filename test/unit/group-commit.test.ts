/**
 * The embedded State store's group commit (core/services/group-commit.ts): which writes share a
 * transaction, how one write's refusal and the store's failure are answered, and how the spacing
 * between commits follows the event loop's load. Batches are compared, never times.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { GroupCommit, Spacing, type BatchResult } from '../../core/services/group-commit.js';

/** A GroupCommit over strings whose commits are recorded, with a fixed spacing. */
function recorded(
  spacingMs: number,
  answer: (op: string) => BatchResult = (op) => ({ ok: true, value: op }),
) {
  const batches: string[][] = [];
  const group = new GroupCommit<string>(
    (ops) => {
      batches.push([...ops]);
      return ops.map(answer);
    },
    { current: () => spacingMs },
  );
  return { group, batches };
}

describe('group commit', () => {
  it('commits the writes of one turn together, and a lone write at the end of its turn', async () => {
    const { group, batches } = recorded(0);
    const first = await Promise.all([group.run('a'), group.run('b')]);
    assert.deepEqual(first, ['a', 'b']);
    assert.equal(await group.run('c'), 'c');
    assert.deepEqual(batches, [['a', 'b'], ['c']]);
  });

  it('while spaced, gathers the writes of several turns into the next commit', async () => {
    const { group, batches } = recorded(50);
    await group.run('a');
    const b = group.run('b');
    await nextTurn();
    const c = group.run('c');
    await nextTurn();
    assert.deepEqual(batches, [['a']], 'not committed before the spacing has passed');
    assert.deepEqual(await Promise.all([b, c]), ['b', 'c']);
    assert.deepEqual(batches, [['a'], ['b', 'c']]);
  });

  it('rejects a refused write alone, and every write of a batch the store failed', async () => {
    const refusal = new TypeError('not a number');
    const { group } = recorded(0, (op) =>
      op === 'bad' ? { ok: false, err: refusal } : { ok: true, value: op },
    );
    const [good, bad] = await Promise.allSettled([
      group.run('good'),
      group.run('bad', (e) => ({ wrapped: e })),
    ]);
    assert.deepEqual(good, { status: 'fulfilled', value: 'good' });
    assert.deepEqual(bad, { status: 'rejected', reason: { wrapped: refusal } });

    const full = new Error('database or disk is full');
    const failing = new GroupCommit<string>(
      () => {
        throw full;
      },
      { current: () => 0 },
    );
    const both = await Promise.allSettled([failing.run('x'), failing.run('y')]);
    assert.deepEqual(
      both.map((r) => r.status === 'rejected' && r.reason),
      [full, full],
    );
  });
});

describe('commit spacing', () => {
  /** A Spacing over a simulated loop: each step of `every` ms passes with the loop `busy` of it. */
  function driven() {
    let now = 0;
    let active = 0;
    let idle = 0;
    let asked = 0;
    const spacing = new Spacing(() => {
      asked++;
      return { active, idle };
    }, 0);
    return {
      at: (busy: number, steps = 1, every = 20): number[] => {
        const seen: number[] = [];
        for (let i = 0; i < steps; i++) {
          now += every;
          active += busy * every;
          idle += (1 - busy) * every;
          seen.push(spacing.current(now));
        }
        return seen;
      },
      asked: () => asked,
    };
  }

  it('is none while the loop has time to spare, and 4 ms as soon as it is busy', () => {
    const s = driven();
    assert.deepEqual(s.at(0.3, 3), [0, 0, 0]);
    assert.deepEqual(s.at(0.8, 3), [0, 0, 0], 'busy 80%: time to spare');
    assert.deepEqual(s.at(0.95, 2), [4, 4]);
  });

  it('stays while the loop is neither idle nor busy, and halves every 50 ms back to none when it idles', () => {
    const s = driven();
    s.at(0.95);
    assert.deepEqual(s.at(0.7, 6), [4, 4, 4, 4, 4, 4]);
    assert.deepEqual(s.at(0.2, 10, 25), [4, 2, 2, 1, 1, 0.5, 0.5, 0.25, 0.25, 0]);
  });

  it('does not drift down on a lull shorter than 50 ms', () => {
    const s = driven();
    s.at(0.95);
    assert.deepEqual(s.at(0.1, 2), [4, 4], 'not yet 50 ms since the last look at idleness');
    assert.deepEqual(s.at(0.95), [4], 'busy again: the lull is forgotten');
    assert.deepEqual(s.at(0.4, 3), [4, 4, 2]);
  });

  it('after a quiet spell, starts again with none', () => {
    const s = driven();
    s.at(0.95);
    assert.deepEqual(s.at(0.01, 1, 1000), [0], 'a second without writes: 20 halvings');
  });

  it('is reconsidered at most once per 20 ms, however often it is asked', () => {
    const s = driven();
    const before = s.asked();
    assert.deepEqual(s.at(0.95, 19, 1), Array(19).fill(0), 'nothing reconsidered within 20 ms');
    assert.equal(s.asked(), before);
    assert.deepEqual(s.at(0.95, 1, 1), [4]);
    assert.equal(s.asked(), before + 1);
  });
});
