import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { html } from '../../core/http/console/html.js';
import { filterQueue, messagePage, queuePage } from '../../core/http/console/queue-pages.js';
import type { QueueMessage } from '../../core/http/console/queue-client.js';
import { figures } from '../../core/http/console/rates.js';

const message = (over: Partial<QueueMessage> = {}): QueueMessage => ({
  id: 'Q1',
  sender: 'alice@example.test',
  receivedAt: '2026-01-01T00:00:00.000Z',
  size: 100,
  held: false,
  attempting: false,
  recipients: [
    {
      address: 'bob@dest.test',
      status: 'deferred',
      attempts: 1,
      nextAttemptAt: '2026-01-01T01:00:00.000Z',
      lastReply: { code: 451, enhanced: '4.7.1', text: 'Greylisted', remote: 'mx.dest.test [192.0.2.1]' },
      lastAttemptAt: '2026-01-01T00:00:01.000Z',
      transport: 'outbound',
    },
  ],
  ...over,
});

describe('console pages', () => {
  it('escapes every value in text and in attributes, and not a fragment twice', () => {
    const v = `"><script>alert('x')</script>&`;
    const out = html`<a title="${v}">${v}${html`<b>${v}</b>`}</a>`.text;
    assert.ok(!out.includes('<script>'));
    assert.ok(!out.includes(`"><`));
    assert.equal(out.match(/<b>/g)?.length, 1, 'the inner fragment is kept as HTML');
    assert.match(out, /&#60;script&#62;alert\(&#39;x&#39;\)&#60;\/script&#62;&#38;/);
  });

  it('shows a hostile sender, reply and Message-ID as text on the queue and message pages', () => {
    const hostile = message({
      sender: '"<script>x()</script>"@evil.test',
      origin: { messageId: '<img src=x onerror=y()>', client: { address: '192.0.2.9', port: 1 } },
      recipients: [
        {
          ...message().recipients[0]!,
          lastReply: { code: 451, enhanced: '4.0.0', text: '<iframe src=//evil>' },
        },
      ],
    });
    for (const page of [
      queuePage([hostile], { state: 'all', to: '', from: '', page: 1 }, 'csrf'),
      messagePage(hostile, 'csrf', null),
    ]) {
      assert.ok(!/<script|<img|<iframe/i.test(page), page);
    }
  });

  it('filters by state, by a part of a recipient or its domain, and by a part of the sender', () => {
    const all = [
      message({ id: 'A' }),
      message({ id: 'B', held: true, sender: 'carol@other.test' }),
      message({
        id: 'C',
        recipients: [{ ...message().recipients[0]!, address: 'dan@elsewhere.test', status: 'pending' }],
      }),
    ];
    const ids = (f: { state?: string; to?: string; from?: string }): string[] =>
      filterQueue(all, { state: 'all', to: '', from: '', page: 1, ...f }).map((m) => m.id);
    assert.deepEqual(ids({}), ['A', 'B', 'C']);
    assert.deepEqual(ids({ state: 'held' }), ['B']);
    assert.deepEqual(ids({ state: 'pending' }), ['C']);
    assert.deepEqual(ids({ to: 'ELSEWHERE' }), ['C']);
    assert.deepEqual(ids({ from: 'other.test' }), ['B']);
  });

  it('says why a deferred recipient waits: the last reply, who gave it, and the next attempt', () => {
    const page = messagePage(message(), 'csrf', null);
    assert.match(
      page,
      /Why it waits: deferred: 451 4\.7\.1 Greylisted from mx\.dest\.test \[192\.0\.2\.1\]; next attempt 2026-01-01T01:00:00\.000Z/,
    );
  });

  it('reads the counters summed over processes, delivered attempts apart from deferred ones', () => {
    const f = figures(
      [
        [
          {
            name: 'petrel_messages_accepted_total',
            help: '',
            type: 'counter',
            aggregator: 'sum',
            values: [{ value: 3, labels: { listener: 'mx' } }],
          },
        ],
        [
          {
            name: 'petrel_delivery_attempts_total',
            help: '',
            type: 'counter',
            aggregator: 'sum',
            values: [
              { value: 2, labels: { result: 'delivered', domain: 'a' } },
              { value: 5, labels: { result: 'deferred', domain: 'a' } },
            ],
          },
        ],
      ],
      0,
    );
    assert.equal(f.accepted, 3);
    assert.equal(f.delivered, 2);
    assert.equal(f.deferred, 5);
  });
});
