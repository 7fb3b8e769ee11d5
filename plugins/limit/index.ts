import {
  compileCidrs,
  defer,
  defineNote,
  definePlugin,
  disconnect,
  networkOf,
  proceed,
  Tokens,
  type SessionView,
  type Verdict,
} from '../../core/index.js';
import { Dnsbl } from '../dnsbl/api.js';
import { limitConfig, type Rate } from './config.js';
import { OutboundThrottle } from './outbound.js';
import { Windows } from './windows.js';

export { limitConfig, type LimitConfig } from './config.js';

/** This connection, counted among its client's open connections under `key`. */
const Open = defineNote<{ readonly key: string }>('limit.open');

/**
 * One limit to check: its name (as in the config and the log), what it counts, its window (for
 * open connections, the lease) and its refusal. A rate counts events; `open` counts this
 * connection among those open.
 */
interface Check {
  readonly limit: string;
  readonly key: string;
  readonly max: number;
  readonly windowMs: number;
  readonly refusal: Verdict;
  readonly open?: true;
}

/**
 * limit — inbound rates and concurrency: connections per client per time and open at once,
 * messages per client, user and sender domain per time, recipients per message and per client
 * and user per time. Every count lives in the State service (`limit:*` keys), so the limits hold
 * across workers and, with `state.backend: redis`, across machines.
 *
 * Connections are checked at `connect` (`421` and closed), messages at `MAIL FROM` (`451 4.7.1`:
 * refused before the client sends the content), recipients at `RCPT TO` (`452 4.5.3` for one
 * message, `451 4.7.1` per time). List it before the plugins that accept recipients (an accepting
 * `rcpt` hook ends the chain before it counts) and after `dnsbl`: clients in `trustedNetworks`,
 * and clients the `Dnsbl` note (`petrel/dnsbl`) says are on an allow list, are not limited.
 *
 * Outbound, `outbound` rates per destination domain answer the `deliver` hook before the
 * transport: a delivery over its rate is postponed in the queue (outbound.ts).
 *
 * When the State store fails, every limit fails open: the command (or delivery) goes through and
 * the failure is logged at error level (see the README for why).
 */
export default definePlugin({
  name: 'limit',
  order: {
    before: {
      plugins: ['relay', 'users', 'outbound'],
      reason:
        'relay and users accept recipients at rcpt, so recipient limits would never refuse one; outbound delivers, so outbound rates would never postpone a delivery',
    },
    after: { plugins: ['dnsbl'], reason: 'its allow lists exempt clients only once it has run' },
  },
  config: limitConfig,
  setup({ config, log, resolve }) {
    const windows = new Windows(resolve(Tokens.State));
    const throttle = new OutboundThrottle(config.outbound, windows, log);
    const trusted = compileCidrs(config.trustedNetworks);
    const client = (session: SessionView): string => networkOf(session.remote.address, config.clientPrefix);
    /**
     * Not limited: a trusted network, or a client on a DNS allow list. The dnsbl plugin publishes
     * its note once its lookups are due (at connect with its `applyAt: connect`, else at the first
     * RCPT), so an allow-listed client is exempt from that point of the session on.
     */
    const exempt = (session: SessionView): boolean =>
      trusted(session.remote.address) || session.notes.get(Dnsbl)?.allowed === true;
    const rateCheck = (limit: string, key: string, rate: Rate, refusal: Verdict): Check => ({
      limit,
      key,
      max: rate.max,
      windowMs: rate.per,
      refusal,
    });

    /**
     * Takes an event in every window of the command at once (one State round trip, not one per
     * limit); the first full one in order refuses, and the events taken in the others are given
     * back (a refused command counts nowhere).
     */
    async function takeAll(session: SessionView, checks: readonly Check[]): Promise<Verdict> {
      const keyOf = (c: Check): string => `limit:${c.limit}:${c.key}`;
      const results = await Promise.all(
        checks.map((c) =>
          (c.open
            ? windows.open(keyOf(c), { max: c.max, lease: c.windowMs })
            : windows.take(keyOf(c), c)
          ).catch((err: unknown) => {
            // Fail open: see the README. Said at error level, once per limit, so it is noticed.
            log.error(
              { session: session.id, limit: c.limit, counted: c.key, err },
              'limit not checked: the State store failed; letting it through',
            );
            return null;
          }),
        ),
      );
      const refused = results.findIndex((r) => r?.allowed === false);
      if (refused < 0) return proceed();
      const c = checks[refused]!;
      log.info(
        {
          session: session.id,
          remote: session.remote.address,
          limit: c.limit,
          counted: c.key,
          count: results[refused]!.count,
          max: c.max,
        },
        'limit reached',
      );
      await Promise.all(
        checks.map((t, i) =>
          results[i]?.allowed !== true
            ? undefined
            : (t.open ? windows.close(keyOf(t), t.windowMs) : windows.giveBack(keyOf(t), t.windowMs)).catch(
                () => undefined,
              ),
        ),
      );
      return c.refusal;
    }

    return {
      // Only with outbound rates configured: otherwise every delivery would ask in vain.
      ...(throttle.enabled ? { deliver: (ctx) => throttle.check(ctx) } : {}),

      async connect({ session, signal }) {
        if (exempt(session)) return proceed();
        const key = client(session);
        const checks: Check[] = [];
        if (config.connections)
          checks.push(
            rateCheck(
              'connections',
              key,
              config.connections,
              disconnect(421, '4.7.0', 'Too many connections from your network; try again later'),
            ),
          );
        if (config.concurrency)
          checks.push({
            limit: 'concurrency',
            key,
            open: true,
            max: config.concurrency.max,
            windowMs: config.concurrency.lease,
            refusal: disconnect(421, '4.7.0', 'Too many open connections from your network'),
          });
        const v = await takeAll(session, checks);
        if (v.kind !== 'proceed' || !config.concurrency) return v;
        const open = `limit:concurrency:${key}`;
        // Given up on (the hook outran its timeout): the session went on without this answer and
        // may have closed already, so no disconnect would give the connection back.
        if (signal.aborted) {
          await windows.close(open, config.concurrency.lease).catch(() => undefined);
          return v;
        }
        // Counted. When the store failed it may not have been; giving it back at disconnect then
        // takes one off this worker's other connections from the client, if it has any: the count
        // errs low, never high (README, "When the State store fails").
        session.notes.set(Open, { key: open });
        return v;
      },

      async mail({ session, sender }) {
        if (exempt(session)) return proceed();
        const m = config.messages;
        const checks: Check[] = [];
        if (m.perClient)
          checks.push(
            rateCheck(
              'messages.perClient',
              client(session),
              m.perClient,
              defer(451, '4.7.1', 'Too many messages from your network; try again later'),
            ),
          );
        if (m.perUser && session.user !== null)
          checks.push(
            rateCheck(
              'messages.perUser',
              session.user.toLowerCase(),
              m.perUser,
              defer(451, '4.7.1', 'Too many messages from this user; try again later'),
            ),
          );
        if (m.perSenderDomain && sender !== null)
          checks.push(
            rateCheck(
              'messages.perSenderDomain',
              sender.domain.toLowerCase(),
              m.perSenderDomain,
              defer(451, '4.7.1', 'Too many messages from this sender domain; try again later'),
            ),
          );
        return takeAll(session, checks);
      },

      async rcpt({ session, transaction }) {
        if (exempt(session)) return proceed();
        const r = config.recipients;
        // RFC 5321 §4.5.3.1.10: too many recipients is 452, and the client sends the rest later
        // (§4.5.3.1.8 asks a server to take 100; a lower limit is the operator's choice).
        if (r.perMessage !== undefined && transaction.recipients.length >= r.perMessage) {
          log.info(
            {
              session: session.id,
              remote: session.remote.address,
              limit: 'recipients.perMessage',
              counted: transaction.id,
              count: transaction.recipients.length + 1,
              max: r.perMessage,
            },
            'limit reached',
          );
          return defer(452, '4.5.3', 'Too many recipients');
        }
        const checks: Check[] = [];
        if (r.perClient)
          checks.push(
            rateCheck(
              'recipients.perClient',
              client(session),
              r.perClient,
              defer(451, '4.7.1', 'Too many recipients from your network; try again later'),
            ),
          );
        if (r.perUser && session.user !== null)
          checks.push(
            rateCheck(
              'recipients.perUser',
              session.user.toLowerCase(),
              r.perUser,
              defer(451, '4.7.1', 'Too many recipients from this user; try again later'),
            ),
          );
        return takeAll(session, checks);
      },

      async disconnect({ session }) {
        const open = session.notes.get(Open);
        if (!open || !config.concurrency) return;
        await windows.close(open.key, config.concurrency.lease).catch((err: unknown) => {
          // The worker's share stays one too high until it has no other connection from this
          // client and its lease has passed (README, "When the State store fails").
          log.error(
            { session: session.id, limit: 'concurrency', err },
            'connection not released: the State store failed',
          );
        });
      },
    };
  },
});
