import { hash } from 'node:crypto';
import {
  compileCidrs,
  networkOf,
  defer,
  defineNote,
  definePlugin,
  proceed,
  Tokens,
  type Address,
  type SessionView,
  type StateStore,
  type TransactionView,
} from '../../core/index.js';
import { Dnsbl } from '../dnsbl/api.js';
import { MailAuthSpf } from '../mailauth/api.js';
import { greylistConfig, type GreylistConfig } from './config.js';

export { greylistConfig, type GreylistConfig } from './config.js';

/** A session-wide exemption is logged once per session, not once per recipient. */
const ExemptLogged = defineNote<{ readonly reason: string }>('greylist.exempt');

/** What the plugin decided for one recipient. */
type Decision =
  | { readonly kind: 'greylisted'; readonly retryIn: number; readonly first: boolean }
  | {
      readonly kind: 'passed';
      readonly waited: number;
      readonly autoAllowed: boolean;
      readonly passes: number;
    }
  | { readonly kind: 'known' }
  | { readonly kind: 'network' };

/**
 * The State keys of one triplet and of its client network. The triplet is hashed: the store holds
 * no addresses, and every key has the same short length whatever the client sends.
 *
 * - `greylist:wait:<t>`: present from the first attempt until `delay` has passed.
 * - `greylist:seen:<t>`: present from the first attempt for `retryWindow`; the value is when
 *   (this worker's clock, used only for the numbers in replies and logs).
 * - `greylist:pass:<t>`: the triplet got through; lives `expire`, renewed on use (`renewed`).
 * - `greylist:passes:<net>`: a window of events, one per distinct triplet through (`expire`).
 * - `greylist:net:<net>`: the network is auto-allowed; lives `autoAllowFor`, renewed on use.
 */
function keys(net: string, sender: string, recipient: string) {
  const text = `${net}\0${sender}\0${recipient}`;
  let t: string | undefined;
  // Hashed when a key of the triplet is first asked for: not at all when this process's copy
  // answers (Known). The one-shot form: a Hash object per recipient cost more than the reads.
  const triplet = (): string => (t ??= hash('sha256', text, 'base64url'));
  return {
    /** The triplet as this process's copy knows it: its text, never stored. */
    known: `pass\0${text}`,
    get triplet() {
      return triplet();
    },
    get wait() {
      return `greylist:wait:${triplet()}`;
    },
    get seen() {
      return `greylist:seen:${triplet()}`;
    },
    get pass() {
      return `greylist:pass:${triplet()}`;
    },
    passes: `greylist:passes:${net}`,
    net: `greylist:net:${net}`,
  };
}

/**
 * Runs the greylisting steps for one triplet. Several workers (and machines, with Redis) run them
 * at once for the same triplet; every interleaving is safe:
 *
 * - A first attempt claims `wait` with "set if absent": of two racing workers one wins and records
 *   the triplet, the other sees an attempt already recorded and says "too early". `seen` is
 *   written after `wait`, so whoever finds `seen` without `wait` knows the delay has passed.
 * - A retry after the delay finds `seen` and no `wait`: it is let through and `pass` is written.
 *   Two retries at once are both let through — both are retries.
 * - The delay and the window are the store's lifetimes, so they are measured on one clock for
 *   every worker and machine.
 */
async function judge(
  state: StateStore,
  known: Known,
  config: GreylistConfig,
  k: ReturnType<typeof keys>,
): Promise<Decision> {
  const now = Date.now();
  // A network or triplet this process found passed a moment ago costs no State read.
  const netKnown = known.get(k.net, now);
  if (netKnown !== null) {
    await renewed(state, known, () => k.net, k.net, netKnown, config.autoAllowFor, now);
    return { kind: 'network' };
  }
  const passKnown = known.get(k.known, now);
  if (passKnown !== null) {
    await renewed(state, known, () => k.pass, k.known, passKnown, config.expire, now);
    return { kind: 'known' };
  }
  const net = await state.get(k.net);
  if (net !== null) {
    known.put(k.net, net, config.autoAllowFor, now);
    await renewed(state, known, () => k.net, k.net, net, config.autoAllowFor, now);
    return { kind: 'network' };
  }
  const pass = await state.get(k.pass);
  if (pass !== null) {
    known.put(k.known, pass, config.expire, now);
    await renewed(state, known, () => k.pass, k.known, pass, config.expire, now);
    return { kind: 'known' };
  }
  const retryIn = (since: number): number => Math.max(1, Math.ceil((config.delay - (now - since)) / 1000));
  if ((await state.get(k.wait)) === null) {
    const seen = await state.get(k.seen);
    if (seen !== null) {
      await state.set(k.pass, String(now), { ttlMs: config.expire });
      await state.delete(k.seen);
      let autoAllowed = false;
      let passes = 0;
      if (config.autoAllowAfter > 0) {
        passes = await state.addEvent(k.passes, k.triplet, { windowMs: config.expire });
        // "Set if absent": the network's auto-allowance is announced once, by whoever started it.
        if (passes >= config.autoAllowAfter)
          autoAllowed = await state.compareAndSet(k.net, null, String(now), {
            ttlMs: config.autoAllowFor,
          });
      }
      return { kind: 'passed', waited: Math.round((now - Number(seen)) / 1000), autoAllowed, passes };
    }
    if (await state.compareAndSet(k.wait, null, String(now), { ttlMs: config.delay })) {
      await state.set(k.seen, String(now), { ttlMs: config.retryWindow });
      return { kind: 'greylisted', retryIn: retryIn(now), first: true };
    }
  }
  const since = Number((await state.get(k.seen)) ?? now);
  return { kind: 'greylisted', retryIn: retryIn(since), first: false };
}

/**
 * How stale a renewal of `pass` or `net` may be, as a share of its lifetime: a key in use is
 * written again only once this much of its lifetime has passed since it was last written, not on
 * every recipient (a write costs far more than the read that finds the key). So a triplet or
 * network in use lives at least 99 % of its lifetime after its last use.
 */
const RENEW_AFTER = 0.01;

/**
 * Renews a `pass` or `net` key found with `value`: the time it was last written (the writer's
 * clock; '1', as earlier versions wrote, reads as long ago and renews it at once); `copy` is the
 * key's name in this process's copy (Known). `key` is asked for only to write: a triplet's key
 * costs its hash.
 */
function renewed(
  state: StateStore,
  known: Known,
  key: () => string,
  copy: string,
  value: string,
  ttlMs: number,
  now: number,
): Promise<void> | undefined {
  const age = now - Number(value);
  // A time ahead of this clock (another machine's, or not a time) renews it too. Not due (nearly
  // always): nothing to wait for.
  if (age >= 0 && age < ttlMs * RENEW_AFTER) return undefined;
  return state.set(key(), String(now), { ttlMs }).then(() => known.put(copy, String(now), ttlMs, now));
}

/**
 * How long this process answers from its own copy that a triplet or network passed, before it
 * reads the State service again: a `pass` or `net` key is never removed before it expires (only
 * renewed, which makes it live longer), so a copy can only be out of date if someone deletes the
 * key by hand — and it then is for this long at most.
 */
const KNOWN_FOR_MS = 60_000;
/** Copies this process keeps at most; past this many, the oldest is dropped. */
const KNOWN_ENTRIES = 10_000;

/**
 * This process's copy of the `pass` and `net` keys it found in the State service: each with its
 * value (when it was last written, for the renewal) and until when the copy answers — never past
 * the key's own expiry as its value tells it (the writer's clock), and never past KNOWN_FOR_MS. A
 * recipient of a known triplet then costs no State operation, where it cost two reads, nor the
 * triplet's hash: a triplet is held by its text (`keys().known`; memory only, never stored). A Map
 * keeps insertion order, so the first entry is the oldest.
 */
class Known {
  private readonly entries = new Map<string, { readonly value: string; readonly until: number }>();

  get(key: string, now: number): string | null {
    const hit = this.entries.get(key);
    if (!hit) return null;
    if (hit.until > now) return hit.value;
    this.entries.delete(key);
    return null;
  }

  put(key: string, value: string, ttlMs: number, now: number): void {
    const written = Number(value);
    // A time ahead of this clock or not a time: no copy, the store is asked each time.
    if (!(written <= now)) return;
    const until = Math.min(written + ttlMs, now + KNOWN_FOR_MS);
    if (until <= now) return;
    this.entries.delete(key);
    if (this.entries.size >= KNOWN_ENTRIES) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(key, { value, until });
  }
}

/**
 * greylist — defers mail from an unknown (client network, sender, recipient) triplet with
 * `451 4.7.1` and accepts the retry that comes after `delay` (RFC 5321 §4.5.4.1: a real mail
 * server retries; much bulk software does not). The triplet is then remembered, and a client
 * network with `autoAllowAfter` triplets through passes without greylisting. All of it lives in
 * the State service, so every worker and every server sharing a Redis agree.
 *
 * Applied at RCPT, per recipient: `postmaster` stays reachable at once (RFC 5321 §4.5.1). List it
 * before the plugins that accept recipients (`relay`, `users`): an accepting `rcpt` hook ends the
 * chain; and after `dnsbl`, whose `Dnsbl` note (`petrel/dnsbl`) exempts clients on an allow list.
 * Mail whose sender domain's SPF passes for the client is exempt too (`exemptSpfPass`), by the
 * `mailauth` plugin's result (`MailAuthSpf`, `petrel/mailauth`), made at MAIL, so before any RCPT.
 *
 * A State failure fails open: the recipient is not greylisted and the failure is logged at error.
 * Greylisting only delays spam; refusing every first-time sender while the store is down would
 * delay all legitimate mail instead.
 */
export default definePlugin({
  name: 'greylist',
  order: {
    before: {
      plugins: ['relay', 'users'],
      reason: 'their rcpt hooks accept recipients, so greylisting would never defer one',
    },
    after: { plugins: ['dnsbl'], reason: 'its allow lists exempt clients only once it has run' },
  },
  config: greylistConfig,
  setup({ config, log, resolve }) {
    const state = resolve(Tokens.State);
    const known = new Known();
    const trusted = compileCidrs(config.trustedNetworks);

    /** Why the whole session is exempt, or null. */
    function sessionExempt(session: SessionView): string | null {
      if (session.user !== null) return 'authenticated';
      if (trusted(session.remote.address)) return 'trusted network';
      // The dnsbl plugin (listed before this one) found the client on a DNS allow list.
      if (session.notes.get(Dnsbl)?.allowed) return 'dns allow list';
      return null;
    }

    /** Why this recipient of this transaction is exempt, or null. */
    function recipientExempt(transaction: TransactionView, recipient: Address): string | null {
      // RFC 5321 §4.5.1: postmaster must be reachable, by anyone, at once.
      if (recipient.local.toLowerCase() === 'postmaster') return 'postmaster';
      const to = recipient.address.toLowerCase();
      const toDomain = recipient.domainAscii.toLowerCase();
      if (config.exemptRecipients.some((r) => r === to || r === toDomain)) return 'exempt recipient';
      const from = transaction.sender?.domainAscii.toLowerCase();
      if (from && config.exemptSenderDomains.some((d) => from === d || from.endsWith(`.${d}`)))
        return 'exempt sender domain';
      // The sender's domain says this client sends its mail: a retry would prove nothing more.
      // The result is the mailauth plugin's, made at MAIL; absent (no mailauth, or a transaction
      // it does not judge), the exemption does not apply.
      if (config.exemptSpfPass && transaction.notes.get(MailAuthSpf)?.mailFrom.result === 'pass')
        return 'spf pass';
      return null;
    }

    return {
      async rcpt({ session, transaction, recipient }) {
        const sender = transaction.sender?.address.toLowerCase() ?? '';
        const fields = {
          session: session.id,
          tx: transaction.id,
          ip: session.remote.address,
          from: sender === '' ? '<>' : sender,
          to: recipient.address,
        };
        const whole = sessionExempt(session);
        if (whole) {
          if (!session.notes.get(ExemptLogged)) {
            session.notes.set(ExemptLogged, { reason: whole });
            const allowedBy = whole === 'dns allow list' ? session.notes.get(Dnsbl)?.allowedBy : undefined;
            log.info(
              {
                session: session.id,
                ip: session.remote.address,
                reason: whole,
                ...(allowedBy ? { allowedBy } : {}),
              },
              'greylist: exempt',
            );
          }
          return proceed();
        }
        const why = recipientExempt(transaction, recipient);
        const spf = transaction.notes.get(MailAuthSpf);
        if (why) {
          log.info(
            { ...fields, reason: why, ...(why === 'spf pass' ? { spfDomain: spf?.mailFrom.domain } : {}) },
            'greylist: exempt',
          );
          return proceed();
        }
        const network = networkOf(session.remote.address, {
          ipv4: config.ipv4Prefix,
          ipv6: config.ipv6Prefix,
        });
        const k = keys(network, sender, recipient.address.toLowerCase());
        let decision: Decision;
        try {
          decision = await judge(state, known, config, k);
        } catch (err) {
          log.error(
            { ...fields, network, err },
            'greylist: state failed, recipient not greylisted (fail open)',
          );
          return proceed();
        }
        switch (decision.kind) {
          case 'greylisted':
            log.info(
              {
                ...fields,
                network,
                retryIn: decision.retryIn,
                first: decision.first,
                // Why SPF did not exempt it: the result, or null when none was made (no mailauth).
                ...(config.exemptSpfPass ? { spf: spf?.mailFrom.result ?? null } : {}),
              },
              decision.first ? 'greylist: greylisted' : 'greylist: greylisted, retry too early',
            );
            return defer(451, '4.7.1', `Greylisted, please try again in ${decision.retryIn} seconds`);
          case 'passed':
            log.info({ ...fields, network, waited: decision.waited }, 'greylist: passed after retry');
            if (decision.autoAllowed)
              log.info(
                { session: session.id, ip: session.remote.address, network, passes: decision.passes },
                'greylist: network auto-allowed',
              );
            return proceed();
          case 'known':
            log.info({ ...fields, network }, 'greylist: passed, known triplet');
            return proceed();
          case 'network':
            log.info({ ...fields, network }, 'greylist: passed, auto-allowed network');
            return proceed();
        }
      },
    };
  },
});
