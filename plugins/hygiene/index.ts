import {
  compileCidrs,
  defer,
  defineNote,
  definePlugin,
  deny,
  proceed,
  Tokens,
  type SessionView,
  type TransactionView,
  type Verdict,
} from '../../core/index.js';
import { Dnsbl } from '../dnsbl/api.js';
import { Hygiene, type Fcrdns, type Finding, type HygieneResults } from './api.js';
import { fcrdns, heloFindings } from './checks.js';
import { hygieneConfig, type Action } from './config.js';

export { hygieneConfig, type HygieneConfig } from './config.js';

type Stage = 'helo' | 'mail' | 'rcpt';

/** The session's checks: FCrDNS started at connect, the HELO findings at each HELO. */
const Pending = defineNote<{
  readonly fcrdns: Promise<Fcrdns>;
  helo: { readonly name: string; readonly findings: readonly Finding[] } | null;
  /** `tag` decisions made at HELO: every message of the session carries them. */
  readonly tags: string[];
}>('hygiene.pending');
/** This transaction's decision (made once, at MAIL or at the first RCPT) and its tags. */
const TxState = defineNote<{ decision: Decision | null; readonly tags: string[] }>('hygiene.transaction');

interface Decision {
  /** `pass`: no finding; `exempt`: not judged (see `exempt`). */
  readonly action: Action | 'pass' | 'exempt';
  /** The findings with that action (the ones the reply or tag names). */
  readonly decisive: readonly Finding[];
}

const SEVERITY: readonly Action[] = ['reject', 'defer', 'tag', 'ignore'];

/** Client text in replies and logs: printable ASCII, bounded. */
const printable = (s: string): string => s.replace(/[^\x21-\x7e]/g, '?').slice(0, 100);

/**
 * hygiene — connection hygiene. The client's reverse DNS is checked forward-confirmed (FCrDNS,
 * RFC 8601 §3) in the background from connect, so the greeting never waits for it; its HELO name
 * is checked at each HELO (syntax, a bare address, our own name or address, an address literal
 * that is not the client's, a name without a dot). Each finding has its own action (`reject`,
 * `defer`, `tag`, `ignore`), applied at `applyAt` (by default RCPT, where `postmaster@` stays
 * reachable); the results are published as the `Hygiene` note (`petrel/hygiene`).
 *
 * Authenticated clients and clients on a `dnsbl` allow list are checked but not judged;
 * `trustedNetworks` are not checked at all. List it after `dnsbl` (whose allow-list note exempts)
 * and before `relay` and `users` (an accepting `rcpt` hook ends the chain).
 */
export default definePlugin({
  name: 'hygiene',
  order: {
    before: {
      plugins: ['relay', 'users'],
      reason: 'their rcpt hooks accept recipients, so a finding applied at RCPT would never refuse one',
    },
    after: { plugins: ['dnsbl'], reason: 'its allow lists exempt clients only once it has run' },
  },
  config: hygieneConfig,
  setup({ config, log, resolve }) {
    const dns = resolve(Tokens.Dns);
    const server = resolve(Tokens.Config);
    const trusted = compileCidrs(config.trustedNetworks);
    const ourNames = [server.hostname, ...server.localDomains].map((n) => n.toLowerCase());

    /** The results so far, published as the note. */
    async function results(session: SessionView, pending: NonNullable<ReturnType<typeof pendingOf>>) {
      const f = await pending.fcrdns;
      const note: HygieneResults = {
        ip: session.remote.address,
        fcrdns: f,
        helo: pending.helo?.name ?? null,
        findings: [
          ...(f.result === 'pass' ? [] : [`fcrdns-${f.result}` as const]),
          ...(pending.helo?.findings ?? []),
        ],
      };
      session.notes.set(Hygiene, note);
      return note;
    }

    const pendingOf = (session: SessionView) => session.notes.get(Pending);

    function exemption(session: SessionView): string | null {
      if (session.user !== null) return 'authenticated';
      // The dnsbl plugin (listed before this one) found the client on a DNS allow list.
      if (session.notes.get(Dnsbl)?.allowed) return 'dns allow list';
      return null;
    }

    /** Judges the findings at `stage`, logs the decision in one line. */
    async function judge(stage: Stage, session: SessionView, tx: TransactionView | null): Promise<Decision> {
      const r = await results(session, pendingOf(session)!);
      const exempt = exemption(session);
      const action = exempt
        ? undefined
        : SEVERITY.find((a) => r.findings.some((f) => config.actions[f] === a));
      const decision: Decision = exempt
        ? { action: 'exempt', decisive: [] }
        : action
          ? { action, decisive: r.findings.filter((f) => config.actions[f] === action) }
          : { action: 'pass', decisive: [] };
      log.info(
        {
          session: session.id,
          ...(tx ? { tx: tx.id } : {}),
          stage,
          ip: r.ip,
          helo: r.helo === null ? null : printable(r.helo),
          fcrdns: r.fcrdns.result,
          fcrdnsDetail: r.fcrdns.detail,
          ptr: r.fcrdns.names,
          findings: r.findings,
          action: decision.action,
          ...(exempt ? { reason: exempt } : {}),
        },
        'hygiene verdict',
      );
      return decision;
    }

    /** What a finding means, for replies and tags. */
    function describe(f: Finding, session: SessionView): string {
      const r = session.notes.get(Hygiene)!;
      const ip = r.ip;
      const helo = printable(r.helo ?? '');
      switch (f) {
        case 'fcrdns-fail':
          return r.fcrdns.names.length === 0
            ? `no reverse DNS for ${ip}`
            : `reverse DNS of ${ip} (${printable(r.fcrdns.names[0]!)}) does not resolve back to it`;
        case 'fcrdns-temperror':
          return `reverse DNS of ${ip} could not be checked (${r.fcrdns.detail})`;
        case 'helo-invalid':
          return `HELO ${helo} is not a valid domain name or address literal`;
        case 'helo-bare-ip':
          return `HELO ${helo} is an address without brackets (RFC 5321 4.1.3)`;
        case 'helo-ours':
          return `HELO ${helo} is our own name or address`;
        case 'helo-literal-mismatch':
          return `HELO ${helo} is not your address ${ip}`;
        case 'helo-no-dot':
          return `HELO ${helo} is not a fully qualified domain name`;
      }
    }

    function verdictOf(d: Decision, session: SessionView, tags: string[]): Verdict {
      const text = d.decisive.map((f) => describe(f, session)).join('; ');
      if (d.action === 'tag') tags.push(text);
      if (d.action === 'reject') return deny(550, '5.7.1', text);
      if (d.action === 'defer') return defer(451, '4.7.1', `${text}; try again later`);
      return proceed();
    }

    return {
      async connect({ session }) {
        if (trusted(session.remote.address)) {
          log.debug({ session: session.id, reason: 'trusted network' }, 'hygiene: not checked');
          return proceed();
        }
        // Started now, awaited only when a decision needs it: the greeting does not wait.
        const end = new Promise<void>((r) => setTimeout(r, config.timeout).unref());
        const check = fcrdns(dns, session.remote.address, end).then((f) => {
          log.debug({ session: session.id, ip: session.remote.address, ...f }, 'hygiene: fcrdns checked');
          return f;
        });
        session.notes.set(Pending, {
          fcrdns: check,
          helo: null,
          tags: [],
        });
        return proceed();
      },

      async helo({ session, hostname }) {
        const pending = pendingOf(session);
        if (!pending) return proceed();
        pending.helo = {
          name: hostname,
          findings: heloFindings(hostname, session.remote.address, {
            names: ourNames,
            address: session.local.address,
          }),
        };
        if (config.applyAt !== 'helo') return proceed();
        pending.tags.length = 0; // a new HELO is judged afresh
        return verdictOf(await judge('helo', session, null), session, pending.tags);
      },

      async mail({ session, transaction }) {
        if (!pendingOf(session)) return proceed();
        const state = { decision: null as Decision | null, tags: [] as string[] };
        transaction.notes.set(TxState, state);
        if (config.applyAt !== 'mail') return proceed();
        state.decision = await judge('mail', session, transaction);
        return verdictOf(state.decision, session, state.tags);
      },

      async rcpt({ session, transaction, recipient }) {
        const pending = pendingOf(session);
        const state = transaction.notes.get(TxState);
        if (!pending || !state) return proceed();
        if (config.applyAt !== 'rcpt') {
          await results(session, pending); // published for the plugins after this one
          return proceed();
        }
        // Decided once per transaction (one log line), applied to each recipient.
        const first = state.decision === null;
        state.decision ??= await judge('rcpt', session, transaction);
        const d = state.decision;
        if (first && d.action === 'tag') verdictOf(d, session, state.tags);
        if (d.action !== 'reject' && d.action !== 'defer') return proceed();
        // RFC 5321 §4.5.1: postmaster must be reachable, also from a client we refuse.
        if (config.reachable.includes(recipient.local.toLowerCase())) return proceed();
        return verdictOf(d, session, []);
      },

      async data_post({ session, transaction, prependHeader }) {
        const tags = [...(pendingOf(session)?.tags ?? []), ...(transaction.notes.get(TxState)?.tags ?? [])];
        if (tags.length > 0) prependHeader(config.tagHeader, tags.join('; '));
        return proceed();
      },
    };
  },
});
