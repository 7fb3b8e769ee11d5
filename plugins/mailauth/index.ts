import { tmpdir } from 'node:os';
import { resolve as resolvePath } from 'node:path';
import type { DNSResolver } from 'mailauth';
import {
  compileCidrs,
  MessageCopy,
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
import { holdOnAccept } from '../queue/api.js';
import { MailAuth, MailAuthSpf, type MailAuthResults, type SpfCheck } from './api.js';
import { budgeted, checkHelo, checkMessage, checkSpf, heloIsDomain } from './checks.js';
import { mailauthConfig } from './config.js';
import { authResultsValue, claimsAuthservId } from './header.js';
import { decide, messageFindings, refusal, spfFinding, type Finding } from './policy.js';
import { arcSet, loadSealKey, ourResults } from './seal.js';

export { mailauthConfig, type MailauthConfig } from './config.js';

/** The HELO check of a session, redone only when the client says HELO again with another name. */
const HeloSpf = defineNote<{ readonly name: string; readonly check: SpfCheck | null }>('mailauth.helo');
/** Whether the SPF refusal of this transaction (given to each RCPT) has been logged. */
const SpfRefusalLogged = defineNote<true>('mailauth.spf-refusal-logged');

/**
 * mailauth — judges incoming mail: SPF at MAIL (the MAIL FROM and HELO identities), then after
 * DATA every DKIM signature, the ARC chain and DMARC. Detection is `checks.ts`, the choice of
 * action is `policy.ts` and configuration. The message gets one `Authentication-Results` field;
 * fields that claim our authserv-id are removed first (RFC 8601 §5). The findings go to the
 * `MailAuth` note (`petrel/mailauth`) and one log line per message.
 *
 * Where each verdict is given: SPF at RCPT (the MAIL FROM result is known then, and a refusal
 * per recipient lets `postmaster` through, RFC 5321 §4.5.1); DKIM, ARC and DMARC need the
 * message, so after DATA. List this plugin before the plugins that accept recipients (`relay`,
 * `users`): a `rcpt` hook that accepts ends the chain.
 */
export default definePlugin({
  name: 'mailauth',
  order: {
    before: {
      plugins: ['relay', 'users'],
      reason: 'their rcpt hooks accept recipients, so an SPF refusal at RCPT would silently become a tag',
    },
  },
  config: mailauthConfig,
  // An ARC set signs the message as it leaves: after every rewrite (a 7-bit downgrade).
  transformPhase: 'sign',
  async setup({ config, log, hostname, resolve, baseDir }) {
    const authservId = config.authservId ?? hostname;
    const dns = resolve(Tokens.Dns);
    const lookup = ((name: string, rrtype: string) => dns.resolve(name, rrtype)) as DNSResolver;
    const trusted = compileCidrs(config.trustedNetworks);
    const spfOpts = { mta: authservId, resolver: lookup, timeout: config.spfTimeout, strict: config.strict };

    // Read once per plugin set (start, reload): a bad key stops the start with its file named.
    const sealing = config.arcSeal;
    const sealKey = sealing
      ? await loadSealKey(resolvePath(baseDir, sealing.keyFile), sealing.domain, sealing.selector)
      : null;

    /** Why a session is not judged, or null when it is. */
    const exempt = (session: SessionView): string | null =>
      trusted(session.remote.address) ? 'trusted network' : session.user !== null ? 'authenticated' : null;

    const heloName = (session: SessionView): string =>
      session.helo?.hostname ?? `[${session.remote.address}]`;

    async function heloCheck(session: SessionView): Promise<SpfCheck | null> {
      const name = heloName(session);
      const known = session.notes.get(HeloSpf);
      if (known?.name === name) return known.check;
      const check = await checkHelo({ ...spfOpts, ip: session.remote.address, helo: name });
      session.notes.set(HeloSpf, { name, check });
      return check;
    }

    /** What every `mailauth verdict` log line starts with. */
    const verdictFields = (
      session: SessionView,
      transaction: TransactionView,
      spf: { readonly mailFrom: SpfCheck; readonly helo: SpfCheck | null },
    ): Record<string, unknown> => ({
      session: session.id,
      tx: transaction.id,
      ip: session.remote.address,
      from: transaction.sender?.address ?? '<>',
      spf: spf.mailFrom.result,
      spfHelo: spf.helo?.result ?? null,
    });

    function verdictOf(action: 'reject' | 'defer', findings: readonly Finding[]): Verdict {
      const r = refusal(action, findings);
      return action === 'reject' ? deny(r.code, r.enhanced, r.text) : defer(r.code, r.enhanced, r.text);
    }

    return {
      // Mail judged on arrival (it carries our Authentication-Results) that leaves for another
      // server is being forwarded: it gets an ARC set. Anything else passes untouched, unread.
      async transform({ message, route, content }) {
        if (!sealing || !sealKey || !sealing.transports.includes(route.transport)) return content;
        const copy = await MessageCopy.of(content, {
          memoryLimit: sealing.memoryLimit,
          tempDir: sealing.tempDir ?? tmpdir(),
        });
        const results = ourResults(copy.headerBlock(), authservId);
        if (!results) return copy.stream();
        const set = await arcSet(copy, sealKey, results).catch((err: unknown) => ({ error: String(err) }));
        if ('error' in set) {
          // A forwarded copy without our seal is still a good copy: send it, and say why.
          log.warn({ queueId: message.id, reason: set.error }, 'ARC: forwarded message not sealed');
          return copy.stream();
        }
        log.debug(
          { queueId: message.id, cv: results.cv, d: sealKey.domain, s: sealKey.selector },
          'ARC sealed',
        );
        return copy.stream(set.headers);
      },

      async mail({ session, transaction, sender }) {
        if (exempt(session)) return proceed();
        // RFC 7208 §2.4: for `<>` the MAIL FROM check is the HELO check; otherwise both run at once.
        const [helo, own] = await Promise.all([
          heloCheck(session),
          sender === null && heloIsDomain(heloName(session))
            ? null
            : checkSpf({
                ...spfOpts,
                sender: sender?.address ?? null,
                ip: session.remote.address,
                helo: heloName(session),
              }),
        ]);
        const mailFrom = own ?? {
          ...helo!,
          info: `spf=${helo!.result} smtp.mailfrom=postmaster@${helo!.domain}`,
        };
        // Published at once: greylisting and other rcpt hooks read it (petrel/mailauth).
        transaction.notes.set(MailAuthSpf, {
          ip: session.remote.address,
          mailFrom,
          helo: sender === null ? null : helo,
        });
        return proceed();
      },

      async rcpt({ session, transaction, recipient }) {
        const spf = transaction.notes.get(MailAuthSpf);
        if (!spf) return proceed();
        const finding = spfFinding(config, spf.mailFrom);
        if (finding.action !== 'reject' && finding.action !== 'defer') return proceed();
        // RFC 5321 §4.5.1: postmaster must be reachable, also by a sender we would refuse.
        if (recipient.local.toLowerCase() === 'postmaster') return proceed();
        if (!transaction.notes.get(SpfRefusalLogged)) {
          transaction.notes.set(SpfRefusalLogged, true);
          log.info(
            {
              ...verdictFields(session, transaction, spf),
              action: finding.action,
              reasons: [finding.reason],
            },
            'mailauth verdict',
          );
        }
        return verdictOf(finding.action, [finding]);
      },

      async data_post({ session, transaction, message, prependHeader, removeHeaders, signal }) {
        const why = exempt(session);
        if (why === 'trusted network') {
          log.info({ session: session.id, tx: transaction.id, reason: why }, 'message not judged');
          return proceed();
        }
        const spf = transaction.notes.get(MailAuthSpf);
        const budget = budgeted(lookup, {
          max: config.maxLookups,
          deadline: Date.now() + config.lookupTimeout,
          signal,
        });
        // Judged on the octets as the client sent them, before any field is removed.
        const checks =
          why || !spf
            ? null
            : await checkMessage(message.streamRaw(), {
                spf: spf.mailFrom,
                ip: session.remote.address,
                resolver: budget.resolver,
                strict: config.strict,
              });
        const forged = await removeHeaders(
          (f) => f.name.toLowerCase() === 'authentication-results' && claimsAuthservId(f.value, authservId),
        );
        if (!checks || !spf) {
          log.info(
            {
              session: session.id,
              tx: transaction.id,
              reason: why ?? 'no MAIL check',
              forgedRemoved: forged.length,
            },
            'message not judged',
          );
          return proceed();
        }
        // A refusing SPF action was given at RCPT; what is left here are postmaster recipients.
        const spfSide = spfFinding(config, spf.mailFrom);
        const findings = [
          spfSide.action === 'reject' || spfSide.action === 'defer'
            ? { ...spfSide, action: 'tag' as const }
            : spfSide,
          ...messageFindings(config, checks),
        ];
        const { action, reasons } = decide(findings);
        const header = authResultsValue(authservId, [
          ...checks.dkim.map((d) => d.info),
          spf.mailFrom.info,
          ...(spf.helo ? [spf.helo.info] : []),
          checks.arc.info,
          ...(checks.dmarc ? [checks.dmarc.info] : []),
        ]);
        const results: MailAuthResults = {
          authservId,
          spf,
          dkim: checks.dkim,
          dmarc: checks.dmarc,
          arc: checks.arc,
          header,
          action,
          reasons,
        };
        transaction.notes.set(MailAuth, results);
        prependHeader('Authentication-Results', header);
        log.info(
          {
            ...verdictFields(session, transaction, spf),
            dkim: checks.dkim.map((d) => `${d.result}${d.domain ? ` ${d.domain}/${d.selector}` : ''}`),
            arc: checks.arc.result,
            dmarc: checks.dmarc
              ? `${checks.dmarc.result} ${checks.dmarc.from} p=${checks.dmarc.policy}`
              : null,
            lookups: budget.used(),
            forgedRemoved: forged.length,
            action,
            reasons,
          },
          'mailauth verdict',
        );
        if (action === 'reject' || action === 'defer') return verdictOf(action, findings);
        if (action === 'quarantine') holdOnAccept(transaction.notes, `mailauth: ${reasons.join('; ')}`);
        if (action === 'tag') prependHeader(config.tagHeader, reasons.join('; '));
        return proceed();
      },
    };
  },
});
