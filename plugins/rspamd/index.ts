import { compileCidrs, defer, definePlugin, deny, foldHeaderField, proceed } from '../../core/index.js';
import { holdOnAccept } from '../queue/api.js';
import { Rspamd, type RspamdResult } from './api.js';
import { checkv2, type CheckAnswer } from './checkv2.js';
import { DEFAULT_ACTIONS, rspamdConfig } from './config.js';

export { rspamdConfig, type RspamdConfig } from './config.js';

/** A field value folded at its spaces (RFC 5322 §2.2.3), without the `Name: ` prefix. */
const folded = (name: string, value: string): string => foldHeaderField(name, value).slice(name.length + 2);

/** `default: True [15.00 / 15.00]; GTUBE(0.00)`: rspamd's own `X-Spamd-Result` form. */
function resultValue(answer: CheckAnswer, spam: boolean): string {
  const symbols = answer.symbols.map(
    (s) => `${s.name}(${s.score.toFixed(2)})${s.options.length ? `[${s.options.join(',')}]` : ''}`,
  );
  return [
    `default: ${spam ? 'True' : 'False'} [${answer.score.toFixed(2)} / ${answer.required.toFixed(2)}]`,
    ...symbols,
  ]
    .join('; ')
    .replace(/[^\x20-\x7e]/g, '?');
}

/**
 * rspamd — asks rspamd about each message after DATA (`POST /checkv2`), streaming it from the
 * spool with the envelope in request headers, and does what rspamd's action says through the
 * `actions` map: refuse (`550 5.7.1`), defer (`451 4.7.1`), hold in the queue (quarantine),
 * rewrite the Subject, add `X-Spam: Yes`, or accept. Every scanned message gets `X-Spamd-Result`
 * and `X-Rspamd-Score`; the result goes to the `Rspamd` note (`petrel/rspamd`) and one log line.
 * A failed scan accepts the message (`fail: open`, logged at error) or defers it (`fail: closed`,
 * `451 4.3.0`).
 *
 * List it after the plugins whose header fields rspamd should see (mailauth's
 * `Authentication-Results`, submission's `Message-ID`) and before `queue`.
 */
export default definePlugin({
  name: 'rspamd',
  config: rspamdConfig,
  setup({ config, log }) {
    const trusted = compileCidrs(config.trustedNetworks);
    const actions = { ...DEFAULT_ACTIONS, ...config.actions };
    const ours = new Set(
      [config.resultHeader, config.scoreHeader, config.spamHeader.name].map((n) => n.toLowerCase()),
    );

    return {
      async data_post({ session, transaction, message, prependHeader, removeHeaders, signal }) {
        const where = { session: session.id, tx: transaction.id, ip: session.remote.address };
        const exempt = trusted(session.remote.address)
          ? 'trusted network'
          : config.skipAuthenticated && session.user !== null
            ? 'authenticated'
            : null;
        if (exempt) {
          log.info({ ...where, reason: exempt }, 'rspamd: message not scanned');
          return proceed();
        }
        // A sender's own `X-Spam: No` or result field must not pass for ours downstream.
        const forged = await removeHeaders((f) => ours.has(f.name.toLowerCase()));
        const size = message.storedSize;
        if (size > config.maxSize) {
          log.info(
            { ...where, size, maxSize: config.maxSize, reason: 'too large' },
            'rspamd: message not scanned',
          );
          return proceed();
        }
        const headers: Record<string, string | string[]> = {
          IP: session.remote.address,
          From: transaction.sender?.address ?? '',
          Rcpt: transaction.recipients.map((r) => r.address.address),
          'Queue-Id': transaction.id,
        };
        if (session.helo) headers.Helo = session.helo.hostname;
        if (session.user !== null) headers.User = session.user;
        if (config.password) headers.Password = config.password;
        const started = Date.now();
        const deadline = AbortSignal.timeout(config.timeout);
        let answer: CheckAnswer;
        try {
          answer = await checkv2({
            url: config.url,
            headers,
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
              ? 'rspamd: scan failed, message accepted unscanned'
              : 'rspamd: scan failed, message deferred',
          );
          if (config.fail === 'closed')
            return defer(451, '4.3.0', 'Spam scanner unavailable, try again later');
          return proceed();
        }
        const mapped = actions[answer.action];
        if (!mapped)
          log.warn({ ...where, action: answer.action }, 'rspamd: action not in the actions map, accepted');
        const verdict = mapped ?? 'accept';
        const result: RspamdResult = {
          action: answer.action,
          verdict,
          score: answer.score,
          required: answer.required,
          symbols: answer.symbols,
          smtpMessage: answer.smtpMessage,
        };
        transaction.notes.set(Rspamd, result);
        log.info(
          {
            ...where,
            action: answer.action,
            verdict,
            score: answer.score,
            required: answer.required,
            symbols: answer.symbols.map((s) => `${s.name}(${s.score.toFixed(2)})`),
            smtpMessage: answer.smtpMessage,
            ms: Date.now() - started,
            forgedRemoved: forged.length,
          },
          'rspamd verdict',
        );
        if (verdict === 'reject') return deny(550, '5.7.1', config.rejectMessage);
        if (verdict === 'defer') return defer(451, '4.7.1', config.deferMessage);
        const spam = verdict !== 'accept';
        prependHeader(config.scoreHeader, answer.score.toFixed(2));
        prependHeader(config.resultHeader, folded(config.resultHeader, resultValue(answer, spam)));
        if (verdict === 'quarantine')
          holdOnAccept(transaction.notes, `rspamd: ${answer.action} (score ${answer.score.toFixed(2)})`);
        if (verdict === 'add-header') prependHeader(config.spamHeader.name, config.spamHeader.value);
        if (verdict === 'rewrite-subject') {
          // The core offers no in-place edit of a received field: the Subject is taken out and a
          // new one added on top of the message (above Received:, where data_post fields go).
          const old = await removeHeaders((f) => f.name.toLowerCase() === 'subject');
          const subject = answer.subject ?? `${config.subjectPrefix}${old[0]?.value ?? ''}`;
          prependHeader('Subject', folded('Subject', subject.replace(/[\r\n]+/g, ' ')));
        }
        return proceed();
      },
    };
  },
});
