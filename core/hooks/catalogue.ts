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
  /**
   * The client, as every policy should see it: the socket's peer, or the client a trusted
   * proxy's PROXY header declared, or the one a plugin set since (`changeClient`, e.g. XCLIENT).
   */
  readonly remote: Endpoint;
  /** The address and port the client connected to (from the PROXY header when there is one). */
  readonly local: Endpoint;
  /**
   * The client's host name when a trusted peer declared it (XCLIENT NAME); null otherwise.
   * Petrel does not look it up itself (the hygiene plugin checks forward-confirmed reverse DNS).
   */
  readonly remoteName: string | null;
  /**
   * Who speaks SMTP on this connection, fixed for its life: the socket's peer, or the client the
   * PROXY header declared. Unlike `remote`, `changeClient` does not move it: judge whether a
   * command that changes the client identity may be trusted on this address.
   */
  readonly peer: Endpoint;
  /** The socket's peer when it is a proxy that sent a PROXY header; null for a direct client. */
  readonly proxy: Endpoint | null;
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

/**
 * What a `deliver` hook returns: `proceed` (not mine: the next plugin is asked), a result for
 * every recipient it was given, or `postpone` (see `Postponement`).
 */
export type DeliveryOutcome =
  | { readonly kind: 'proceed' }
  | { readonly kind: 'results'; readonly results: readonly RecipientResult[] }
  | Postponement;

/**
 * "Not now, try at `until`": a delivery held back on purpose (an outbound rate, a peer's
 * concurrency), not a failure. Any plugin whose `deliver` hook runs before the transport's may
 * answer it, and so may the transport. The queue then, for every recipient of the delivery:
 * - counts no attempt, keeps the last reply, and runs no `delivered`/`deferred`/`failed` hook
 *   (so no "delayed" report goes out for it);
 * - tries it again at `until` (or sooner, on a flush or a restart: the postponement is not
 *   written to the journal, and whoever postponed it is asked again then);
 * - still ends it at its lifetime: a postponement reaching past the end of the message's
 *   lifetime fails the recipient as expired, as a retry would;
 * - logs one line (`delivery postponed`, with `reason` and the plugin) and shows `reason` in
 *   `petrel queue list` until the next attempt.
 * Build it with `postpone(until, reason)`.
 */
export interface Postponement {
  readonly kind: 'postpone';
  readonly until: Date;
  /** Why, for the log and the queue listing: `throttled: at most 100 messages per 1m to gmail.com`. */
  readonly reason: string;
}

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
interface AuthBase extends Base {
  readonly username: string;
  /** SASL authorization identity (PLAIN, SCRAM's `a=`), or empty. */
  readonly authzid: string;
}

/** What a server keeps for a user instead of the password (RFC 5802 §3), for SCRAM-SHA-256. */
export interface ScramCredentials {
  readonly salt: Buffer;
  readonly iterations: number;
  /** H(ClientKey): checks the client's proof. */
  readonly storedKey: Buffer;
  /** HMAC(SaltedPassword, "Server Key"): signs the server's final message. */
  readonly serverKey: Buffer;
}

/** The rest of a SCRAM-SHA-256 exchange (RFC 7677), which needs the user's stored credentials. */
export interface ScramExchange {
  /**
   * Sends the server's first message (the credentials' salt and iteration count), reads the
   * client's final message and checks its proof against `storedKey`: true when it matches. Call
   * it at most once; for an unknown user, call it with made-up credentials, so that the client
   * cannot tell. When it returned true and the hook accepts, the session sends the server's
   * signature (made with `serverKey`) before `235`. False also when the client cancelled or sent
   * something malformed (the session has then replied already).
   */
  verify(credentials: ScramCredentials): Promise<boolean>;
}

/**
 * AUTH. PLAIN and LOGIN carry the password; SCRAM-SHA-256 carries none, and the hook finishes the
 * exchange with `scram.verify` and the user's stored credentials.
 */
export type AuthContext =
  | (AuthBase & {
      readonly mechanism: 'PLAIN' | 'LOGIN';
      /** The password. Never log it; the logger redacts `password` keys, but not free text. */
      readonly password: string;
      readonly scram?: undefined;
    })
  | (AuthBase & {
      readonly mechanism: 'SCRAM-SHA-256';
      readonly password?: undefined;
      readonly scram: ScramExchange;
    });
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
  /**
   * Begins replacing the message body (what follows the header block's empty line; the header
   * fields stay, and header edits keep applying to them). Write the new body through the
   * returned handle, then `commit()` puts it in place, or `abort()` drops it. The new octets are
   * spooled as a received body is (`spool.memoryThreshold` in memory, then a file in the
   * receiving spool), never held whole: at most twice the threshold while it is committed.
   * Bare CR or LF become CRLF and the body ends with a line end, as stored content does; it may
   * hold at most `limits.maxMessageSize` octets. Until `commit()` resolves, every reader sees the
   * old body; after, every reader (later hooks, the queue) sees the new one. A failure (too big,
   * a NUL octet, the disk) rejects and leaves the message unchanged; the hook may throw it on,
   * which the runner answers with `451 4.3.0`. A replacement neither committed nor aborted is
   * dropped at the end of the transaction.
   */
  replaceBody(): BodyReplacement;
  /**
   * Changes the envelope sender: `address` without angle brackets, `''` for the null sender
   * `<>`. Checked as `MAIL FROM` is (syntax, length, non-ASCII only with SMTPUTF8); the MAIL
   * parameters (SIZE, BODY, SMTPUTF8, RET, ENVID) stay. `mail` hooks are not run again. Throws a
   * TypeError on an address that does not parse, and nothing changes. Later hooks and the queue
   * see the new sender (`transaction.sender`); the `Received:` field already written does not change.
   */
  setSender(address: string): void;
  /**
   * Adds an envelope recipient: `address` without angle brackets (`postmaster` alone is the
   * postmaster of the first local domain, as at RCPT). Checked for syntax, length and SMTPUTF8 as
   * `RCPT TO` is, and counted against `limits.maxRecipients`; `rcpt` hooks are **not** run, so
   * relay policy and recipient lookups do not apply to it (as in Postfix, where a milter's added
   * recipient skips `smtpd_recipient_restrictions`): the plugin that adds one answers for it. The
   * queue's `expand` hook does apply (an added alias is expanded). Returns false when the
   * recipient is already there (nothing added); throws a TypeError (bad address) or RangeError
   * (over the limit), and nothing changes.
   */
  addRecipient(address: string, params?: RecipientParams): boolean;
  /**
   * Removes the envelope recipients equal to `address` (local part exact, domain in any case),
   * as accepted at RCPT or added here; returns how many were removed. A message left with no
   * recipient after `data_post` is refused with `554 5.5.1` (a filter that wants a message
   * dropped says so with a verdict, not by emptying the envelope).
   */
  removeRecipient(address: string): number;
}

/** A new body being written at `data_post` (`DataPostContext.replaceBody`). Calls are sequential. */
export interface BodyReplacement {
  /** Appends octets; resolves once the spool took them (back-pressure). A rejection aborts. */
  write(chunk: Uint8Array): Promise<void>;
  /** Puts the new body in place of the old, at once; on a rejection the message is unchanged. */
  commit(): Promise<void>;
  /** Drops the new body; the message is unchanged. Does nothing after `commit()`. */
  abort(): Promise<void>;
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
  /**
   * Makes the session continue as another client (XCLIENT and the like). The change takes effect
   * only when the chain ends with `accept()`: the session then restarts as if that client had
   * just connected (see `ClientIdentity` and docs/hooks.md); with any other verdict it is
   * dropped. Check that `session.peer` may make such a claim before calling it: the engine
   * trusts the plugin.
   */
  changeClient(identity: ClientIdentity): void;
}

/**
 * A client identity a plugin declares with `changeClient`. Each field that is given replaces the
 * session's; a field left out keeps its value, except `helo`, which a restart forgets (as at a
 * new connection) unless it is given.
 */
export interface ClientIdentity {
  /** The client's IP address (`session.remote.address`). */
  readonly address?: string;
  readonly port?: number;
  /** The client's verified host name (`session.remoteName`); null: unknown. */
  readonly name?: string | null;
  /** The HELO/EHLO the client gave; null or left out: the client must send one. */
  readonly helo?: { readonly verb: 'HELO' | 'EHLO'; readonly hostname: string } | null;
  /** The name the client authenticated as (`session.user`); null: not authenticated. */
  readonly user?: string | null;
  /** The address and port the client connected to (`session.local`). */
  readonly local?: Endpoint;
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
  /**
   * Queue: a transport delivers the recipients of one route, with a result for each; a plugin
   * before it (or the transport itself) may postpone the delivery instead (`postpone()`).
   */
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
