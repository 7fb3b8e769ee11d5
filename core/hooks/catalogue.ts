import type { Address } from '../message/address.js';
import type { Headers, HeaderField } from '../message/headers.js';
import type { Notes } from '../message/notes.js';
import type { Readable } from 'node:stream';
import type { ReplySpec, Verdict } from './verdict.js';

/** The kinds of listener (ARCHITECTURE: MX on 25, submission on 587, implicit TLS on 465). */
export type ListenerKind = 'smtp' | 'submission' | 'submissions';

export interface Endpoint {
  readonly address: string;
  readonly port: number;
}

export interface TlsInfo {
  readonly protocol: string;
  readonly cipher: string;
  /** SNI name the client asked for, if any. */
  readonly servername?: string;
}

/** What a plugin may read about the connection. Fields fill in as the session goes on. */
export interface SessionView {
  readonly id: string;
  readonly remote: Endpoint;
  readonly local: Endpoint;
  readonly listener: { readonly kind: ListenerKind; readonly name: string };
  /** The HELO/EHLO the client gave, once accepted. */
  readonly helo: { readonly verb: 'HELO' | 'EHLO'; readonly hostname: string } | null;
  readonly tls: TlsInfo | null;
  /** The authenticated user name, once AUTH succeeded. */
  readonly user: string | null;
  readonly startedAt: Date;
  /** Per-connection notes: survive RSET and new transactions. */
  readonly notes: Notes;
}

/** RFC 3461 DSN parameters of a recipient. */
export interface RecipientParams {
  /** NOTIFY: NEVER, or any of SUCCESS, FAILURE, DELAY. Absent when the client gave none. */
  readonly notify?: readonly ('NEVER' | 'SUCCESS' | 'FAILURE' | 'DELAY')[];
  /** ORCPT: address type and the decoded original recipient. */
  readonly orcpt?: { readonly type: string; readonly address: string };
}

export interface Recipient {
  readonly address: Address;
  readonly params: RecipientParams;
}

/** MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 RET/ENVID). */
export interface MailParams {
  readonly size?: number;
  readonly body?: '7BIT' | '8BITMIME';
  readonly smtputf8: boolean;
  readonly ret?: 'FULL' | 'HDRS';
  readonly envid?: string;
  /** RFC 4954 AUTH= parameter, kept as given (xtext decoded); `<>` when the client sent it. */
  readonly auth?: string;
}

export interface TransactionView {
  readonly id: string;
  /** The envelope sender; null is the null reverse-path `<>` (bounces). */
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  /** Recipients accepted so far. */
  readonly recipients: readonly Recipient[];
  /** Per-transaction notes: cleared at RSET and at the end of each transaction. */
  readonly notes: Notes;
}

/** The received message, at `data_post` and `queue`. */
export interface MessageView {
  /** Header fields as the client sent them (without headers added here, less any removed). */
  readonly headers: Headers;
  /** Size in octets as received (after dot-unstuffing), without added headers, less removed ones. */
  readonly size: number;
  /** Received header fields a `data_post` hook took out (`removeHeaders`), in message order. */
  readonly removedHeaders: readonly HeaderField[];
  /** Header fields added by the server (`Received:`, and any from `data_post`), newest first. */
  readonly addedHeaders: readonly HeaderField[];
  /** Octets `stream()` yields now: the added header fields, then the received octets. */
  readonly storedSize: number;
  /** The whole message as it will be stored: added headers, then the received octets. */
  stream(): Readable;
  /** The received octets only (less removed header fields). */
  streamRaw(): Readable;
  /** Forces the body onto disk and returns the spool file's path (a queue may adopt it). */
  toFile(): Promise<string>;
}

// ------------------------------------------------------------------ delivery side

/** A message in the queue, as delivery hooks see it. */
export interface QueuedMessageView {
  /** The queue id (the id the client was given in `250 … queued as <id>`). */
  readonly id: string;
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  readonly receivedAt: Date;
  /** Octets of the stored message (added headers included). */
  readonly size: number;
  /** The stored message exactly as it goes on the wire (before any `transform`). */
  stream(): Readable;
}

/** One recipient of a queued message, with its delivery history. */
export interface DeliveryRecipient {
  readonly address: Address;
  readonly params: RecipientParams;
  /**
   * The envelope sender this recipient is delivered with: the message's own sender, unless the
   * `expand` hook that produced this recipient gave it another (a forwarded copy's SRS address).
   */
  readonly sender: Address | null;
  /** The accepted recipient this one was expanded from (an alias, a forwarding), if any. */
  readonly expandedFrom?: Address;
  /** Attempts made before this one. */
  readonly attempts: number;
  /** The last reply from a previous attempt, if any. */
  readonly lastReply?: RecipientReply;
  /**
   * An earlier attempt may have delivered without the queue learning of it (a crash between
   * delivery and the state update): a transport that can detect a duplicate should check.
   */
  readonly maybeDelivered: boolean;
}

/** Where a recipient goes: the transport that delivers it and what that transport needs. */
export interface Route {
  /** A transport name: a `deliver` hook handles the routes it recognises (`maildir`, `lmtp`, …). */
  readonly transport: string;
  /** Recipients with the same transport and key are delivered together (one LMTP/SMTP transaction). */
  readonly key: string;
  /** Transport-specific data (a mailbox path, a host…). */
  readonly data: Readonly<Record<string, unknown>>;
}

/** A reply for one recipient: from the remote server, or made up by the transport. */
export interface RecipientReply extends ReplySpec {
  /**
   * Who sent this reply, e.g. `mx.example.test [192.0.2.1]` or `127.0.0.1:24`. Set only on a
   * reply a server actually sent; absent on one made up here (a local delivery, a timeout, a
   * peer lacking an extension the message needs, an expired lifetime), even when it concerns a
   * peer: the text names that peer. Bounces report `Remote-MTA` and an `smtp;` diagnostic from it.
   */
  readonly remote?: string;
  /**
   * With `remote`: the TLS version and cipher of the connection the reply came over (e.g.
   * `TLSv1.3 TLS_AES_256_GCM_SHA384`); absent when it was plain text. For the message's history.
   */
  readonly tls?: string;
}

export type DeliveryStatus = 'delivered' | 'deferred' | 'failed';

export interface RecipientResult {
  /** The recipient's address, as in `DeliveryRecipient.address.address`. */
  readonly recipient: string;
  readonly status: DeliveryStatus;
  readonly reply: RecipientReply;
  /**
   * Delivered to a next hop that took the recipient's DSN request over (it offered the DSN
   * extension, so NOTIFY and ORCPT went along): that hop reports on it from now on, and no
   * `relayed` report is due from here (RFC 3461 §5.2.2).
   */
  readonly dsnPassedOn?: boolean;
}

/** What a transport's `deliver` hook returns: a result for every recipient it was given. */
export type DeliveryOutcome =
  { readonly kind: 'proceed' } | { readonly kind: 'results'; readonly results: readonly RecipientResult[] };

/** One address an accepted recipient expands into (see the `expand` hook). */
export interface ExpandTarget {
  readonly address: Address;
  /**
   * The envelope sender to deliver this target with, when it is not the message's own (a
   * forwarded copy goes out with an SRS address); null for `<>`. Absent: the message's sender.
   */
  readonly sender?: Address | null;
}

/**
 * What an `expand` hook returns: `proceed()` (the recipient stays as it is) or `expandTo([...])`
 * (the recipient is replaced by its targets).
 */
export type ExpandVerdict =
  { readonly kind: 'proceed' } | { readonly kind: 'expand'; readonly targets: readonly ExpandTarget[] };

/** What a `route` hook returns: a route, or a verdict (deny fails the recipient, defer retries later). */
export type RouteVerdict = Verdict | { readonly kind: 'route'; readonly route: Route };

/** Every hook call also gets a signal that aborts when its time is up. */
interface Base {
  readonly session: SessionView;
  readonly signal: AbortSignal;
}

export interface ConnectContext extends Base {}
export interface HeloContext extends Base {
  readonly verb: 'HELO' | 'EHLO';
  readonly hostname: string;
}
export interface CapabilitiesContext extends Base {}
export interface AuthContext extends Base {
  readonly mechanism: 'PLAIN' | 'LOGIN';
  readonly username: string;
  /** The password. Never log it; the logger redacts `password` keys, but not free text. */
  readonly password: string;
  /** SASL authorization identity (PLAIN), or empty. */
  readonly authzid: string;
}
export interface MailContext extends Base {
  readonly transaction: TransactionView;
  readonly sender: Address | null;
  readonly params: MailParams;
}
export interface RcptContext extends Base {
  readonly transaction: TransactionView;
  readonly recipient: Address;
  readonly params: RecipientParams;
}
export interface DataContext extends Base {
  readonly transaction: TransactionView;
}
export interface DataPostContext extends Base {
  readonly transaction: TransactionView;
  readonly message: MessageView;
  /** Adds a header field on top of the message (above `Received:`). */
  prependHeader(name: string, value: string): void;
  /**
   * Takes received header fields out of the message for good, e.g. an `Authentication-Results`
   * that claims this server's authserv-id (RFC 8601 §5). The spooled octets are rewritten once,
   * so do it only when a field matches. Fields added here are not affected; a field beyond
   * `limits.maxHeaderBytes` cannot be removed. Resolves to the fields removed.
   */
  removeHeaders(match: (field: HeaderField) => boolean): Promise<HeaderField[]>;
}
export interface QueueContext extends Base {
  readonly transaction: TransactionView;
  readonly message: MessageView;
}
export interface ResetContext extends Base {
  readonly transaction: TransactionView;
  /** How the transaction ended. */
  readonly outcome: 'queued' | 'rejected' | 'aborted';
}
export interface DisconnectContext extends Base {}
export interface UnrecognizedCommandContext extends Base {
  /** The command verb, upper-cased. */
  readonly verb: string;
  /** The rest of the line after the verb. */
  readonly args: string;
}

/**
 * At acceptance, for each recipient, before the message is stored: the plugin that owns the
 * message (the queue) asks what the recipient stands for. No session view: a queue also runs it
 * for messages a plugin submits (a bounce).
 */
export interface ExpandContext {
  /** The message's envelope sender; null for `<>`. */
  readonly sender: Address | null;
  readonly mailParams: MailParams;
  readonly recipient: Recipient;
  readonly signal: AbortSignal;
}

/** Delivery hooks run in the queue, not in a session; they get no session. */
interface DeliveryBase {
  readonly message: QueuedMessageView;
  readonly signal: AbortSignal;
}
export interface RouteContext extends DeliveryBase {
  readonly recipient: DeliveryRecipient;
}
export interface DeliverContext extends DeliveryBase {
  readonly route: Route;
  /** The envelope sender to use: every recipient of one delivery has the same (`recipient.sender`). */
  readonly sender: Address | null;
  readonly recipients: readonly DeliveryRecipient[];
}
export interface DeliveredContext extends DeliveryBase {
  readonly recipient: DeliveryRecipient;
  readonly route: Route | null;
  readonly result: RecipientResult;
}
export interface DeferredContext extends DeliveredContext {
  /** When the queue will try again. */
  readonly nextAttemptAt: Date;
}
/** What the next hop accepts, as the transport learnt it (from EHLO/LHLO). */
export interface PeerCapabilities {
  readonly eightBitMime: boolean;
  readonly smtputf8: boolean;
}
export interface TransformContext extends DeliveryBase {
  readonly route: Route;
  readonly peer: PeerCapabilities;
  /** The message as it stands: the stored octets, or what earlier transforms made of them. */
  readonly content: Readable;
}
export interface FailedContext extends DeliveredContext {
  /** Why it is final: the remote refused (`refused`), or the queue lifetime ran out (`expired`). */
  readonly reason: 'refused' | 'expired' | 'deleted';
}

/**
 * The hook catalogue: every hook name, its context, and what it returns. A plugin can only name
 * hooks that are keys here; the loader refuses anything else.
 */
export interface HookMap {
  /** A client connected. Deny: `554` greeting and every command but QUIT refused. Defer/disconnect: `421` and close. */
  connect: (ctx: ConnectContext) => Promise<Verdict>;
  /** HELO or EHLO. Deny/defer is the reply to HELO/EHLO itself; the client must try again. */
  helo: (ctx: HeloContext) => Promise<Verdict>;
  /** Extra EHLO keywords (e.g. `XCLIENT ADDR NAME`). Every plugin's keywords are listed. */
  capabilities: (ctx: CapabilitiesContext) => Promise<readonly string[]>;
  /** Verify AUTH credentials. Accept authenticates; deny or nobody accepting is `535 5.7.8`. */
  auth: (ctx: AuthContext) => Promise<Verdict>;
  /** MAIL FROM. Proceeding through the chain accepts the sender. */
  mail: (ctx: MailContext) => Promise<Verdict>;
  /** RCPT TO. Someone must accept: a recipient nobody accepts is refused (`550 5.7.1`). */
  rcpt: (ctx: RcptContext) => Promise<Verdict>;
  /** DATA or the first BDAT, before any content is read. */
  data: (ctx: DataContext) => Promise<Verdict>;
  /** The message is received (headers parsed, body spooled), before it is queued. */
  data_post: (ctx: DataPostContext) => Promise<Verdict>;
  /** Take ownership. Only an accept gives the client `250`; nobody accepting is `451 4.3.0`. */
  queue: (ctx: QueueContext) => Promise<Verdict>;
  /** A transaction ended (queued, rejected or aborted). Runs even when the client has gone. */
  reset: (ctx: ResetContext) => Promise<void>;
  /** The connection closed. Runs even when the client has gone. */
  disconnect: (ctx: DisconnectContext) => Promise<void>;
  /** A command the engine does not know. Proceed: `500 5.5.1` (`502 5.5.1` for EXPN/ETRN/TURN). */
  unrecognized_command: (ctx: UnrecognizedCommandContext) => Promise<Verdict>;

  /**
   * Queue, at acceptance: what a recipient stands for. The first plugin that answers
   * `expandTo([...])` replaces the recipient by its targets (an alias's mailboxes, a forwarding
   * address); each target keeps the recipient's NOTIFY, and its ORCPT names the recipient as
   * accepted. Targets are not expanded again. A failure refuses the message for now (`451 4.3.0`).
   */
  expand: (ctx: ExpandContext) => Promise<ExpandVerdict>;
  /** Queue: which transport delivers this recipient. Nobody routing it defers it (and logs why). */
  route: (ctx: RouteContext) => Promise<RouteVerdict>;
  /**
   * Delivery: rewrites the message for the next hop. The chain runs by phase — every `rewrite`
   * transform (a 7-bit downgrade) before every `sign` transform (DKIM, an ARC seal) — and in
   * config order within a phase. A transport runs it once it knows the peer; each plugin returns
   * the content it was given, or a stream made from it.
   */
  transform: (ctx: TransformContext) => Promise<Readable>;
  /** Queue: a transport delivers the recipients of one route, with a result for each. */
  deliver: (ctx: DeliverContext) => Promise<DeliveryOutcome>;
  /** Queue: a recipient was delivered. */
  delivered: (ctx: DeliveredContext) => Promise<void>;
  /** Queue: a recipient was deferred and will be tried again. */
  deferred: (ctx: DeferredContext) => Promise<void>;
  /** Queue: a recipient failed for good (refused, or its queue lifetime ran out). */
  failed: (ctx: FailedContext) => Promise<void>;
}

export type HookName = keyof HookMap;
export type HookContext<K extends HookName> = Parameters<HookMap[K]>[0];
export type HookResult<K extends HookName> = Awaited<ReturnType<HookMap[K]>>;

/** The hooks a plugin implements. */
export type Hooks = { readonly [K in HookName]?: HookMap[K] };

/** Every hook name, in the order a session meets them. */
export const HOOK_NAMES: readonly HookName[] = [
  'connect',
  'helo',
  'capabilities',
  'auth',
  'mail',
  'rcpt',
  'data',
  'data_post',
  'queue',
  'reset',
  'disconnect',
  'unrecognized_command',
  'expand',
  'route',
  'transform',
  'deliver',
  'delivered',
  'deferred',
  'failed',
] as const;

/** Session hooks that return a verdict and stop at the first decisive one. */
export type VerdictHookName = {
  [K in HookName]: HookResult<K> extends Verdict ? K : never;
}[HookName];
/** Hooks that tell, run every plugin, and ignore failures (after logging them). */
export type NotifyHookName = 'reset' | 'disconnect' | 'delivered' | 'deferred' | 'failed';

export function isHookName(name: string): name is HookName {
  return (HOOK_NAMES as readonly string[]).includes(name);
}
