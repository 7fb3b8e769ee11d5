import {
  accept,
  defer,
  defineNote,
  definePlugin,
  deny,
  proceed,
  Tokens,
  type BodyReplacement,
  type DataPostContext,
  type SessionView,
  type Verdict,
} from '../../core/index.js';
import { holdOnAccept } from '../queue/api.js';
import { milterConfig, type MilterEntry } from './config.js';
import { MilterLink, type StepAnswer } from './link.js';
import { ACTION_OF, BODY_CHUNK, Cmd, MilterError, P, Reply, splitStrings, strings } from './protocol.js';
import { streamBody } from './body.js';

export { milterConfig, type MilterConfig } from './config.js';

/** A milter discarded the message: the `queue` hook takes it and drops it. */
const Discarded = defineNote<{ readonly by: string }>('milter.discarded');

/**
 * Most modification actions one milter may send for one message: each is held until the final
 * reply. SMFIR_REPLBODY chunks are not counted: they go straight to the spool, bounded by
 * `limits.maxMessageSize`.
 */
const MAX_ACTIONS = 1000;

/** An envelope change a milter asked for, applied in the order it was sent. */
type EnvelopeEdit =
  | { readonly kind: 'sender'; readonly address: string; readonly args: string }
  | { readonly kind: 'add'; readonly address: string; readonly args: string }
  | { readonly kind: 'delete'; readonly address: string };

/** An address as a milter sends it: `<a@b>` (Sendmail's form), or bare. */
const bare = (s: string | undefined): string => (s ?? '').trim().replace(/^<(.*)>$/s, '$1');

/** One SMTP session's milters: null where the milter failed with default action `accept`. */
interface SessionLinks {
  readonly links: (MilterLink | null)[];
  /** A milter failed with default action tempfail or reject: every later step gets this. */
  failed: Verdict | null;
}

const REJECT = (): Verdict => deny(550, '5.7.1', 'Command rejected');
const TEMPFAIL = (): Verdict => defer(451, '4.7.1', 'Service unavailable - try again later');

/**
 * milter — runs the SMTP session past Sendmail milters (protocol version 6), in order, and
 * applies their verdicts at the matching hook (connect, helo, mail, rcpt, data) and their
 * verdict and header edits at `data_post`. See README.md for what each action becomes.
 *
 * List it before the plugins that accept recipients (`relay`, `users`) — an accepting `rcpt`
 * hook ends the chain — and before `queue`, whose place the plugin takes for a discarded message.
 */
export default definePlugin({
  name: 'milter',
  order: {
    before: {
      plugins: ['relay', 'users', 'queue'],
      reason:
        'relay and users accept recipients, ending the rcpt chain before a milter can refuse one; queue takes the message before a discarded one can be dropped',
    },
  },
  config: milterConfig,
  setup({ config, log, resolve }) {
    const hostname = resolve(Tokens.Config).hostname;
    const sessions = new Map<string, SessionLinks>();

    /**
     * Runs `fn` on `link`, closing the link if the hook's time limit is reached first: the core has
     * answered the client by then, and a late reply must not be read as the next step's answer.
     * The close makes `fn` fail, so the milter gets its default action for the rest of the session.
     */
    async function closingOnAbort<T>(
      link: MilterLink,
      signal: AbortSignal,
      fn: () => Promise<T>,
    ): Promise<T> {
      const onAbort = (): void => link.close();
      signal.addEventListener('abort', onAbort, { once: true });
      try {
        return await fn();
      } finally {
        signal.removeEventListener('abort', onAbort);
      }
    }

    /** The default action for `entry`'s failure, logged at error. */
    function failure(
      s: SessionLinks,
      i: number,
      session: SessionView,
      step: string,
      err: unknown,
    ): Verdict | null {
      const entry = config.milters[i]!;
      const action = entry.defaultAction ?? config.defaultAction;
      log.error(
        { session: session.id, milter: entry.name, step, action, err },
        'milter: failed, applying the default action',
      );
      s.links[i]?.close();
      s.links[i] = null;
      if (action === 'accept') return null;
      s.failed = action === 'reject' ? REJECT() : TEMPFAIL();
      return s.failed;
    }

    /** Turns a step's answer into a verdict for the hook, or null to go on. */
    function verdictOf(answer: StepAnswer, link: MilterLink, scope: 'session' | 'message'): Verdict | null {
      switch (answer.kind) {
        case 'continue':
        case 'skip':
          return null;
        case 'accept':
          if (scope === 'session') link.sessionDone = true;
          else link.messageDone = true;
          return null;
        case 'discard':
          // Only meaningful for a message: at connect or helo libmilter's discard is a no-op.
          if (scope === 'message') link.messageDone = true;
          return null;
        case 'reject':
          return REJECT();
        case 'tempfail':
          return TEMPFAIL();
        case 'reply':
          return answer.code >= 500
            ? deny(answer.code, answer.enhanced, answer.text)
            : defer(answer.code, answer.enhanced, answer.text);
      }
    }

    /**
     * Runs one step on every milter that still wants it; the first refusal ends the hook. `run`
     * returns the milter's answer, or null when the milter skips the step.
     */
    async function each(
      session: SessionView,
      signal: AbortSignal,
      step: string,
      scope: 'session' | 'message',
      run: (link: MilterLink) => Promise<StepAnswer | null>,
      onDiscard?: (link: MilterLink) => void,
    ): Promise<Verdict> {
      const s = sessions.get(session.id);
      if (!s) return proceed();
      if (s.failed) return s.failed;
      for (let i = 0; i < s.links.length; i++) {
        const link = s.links[i];
        if (!link || link.sessionDone || (scope === 'message' && link.messageDone)) continue;
        let answer: StepAnswer | null;
        try {
          answer = await closingOnAbort(link, signal, () => run(link));
        } catch (err) {
          const v = failure(s, i, session, step, err);
          if (v) return v;
          continue;
        }
        if (!answer) continue;
        if (answer.kind === 'discard') onDiscard?.(link);
        const v = verdictOf(answer, link, scope);
        if (v) {
          log.info(
            {
              session: session.id,
              milter: link.entry.name,
              step,
              reply: v.kind === 'proceed' ? undefined : v,
            },
            `milter: ${step} refused`,
          );
          return v;
        }
      }
      return proceed();
    }

    return {
      async connect({ session, signal }) {
        const s: SessionLinks = { links: [], failed: null };
        sessions.set(session.id, s);
        for (let i = 0; i < config.milters.length; i++) {
          try {
            s.links.push(await MilterLink.open(config.milters[i]!));
          } catch (err) {
            s.links.push(null);
            const v = failure(s, i, session, 'open', err);
            if (v) return v;
          }
        }
        const addr = session.remote.address.replace(/^::ffff:(?=\d+\.)/, '');
        const family = addr.includes(':') ? '6' : '4';
        const data = Buffer.concat([
          strings(`[${addr}]`),
          Buffer.from(family, 'latin1'),
          Buffer.from([session.remote.port >> 8, session.remote.port & 0xff]),
          strings(addr),
        ]);
        return each(session, signal, 'connect', 'session', async (link) => {
          await link.macros(Cmd.connect, {
            j: hostname,
            '{daemon_name}': session.listener.name,
            '{client_addr}': addr,
            '{client_port}': String(session.remote.port),
            '{client_name}': `[${addr}]`,
            '{if_addr}': session.local.address,
          });
          if (link.has(P.noConnect)) return null;
          return link.step(Cmd.connect, data, link.has(P.nrConn), link.entry.stepTimeout);
        });
      },

      async helo({ session, signal, hostname: name }) {
        return each(session, signal, 'helo', 'session', async (link) => {
          if (link.has(P.noHelo)) return null;
          return link.step(Cmd.helo, strings(name), link.has(P.nrHelo), link.entry.stepTimeout);
        });
      },

      async mail({ session, signal, transaction, sender, params }) {
        const s = sessions.get(session.id);
        for (const link of s?.links ?? []) {
          if (!link) continue;
          link.messageDone = false;
          // A transaction another plugin refused at MAIL never reached reset: end it first.
          await link.abort().catch(() => undefined);
        }
        const from = sender?.address ?? '';
        const args: string[] = [`<${from}>`];
        if (params.size !== undefined) args.push(`SIZE=${params.size}`);
        if (params.body) args.push(`BODY=${params.body}`);
        if (params.smtputf8) args.push('SMTPUTF8');
        if (params.ret) args.push(`RET=${params.ret}`);
        if (params.envid) args.push(`ENVID=${params.envid}`);
        if (params.auth) args.push(`AUTH=${params.auth}`);
        const v = await each(session, signal, 'mail', 'message', async (link) => {
          link.inMessage = true;
          await link.macros(Cmd.mail, {
            i: transaction.id,
            '{auth_authen}': session.user ?? undefined,
            '{mail_addr}': from,
          });
          if (link.has(P.noMail)) return null;
          return link.step(Cmd.mail, strings(...args), link.has(P.nrMail), link.entry.stepTimeout);
        });
        // A refused MAIL opens no transaction, so no reset follows: tell the milters now.
        if (v.kind !== 'proceed')
          for (const link of s?.links ?? []) await link?.abort().catch(() => undefined);
        return v;
      },

      async rcpt({ session, signal, transaction, recipient }) {
        return each(
          session,
          signal,
          'rcpt',
          'message',
          async (link) => {
            await link.macros(Cmd.rcpt, { '{rcpt_addr}': recipient.address });
            if (link.has(P.noRcpt)) return null;
            return link.step(
              Cmd.rcpt,
              strings(`<${recipient.address}>`),
              link.has(P.nrRcpt),
              link.entry.stepTimeout,
            );
          },
          (link) => transaction.notes.set(Discarded, { by: link.entry.name }),
        );
      },

      async data({ session, signal, transaction }) {
        return each(
          session,
          signal,
          'data',
          'message',
          async (link) => {
            if (link.has(P.noData)) return null;
            return link.step(Cmd.data, Buffer.alloc(0), link.has(P.nrData), link.entry.stepTimeout);
          },
          (link) => transaction.notes.set(Discarded, { by: link.entry.name }),
        );
      },

      async data_post(ctx) {
        const { session, transaction } = ctx;
        if (transaction.notes.get(Discarded)) return proceed();
        const s = sessions.get(session.id);
        if (!s) return proceed();
        if (s.failed) return s.failed;
        for (let i = 0; i < s.links.length; i++) {
          const link = s.links[i];
          if (!link || link.sessionDone || link.messageDone) continue;
          // The body a milter sends in SMFIR_REPLBODY goes straight to the spool; it is put in
          // place only once the milter's final reply accepts, and dropped on any other way out.
          const replacement: { body: BodyReplacement | null } = { body: null };
          try {
            let outcome: EomOutcome;
            try {
              outcome = await closingOnAbort(link, ctx.signal, () =>
                endOfMessage(link, ctx, transaction.id, replacement),
              );
            } catch (err) {
              const v = failure(s, i, session, 'end of message', err);
              if (v) return v;
              continue;
            }
            link.inMessage = false;
            const fields = { session: session.id, tx: transaction.id, milter: link.entry.name };
            if (outcome.answer.kind === 'discard') {
              log.info(fields, 'milter: message discarded');
              transaction.notes.set(Discarded, { by: link.entry.name });
              return proceed();
            }
            const v = verdictOf(outcome.answer, link, 'message');
            if (v) {
              log.info({ ...fields, reply: v }, 'milter: message refused');
              return v;
            }
            try {
              await applyEdits(ctx, link.entry, outcome, replacement.body, fields);
            } catch (err) {
              // An edit the server cannot make (an address that does not parse, a recipient past
              // limits.maxRecipients, a body the spool cannot take) fails the milter.
              const v = failure(s, i, session, 'end of message edits', err);
              if (v) return v;
            }
          } finally {
            await replacement.body?.abort();
          }
        }
        return proceed();
      },

      async queue({ session, transaction }) {
        const d = transaction.notes.get(Discarded);
        if (!d) return proceed();
        // Postfix's and Sendmail's discard: the client is told the message was taken; it is dropped.
        log.info(
          { session: session.id, tx: transaction.id, milter: d.by },
          'milter: discarded message accepted and dropped',
        );
        return accept();
      },

      async reset({ session }) {
        for (const link of sessions.get(session.id)?.links ?? []) await link?.abort().catch(() => undefined);
      },

      async disconnect({ session }) {
        const s = sessions.get(session.id);
        sessions.delete(session.id);
        for (const link of s?.links ?? []) link?.quit();
      },
    };

    interface EomOutcome {
      readonly answer: StepAnswer;
      readonly adds: { name: string; value: string }[];
      readonly changes: { index: number; name: string; value: string }[];
      readonly quarantine: string[];
      readonly envelope: EnvelopeEdit[];
    }

    /**
     * Headers, end of headers, body chunks, end of message, then the actions and the final reply.
     * A replacement body is begun in `replacement.body` (the caller commits or aborts it).
     */
    async function endOfMessage(
      link: MilterLink,
      ctx: DataPostContext,
      id: string,
      replacement: { body: BodyReplacement | null },
    ): Promise<EomOutcome> {
      const step = link.entry.stepTimeout;
      const refused = (a: StepAnswer): EomOutcome | null =>
        a.kind === 'continue' || a.kind === 'skip'
          ? null
          : { answer: a, adds: [], changes: [], quarantine: [], envelope: [] };
      if (!link.has(P.noHdrs))
        for (const h of ctx.message.headers.list()) {
          const a = await link.step(Cmd.header, strings(h.name, h.value), link.has(P.nrHdr), step);
          const r = refused(a);
          if (r) return r;
        }
      await link.macros(Cmd.eoh, { i: id });
      if (!link.has(P.noEoh)) {
        const r = refused(await link.step(Cmd.eoh, Buffer.alloc(0), link.has(P.nrEoh), step));
        if (r) return r;
      }
      if (!link.has(P.noBody)) {
        for await (const chunk of streamBody(ctx.message.streamRaw(), BODY_CHUNK)) {
          const a = await link.step(Cmd.body, chunk, link.has(P.nrBody), step);
          if (a.kind === 'skip') break;
          const r = refused(a);
          if (r) return r;
        }
      }
      await link.macros(Cmd.bodyEob, { i: id });
      await link.conn.send(Cmd.bodyEob);
      const deadline = Date.now() + link.entry.eomTimeout;
      const out: EomOutcome = {
        answer: { kind: 'continue' },
        adds: [],
        changes: [],
        quarantine: [],
        envelope: [],
      };
      for (let count = 0; ;) {
        const p = await link.readSkippingProgress(deadline);
        const needs = ACTION_OF[p.cmd];
        if (needs === undefined) return { ...out, answer: link.answer(p) };
        if ((link.actions & needs) === 0)
          throw new MilterError(`milter sent '${p.cmd}' without negotiating action 0x${needs.toString(16)}`);
        if (p.cmd === Reply.replBody) {
          replacement.body ??= ctx.replaceBody();
          await replacement.body.write(p.data);
          continue;
        }
        // Each other action is held until the final reply: a bound keeps a runaway milter's cost fixed.
        if (++count > MAX_ACTIONS) throw new MilterError(`milter sent over ${MAX_ACTIONS} actions`);
        switch (p.cmd) {
          case Reply.addHeader:
          case Reply.insHeader: {
            // SMFIR_INSHEADER's position is not honoured: the core adds fields on top (README).
            const [name, value] = splitStrings(p.cmd === Reply.insHeader ? p.data.subarray(4) : p.data);
            if (!name) throw new MilterError('milter sent an empty header name');
            out.adds.push({ name, value: value ?? '' });
            break;
          }
          case Reply.chgHeader: {
            const index = p.data.readUInt32BE(0);
            const [name, value] = splitStrings(p.data.subarray(4));
            if (!name) throw new MilterError('milter sent an empty header name');
            out.changes.push({ index, name, value: value ?? '' });
            break;
          }
          case Reply.quarantine:
            out.quarantine.push(splitStrings(p.data)[0] ?? '');
            break;
          case Reply.chgFrom: {
            const [address, args] = splitStrings(p.data);
            out.envelope.push({ kind: 'sender', address: bare(address), args: args ?? '' });
            break;
          }
          case Reply.addRcpt:
          case Reply.addRcptPar: {
            const [address, args] = splitStrings(p.data);
            out.envelope.push({ kind: 'add', address: bare(address), args: args ?? '' });
            break;
          }
          case Reply.delRcpt:
            out.envelope.push({ kind: 'delete', address: bare(splitStrings(p.data)[0]) });
            break;
        }
      }
    }

    /**
     * Applies one milter's edits once its final reply accepted: the envelope in the milter's order,
     * then the body, then the header changes, additions and quarantine. A failure throws, with
     * the edits before it made.
     */
    async function applyEdits(
      ctx: DataPostContext,
      entry: MilterEntry,
      outcome: EomOutcome,
      body: BodyReplacement | null,
      fields: Record<string, string>,
    ): Promise<void> {
      for (const e of outcome.envelope) {
        // Postfix too ignores ESMTP arguments of SMFIR_CHGFROM and SMFIR_ADDRCPT_PAR: the
        // transaction's MAIL parameters stay, and an added recipient gets no NOTIFY or ORCPT.
        if (e.kind !== 'delete' && e.args.trim() !== '')
          log.warn({ ...fields, action: e.kind, args: e.args }, 'milter: ESMTP arguments ignored');
        if (e.kind === 'sender') {
          const from = ctx.transaction.sender?.address ?? '';
          ctx.setSender(e.address);
          log.info({ ...fields, from, to: e.address }, 'milter: envelope sender changed');
        } else if (e.kind === 'add') {
          const added = ctx.addRecipient(e.address);
          log.info({ ...fields, rcpt: e.address, added }, 'milter: recipient added');
        } else {
          const removed = ctx.removeRecipient(e.address);
          log.info({ ...fields, rcpt: e.address, removed }, 'milter: recipient deleted');
        }
      }
      if (body) {
        await body.commit();
        log.info({ ...fields, size: ctx.message.size }, 'milter: body replaced');
      }
      for (const c of outcome.changes) {
        // SMFIR_CHGHEADER: the index counts fields of that name from 1; an empty value deletes.
        const name = c.name.toLowerCase();
        let n = 0;
        const removed = await ctx.removeHeaders(
          (f) => f.name.toLowerCase() === name && ++n === Math.max(1, c.index),
        );
        if (c.value !== '') ctx.prependHeader(c.name, c.value.trimStart());
        log.info(
          { ...fields, header: c.name, index: c.index, removed: removed.length },
          c.value === '' ? 'milter: header deleted' : 'milter: header changed (moved to the top)',
        );
      }
      // prependHeader puts the newest on top: add in reverse so they read in the milter's order.
      for (const a of [...outcome.adds].reverse()) ctx.prependHeader(a.name, a.value.trimStart());
      if (outcome.adds.length > 0)
        log.info({ ...fields, headers: outcome.adds.map((a) => a.name) }, 'milter: headers added');
      for (const reason of outcome.quarantine) {
        holdOnAccept(ctx.transaction.notes, `milter ${entry.name}: ${reason}`);
        log.info({ ...fields, reason }, 'milter: message quarantined');
      }
    }
  },
});
