/**
 * Detection: the SPF, DKIM, ARC and DMARC checks, done by the `mailauth` package with every DNS
 * query sent through the resolver given (the server's, so `dns.servers` applies). Nothing here
 * decides what to do about a result; that is `policy.ts`.
 */
import type { Readable } from 'node:stream';
import { arc, dkimVerify, dmarc, spf, type ARCData, type DNSResolver } from 'mailauth';
import type { ArcCheck, AuthResult, DkimCheck, DmarcCheck, SpfCheck } from './api.js';

/** `resolver(name, rrtype)`, as mailauth calls it. */
export type Lookup = (name: string, rrtype: string) => Promise<unknown>;

/**
 * A resolver that answers at most `max` queries, none started after `deadline` (epoch ms) or
 * once `signal` aborts (the hook's time is up); later ones fail as a server failure would, so
 * the check that asked is `temperror`. RFC 6376 §6.1 lets a verifier limit the signatures it
 * checks: this bounds what one message with a thousand signatures, or slow key servers, costs.
 */
export function budgeted(
  lookup: Lookup,
  limits: { max: number; deadline: number; signal?: AbortSignal },
): { resolver: DNSResolver; used(): number } {
  let used = 0;
  const refuse = (why: string): Promise<never> =>
    Promise.reject(Object.assign(new Error(why), { code: 'ESERVFAIL' }));
  const resolver = ((name: string, rrtype: string) => {
    if (++used > limits.max) return refuse(`DNS lookup limit of ${limits.max} per message reached`);
    if (Date.now() >= limits.deadline || limits.signal?.aborted) return refuse('DNS lookup time is up');
    return lookup(name, rrtype);
  }) as DNSResolver;
  return { resolver, used: () => used };
}

function result(r: string | undefined): AuthResult {
  return (r === 'temperr' ? 'temperror' : (r ?? 'none')) as AuthResult;
}

export interface SpfInput {
  /** The MAIL FROM address, or null for `<>`. */
  readonly sender: string | null;
  readonly ip: string;
  /** The HELO/EHLO name. */
  readonly helo: string;
  /** The authserv-id, used in the comments of the results. */
  readonly mta: string;
  readonly resolver: DNSResolver;
  readonly timeout: number;
  readonly strict: boolean;
}

/**
 * One SPF evaluation (RFC 7208 §4). mailauth enforces the limits of §4.6.4: at most 10 terms
 * that query DNS (more is `permerror`), at most 2 void lookups (more is `permerror`), and here a
 * total time of `timeout` (then `temperror`). A null sender is checked as `postmaster@<helo>`.
 */
export async function checkSpf(input: SpfInput): Promise<SpfCheck> {
  const r = await spf({
    sender: input.sender ?? '',
    ip: input.ip,
    helo: input.helo,
    mta: input.mta,
    resolver: input.resolver,
    maxElapsedTime: input.timeout,
    strict: input.strict,
  });
  return {
    result: result(r.status.result),
    domain: r.domain,
    // The HELO identity gets a result of its own (`checkHelo`), so it is not repeated here.
    info: r.info.replace(/\s+smtp\.helo=\S+$/, ''),
    ...(r.explanation ? { explanation: r.explanation } : {}),
  };
}

/**
 * The HELO identity check (RFC 7208 §2.3): `postmaster@<helo>`, reported as `smtp.helo`. Null
 * for an address literal, which names no domain to ask.
 */
export async function checkHelo(input: Omit<SpfInput, 'sender'>): Promise<SpfCheck | null> {
  if (!heloIsDomain(input.helo)) return null;
  const r = await checkSpf({ ...input, sender: null });
  return { ...r, info: `spf=${r.result} smtp.helo=${input.helo}` };
}

/** A HELO name that names a domain: not an address literal, and with a dot (RFC 7208 §2.3). */
export function heloIsDomain(helo: string): boolean {
  return !helo.startsWith('[') && helo.includes('.');
}

export interface MessageChecks {
  readonly dkim: readonly DkimCheck[];
  readonly arc: ArcCheck;
  readonly dmarc: DmarcCheck | null;
}

/**
 * DKIM (every signature, RFC 6376 §6), the ARC chain (RFC 8617 §5.2) and DMARC (RFC 7489 §6.6:
 * the `From:` domain, aligned with a passing SPF domain or DKIM signing domain) of a message.
 * `message` is read once, as a stream: mailauth keeps the header section and hashes the body.
 */
export async function checkMessage(
  message: Readable,
  opts: { spf: SpfCheck; ip: string; resolver: DNSResolver; strict: boolean },
): Promise<MessageChecks> {
  const { resolver, strict } = opts;
  const verified = await dkimVerify(message, { resolver, strict });
  const dkim: DkimCheck[] = verified.results.map((r) => ({
    result: result(r.status.result),
    domain: r.signingDomain ?? '',
    selector: r.selector ?? '',
    algorithm: r.algo ?? '',
    ...(r.status.comment ? { comment: r.status.comment } : {}),
    info: r.info ?? `dkim=${result(r.status.result)}`,
  }));
  // As mailauth's own authenticate() does: the chain data from the DKIM pass, `chain: false` when none.
  const arcResult = await arc(verified.arc as unknown as ARCData, { resolver, strict, ip: opts.ip });
  const arcCheck: ArcCheck = {
    result: result(arcResult.status.result),
    instance: typeof arcResult.i === 'number' && arcResult.i > 0 ? arcResult.i : null,
    info: arcResult.info ?? `arc=${result(arcResult.status.result)}`,
  };
  let dmarcCheck: DmarcCheck | null = null;
  if (verified.headerFrom?.length) {
    const d = await dmarc({
      headerFrom: verified.headerFrom,
      fromFields: verified.fromFields,
      spfDomains: opts.spf.result === 'pass' ? [opts.spf.domain] : [],
      dkimDomains: verified.results
        .filter((r) => r.status.result === 'pass')
        .map((r) => ({
          ...(r.id ? { id: r.id } : {}),
          domain: r.signingDomain ?? '',
          aligned: r.status.aligned ?? false,
          ...(r.status.underSized !== undefined ? { underSized: r.status.underSized } : {}),
        })),
      arcResult,
      resolver,
      strict,
    });
    if (d) {
      dmarcCheck = {
        result: result(d.status.result),
        from: d.status.header?.from ?? '',
        policy: (['reject', 'quarantine'].includes(d.policy) ? d.policy : 'none') as DmarcCheck['policy'],
        alignment: {
          ...(d.alignment?.spf?.result ? { spf: d.alignment.spf.result } : {}),
          ...(d.alignment?.dkim?.result ? { dkim: d.alignment.dkim.result } : {}),
        },
        info: d.info,
      };
    }
  }
  return { dkim, arc: arcCheck, dmarc: dmarcCheck };
}
