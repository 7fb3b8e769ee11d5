import { compileCidrs, defer, definePlugin, deny, proceed } from '../../core/index.js';
import { SpamAssassin, type SpamAssassinResult } from './api.js';
import { spamassassinConfig } from './config.js';
import { spamdSymbols } from './spamd.js';

export { spamassassinConfig, type SpamassassinConfig } from './config.js';

/**
 * spamassassin — asks SpamAssassin's spamd about each message after DATA (the spamc protocol,
 * `SYMBOLS`), streaming it from the spool. The score decides: from `rejectAbove` the message is
 * refused (`550 5.7.1`); otherwise it is accepted with `X-Spam-Status` (`Yes` from `tagAbove`)
 * and `X-Spam-Score`. The result goes to the `SpamAssassin` note (`petrel/spamassassin`) and one
 * log line. A failed scan accepts the message (`fail: open`, logged at error) or refuses it for
 * now (`fail: closed`, `451 4.3.0`).
 *
 * List it after the plugins whose headers spamd should see (mailauth's
 * `Authentication-Results`) and before the ones that act on its note.
 */
export default definePlugin({
  name: 'spamassassin',
  config: spamassassinConfig,
  setup({ config, log }) {
    const trusted = compileCidrs(config.trustedNetworks);
    const ours = new Set([config.statusHeader.toLowerCase(), config.scoreHeader.toLowerCase()]);

    return {
      async data_post({ session, transaction, message, prependHeader, removeHeaders, signal }) {
        const where = { session: session.id, tx: transaction.id, ip: session.remote.address };
        const exempt = trusted(session.remote.address)
          ? 'trusted network'
          : config.skipAuthenticated && session.user !== null
            ? 'authenticated'
            : null;
        if (exempt) {
          log.info({ ...where, reason: exempt }, 'spamassassin: message not scanned');
          return proceed();
        }
        // A sender's own `X-Spam-Status: No` must not pass for ours downstream.
        const forged = await removeHeaders((f) => ours.has(f.name.toLowerCase()));
        const size = message.storedSize;
        if (size > config.maxSize) {
          log.info(
            { ...where, size, maxSize: config.maxSize, reason: 'too large' },
            'spamassassin: message not scanned',
          );
          return proceed();
        }
        const started = Date.now();
        const deadline = AbortSignal.timeout(config.timeout);
        let answer;
        try {
          answer = await spamdSymbols({
            host: config.host,
            port: config.port,
            user: config.user,
            message: message.stream(),
            size,
            signal: AbortSignal.any([signal, deadline]),
          });
        } catch (err) {
          // Open by default: a scanner is an extra opinion, and while it is down every sender's
          // mail would otherwise wait in their queues (or bounce after days) for nothing.
          log.error(
            {
              ...where,
              fail: config.fail,
              reason: deadline.aborted
                ? `no answer within ${config.timeout} ms`
                : err instanceof Error
                  ? err.message
                  : String(err),
            },
            config.fail === 'open'
              ? 'spamassassin: scan failed, message accepted unscanned'
              : 'spamassassin: scan failed, message deferred',
          );
          if (config.fail === 'closed')
            return defer(451, '4.3.0', 'Spam scanner unavailable, try again later');
          return proceed();
        }
        const tagAbove = config.tagAbove ?? answer.required;
        const action: SpamAssassinResult['action'] =
          answer.score >= config.rejectAbove ? 'reject' : answer.score >= tagAbove ? 'tag' : 'pass';
        const result: SpamAssassinResult = { ...answer, action };
        transaction.notes.set(SpamAssassin, result);
        log.info(
          {
            ...where,
            score: answer.score,
            required: answer.required,
            tagAbove,
            rejectAbove: config.rejectAbove,
            symbols: answer.symbols,
            action,
            ms: Date.now() - started,
            forgedRemoved: forged.length,
          },
          'spamassassin verdict',
        );
        if (action === 'reject') return deny(550, '5.7.1', config.rejectMessage);
        prependHeader(config.scoreHeader, answer.score.toFixed(1));
        prependHeader(
          config.statusHeader,
          `${action === 'tag' ? 'Yes' : 'No'}, score=${answer.score.toFixed(1)} required=${tagAbove.toFixed(1)} tests=${answer.symbols.join(',') || 'none'}`,
        );
        return proceed();
      },
    };
  },
});
