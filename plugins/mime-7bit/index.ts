import { definePlugin, z } from '../../core/index.js';
import { downgrade, type DowngradeReport } from './downgrade.js';

export { downgrade, type DowngradeOptions, type DowngradeReport } from './downgrade.js';

export const mime7bitConfigSchema = z
  .object({
    /** Re-encode 8-bit bodies even for a peer that offers 8BITMIME. */
    always: z.boolean().default(false),
  })
  .strict();

/**
 * mime-7bit — makes a message fit a next hop that takes 7-bit mail only (no 8BITMIME, RFC 6152),
 * or no UTF-8 header text (no SMTPUTF8, RFC 6531). 8-bit parts are re-encoded, text as
 * quoted-printable and anything else as base64; 8-bit header text becomes RFC 2047 encoded
 * words. The MIME structure, nested messages and every header field stay. It streams: the
 * message is never held whole. It runs in the `rewrite` phase, so always before a signer.
 */
export default definePlugin({
  name: 'mime-7bit',
  config: mime7bitConfigSchema,
  // A downgrade changes the octets: it must come before anything that signs them.
  transformPhase: 'rewrite',
  setup({ config, log }) {
    return {
      async transform({ message, peer, content }) {
        const body = config.always || !peer.eightBitMime;
        const utf8 = message.mailParams.smtputf8;
        // Raw UTF-8 header text may stay only in an SMTPUTF8 message going to an SMTPUTF8 peer.
        // A message that is not SMTPUTF8 but has 8-bit header text anyway is left alone for a
        // peer that takes 8-bit content.
        const headers = !(utf8 && peer.smtputf8) && (body || utf8);
        if (!body && !headers) return content;
        const report: DowngradeReport = { untouched: false, encoded: 0, repaired: 0, headers: 0 };
        const out = downgrade(content, { body, headers }, report);
        out.once('end', () => {
          if (report.untouched) return;
          log.debug({ queueId: message.id, ...report }, 'message rewritten for a 7-bit peer');
        });
        return out;
      },
    };
  },
});
