import {
  compileCidrs,
  defer,
  defineNote,
  definePlugin,
  deny,
  proceed,
  Tokens,
  type MessageView,
  type SessionView,
  type TransactionView,
  type Verdict,
} from '../../core/index.js';
import { Dnsbl, type DnsblClient, type ListResult } from './api.js';
import { bodyDomains } from './body.js';
import { domainName, reversedName } from './codes.js';
import { dnsblConfig, type BlockListConfig } from './config.js';
import { lookups, type ListSpec } from './lookup.js';
import { registeredDomain } from './urls.js';

export { dnsblConfig, type DnsblConfig } from './config.js';

type Stage = 'connect' | 'helo' | 'mail' | 'rcpt' | 'data_post';
type Action = BlockListConfig['action'];

/** The lookups of a session, started as soon as their subject is known. */
const Pending = defineNote<{
  readonly ip: Promise<ListResult[]>;
  helo: { readonly name: string; readonly results: Promise<ListResult[]> } | null;
  /** `tag` decisions made before MAIL: every message of the session carries them. */
  readonly tags: string[];
}>('dnsbl.pending');
/** The sender domain's lookups and this transaction's RCPT decision. */
interface Transaction {
  readonly sender: Promise<ListResult[]>;
  rcpt: Decision | null;
  readonly tags: string[];
}
const TxState = defineNote<Transaction>('dnsbl.transaction');

interface Decision {
  readonly action: Action | 'pass' | 'allow';
  /** The listings that decided it (block hits with that action), or the allow-list hits. */
  readonly hits: readonly ListResult[];
}

const SEVERITY: readonly Action[] = ['reject', 'defer', 'tag', 'ignore'];

/**
 * dnsbl — DNS block and allow lists (RFC 5782). The client address is looked up in every `ip`
 * list when it connects, the HELO name and the sender domain in the `domain` lists when they
 * are given, all at once and within `timeout`; answers are cached in the State service. A
 * listing is acted on at `applyAt` (by default RCPT, so `postmaster@` and `abuse@` stay
 * reachable), with the list's action. An allow-list hit exempts the client from every block
 * list and is published as the `Dnsbl` session note (`petrel/dnsbl`). Lists that cannot be
 * reached, time out or refuse us fail open, with a warning.
 *
 * Domain lists with `check: [body]` (URI lists such as SURBL) are asked about the domains of the
 * URLs in the message's text parts after DATA (`body.ts`), within `body.maxSize` and
 * `body.maxDomains`, and a listing is acted on at `data_post`.
 *
 * List it before the plugins that accept recipients (`relay`, `users`): a `rcpt` hook that
 * accepts ends the chain.
 */
export default definePlugin({
  name: 'dnsbl',
  order: {
    before: {
      plugins: ['relay', 'users'],
      reason: 'their rcpt hooks accept recipients, so a listing applied at RCPT would never refuse one',
    },
  },
  config: dnsblConfig,
  setup({ config, log, resolve }) {
    const trusted = compileCidrs(config.trustedNetworks);
    const lists = lookups(resolve(Tokens.Dns), resolve(Tokens.State), config.cache, log);
    const spec = (l: { zone: string; name?: string; codes?: Record<string, string>; refused: string[] }) => ({
      list: l.name ?? l.zone,
      zone: l.zone,
      codes: l.codes,
      refused: l.refused,
    });
    // Allow lists first: the note lists them so.
    const ipLists: ListSpec[] = [
      ...config.allow.map((l) => ({ ...spec(l), kind: 'allow' as const })),
      ...config.block.filter((l) => l.type === 'ip').map((l) => ({ ...spec(l), kind: 'block' as const })),
    ];
    const domainLists = (check: 'helo' | 'sender' | 'body'): ListSpec[] =>
      config.block
        .filter((l) => l.type === 'domain' && l.check.includes(check))
        .map((l) => ({ ...spec(l), kind: 'block' as const }));
    const bodyLists = domainLists('body');
    const heloLists = domainLists('helo');
    const senderLists = domainLists('sender');
    const bodyName = config.body.lookup === 'registered' ? registeredDomain : (host: string) => host;
    // Names are unique (the config schema checks): a result finds its list's action by name.
    const blockByName = new Map(config.block.map((l) => [l.name ?? l.zone, l]));

    /** Resolves after `timeout`: the end of one step's lookups. */
    function deadline(): Promise<void> {
      return new Promise((r) => setTimeout(r, config.timeout).unref());
    }

    /** A step's deadline, started when the first of its lookups needs one (see Lookups). */
    function lazyDeadline(): () => Promise<void> {
      let end: Promise<void> | undefined;
      return () => (end ??= deadline());
    }

    function queryAll(
      targets: readonly ListSpec[],
      subject: string,
      nameOf: (zone: string) => string | null,
    ): Promise<ListResult[]> {
      if (targets.length === 0) return Promise.resolve([]);
      const end = lazyDeadline();
      return Promise.all(
        targets.flatMap((s) => {
          const q = nameOf(s.zone);
          return q === null ? [] : [lists.query(s, subject, q, end)];
        }),
      );
    }

    /** When each subject's listing is acted on: at `applyAt`, or when it is first known. */
    const actAt: Record<'ip' | 'helo' | 'sender', Stage> = {
      ip: config.applyAt,
      helo: config.applyAt === 'connect' ? 'helo' : config.applyAt,
      sender: config.applyAt === 'rcpt' ? 'rcpt' : 'mail',
    };

    async function client(session: SessionView, pending: NonNullable<ReturnType<typeof pendingOf>>) {
      const results = await pending.ip;
      const allowedBy = results.filter((r) => r.kind === 'allow' && r.status === 'listed').map((r) => r.list);
      const note: DnsblClient = {
        ip: session.remote.address,
        lists: results,
        allowedBy,
        allowed: allowedBy.length > 0,
        listedBy: results.filter((r) => r.kind === 'block' && r.status === 'listed').map((r) => r.list),
      };
      session.notes.set(Dnsbl, note);
      return results;
    }

    const pendingOf = (session: SessionView) => session.notes.get(Pending);

    function decide(allow: readonly ListResult[], block: readonly ListResult[]): Decision {
      const allowHits = allow.filter((r) => r.kind === 'allow' && r.status === 'listed');
      if (allowHits.length > 0) return { action: 'allow', hits: allowHits };
      const hits = block.filter((r) => r.kind === 'block' && r.status === 'listed');
      const actionOf = (r: ListResult): Action => blockByName.get(r.list)?.action ?? 'reject';
      const action = SEVERITY.find((a) => hits.some((h) => actionOf(h) === a));
      return action
        ? { action, hits: hits.filter((h) => actionOf(h) === action) }
        : { action: 'pass', hits: [] };
    }

    /** `127.0.0.2 listed by Spamhaus ZEN (spam)`: for replies and tags. */
    const describe = (r: ListResult): string => {
      const why = r.reasons.filter((x) => x !== 'listed');
      return `${r.subject} listed by ${r.list}${why.length ? ` (${why.join(', ')})` : ''}`;
    };

    /** Judges the subjects due at `stage`; logs the decision; returns null when there is none. */
    async function judge(
      stage: Stage,
      session: SessionView,
      tx: TransactionView | null,
    ): Promise<Decision | null> {
      const pending = pendingOf(session);
      if (!pending) return null; // a trusted client: never looked up
      const due: Promise<ListResult[]>[] = [];
      if (actAt.ip === stage) due.push(pending.ip);
      if (actAt.helo === stage && pending.helo) due.push(pending.helo.results);
      const txState = tx?.notes.get(TxState);
      if (actAt.sender === stage && txState) due.push(txState.sender);
      // Nothing due here: let the lookups run on (the greeting does not wait for them). At RCPT
      // the client's standing is published all the same, for the plugins after this one.
      if (due.length === 0 && stage !== 'rcpt') return null;
      const ip = await client(session, pending);
      if (due.length === 0) return null;
      if (session.user !== null) {
        log.debug({ session: session.id, stage, reason: 'authenticated' }, 'dnsbl: not judged');
        return null;
      }
      const block = (await Promise.all(due)).flat();
      const decision = decide(ip, block);
      logVerdict(stage, session, tx, decision, [...ip, ...block]);
      return decision;
    }

    /** The one `dnsbl verdict` line of a decision. */
    function logVerdict(
      stage: Stage,
      session: SessionView,
      tx: TransactionView | null,
      decision: Decision,
      results: readonly ListResult[],
      extra: Record<string, unknown> = {},
    ): void {
      // One line per message: not even built when the level leaves it out.
      if (!log.isLevelEnabled('info')) return;
      const first = decision.hits[0];
      log.info(
        {
          session: session.id,
          ...(tx ? { tx: tx.id } : {}),
          stage,
          ip: session.remote.address,
          action: decision.action,
          list: first?.list ?? null,
          code: first ? first.codes.join(' ') : null,
          reason: first ? first.reasons.join(', ') || 'listed' : 'not listed',
          subject: first?.subject ?? null,
          hits: decision.hits.map(describe),
          failed: [
            ...new Set(
              results.filter((r) => r.status !== 'listed' && r.status !== 'clear').map((r) => r.list),
            ),
          ],
          ...extra,
        },
        'dnsbl verdict',
      );
    }

    /**
     * The body's URL domains in the body lists, after DATA; null when the body is not judged
     * (a trusted or authenticated client, no body list, a message too large or unreadable).
     */
    async function judgeBody(
      session: SessionView,
      tx: TransactionView,
      message: MessageView,
    ): Promise<Decision | null> {
      const pending = pendingOf(session);
      if (bodyLists.length === 0 || !pending) return null; // no body list; a trusted client
      const fields = { session: session.id, tx: tx.id, size: message.size };
      if (session.user !== null) {
        log.debug({ ...fields, stage: 'data_post', reason: 'authenticated' }, 'dnsbl: not judged');
        return null;
      }
      if (message.size > config.body.maxSize) {
        log.info({ ...fields, maxSize: config.body.maxSize, reason: 'too large' }, 'dnsbl: body not scanned');
        return null;
      }
      const ip = await client(session, pending);
      if (ip.some((r) => r.kind === 'allow' && r.status === 'listed')) {
        // On an allow list: exempt from every block list, so the body is not even read.
        logVerdict('data_post', session, tx, decide(ip, []), ip, { domains: 0, limitReached: false });
        return null;
      }
      let found;
      try {
        found = await bodyDomains(message.streamRaw(), {
          maxDomains: config.body.maxDomains,
          nameOf: bodyName,
        });
      } catch (err) {
        // A body the MIME parser gives up on is judged by everything else: fail open, and say so.
        log.warn({ ...fields, reason: 'unreadable', err: String(err) }, 'dnsbl: body not scanned');
        return null;
      }
      const end = lazyDeadline();
      const block = await Promise.all(
        found.domains.flatMap((d) =>
          bodyLists.flatMap((s) => {
            const q = domainName(d, s.zone);
            return q === null ? [] : [lists.query(s, d, q, end)];
          }),
        ),
      );
      let decision = decide(ip, block);
      // RFC 5321 §4.5.1: mail for postmaster (and abuse, where spam is reported with its links)
      // only is never refused for its content; it is tagged instead.
      const onlyReachable =
        tx.recipients.length > 0 &&
        tx.recipients.every((r) => config.reachable.includes(r.address.local.toLowerCase()));
      if (onlyReachable && (decision.action === 'reject' || decision.action === 'defer'))
        decision = { action: 'tag', hits: decision.hits };
      logVerdict('data_post', session, tx, decision, [...ip, ...block], {
        domains: found.domains.length,
        limitReached: found.limitReached,
        ...(onlyReachable ? { onlyReachable } : {}),
      });
      return decision;
    }

    /** The transaction's state: its sender domain's lookups, started at MAIL or (no MAIL hook) at RCPT. */
    function startTransaction(transaction: TransactionView): Transaction {
      const domain = transaction.sender?.domain;
      const state: Transaction = {
        sender: domain
          ? queryAll(senderLists, domain, (zone) => domainName(domain, zone))
          : Promise.resolve([]),
        rcpt: null,
        tags: [],
      };
      transaction.notes.set(TxState, state);
      return state;
    }

    function verdictOf(stage: Stage, d: Decision, tags: string[]): Verdict {
      if (d.action === 'tag') tags.push(...d.hits.map(describe));
      if (d.action !== 'reject' && d.action !== 'defer') return proceed();
      const hit = d.hits[0]!;
      const extra = blockByName.get(hit.list)?.message?.replaceAll('{subject}', hit.subject);
      const text = `${describe(hit)}${extra ? `; ${extra}` : ''}`;
      // RFC 5321 §3.1: refused at the greeting, 554 (and only QUIT follows); 421 closes.
      if (stage === 'connect')
        return d.action === 'reject' ? deny(554, '5.7.1', text) : defer(421, '4.7.1', text);
      // After DATA, 554: the transaction failed (RFC 5321 §4.3.2, as the scanners answer).
      if (stage === 'data_post')
        return d.action === 'reject' ? deny(554, '5.7.1', text) : defer(451, '4.7.1', text);
      return d.action === 'reject' ? deny(550, '5.7.1', text) : defer(451, '4.7.1', text);
    }

    return {
      async connect({ session }) {
        if (trusted(session.remote.address)) {
          log.debug({ session: session.id, reason: 'trusted network' }, 'dnsbl: not looked up');
          return proceed();
        }
        const ip = session.remote.address;
        const pending = {
          ip: queryAll(ipLists, ip, (zone) => reversedName(ip, zone)),
          helo: null,
          tags: [] as string[],
        };
        session.notes.set(Pending, pending);
        const d = await judge('connect', session, null);
        return d ? verdictOf('connect', d, pending.tags) : proceed();
      },

      // Without HELO lists, HELO has nothing to look up, and nothing is due at it unless the
      // client's listing is acted on at connect (it is then judged again with the HELO name's).
      ...(heloLists.length === 0 && config.applyAt !== 'connect'
        ? {}
        : {
            async helo({ session, hostname }) {
              const pending = pendingOf(session);
              if (!pending) return proceed();
              const name = hostname.toLowerCase();
              if (pending.helo?.name !== name)
                pending.helo = {
                  name,
                  results: queryAll(heloLists, name, (zone) => domainName(name, zone)),
                };
              const d = await judge('helo', session, null);
              return d ? verdictOf('helo', d, pending.tags) : proceed();
            },
          }),

      // Without sender lists, MAIL has nothing to look up, and nothing is due at it unless the
      // client's listing is acted on at MAIL: the transaction's state is then made at its first RCPT.
      ...(senderLists.length === 0 && config.applyAt !== 'mail'
        ? {}
        : {
            async mail({ session, transaction }) {
              if (!pendingOf(session)) return proceed();
              const state = startTransaction(transaction);
              const d = await judge('mail', session, transaction);
              return d ? verdictOf('mail', d, state.tags) : proceed();
            },
          }),

      async rcpt({ session, transaction, recipient }) {
        if (!pendingOf(session)) return proceed();
        const state = transaction.notes.get(TxState) ?? startTransaction(transaction);
        // Decided once per transaction (one log line), applied to each recipient.
        const first = state.rcpt === null;
        state.rcpt ??= (await judge('rcpt', session, transaction)) ?? { action: 'pass', hits: [] };
        if (first && state.rcpt.action === 'tag') state.tags.push(...state.rcpt.hits.map(describe));
        if (state.rcpt.action !== 'reject' && state.rcpt.action !== 'defer') return proceed();
        // RFC 5321 §4.5.1: postmaster must be reachable, also from a client we refuse.
        if (config.reachable.includes(recipient.local.toLowerCase())) return proceed();
        return verdictOf('rcpt', state.rcpt, []);
      },

      // After DATA there is something to do only with body lists or a list that tags.
      ...(bodyLists.length === 0 && !config.block.some((l) => l.action === 'tag')
        ? {}
        : {
            async data_post({ session, transaction, message, prependHeader }) {
              const tags = [
                ...(pendingOf(session)?.tags ?? []),
                ...(transaction.notes.get(TxState)?.tags ?? []),
              ];
              const body = await judgeBody(session, transaction, message);
              const verdict = body ? verdictOf('data_post', body, tags) : proceed();
              if (verdict.kind !== 'proceed') return verdict;
              if (tags.length > 0) prependHeader(config.tagHeader, tags.join('; '));
              return proceed();
            },
          }),
    };
  },
});
