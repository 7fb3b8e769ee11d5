/**
 * Policy: what to do about the results, by configuration. Pure functions, no I/O: results in,
 * findings and one action out.
 */
import type { AuthAction, AuthResult, SpfCheck } from './api.js';
import type { MessageChecks } from './checks.js';
import type { MailauthConfig } from './config.js';

/** One result that the configuration maps to an action. */
export interface Finding {
  readonly action: AuthAction;
  readonly result: AuthResult;
  /** For the log, the tag header and the note, e.g. `dmarc=fail policy=reject header.from=example.test`. */
  readonly reason: string;
}

const RANK: Record<AuthAction, number> = { ignore: 0, tag: 1, quarantine: 2, defer: 3, reject: 4 };

function pick<K extends string>(table: Readonly<Record<K, AuthAction>>, key: string): AuthAction {
  return (table as Readonly<Record<string, AuthAction>>)[key] ?? 'ignore';
}

/** The finding of the MAIL FROM SPF check (RFC 7208 §8). */
export function spfFinding(config: MailauthConfig, spf: SpfCheck): Finding {
  return {
    action: pick(config.spf, spf.result),
    result: spf.result,
    reason: `spf=${spf.result} smtp.mailfrom=${spf.domain}`,
  };
}

/** The findings of the checks made after DATA: each DKIM signature, ARC, DMARC. */
export function messageFindings(config: MailauthConfig, checks: MessageChecks): Finding[] {
  const out: Finding[] = [];
  for (const d of checks.dkim) {
    out.push({
      action: pick(config.dkim, d.result),
      result: d.result,
      reason: `dkim=${d.result} header.d=${d.domain || '-'}${d.comment ? ` (${d.comment})` : ''}`,
    });
  }
  if (checks.arc.result === 'fail') {
    out.push({ action: config.arc.fail, result: 'fail', reason: 'arc=fail' });
  }
  const m = checks.dmarc;
  if (m) {
    // A failing message gets the action for the policy its domain asks for (RFC 7489 §6.3).
    const key = m.result === 'fail' ? m.policy : m.result;
    out.push({
      action: pick(config.dmarc, key),
      result: m.result,
      reason: `dmarc=${m.result}${m.result === 'fail' ? ` policy=${m.policy}` : ''} header.from=${m.from}`,
    });
  }
  return out;
}

/** The strongest action among the findings (reject > defer > quarantine > tag > ignore), and why. */
export function decide(findings: readonly Finding[]): { action: AuthAction; reasons: string[] } {
  let action: AuthAction = 'ignore';
  for (const f of findings) if (RANK[f.action] > RANK[action]) action = f.action;
  const reasons = findings
    .filter((f) => f.action !== 'ignore')
    .sort((a, b) => RANK[b.action] - RANK[a.action])
    .map((f) => f.reason);
  return { action, reasons };
}

/**
 * The reply for a refusal. `550 5.7.1` for a policy refusal (RFC 7208 §8.4, RFC 7489 §7);
 * a deferral for a lookup that failed is `451 4.4.3` (RFC 7208 §8.6), for policy `451 4.7.1`.
 */
export function refusal(
  action: 'reject' | 'defer',
  findings: readonly Finding[],
): { code: number; enhanced: string; text: string } {
  const decisive = findings.filter((f) => f.action === action);
  const names = [...new Set(decisive.map((f) => f.reason.split('=')[0]!.toUpperCase()))].join(', ');
  if (action === 'reject') {
    return {
      code: 550,
      enhanced: '5.7.1',
      text: `Message refused by sender authentication policy (${names})`,
    };
  }
  const dns = decisive.some((f) => f.result === 'temperror');
  return dns
    ? {
        code: 451,
        enhanced: '4.4.3',
        text: `Sender authentication could not be completed (${names}), try again later`,
      }
    : { code: 451, enhanced: '4.7.1', text: `Message deferred by sender authentication policy (${names})` };
}
