/**
 * outbound — the SMTP transport for mail to other servers: MX lookup through the core resolver,
 * failover across MX hosts and their addresses, per-recipient results, connection reuse with
 * per-destination limits and backoff, opportunistic or required STARTTLS, destinations' MTA-STS
 * policies (mta-sts.ts) and DANE records (dane.ts), and a smarthost mode. See README.md.
 */
import {
  definePlugin,
  type PluginApi,
  proceed,
  routeTo,
  Tokens,
  type DeliverContext,
  type DeliveryRecipient,
  type RecipientReply,
  type RecipientResult,
  type Route,
} from '../../core/index.js';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { isAbsolute, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { rootCertificates } from 'node:tls';
import { domainToASCII } from 'node:url';
import { configSchema, tlsPolicyFor, type OutboundConfig, type TlsPolicy } from './config.js';
import {
  describePeer,
  describeReply,
  SmtpConnection,
  SmtpFailure,
  tlsOptions,
  type SmtpReply,
} from './connection.js';
import { literalAddress, planDomain, planHosts, Self, type Hop, type Plan } from './mx.js';
import { checkDane, daneDemand, daneFailure, lookupTlsa, usableTlsa } from './dane.js';
import {
  allowedHops,
  hostsOf,
  meetsPolicy,
  MtaSts,
  stsDemand,
  stsFailure,
  stsName,
  tlsResultType,
  type StsPolicy,
} from './mta-sts.js';
import { BusyError, Pool, type Lease } from './pool.js';
import { madeUp, MessageFacts, transaction, type Decision } from './transaction.js';

export { configSchema, type OutboundConfig } from './config.js';

/** The transport name routes carry. */
export const TRANSPORT = 'outbound';

/** A TLS or authentication policy stopped the session: deferred with its own status code. */
class PolicyError extends Error {
  override readonly name = 'PolicyError';
  constructor(
    readonly enhanced: string,
    message: string,
  ) {
    super(message);
  }
}

/** The peer is this server (it greeted with our own name): a loop, failed at once. */
class LoopError extends Error {
  override readonly name = 'LoopError';
}

/** The deferral that a failed connection attempt leaves, naming the peer. */
function problem(err: unknown, remote: string): Decision {
  if (err instanceof PolicyError) return madeUp(451, err.enhanced, err.message);
  if (err instanceof SmtpFailure) {
    const r = err.reply;
    // A temporary refusal from the peer is passed on as it was given.
    if (err.kind === 'reply' && r && r.code >= 400 && r.code < 500) return asDeferral(r, remote);
    return madeUp(451, failureStatus(err), err.message);
  }
  return madeUp(451, '4.4.2', `Delivery to ${remote} failed: ${(err as Error)?.message ?? String(err)}`);
}

/** RFC 3463 status for a failed session: no answer, bad connection, protocol, TLS or authentication. */
function failureStatus(err: SmtpFailure): string {
  if (err.kind === 'tls') return '4.7.5';
  if (err.stage === 'connect') return '4.4.1';
  if (err.kind === 'protocol') return '4.5.0';
  if (err.stage === 'auth') return '4.7.8';
  return '4.4.2';
}

/**
 * A failure at the very start of a transaction on a reused connection that the peer had already
 * given up: the connection was gone, or the peer said 421 (closing) to MAIL FROM.
 */
function closedWhileIdle(err: SmtpFailure): boolean {
  return err.stage === 'mail' && (err.kind === 'network' || err.reply?.code === 421);
}

function asDeferral(r: SmtpReply, remote: string): Decision {
  const reply: RecipientReply = {
    code: r.code,
    enhanced: r.enhanced,
    text: r.lines.length === 1 ? r.lines[0]! : r.lines,
    remote,
  };
  return { status: 'deferred', reply };
}

export default definePlugin({
  name: 'outbound',
  config: configSchema,
  // One delivery may try several MX addresses, each with its own stage timeouts (RFC 5321
  // §4.5.3.2: up to 10 minutes for the final reply): the generic 30 s hook limit would cut it off.
  hookTimeout: 60 * 60_000,
  setup(api: PluginApi<OutboundConfig>) {
    const { config, log } = api;
    const core = api.resolve(Tokens.Config);
    const dns = api.resolve(Tokens.Dns);
    // The same family the core counts inbound handshakes in (declaring it again returns it).
    const handshakes = api.resolve(Tokens.Metrics).counter({
      name: 'petrel_tls_handshakes_total',
      help: 'TLS handshakes, by direction (inbound, outbound), result and protocol version',
      labelNames: ['direction', 'result', 'version'],
    });
    const { timeouts, smarthost } = config;
    const heloName = config.heloName ?? api.hostname;
    const port = smarthost?.port ?? config.port;
    const localDomains = new Set(core.localDomains.flatMap((d) => [d, domainToASCII(d) || d]));
    const self = new Self([api.hostname, heloName], core.listeners);
    const ca = config.tlsCa
      ? [
          ...rootCertificates,
          readFileSync(isAbsolute(config.tlsCa) ? config.tlsCa : resolve(api.baseDir, config.tlsCa), 'utf8'),
        ]
      : undefined;
    const smarthostKey = smarthost ? `smarthost:${smarthost.host}:${smarthost.port}` : null;
    // MTA-STS is about a domain's MX hosts: mail through a smarthost never looks at them.
    // DANE needs the AD bit of a validating resolver: asked of the servers the core resolver uses.
    const dane = config.dane.enabled && !smarthost ? { timeout: core.dns.timeout } : null;
    const mtaSts =
      config.mtaSts.enabled && !smarthost
        ? new MtaSts({
            resolver: (name, rrtype) => dns.resolve(name, rrtype),
            state: api.resolve(Tokens.State),
            log,
            timeout: config.mtaSts.timeout,
          })
        : null;
    const pool = new Pool({
      maxConnections: config.maxConnectionsPerDestination,
      maxMessages: config.maxMessagesPerConnection,
      idleTimeout: config.idleTimeout,
      backoffAfter: config.backoffAfter,
      backoffTime: config.backoffTime,
      quitTimeout: timeouts.quit,
    });
    api.onClose(() => pool.close());
    const txTimeouts = {
      mail: timeouts.mail,
      rcpt: timeouts.rcpt,
      data: timeouts.data,
      block: timeouts.block,
      final: timeouts.final,
    };

    /** Where a route's mail goes: the smarthost's addresses, or the domain's MX hosts'. */
    async function plan(route: Route): Promise<Plan> {
      const opts = { dns, families: config.addressFamilies, port, self };
      if (!smarthost) return planDomain(String(route.data.domain ?? route.key), opts);
      const p = await planHosts(
        `the smarthost ${smarthost.host}`,
        [{ host: smarthost.host, preference: 0 }],
        opts,
      );
      // A smarthost without an address is a configuration problem: keep the mail and retry.
      if (p.kind === 'failed' && p.reply.enhanced !== '5.4.6') {
        return { kind: 'deferred', reply: { code: 451, enhanced: '4.4.4', text: p.reply.text } };
      }
      return p;
    }

    /**
     * Connects to one address and brings the session to where MAIL FROM can be sent.
     *
     * TLS: the domain's `tls` policy, unless something stricter applies. Validated TLSA records
     * for the host (DANE, RFC 7672 §2.2) make TLS mandatory and the certificate must match them;
     * an MTA-STS policy in `enforce` mode makes TLS mandatory, verified for the MX name (RFC 8461
     * §4.2). DANE decides the certificate check where both apply. In MTA-STS `testing` mode what
     * would have failed is logged.
     */
    async function openSession(
      hop: Hop,
      what: string,
      localPolicy: TlsPolicy,
      sts: StsPolicy | null,
      signal: AbortSignal,
      plain = false,
    ): Promise<SmtpConnection> {
      const remote = describePeer({ ...hop, port });
      const where = { receivingMxHostname: hop.host, receivingIp: hop.ip };
      const tlsa =
        dane && isIP(hop.host) === 0 ? await lookupTlsa(dns.servers(), hop.host, port, dane.timeout) : null;
      if (tlsa?.kind === 'failed') {
        daneFailure(log, what, hop, 'dnssec-invalid', tlsa.reason);
        throw new PolicyError('4.4.3', `DANE: ${tlsa.reason}; not connecting to ${remote} without it`);
      }
      const records = tlsa?.kind === 'records' ? tlsa.records : null;
      // Validated records make TLS mandatory; only usable ones authenticate (RFC 7672 §3.1.3).
      const daneAuth = records !== null && usableTlsa(records).length > 0;
      const enforced = sts?.mode === 'enforce';
      const policy: TlsPolicy = records || enforced ? 'require' : localPolicy;
      // Who checks the certificate: DANE when it can, else Node (PKIX, for the MX name) when the
      // local policy or MTA-STS asks for verification.
      const pkix = !daneAuth && (enforced || localPolicy === 'require');
      /** Why a mandatory TLS requirement failed here, as the deferral says it. */
      const demand = records ? daneDemand(hop.host, port) : enforced ? stsDemand(sts!) : 'TLS is required';
      const fail = (resultType: string, enhanced: string, text: string, sep = ', but '): PolicyError => {
        if (records) daneFailure(log, what, hop, resultType, text);
        return new PolicyError(enhanced, `${demand}${sep}${text}`);
      };
      const conn = await SmtpConnection.open({ host: hop.host, ip: hop.ip, port }, timeouts.connect, signal);
      try {
        await conn.greeting(timeouts.greeting);
        await conn.hello(heloName, timeouts.ehlo);
        if (self.isName(conn.peerName)) {
          throw new LoopError(
            `mail for ${what} loops back to myself (${conn.remote} greeted me with my own name)`,
          );
        }
        if (policy !== 'none' && !plain && conn.caps.has('STARTTLS')) {
          let refused: SmtpReply | null;
          try {
            refused = await conn.starttls(tlsOptions(hop.host, pkix, ca), timeouts.starttls);
            if (!refused) handshakes.labels('outbound', 'ok', conn.tlsProtocol ?? 'unknown').inc();
          } catch (err) {
            if (err instanceof SmtpFailure && err.kind === 'tls') {
              handshakes.labels('outbound', 'failed', 'unknown').inc();
              if (sts) {
                const text = `TLS with ${conn.remote} failed: ${err.message}`;
                stsFailure(log, sts, { ...where, resultType: tlsResultType(err.code), failureReason: text });
              }
              if (policy === 'require') throw fail(tlsResultType(err.code), '4.7.5', err.message, ': ');
              // Opportunistic TLS must not cost the delivery: the same host again, in plain text.
              log.info(
                { remote: conn.remote, err: err.message },
                'TLS handshake failed; retrying without TLS',
              );
              conn.destroy();
              return openSession(hop, what, localPolicy, sts, signal, true);
            }
            throw err;
          }
          if (refused) {
            const text = `${conn.remote} refused STARTTLS: ${describeReply(refused)}`;
            if (sts)
              stsFailure(log, sts, { ...where, resultType: 'starttls-not-supported', failureReason: text });
            if (policy === 'require') throw fail('starttls-not-supported', '4.7.4', text);
          } else {
            await conn.hello(heloName, timeouts.ehlo);
            if (daneAuth) {
              const check = checkDane(records!, conn.peerChain(), hop.host);
              if (!check.ok) throw fail('tlsa-invalid', '4.7.5', `${conn.remote}: ${check.reason}`, ': ');
              conn.daneMatch = check.match;
              log.debug({ remote: conn.remote, tlsa: check.match }, 'DANE: certificate matches');
            } else if (records) {
              log.info(
                { remote: conn.remote },
                'DANE: no usable TLSA record; TLS without DANE authentication',
              );
            }
            const unverified = conn.authorizationError;
            // Only `testing` gets here unverified (`enforce` refused such a handshake already),
            // or DANE, which verified the certificate its own way.
            if (sts && unverified && !daneAuth) {
              stsFailure(log, sts, {
                ...where,
                resultType: tlsResultType(unverified),
                failureReason: `the certificate of ${conn.remote} is not verified: ${unverified}`,
              });
            }
          }
        } else {
          const text = `TLS was not offered by host ${conn.remote}`;
          if (sts && !conn.caps.has('STARTTLS'))
            stsFailure(log, sts, { ...where, resultType: 'starttls-not-supported', failureReason: text });
          if (policy === 'require')
            throw records || enforced
              ? fail('starttls-not-supported', '4.7.4', text)
              : new PolicyError('4.7.4', `TLS is required, but was not offered by host ${conn.remote}`);
        }
        if (smarthost?.auth) {
          if (!conn.secure) {
            throw new PolicyError('4.7.4', `Not sending credentials to ${conn.remote} without TLS`);
          }
          await conn.auth(smarthost.auth.user, smarthost.auth.pass, timeouts.auth);
        }
        return conn;
      } catch (err) {
        void conn.quit(timeouts.quit);
        throw err;
      }
    }

    type SessionOutcome =
      { kind: 'done'; decisions: Decision[]; reusable: boolean } | { kind: 'next'; failure: SmtpFailure };

    /**
     * The recipients' transaction on a ready connection; recipients the peer put off with `452`
     * (too many recipients) go in another transaction on the same connection straight away.
     */
    async function session(
      conn: SmtpConnection,
      ctx: DeliverContext,
      batch: readonly DeliveryRecipient[],
      facts: MessageFacts,
    ): Promise<SessionOutcome> {
      const decisions: Decision[] = [];
      let pending = batch.map((_, i) => i);
      for (let round = 0; ; round++) {
        // The stored message, read afresh for each transaction; closed whatever becomes of it.
        let source: Readable | null = null;
        const out = await transaction({
          conn,
          message: facts,
          recipients: pending.map((i) => batch[i]!),
          content: (peer) => {
            source = ctx.message.stream();
            return api.hooks.transform({ message: ctx.message, route: ctx.route, peer, content: source });
          },
          timeouts: txTimeouts,
          signal: ctx.signal,
        }).finally(() => (source as Readable | null)?.destroy());
        if (out.kind === 'next') {
          // Later rounds keep what the first decided (those recipients stay deferred with their 452).
          return round === 0 ? out : { kind: 'done', decisions, reusable: false };
        }
        if (out.localError) {
          log.error(
            { err: out.localError, queueId: ctx.message.id, remote: conn.remote },
            'local problem during delivery',
          );
        }
        // A reply the peer sent says how it came (for the message's history).
        const tls = conn.tlsDescription;
        out.decisions.forEach(
          (d, k) =>
            (decisions[pending[k]!] = tls && d.reply.remote ? { ...d, reply: { ...d.reply, tls } } : d),
        );
        log.debug(
          {
            queueId: ctx.message.id,
            remote: conn.remote,
            tls: conn.tlsDescription,
            verified: conn.verifiedBy,
            accepted: out.accepted,
            rcpts: pending.length,
          },
          'transaction finished',
        );
        const retry = out.tooMany.map((k) => pending[k]!);
        if (retry.length === 0 || !out.reusable || conn.messages >= config.maxMessagesPerConnection) {
          return { kind: 'done', decisions, reusable: out.reusable };
        }
        if (!(await conn.rset(timeouts.rset))) return { kind: 'done', decisions, reusable: false };
        pending = retry;
      }
    }

    /** One transaction's worth of recipients: a connection from the pool or a new one, with failover. */
    async function deliverBatch(
      ctx: DeliverContext,
      batch: readonly DeliveryRecipient[],
      facts: MessageFacts,
    ): Promise<RecipientResult[]> {
      const { route, signal } = ctx;
      const domain = String(route.data.domain ?? route.key);
      const what = smarthost ? `the smarthost ${smarthost.host}` : domain;
      const policy: TlsPolicy = smarthost ? smarthost.tls : tlsPolicyFor(config.tls, domain);
      const dest = pool.get(route.key);
      const results = (ds: readonly Decision[]): RecipientResult[] =>
        batch.map((r, i) => {
          const { status, reply, dsnPassedOn } = ds[i]!;
          return { recipient: r.address.address, status, reply, ...(dsnPassedOn ? { dsnPassedOn } : {}) };
        });
      const every = (d: Decision): RecipientResult[] => results(batch.map(() => d));
      const heldBack = (): RecipientResult[] | null => {
        const b = dest.backoff();
        if (!b) return null;
        const text = `Delivery to ${what} is backed off until ${b.until.toISOString()} after repeated connection failures (last: ${b.reason})`;
        return every(madeUp(451, '4.4.1', text));
      };

      const held = heldBack();
      if (held) return held;
      const sts = await stsPolicy(domain, ctx.message.id);
      let lease: Lease;
      try {
        lease = await dest.acquire(signal, timeouts.wait);
      } catch (err) {
        const text = err instanceof BusyError ? `Too busy: ${err.message}` : `Delivery to ${what} stopped`;
        return every(madeUp(451, '4.4.5', text));
      }
      let slotHeld = true;
      let last: Decision | null = null;
      const tried = new Set<string>();
      try {
        // An idle connection opened before an `enforce` policy was known may not meet it.
        if (lease.conn && sts?.mode === 'enforce' && !meetsPolicy(lease.conn, sts))
          void lease.conn.quit(timeouts.quit);
        else if (lease.conn) {
          const conn = lease.conn;
          conn.bind(signal);
          // A clean connection goes straight to MAIL FROM; one left mid-transaction gets RSET first.
          const unchecked = conn.clean;
          if (unchecked || (await conn.rset(timeouts.rset))) {
            const out = await session(conn, ctx, batch, facts);
            if (out.kind === 'done') {
              dest.release(conn, out.reusable);
              slotHeld = false;
              return results(out.decisions);
            }
            // The peer may have closed it while it was idle (a reset, or 421 at MAIL FROM): that says
            // nothing about the peer, so a new connection is tried like after a failed RSET.
            if (!(unchecked && closedWhileIdle(out.failure))) {
              tried.add(conn.peer.ip);
              last = problem(out.failure, conn.remote);
            }
          }
          void conn.quit(timeouts.quit);
        }
        const again = heldBack();
        if (again) return again;
        const p = await plan(route);
        if (p.kind !== 'hops') {
          const { code, enhanced, text } = p.reply;
          return every(madeUp(code, enhanced, String(text)));
        }
        const hops = sts ? allowedHops(log, sts, p.hops, ctx.message.id) : p.hops;
        if (hops.length === 0) {
          const text = `${stsName(sts!)} allows none of the MX hosts (${hostsOf(p.hops)}); it names ${sts!.mx.join(', ')}`;
          return every(madeUp(451, '4.7.0', text));
        }
        let reached = false;
        let attempts = 0;
        for (const hop of hops) {
          if (attempts >= config.maxAddresses || signal.aborted) break;
          if (tried.has(hop.ip)) continue;
          attempts++;
          const remote = describePeer({ ...hop, port });
          let conn: SmtpConnection;
          try {
            conn = await openSession(hop, what, policy, sts, signal);
          } catch (err) {
            if (err instanceof LoopError) return every(madeUp(554, '5.4.6', err.message));
            last = problem(err, remote);
            log.debug(
              { queueId: ctx.message.id, remote, err: (err as Error).message },
              'no session; next address',
            );
            continue;
          }
          reached = true;
          dest.reached();
          const out = await session(conn, ctx, batch, facts);
          if (out.kind === 'done') {
            dest.release(conn, out.reusable);
            slotHeld = false;
            return results(out.decisions);
          }
          last = problem(out.failure, conn.remote);
          log.debug(
            { queueId: ctx.message.id, remote, err: out.failure.message },
            'transaction refused; next address',
          );
          void conn.quit(timeouts.quit);
        }
        if (!reached && attempts > 0 && !signal.aborted) {
          dest.unreachable(String(last?.reply.text ?? 'no connection'));
          const b = dest.backoff();
          if (b)
            log.warn({ destination: route.key, until: b.until, reason: b.reason }, 'destination backed off');
        }
        return every(last ?? madeUp(451, '4.4.4', `No usable address for ${what}`));
      } finally {
        if (slotHeld) dest.freeSlot();
      }
    }

    /** The MTA-STS policy that applies to a delivery to `domain`, or null. */
    async function stsPolicy(domain: string, queueId: string): Promise<StsPolicy | null> {
      if (!mtaSts || literalAddress(domain)) return null;
      try {
        return await mtaSts.policyFor(domain);
      } catch (err) {
        // Whatever went wrong, no policy is known: deliver as without MTA-STS (RFC 8461 §5).
        log.warn({ queueId, domain, err }, 'MTA-STS policy lookup failed; delivering as without MTA-STS');
        return null;
      }
    }

    return {
      async route({ recipient }) {
        const a = recipient.address;
        // `<postmaster>` without a domain is always local (RFC 5321 §4.5.1).
        if (!a.domain || localDomains.has(a.domain) || localDomains.has(a.domainAscii)) return proceed();
        if (smarthostKey) {
          return routeTo(TRANSPORT, { key: smarthostKey, data: { smarthost: `${smarthost!.host}:${port}` } });
        }
        return routeTo(TRANSPORT, { key: a.domainAscii, data: { domain: a.domainAscii } });
      },

      async deliver(ctx) {
        if (ctx.route.transport !== TRANSPORT) return { kind: 'proceed' };
        const facts = new MessageFacts(ctx.message, ctx.sender);
        const results: RecipientResult[] = [];
        const max = config.maxRecipientsPerTransaction;
        for (let i = 0; i < ctx.recipients.length; i += max) {
          results.push(...(await deliverBatch(ctx, ctx.recipients.slice(i, i + max), facts)));
        }
        return { kind: 'results', results };
      },
    };
  },
});
