/**
 * The benchmark's only plugin: accepts every recipient and, at `queue`, accepts the message and
 * throws it away.
 *
 * THIS PLUGIN LOSES MAIL ON PURPOSE. It answers `250` for messages it does not keep, so it must
 * never be listed in a real config. It exists only to measure the engine itself (wire parsing,
 * session state, hooks, content receiving) without a queue or a disk in the way.
 *
 * So that the benchmark can check that the server really took what the client says it sent, it
 * counts the messages it accepted and tells the count on its count socket (see
 * bench/count-socket.ts): `<accepted>`, since the worker started.
 */
import { accept, definePlugin } from '../core/index.js';
import { serveCounts } from './count-socket.js';

export default definePlugin({
  name: 'bench-discard',
  setup: async ({ baseDir, onClose }) => {
    let accepted = 0;
    await serveCounts(baseDir, () => [accepted], onClose);
    return {
      rcpt: async () => accept(),
      // The engine has received the whole body by now and removes it at the end of the
      // transaction; not reading it is the discard.
      queue: async () => {
        accepted++;
        return accept();
      },
    };
  },
});
