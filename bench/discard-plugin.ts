/**
 * The benchmark's only plugin: accepts every recipient and, at `queue`, accepts the message and
 * throws it away.
 *
 * THIS PLUGIN LOSES MAIL ON PURPOSE. It answers `250` for messages it does not keep, so it must
 * never be listed in a real config. It exists only to measure the engine itself (wire parsing,
 * session state, hooks, content receiving) without a queue or a disk in the way.
 *
 * So that the benchmark can check that the server really took what the client says it sent, it
 * counts the messages it accepted and tells the count to the command `XBENCHCOUNT`
 * (`250 2.0.0 <count>`). Every other unknown command is left to the engine.
 */
import { accept, definePlugin, proceed } from '../core/index.js';

/** The command that reports how many messages were accepted since the server started. */
export const COUNT_COMMAND = 'XBENCHCOUNT';

export default definePlugin({
  name: 'bench-discard',
  setup: () => {
    let accepted = 0;
    return {
      rcpt: async () => accept(),
      // The engine has received the whole body by now and removes it at the end of the
      // transaction; not reading it is the discard.
      queue: async () => {
        accepted++;
        return accept();
      },
      unrecognized_command: async ({ verb }) =>
        verb === COUNT_COMMAND ? accept({ code: 250, enhanced: '2.0.0', text: String(accepted) }) : proceed(),
    };
  },
});
