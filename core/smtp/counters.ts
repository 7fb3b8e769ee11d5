import type {
  CounterCell,
  CounterFamily,
  GaugeCell,
  GaugeFamily,
  MetricsRegistry,
} from '../services/metrics.js';

/** The verbs counted by name; anything else is counted as `other`. */
const VERBS = [
  'HELO',
  'EHLO',
  'MAIL',
  'RCPT',
  'DATA',
  'BDAT',
  'RSET',
  'NOOP',
  'QUIT',
  'VRFY',
  'HELP',
  'STARTTLS',
  'AUTH',
] as const;

/** Why the engine itself refused a message (a plugin's refusal is counted under its name). */
export type CoreRefusal = 'size' | 'storage' | 'bare_line_ending' | 'nul' | 'not_queued';

/**
 * Why a connection got no session: over a limit, the server stopping, the limits unanswerable, a
 * PROXY-protocol peer that is not trusted or sent no valid header.
 */
export type ConnectionRefusal = 'limit' | 'shutdown' | 'unavailable' | 'early_talker' | 'policy' | 'proxy';

export interface ListenerCells {
  readonly total: CounterCell;
  readonly open: GaugeCell;
  readonly accepted: CounterCell;
}

/**
 * The SMTP engine's metrics, declared once per registry with their cells bound, so that counting a
 * command or a reply on the hot path is an array or map lookup and an addition.
 */
export class SmtpCounters {
  private static readonly known = new WeakMap<MetricsRegistry, SmtpCounters>();

  static of(metrics: MetricsRegistry): SmtpCounters {
    let c = SmtpCounters.known.get(metrics);
    if (!c) SmtpCounters.known.set(metrics, (c = new SmtpCounters(metrics)));
    return c;
  }

  private readonly commandCells = new Map<string, CounterCell>();
  private readonly otherCommand: CounterCell;
  /** By the reply code's first digit (index 2 to 5); anything else goes to index 0. */
  private readonly replyCells: CounterCell[];
  private readonly connectionsTotal: CounterFamily;
  private readonly connectionsOpen: GaugeFamily;
  private readonly connectionsRefused: CounterFamily;
  private readonly byListener = new Map<string, ListenerCells>();
  private readonly accepted: CounterFamily;
  private readonly refused: CounterFamily;
  private readonly tls: CounterFamily;
  readonly timeouts: CounterCell;
  readonly authSuccess: CounterCell;
  readonly authFailure: CounterCell;
  /** A plugin changed the session's client (`changeClient`, e.g. XCLIENT). */
  readonly clientChanges: CounterCell;

  private constructor(m: MetricsRegistry) {
    const commands = m.counter({
      name: 'petrel_smtp_commands_total',
      help: 'SMTP commands received, by verb',
      labelNames: ['command'],
    });
    for (const v of VERBS) this.commandCells.set(v, commands.labels(v));
    this.otherCommand = commands.labels('other');
    const replies = m.counter({
      name: 'petrel_smtp_replies_total',
      help: 'SMTP replies sent, by code class',
      labelNames: ['class'],
    });
    const other = replies.labels('other');
    this.replyCells = [
      other,
      other,
      replies.labels('2xx'),
      replies.labels('3xx'),
      replies.labels('4xx'),
      replies.labels('5xx'),
    ];
    this.connectionsTotal = m.counter({
      name: 'petrel_connections_total',
      help: 'SMTP connections accepted into a session, by listener',
      labelNames: ['listener'],
    });
    this.connectionsOpen = m.gauge({
      name: 'petrel_connections_open',
      help: 'SMTP sessions open now, by listener',
      labelNames: ['listener'],
    });
    this.connectionsRefused = m.counter({
      name: 'petrel_connections_refused_total',
      help: 'SMTP connections refused, by listener and reason (limit, shutdown, unavailable, early_talker, policy)',
      labelNames: ['listener', 'reason'],
    });
    this.accepted = m.counter({
      name: 'petrel_messages_accepted_total',
      help: 'Messages accepted (250 after the content), by listener',
      labelNames: ['listener'],
    });
    this.refused = m.counter({
      name: 'petrel_messages_refused_total',
      help: 'Messages refused at or after DATA, by hook, plugin (core: the engine) and reason',
      labelNames: ['hook', 'plugin', 'reason'],
    });
    this.tls = m.counter({
      name: 'petrel_tls_handshakes_total',
      help: 'TLS handshakes, by direction (inbound, outbound), result and protocol version',
      labelNames: ['direction', 'result', 'version'],
    });
    this.timeouts = m
      .counter({ name: 'petrel_smtp_timeouts_total', help: 'SMTP sessions closed by a deadline' })
      .labels();
    const auth = m.counter({
      name: 'petrel_smtp_auth_total',
      help: 'SMTP AUTH attempts, by result',
      labelNames: ['result'],
    });
    this.authSuccess = auth.labels('success');
    this.authFailure = auth.labels('failure');
    this.clientChanges = m
      .counter({
        name: 'petrel_smtp_client_changes_total',
        help: 'Sessions whose client a plugin changed (changeClient, e.g. XCLIENT)',
      })
      .labels();
  }

  command(verb: string): void {
    (this.commandCells.get(verb) ?? this.otherCommand).inc();
  }

  reply(code: number): void {
    (this.replyCells[(code / 100) | 0] ?? this.replyCells[0]!).inc();
  }

  /** The cells of one listener (made on its first connection, then reused). */
  listener(name: string): ListenerCells {
    let l = this.byListener.get(name);
    if (!l) {
      l = {
        total: this.connectionsTotal.labels(name),
        open: this.connectionsOpen.labels(name),
        accepted: this.accepted.labels(name),
      };
      this.byListener.set(name, l);
    }
    return l;
  }

  connectionRefused(listener: string, reason: ConnectionRefusal): void {
    this.connectionsRefused.labels(listener, reason).inc();
  }

  /** A message refused by a plugin's verdict (`reason`: deny, defer, disconnect or failed). */
  messageRefused(hook: string, plugin: string | null, reason: string): void {
    this.refused.labels(hook, plugin ?? 'core', reason).inc();
  }

  messageRefusedByCore(reason: CoreRefusal): void {
    this.refused.labels('data', 'core', reason).inc();
  }

  tlsHandshake(result: 'ok' | 'failed', version: string): void {
    this.tls.labels('inbound', result, version).inc();
  }
}
