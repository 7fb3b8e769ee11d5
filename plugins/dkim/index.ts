import { tmpdir } from 'node:os';
import type { Readable } from 'node:stream';
import {
  compileCidrs,
  definePlugin,
  MessageCopy,
  proceed,
  type QueuedMessageView,
} from '../../core/index.js';
import { dkimCommand } from './cli.js';
import { dkimConfig, keyLocations } from './config.js';
import { loadKeys, signingDomainFor } from './keys.js';
import { MARK_NAME, MARK_VALUE, readHead, rejoined, remainder } from './mark.js';
import { fromDomain, signCopy } from './sign.js';
import { SigningThreads } from './signer.js';

export { dkimConfig, type DkimConfig } from './config.js';

/** Thrown by the transform when a message cannot be signed and `onError` is `defer`. */
export class DkimSigningError extends Error {
  override readonly name = 'DkimSigningError';
}

/**
 * dkim — signs outgoing mail (RFC 6376), with RSA and Ed25519 keys (RFC 8463), per `From:`
 * domain. Which mail: what our own users and trusted networks send (decided at `data_post`,
 * where the session is known, and carried by the queued message as a mark, see mark.ts); mail
 * from other servers is never signed, so a forged `From:` of ours passing through (an alias
 * forwarding it, say) never gets our signature. How: in the delivery `transform` chain's `sign`
 * phase, after every rewrite (a 7-bit downgrade), for every transport.
 */
export default definePlugin({
  name: 'dkim',
  config: dkimConfig,
  // The signature covers the octets as sent: it must come after anything that changes them.
  transformPhase: 'sign',
  commands: { dkim: dkimCommand },
  async setup({ config, log, baseDir, onClose }) {
    const trusted = compileCidrs(config.trustedNetworks);
    const tempDir = config.tempDir ?? tmpdir();
    const configured = new Set(Object.keys(config.domains));
    const action = config.onError === 'defer' ? 'deferred' : 'sent unsigned';
    // Keys are read and checked once per plugin set (at start and at each reload), never per message.
    const keys = await loadKeys(keyLocations(config, baseDir));
    const signer = new SigningThreads(config.signingThreads, config.signingNice);
    onClose(() => signer.close());
    for (const [domain, { keys: usable, problems }] of keys) {
      for (const k of usable)
        log.info({ domain, selector: k.selector, algorithm: k.algorithm }, 'DKIM key loaded');
      for (const p of problems) {
        log.error(
          { domain, selector: p.selector, file: p.file, reason: p.reason },
          usable.length
            ? `DKIM key unusable; mail from ${domain} is signed with its other keys only`
            : `DKIM key unusable; mail from ${domain} will be ${action}`,
        );
      }
    }

    /** A message that should be signed but cannot be: sent as it is, or the delivery deferred. */
    const unsigned = async (
      message: QueuedMessageView,
      copy: MessageCopy,
      reason: string,
      fields: Record<string, unknown>,
    ): Promise<Readable> => {
      const where = { queueId: message.id, ...fields, reason, onError: config.onError };
      if (config.onError === 'defer') {
        await copy.discard();
        log.warn(where, `DKIM: message not signed (${reason}); delivery deferred`);
        throw new DkimSigningError(`not signed: ${reason}`);
      }
      log.warn(where, `DKIM: message not signed (${reason}); sent unsigned`);
      return copy.stream();
    };

    return {
      async data_post({ session, prependHeader }) {
        // Ours to sign: an authenticated user, any submission listener (AUTH is required there),
        // or a trusted network. The mark goes above the server's Received: field (mark.ts).
        const ours =
          session.user !== null || session.listener.kind !== 'smtp' || trusted(session.remote.address);
        if (ours) prependHeader(MARK_NAME, MARK_VALUE);
        return proceed();
      },

      async transform({ message, content }) {
        // Each delivery of the message is signed (the mark stays in the queued message).
        const head = await readHead(content);
        if (!head.marked) return rejoined(head, content);
        const copy = await MessageCopy.of(remainder(head), {
          memoryLimit: config.memoryLimit,
          tempDir,
          first: head.head,
        });
        const from = fromDomain(copy.headerBlock());
        const domain = signingDomainFor(from, configured, config);
        if (!domain) {
          const reason = from ? `no DKIM key for ${from}` : 'no single From: address';
          return unsigned(message, copy, reason, { from });
        }
        const domainKeys = keys.get(domain);
        if (!domainKeys?.keys.length) {
          const reason = `no usable DKIM key for ${domain}: ${domainKeys?.problems.map((p) => p.reason).join('; ')}`;
          return unsigned(message, copy, reason, { from, domain });
        }
        let signed;
        try {
          signed = await signCopy(copy, {
            keys: domainKeys.keys,
            signer,
            headers: config.headers,
            oversign: config.oversign,
          });
        } catch (err) {
          await copy.discard();
          throw err;
        }
        for (const f of signed.failures) {
          log.error(
            { queueId: message.id, domain, selector: f.selector, reason: f.reason },
            'DKIM signature failed',
          );
        }
        if (!signed.signatures.length) {
          return unsigned(message, copy, signed.failures.map((f) => f.reason).join('; '), { from, domain });
        }
        log.debug(
          { queueId: message.id, domain, selectors: domainKeys.keys.map((k) => k.selector) },
          'DKIM signed',
        );
        return copy.stream(signed.signatures);
      },
    };
  },
});
