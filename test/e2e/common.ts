import assert from 'node:assert/strict';
import { accept, definePlugin, deny } from '../../core/index.js';
import type { CapturedMessage } from '../harness/server.js';

/** The one account the test auth plugin knows. */
export const USER = 'alice';
export const PASSWORD = 's3cret pass';

/** Accepts alice with her password; anyone else is refused with 535 5.7.8. */
export const aliceOnly = definePlugin({
  name: 'test-auth-alice',
  setup: () => ({
    async auth({ username, password }) {
      return username === USER && password === PASSWORD
        ? accept()
        : deny(535, '5.7.8', 'Authentication credentials invalid');
    },
  }),
});

/** The protocol name (RFC 3848) in the `with` clause of the stored message's first Received: field. */
export function receivedWith(m: CapturedMessage): string {
  const head = m.data.toString('utf8');
  assert.match(head, /^Received: /, 'the stored message starts with our Received: field');
  const w = /^Received: [^]*? with (\S+) id /.exec(head);
  assert.ok(w, `a "with" clause in ${JSON.stringify(head.slice(0, 300))}`);
  return w[1]!;
}
