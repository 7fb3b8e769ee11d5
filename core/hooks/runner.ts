import type { Logger } from 'pino';
import type {
  DeliveryOutcome,
  ExpandTarget,
  HookContext,
  HookMap,
  HookName,
  NotifyHookName,
  RecipientResult,
  RouteVerdict,
  VerdictHookName,
} from './catalogue.js';
import { Readable } from 'node:stream';
import { defer, isVerdict, proceed, type Verdict } from './verdict.js';
import { enterHook, leaveHook } from '../process/activity.js';
import { Deadlines } from './deadlines.js';
import type { HistogramCell } from '../services/metrics.js';

export interface RegisteredHook<K extends HookName> {
  readonly plugin: string;
  readonly fn: HookMap[K];
  readonly timeoutMs: number;
  /** Where each call's duration is observed (bound once when the hook is registered). */
  readonly latency?: HistogramCell;
}

/** `petrel_hook_duration_seconds{plugin, hook}`: every hook call, however it ended. */
export const HOOK_LATENCY = {
  name: 'petrel_hook_duration_seconds',
  help: 'Time a plugin hook call took, by plugin and hook (throws and timeouts included)',
  labelNames: ['plugin', 'hook'],
} as const;

export type HookTable = { readonly [K in HookName]: readonly RegisteredHook<K>[] };

export type CallContext<K extends HookName> = Omit<HookContext<K>, 'signal'>;

export interface VerdictOutcome {
  readonly verdict: Verdict;
  /** The plugin whose verdict decided, or null when every plugin proceeded. */
  readonly plugin: string | null;
  /** The deciding plugin threw or timed out (the verdict is then the generic 451 4.3.0). */
  readonly failed: boolean;
}

/**
 * What the `deliver` chain decided: a result for each recipient, or a postponement of the whole
 * delivery; `plugin` is the one that answered (null when none did).
 */
export type DeliverOutcome =
  | { readonly results: RecipientResult[]; readonly postponed?: undefined; readonly plugin: string | null }
  | {
      readonly postponed: { readonly until: Date; readonly reason: string };
      readonly results?: undefined;
      readonly plugin: string;
    };

export class HookTimeoutError extends Error {
  constructor(plugin: string, hook: string, ms: number) {
    super(`plugin ${plugin} hook ${hook} did not finish within ${ms} ms`);
    this.name = 'HookTimeoutError';
  }
}

/** What the client sees when a plugin fails: generic text, the detail goes to the log. */
export const FAILURE_VERDICT: Verdict = defer(
  451,
  '4.3.0',
  'Temporary local problem, please try again later',
);

/** Log fields that say where a hook ran: a session, or a queued message. */
function where(ctx: object): Record<string, string> {
  const c = ctx as { session?: { id: string }; message?: { id?: string } };
  if (c.session) return { session: c.session.id };
  if (c.message?.id) return { queueId: c.message.id };
  return {};
}

function isAddress(a: unknown): boolean {
  return typeof a === 'object' && a !== null && typeof (a as { address?: unknown }).address === 'string';
}

function isTarget(t: unknown): boolean {
  const x = t as { address?: unknown; sender?: unknown } | null;
  return (
    typeof x === 'object' &&
    x !== null &&
    isAddress(x.address) &&
    (x.sender === undefined || x.sender === null || isAddress(x.sender))
  );
}

const NO_DECISION: VerdictOutcome = Object.freeze({ verdict: proceed(), plugin: null, failed: false });

/**
 * Runs the hooks of one plugin set. Chains run in config order; the first decisive verdict wins;
 * a throw, a timeout or a non-verdict result becomes `451 4.3.0` plus a log line naming plugin
 * and hook. Never a crash, never a silent accept.
 */
export class HookRunner {
  private readonly deadlines = new Deadlines();

  constructor(
    private readonly table: HookTable,
    private readonly log: Logger,
  ) {}

  has(name: HookName): boolean {
    return this.table[name].length > 0;
  }

  async verdict<K extends VerdictHookName>(name: K, ctx: CallContext<K>): Promise<VerdictOutcome> {
    for (const hook of this.table[name]) {
      let result: unknown;
      try {
        result = await this.call(name, hook, ctx);
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: name, ...where(ctx), err }, 'hook failed');
        return { verdict: FAILURE_VERDICT, plugin: hook.plugin, failed: true };
      }
      if (!isVerdict(result)) {
        this.log.error(
          { plugin: hook.plugin, hook: name, ...where(ctx), got: typeof result },
          'hook returned something that is not a verdict',
        );
        return { verdict: FAILURE_VERDICT, plugin: hook.plugin, failed: true };
      }
      if (result.kind !== 'proceed') return { verdict: result, plugin: hook.plugin, failed: false };
    }
    return NO_DECISION;
  }

  /** Runs every plugin's hook; failures are logged and do not stop the others. */
  async notify<K extends NotifyHookName>(name: K, ctx: CallContext<K>): Promise<void> {
    for (const hook of this.table[name]) {
      try {
        await this.call(name, hook, ctx);
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: name, ...where(ctx), err }, 'hook failed');
      }
    }
  }

  /** Collects EHLO keywords from every plugin; a failing plugin adds none. */
  async capabilities(ctx: CallContext<'capabilities'>): Promise<string[]> {
    const out: string[] = [];
    for (const hook of this.table.capabilities) {
      try {
        const words = await this.call('capabilities', hook, ctx);
        if (!Array.isArray(words)) throw new TypeError('capabilities must return an array of strings');
        for (const w of words) {
          // A keyword is one line: refuse anything that could inject a reply line.
          if (typeof w === 'string' && /^[A-Za-z0-9][A-Za-z0-9 =\-_.]*$/.test(w)) out.push(w);
          else this.log.warn({ plugin: hook.plugin, keyword: String(w) }, 'ignored invalid EHLO keyword');
        }
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: 'capabilities', ...where(ctx), err }, 'hook failed');
      }
    }
    return out;
  }

  /**
   * The first plugin that expands the recipient decides; null when every plugin proceeded. A
   * throw, a timeout or an answer that is not an expansion throws (after a log line naming the
   * plugin): where the recipient goes is unknown, so the caller must not store the message.
   */
  async expand(
    ctx: CallContext<'expand'>,
  ): Promise<{ targets: readonly ExpandTarget[]; plugin: string } | null> {
    for (const hook of this.table.expand) {
      let result: unknown;
      try {
        result = await this.call('expand', hook, ctx);
      } catch (err) {
        this.log.error(
          { plugin: hook.plugin, hook: 'expand', rcpt: ctx.recipient.address.address, err },
          'hook failed',
        );
        throw err;
      }
      const r = result as { kind?: unknown; targets?: unknown } | null;
      if (r?.kind === 'proceed') continue;
      if (
        r?.kind === 'expand' &&
        Array.isArray(r.targets) &&
        r.targets.length > 0 &&
        r.targets.every(isTarget)
      )
        return { targets: r.targets as ExpandTarget[], plugin: hook.plugin };
      this.log.error(
        { plugin: hook.plugin, hook: 'expand', rcpt: ctx.recipient.address.address },
        'expand hook returned neither proceed() nor expandTo([...])',
      );
      throw new TypeError(`plugin ${hook.plugin}: expand must return proceed() or expandTo([...])`);
    }
    return null;
  }

  /** The first plugin that routes (or refuses) the recipient decides; a failure defers it. */
  async route(ctx: CallContext<'route'>): Promise<{ verdict: RouteVerdict; plugin: string | null }> {
    for (const hook of this.table.route) {
      let result: unknown;
      try {
        result = await this.call('route', hook, ctx);
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: 'route', ...where(ctx), err }, 'hook failed');
        return { verdict: FAILURE_VERDICT, plugin: hook.plugin };
      }
      const kind = (result as { kind?: unknown } | null)?.kind;
      if (kind === 'route' || (isVerdict(result) && kind !== 'accept')) {
        if (kind !== 'proceed') return { verdict: result as RouteVerdict, plugin: hook.plugin };
        continue;
      }
      this.log.error(
        { plugin: hook.plugin, hook: 'route', ...where(ctx) },
        'route hook returned neither a route nor a verdict',
      );
      return { verdict: FAILURE_VERDICT, plugin: hook.plugin };
    }
    return { verdict: proceed(), plugin: null };
  }

  /**
   * The transport that recognises the route delivers. Results must cover every recipient; a
   * recipient left out, a throw or a timeout is deferred with the generic 451 4.3.0.
   */
  async deliver(ctx: CallContext<'deliver'>): Promise<DeliverOutcome> {
    const deferAll = (text: string): RecipientResult[] =>
      ctx.recipients.map((r) => ({
        recipient: r.address.address,
        status: 'deferred' as const,
        reply: { code: 451, enhanced: '4.3.0', text },
      }));
    for (const hook of this.table.deliver) {
      let outcome: DeliveryOutcome;
      try {
        outcome = (await this.call('deliver', hook, ctx)) as DeliveryOutcome;
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: 'deliver', ...where(ctx), err }, 'hook failed');
        return { results: deferAll('Temporary local problem'), plugin: hook.plugin };
      }
      if (outcome?.kind === 'proceed') continue;
      if (outcome?.kind === 'postpone') {
        const { until, reason } = outcome;
        if (until instanceof Date && !Number.isNaN(until.getTime()) && typeof reason === 'string')
          return { postponed: { until, reason }, plugin: hook.plugin };
        this.log.error(
          { plugin: hook.plugin, hook: 'deliver', ...where(ctx) },
          'deliver hook postponed without a valid time and reason (use postpone())',
        );
        return { results: deferAll('Temporary local problem'), plugin: hook.plugin };
      }
      if (outcome?.kind !== 'results' || !Array.isArray(outcome.results)) {
        this.log.error(
          { plugin: hook.plugin, hook: 'deliver', ...where(ctx) },
          'deliver hook returned no results',
        );
        return { results: deferAll('Temporary local problem'), plugin: hook.plugin };
      }
      const byAddress = new Map(outcome.results.map((r) => [r.recipient, r]));
      const results = ctx.recipients.map(
        (r) =>
          byAddress.get(r.address.address) ?? {
            recipient: r.address.address,
            status: 'deferred' as const,
            reply: { code: 451, enhanced: '4.3.0', text: 'Transport gave no result for this recipient' },
          },
      );
      return { results, plugin: hook.plugin };
    }
    this.log.error({ transport: ctx.route.transport, ...where(ctx) }, 'no plugin delivers this transport');
    return { results: deferAll(`No transport "${ctx.route.transport}"`), plugin: null };
  }

  /**
   * Runs the transform chain in config order, each plugin getting what the one before returned.
   * A failure throws (the transport then defers the delivery): a half-transformed message must
   * never be sent.
   */
  async transform(ctx: CallContext<'transform'>): Promise<Readable> {
    let content = ctx.content;
    for (const hook of this.table.transform) {
      let result: unknown;
      try {
        result = await this.call('transform', hook, { ...ctx, content });
      } catch (err) {
        this.log.error({ plugin: hook.plugin, hook: 'transform', ...where(ctx), err }, 'hook failed');
        throw err;
      }
      if (!(result instanceof Readable)) {
        this.log.error(
          { plugin: hook.plugin, hook: 'transform', ...where(ctx) },
          'transform hook returned no stream',
        );
        throw new TypeError(`plugin ${hook.plugin}: transform must return a readable stream`);
      }
      content = result;
    }
    return content;
  }

  /**
   * Calls one hook within its timeout: a synchronous throw, a rejection and a timeout all reject
   * (the timeout with a HookTimeoutError, after aborting the call's signal). The deadline is kept
   * in `deadlines` (one timer per timeout length, not one per call) and the result is passed on
   * directly rather than raced against a timer: a busy server makes several calls per command.
   */
  private call<K extends HookName>(name: K, hook: RegisteredHook<K>, ctx: CallContext<K>): Promise<unknown> {
    const controller = new AbortController();
    const started = performance.now();
    const observe = (): void => hook.latency?.observe((performance.now() - started) / 1000);
    const fn = hook.fn as (c: HookContext<K>) => unknown;
    // The mark covers the hook's synchronous part: a watchdog can name a hook stuck in it.
    const previous = enterHook(hook.plugin, name);
    let pending: unknown;
    try {
      pending = fn({ ...ctx, signal: controller.signal } as HookContext<K>);
    } catch (err) {
      observe();
      return Promise.reject(err);
    } finally {
      leaveHook(previous);
    }
    return new Promise((resolve, reject) => {
      const deadline = this.deadlines.add(hook.timeoutMs, () => {
        const err = new HookTimeoutError(hook.plugin, name, hook.timeoutMs);
        controller.abort(err);
        observe();
        reject(err);
      });
      Promise.resolve(pending).then(
        (value) => {
          if (!this.deadlines.end(deadline, hook.timeoutMs)) return;
          observe();
          resolve(value);
        },
        (err: unknown) => {
          if (!this.deadlines.end(deadline, hook.timeoutMs)) return;
          observe();
          reject(err);
        },
      );
    });
  }
}
