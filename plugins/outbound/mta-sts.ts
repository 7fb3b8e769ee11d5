/**
 * MTA-STS for outgoing mail (RFC 8461): a destination domain's policy, discovered through its
 * `_mta-sts` TXT record and fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt`
 * (mailauth's `getPolicy`, every DNS query through the core resolver), and cached in the State
 * service until its `max_age` runs out, so that a restart neither forgets a policy nor fetches
 * it again. The policy is re-fetched before then only when the TXT record's id changes
 * (RFC 8461 §3.3, §5.1).
 *
 * What a policy means for a delivery is decided in index.ts: `enforce` allows only MX hosts the
 * policy names, over TLS with a certificate verified for the MX name (§4); `testing` delivers as
 * before and logs what `enforce` would have refused (§5).
 */
import type { PluginApi, StateStore } from '../../core/index.js';
import { getPolicy, validateMx } from 'mailauth/lib/mta-sts.js';
import type { Hop } from './mx.js';

/** A policy that asks for something: `enforce` or `testing` (a `none` policy is no policy). */
export interface StsPolicy {
  readonly domain: string;
  readonly id: string;
  readonly mode: 'enforce' | 'testing';
  readonly mx: readonly string[];
  /** When the policy stops applying (ISO 8601): fetch time + `max_age`. */
  readonly expires: string;
}

/** The cached form of a policy (what `getPolicy` takes back as its `knownPolicy`). */
interface Cached {
  id: string;
  mode: 'enforce' | 'testing' | 'none';
  mx?: string[];
  maxAge?: number;
  expires: string;
  version?: string;
}

/**
 * The fields of a TLS-RPT failure detail (RFC 8460 §4.3), logged where a report would count a
 * failure; Petrel does not send reports.
 */
export interface TlsRptFailure {
  readonly policyType: 'sts' | 'no-policy-found';
  readonly policyDomain: string;
  readonly resultType: string;
  readonly receivingMxHostname?: string;
  readonly receivingIp?: string;
  readonly failureReason?: string;
}

/** RFC 8460 §4.3 result type for a failed STARTTLS handshake or certificate check (Node's codes). */
export function tlsResultType(code: string | undefined): string {
  switch (code) {
    case 'ERR_TLS_CERT_ALTNAME_INVALID':
      return 'certificate-host-mismatch';
    case 'CERT_HAS_EXPIRED':
      return 'certificate-expired';
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'CERT_UNTRUSTED':
      return 'certificate-not-trusted';
    default:
      return 'validation-failure';
  }
}

/** Whether `host` (an MX name) is one the policy allows (RFC 8461 §4.1, wildcards included). */
export function mxAllowed(host: string, policy: StsPolicy): boolean {
  return validateMx(host, { mode: policy.mode, mx: [...policy.mx] }).valid;
}

/**
 * Logs a failure a policy counts: under `enforce` what was refused, under `testing` what would
 * have been (RFC 8461 §5), with the fields a TLS-RPT report would carry for it.
 */
export function stsFailure(
  log: PluginApi<unknown>['log'],
  sts: StsPolicy,
  detail: Omit<TlsRptFailure, 'policyType' | 'policyDomain'>,
  queueId?: string,
): void {
  const tlsrpt: TlsRptFailure = { policyType: 'sts', policyDomain: sts.domain, ...detail };
  const fields = {
    ...(queueId ? { queueId } : {}),
    domain: sts.domain,
    mode: sts.mode,
    policyId: sts.id,
    tlsrpt,
  };
  if (sts.mode === 'enforce')
    log.warn(fields, `MTA-STS refused: ${detail.failureReason ?? detail.resultType}`);
  else
    log.warn(
      fields,
      `MTA-STS testing: enforce would refuse (${detail.failureReason ?? detail.resultType}); delivering as before`,
    );
}

/** `MTA-STS policy of a.test (enforce, id 2025…)`: how replies and logs name a policy. */
export function stsName(sts: StsPolicy): string {
  return `MTA-STS policy of ${sts.domain} (${sts.mode}, id ${sts.id})`;
}

/** The start of a deferral for a TLS failure under an `enforce` policy. */
export function stsDemand(sts: StsPolicy): string {
  return `${stsName(sts)} requires TLS with a certificate verified for the MX host`;
}

/** `mx1.a.test, mx2.a.test`: the hosts of some hops, each once. */
export const hostsOf = (hops: readonly Hop[]): string => [...new Set(hops.map((h) => h.host))].join(', ');

/** A connection an `enforce` policy accepts: to an MX host it names, over verified TLS. */
export function meetsPolicy(
  conn: { readonly verifiedBy: string | null; readonly peer: { readonly host: string } },
  sts: StsPolicy,
): boolean {
  return conn.verifiedBy !== null && mxAllowed(conn.peer.host, sts);
}

/**
 * The hops a policy allows (RFC 8461 §4.1): under `enforce` only those whose MX name matches;
 * under `testing` all of them. Each host the policy does not name is logged either way.
 */
export function allowedHops(
  log: PluginApi<unknown>['log'],
  sts: StsPolicy,
  hops: readonly Hop[],
  queueId: string,
): readonly Hop[] {
  const refused = new Set(hops.filter((h) => !mxAllowed(h.host, sts)).map((h) => h.host));
  for (const host of refused) {
    const failureReason = `MX host ${host} is not in the policy (${sts.mx.join(', ')})`;
    stsFailure(
      log,
      sts,
      { receivingMxHostname: host, resultType: 'validation-failure', failureReason },
      queueId,
    );
  }
  return sts.mode === 'enforce' ? hops.filter((h) => !refused.has(h.host)) : hops;
}

const KEY_PREFIX = 'outbound:mta-sts:';

export interface MtaStsOptions {
  readonly resolver: (name: string, rrtype: string) => Promise<unknown>;
  readonly state: StateStore;
  readonly log: PluginApi<unknown>['log'];
  /** Time limit for the HTTPS policy fetch. */
  readonly timeout: number;
}

export class MtaSts {
  /** Lookups under way, by domain: concurrent deliveries to one domain fetch its policy once. */
  private readonly pending = new Map<string, Promise<StsPolicy | null>>();

  constructor(private readonly opts: MtaStsOptions) {}

  /**
   * The policy that applies to mail for `domain` (A-label form) now, or null when none does
   * (no policy, mode `none`, or no policy could be fetched and none is cached: RFC 8461 §5
   * says to deliver as without MTA-STS then).
   */
  policyFor(domain: string): Promise<StsPolicy | null> {
    const d = domain.toLowerCase();
    let p = this.pending.get(d);
    if (!p) {
      p = this.lookup(d).finally(() => this.pending.delete(d));
      this.pending.set(d, p);
    }
    return p;
  }

  private async lookup(domain: string): Promise<StsPolicy | null> {
    const { log, state } = this.opts;
    const key = KEY_PREFIX + domain;
    let known: Cached | null = null;
    try {
      const raw = await state.get(key);
      known = raw ? (JSON.parse(raw) as Cached) : null;
    } catch (err) {
      // Without the cache the policy is fetched afresh: that costs a request, never safety.
      log.warn({ domain, err }, 'MTA-STS policy cache could not be read; fetching the policy');
    }
    const { policy, status, warnings } = await getPolicy(domain, known, {
      // The core resolver answers each type in the shape Node's resolver gives it, as mailauth expects.
      resolver: this.opts.resolver as (name: string, rrtype: string) => Promise<string[] | string[][]>,
      timeout: this.opts.timeout,
    });
    const error = (policy as { error?: Error }).error;
    const fields = { domain, id: policy.id, mode: policy.mode, ...(warnings ? { warnings } : {}) };
    switch (status) {
      case 'not_found':
        log.debug({ domain }, 'no MTA-STS policy');
        return null;
      case 'renewed':
        log.debug({ ...fields, expires: policy.expires }, 'MTA-STS policy from the cache');
        break;
      case 'found':
        log.info(
          { ...fields, mx: policy.mx, maxAge: policy.maxAge, expires: policy.expires },
          'MTA-STS policy fetched',
        );
        await this.store(key, policy as Cached);
        break;
      case 'errored': {
        const tlsrpt: TlsRptFailure = {
          policyType: 'sts',
          policyDomain: domain,
          resultType: 'sts-policy-fetch-error',
          failureReason: error?.message ?? 'unknown',
        };
        if (known && policy.id === known.id && policy.mode === known.mode && known.mode !== 'none') {
          log.warn({ ...fields, tlsrpt }, 'MTA-STS policy fetch failed; using the cached policy');
        } else {
          log.warn(
            { ...fields, tlsrpt },
            'MTA-STS policy fetch failed and none is cached; delivering as without MTA-STS',
          );
          // mailauth's placeholder (mode none for an hour) stops every delivery from trying again.
          if (policy.id && policy.expires) await this.store(key, policy as Cached);
          return null;
        }
        break;
      }
    }
    if (!policy.id || (policy.mode !== 'enforce' && policy.mode !== 'testing')) return null;
    return {
      domain,
      id: policy.id,
      mode: policy.mode,
      mx: policy.mx ?? [],
      expires: policy.expires ?? new Date().toISOString(),
    };
  }

  private async store(key: string, p: Cached): Promise<void> {
    const ttlMs = new Date(p.expires).getTime() - Date.now();
    if (!(ttlMs > 0)) return;
    const value: Cached = {
      id: p.id,
      mode: p.mode,
      expires: p.expires,
      ...(p.version ? { version: p.version } : {}),
      ...(p.mx ? { mx: p.mx } : {}),
      ...(p.maxAge !== undefined ? { maxAge: p.maxAge } : {}),
    };
    try {
      await this.opts.state.set(key, JSON.stringify(value), { ttlMs });
    } catch (err) {
      this.opts.log.warn({ key, err }, 'MTA-STS policy could not be cached');
    }
  }
}
