import { performance } from 'node:perf_hooks';
import { compileCidrs, defer, definePlugin, deny, proceed } from '../../core/index.js';
import { holdOnAccept } from '../queue/api.js';
import { ClamAV, type ClamAVResult } from './api.js';
import { instream, parseReply, ScanTimeoutError, type ClamdTarget, type ScanVerdict } from './clamd.js';
import { clamavConfig } from './config.js';

export { clamavConfig, type ClamavConfig } from './config.js';

/** A signature name as it may appear in a reply line: printable ASCII, bounded. */
const printable = (s: string): string => s.replace(/[^\x21-\x7e]/g, '?').slice(0, 100);

/**
 * clamav — scans each message with ClamAV's clamd at `data_post`, after the message is on disk
 * and before it is queued. The message is streamed from the spool to clamd (INSTREAM); a virus
 * is refused with `554 5.7.1 Message contains a virus (<signature>)` or, with `action:
 * quarantine`, accepted and held in the queue. When clamd cannot answer, `fail` decides:
 * `closed` (451 4.3.0, the default) or `open` (accepted, logged at error). The result is left
 * as the `ClamAV` transaction note (`petrel/clamav`); one log line per message.
 *
 * List it after the plugins that refuse at `data_post` for cheaper reasons (mailauth,
 * submission): a message refused anyway is not scanned. The hold it asks for is read by the
 * queue's `queue` hook, which runs after every `data_post` hook.
 */
export default definePlugin({
  name: 'clamav',
  config: clamavConfig,
  setup({ config, log }) {
    const trusted = compileCidrs(config.trustedNetworks);
    const target: ClamdTarget = config.socket
      ? { socket: config.socket }
      : { host: config.host, port: config.port };
    const where = config.socket ?? `${config.host}:${config.port}`;

    return {
      async data_post({ session, transaction, message }) {
        const started = performance.now();
        let verdict: ScanVerdict | { status: 'skipped'; reason: string };
        let bytes = 0;
        if (trusted(session.remote.address)) verdict = { status: 'skipped', reason: 'trusted network' };
        else if (message.size > config.maxSize)
          verdict = { status: 'skipped', reason: `too large (${message.size} > maxSize ${config.maxSize})` };
        else
          try {
            const sent = await instream(target, message.stream(), config.timeout);
            bytes = sent.bytes;
            verdict = parseReply(sent.reply);
          } catch (err) {
            verdict = {
              status: 'error',
              reason: err instanceof ScanTimeoutError ? `timeout: ${err.message}` : (err as Error).message,
            };
          }
        const result: ClamAVResult = {
          status: verdict.status,
          signature: verdict.status === 'infected' ? verdict.signature : null,
          reason: 'reason' in verdict ? verdict.reason : null,
          bytes,
          ms: Math.round(performance.now() - started),
        };
        transaction.notes.set(ClamAV, result);

        const action =
          result.status === 'infected'
            ? config.action
            : result.status === 'error'
              ? config.fail === 'closed'
                ? 'defer'
                : 'accept'
              : 'accept';
        const line = {
          session: session.id,
          tx: transaction.id,
          result: result.status,
          signature: result.signature,
          reason: result.reason,
          bytes: result.bytes,
          size: message.size,
          ms: result.ms,
          action,
          clamd: where,
        };
        if (result.status === 'error') log.error(line, 'clamav scan');
        else if (result.status === 'infected') log.warn(line, 'clamav scan');
        else log.info(line, 'clamav scan');

        if (result.status === 'infected') {
          const signature = printable(result.signature!);
          // RFC 3463 §3.8: 5.7.1, delivery not authorized, message refused.
          if (config.action === 'reject')
            return deny(554, '5.7.1', `Message contains a virus (${signature})`);
          holdOnAccept(transaction.notes, `clamav: virus ${signature}`);
        }
        // RFC 3463 §3.5: 4.3.0, a mail system problem; the client keeps the message and retries.
        if (result.status === 'error' && config.fail === 'closed')
          return defer(451, '4.3.0', 'Virus scanner unavailable, try again later');
        return proceed();
      },
    };
  },
});
