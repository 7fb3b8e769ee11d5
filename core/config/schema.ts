import { hostname as osHostname } from 'node:os';
import { isIP } from 'node:net';
import { z } from 'zod';
import { cidrProblem } from '../util/cidr.js';
import { parseDuration } from '../util/duration.js';

/** A duration: milliseconds, or a string such as `30s`, `5m`, `4h`. */
export const duration = z.union([z.number().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseDuration(v);
  } catch {
    ctx.addIssue({ code: 'custom', message: `expected a duration like 250ms, 30s, 5m or 4h, got "${v}"` });
    return z.NEVER;
  }
});

const size = z.number().int().positive();

export const limitsSchema = z
  .object({
    /** RFC 1870 SIZE: the largest message accepted, in octets. */
    maxMessageSize: size.default(26_214_400),
    maxRecipients: size.default(100),
    /** Longest command line, CRLF included (RFC 5321 §4.5.3.1.4 allows 512 plus extensions). */
    maxLineLength: z.number().int().min(512).default(2048),
    /** Unknown or malformed commands before the connection is closed. */
    maxUnknownCommands: size.default(10),
    /** Failed AUTH attempts in one session before it is closed. */
    maxAuthFailures: size.default(3),
    maxConnections: size.default(1000),
    maxConnectionsPerIp: size.default(50),
    /** Bytes of header block parsed at end of data; a longer block is stored but not parsed further. */
    maxHeaderBytes: size.default(1_048_576),
  })
  .strict();

export const timeoutsSchema = z
  .object({
    /**
     * A complete command line, counted from the start of the wait (RFC 5321 §4.5.3.2.7: at least
     * 5 minutes). Also each AUTH response, the TLS handshake, and a client that does not read its
     * replies (they may not pile up past a small bound).
     */
    command: duration.default(300_000),
    /**
     * The base of one message's content deadline (DATA, or all BDAT chunks of one message): the
     * whole content must arrive within `data` plus its size at `minDataRate`.
     */
    data: duration.default(180_000),
    /**
     * Octets per second: each octet of content received extends the content deadline by
     * `1000 / minDataRate` ms (Postfix's `smtpd_min_data_rate`).
     */
    minDataRate: z.number().int().positive().default(500),
    /** Hold the greeting this long; a client that talks first is refused (an early talker). */
    greetingDelay: duration.default(0),
    /** Per-hook time limit; a plugin entry may override it with `timeout`. */
    hook: duration.default(30_000),
    /** On SIGTERM, how long sessions may finish before the rest get `421 4.3.2`. */
    shutdown: duration.default(30_000),
    /**
     * How long each plugin's `setup` may take at start and on reload; past it the start fails, or
     * the reload is refused and the running config stays.
     */
    setup: duration.default(60_000),
  })
  .strict();

/** Per-listener overrides: the same keys, none defaulted, so unset keys fall back to the top level. */
const listenerLimitsSchema = z
  .object(
    Object.fromEntries(
      Object.entries(limitsSchema.shape).map(([k, v]) => [
        k,
        (v as unknown as z.ZodDefault<z.ZodNumber>).unwrap().optional(),
      ]),
    ) as { [K in keyof typeof limitsSchema.shape]: z.ZodOptional<z.ZodNumber> },
  )
  .strict();

const listenerSchema = z
  .object({
    kind: z.enum(['smtp', 'submission', 'submissions']),
    /** A name for logs; defaults to `kind:port`. */
    name: z.string().min(1).optional(),
    address: z
      .string()
      .refine((a) => isIP(a) !== 0, { message: 'expected an IP address such as 127.0.0.1 or ::' })
      .default('127.0.0.1'),
    port: z.number().int().min(0).max(65535),
    /** Offer AUTH without TLS on this listener (never on the open internet). */
    allowInsecureAuth: z.boolean().default(false),
    /** Per-listener overrides of the top-level `limits`. */
    limits: listenerLimitsSchema.optional(),
    /**
     * The PROXY protocol (v1 or v2) on this listener: every connection must come from one of
     * `networks` and start with a PROXY header, whose client address and port then stand for the
     * connection everywhere. Anyone else, or a connection without a valid header, is closed.
     */
    proxyProtocol: z
      .object({
        /** The proxies' addresses (CIDR); required, so that no one else can claim an address. */
        networks: z
          .array(
            z.string().superRefine((text, ctx) => {
              const problem = cidrProblem(text);
              if (problem) ctx.addIssue({ code: 'custom', message: problem });
            }),
          )
          .min(1, { message: 'expected at least one network the proxy connects from' }),
        /** The whole header must arrive within this, counted from the connection. */
        timeout: duration
          .refine((ms) => ms > 0, { message: 'expected a duration greater than 0' })
          .default(5000),
      })
      .strict()
      .optional(),
  })
  .strict();

/**
 * The `http` listener: `/metrics`, `/healthz`, `/readyz`, and routes added through the core's
 * HTTP seam (core/http/server.ts). Off unless configured; at most one.
 */
const httpListenerSchema = z
  .object({
    kind: z.literal('http'),
    name: z.string().min(1).optional(),
    address: z
      .string()
      .refine((a) => isIP(a) !== 0, { message: 'expected an IP address such as 127.0.0.1 or ::' })
      .default('127.0.0.1'),
    port: z.number().int().min(0).max(65535),
    /** When set, `/metrics` answers only a request with `Authorization: Bearer <metricsToken>`. */
    metricsToken: z.string().min(16, { message: 'expected a token of at least 16 characters' }).optional(),
    /** The web console under `/console/` (docs/operations.md "Web console"); off unless set. */
    console: z
      .object({
        /**
         * What an operator types to log in. Kept in the primary's memory only as a SHA-256 digest
         * and compared in constant time; at least 24 characters (`openssl rand -base64 24`).
         */
        token: z.string().min(24, { message: 'expected a token of at least 24 characters' }),
        /** How long a login lasts without being used (every page view renews it). */
        sessionIdle: duration.default(30 * 60_000),
        /**
         * Marks the session cookie `Secure`. The listener speaks plain HTTP (reach it through an
         * SSH tunnel or a TLS reverse proxy): set it when browsers reach it over HTTPS.
         */
        secureCookie: z.boolean().default(false),
      })
      .strict()
      .optional(),
  })
  .strict();

const certPair = z.object({ cert: z.string().min(1), key: z.string().min(1) }).strict();

const pluginEntry = z.union([
  z.string().min(1),
  z
    .object({
      name: z.string().min(1),
      config: z.unknown().optional(),
      /** Per-plugin hook timeout, overriding `timeouts.hook`. */
      timeout: duration.optional(),
      enabled: z.boolean().default(true),
    })
    .strict(),
]);

export const configSchema = z
  .object({
    /**
     * The account `petrel start` runs as (a name or a number). Started as root, the primary binds
     * the listeners and then becomes this user before it forks a worker or writes a file; started
     * as root without it, Petrel refuses to run unless given `--run-as-root`.
     */
    user: z.string().min(1).optional(),
    /** The group to run as with `user` (a name or a number); default the user's primary group. */
    group: z.string().min(1).optional(),
    /** The name this server gives itself in the greeting, EHLO reply and Received: headers. */
    hostname: z.string().min(1).default(osHostname()),
    /**
     * Domains this server is the final destination for (its mailboxes). Plugins such as relay
     * and maildir read it; lower-cased, without a trailing dot.
     */
    localDomains: z
      .array(
        z
          .string()
          .regex(
            /^[a-z0-9\u0080-\uffff]([a-z0-9\u0080-\uffff-]*[a-z0-9\u0080-\uffff])?(\.[a-z0-9\u0080-\uffff]([a-z0-9\u0080-\uffff-]*[a-z0-9\u0080-\uffff])?)*$/i,
            {
              message: 'expected a domain name such as example.com',
            },
          )
          .transform((d) => d.toLowerCase()),
      )
      .default([]),
    listeners: z
      .array(z.discriminatedUnion('kind', [listenerSchema, httpListenerSchema]))
      .min(1)
      .refine((ls) => ls.filter((l) => l.kind === 'http').length <= 1, {
        message: 'expected at most one listener of kind http',
      }),
    tls: certPair
      .extend({
        sni: z.record(z.string(), certPair).default({}),
        /**
         * When `cert` and `key` do not exist yet, generate a self-signed pair there on first start
         * (development and the embedded default; clients cannot verify it).
         */
        selfSigned: z.boolean().default(false),
      })
      .strict()
      .optional(),
    dns: z
      .object({
        servers: z.array(z.string().min(1)).min(1).optional(),
        /** Per-query timeout. */
        timeout: duration.default(5000),
      })
      .strict()
      .default({ timeout: 5000 }),
    limits: limitsSchema.default(limitsSchema.parse({})),
    timeouts: timeoutsSchema.default(timeoutsSchema.parse({})),
    smtp: z
      .object({
        /**
         * Bare LF or bare CR in message content: `reject` refuses the message with 5xx (the SMTP
         * smuggling guard); `normalize` turns each into CRLF. End of data is always CRLF.CRLF.
         */
        bareLineEndings: z.enum(['reject', 'normalize']).default('reject'),
        /**
         * NUL octets in message content (RFC 5321 text lines have none; without BINARYMIME,
         * RFC 6152 §2 forbids them): `reject` refuses the message with 5xx; `strip` removes them.
         */
        nul: z.enum(['reject', 'strip']).default('reject'),
        /** Text after the hostname in the 220 greeting. */
        banner: z.string().default('ESMTP Petrel'),
      })
      .strict()
      .default({ bareLineEndings: 'reject', nul: 'reject', banner: 'ESMTP Petrel' }),
    spool: z
      .object({
        dir: z.string().min(1).default('./var/spool'),
        /** Bodies up to this size stay in memory while received; larger ones spill to the spool. */
        memoryThreshold: z.number().int().nonnegative().default(262_144),
      })
      .strict()
      .default({ dir: './var/spool', memoryThreshold: 262_144 }),
    /**
     * Where the State service keeps what the workers share (counters, lockouts). `sqlite`: one
     * file that every worker of this server opens; `path` defaults to `<spool.dir>/state.sqlite`.
     * `redis`: a Redis server named by `redis.url`, for servers on several machines.
     */
    state: z
      .object({
        backend: z.enum(['sqlite', 'redis']).default('sqlite'),
        path: z.string().min(1).optional(),
        redis: z
          .object({
            url: z.string().refine(
              (u) => {
                try {
                  return ['redis:', 'rediss:'].includes(new URL(u).protocol);
                } catch {
                  return false;
                }
              },
              { message: 'expected a URL such as redis://127.0.0.1:6379 or rediss://user:password@host' },
            ),
            /** Put before every key, so several servers or programs can share one Redis. */
            prefix: z.string().default('petrel:'),
            /** How long an operation waits for Redis's answer before it fails. */
            timeout: duration
              .refine((ms) => ms > 0, { message: 'expected a duration greater than 0' })
              .default(2000),
          })
          .strict()
          .optional(),
      })
      .strict()
      .superRefine((s, ctx) => {
        if (s.backend === 'redis' && !s.redis)
          ctx.addIssue({
            code: 'custom',
            path: ['redis'],
            message: 'expected redis: { url } with backend: redis',
          });
        if (s.backend === 'redis' && s.path)
          ctx.addIssue({ code: 'custom', path: ['path'], message: 'expected no path with backend: redis' });
        if (s.backend === 'sqlite' && s.redis)
          ctx.addIssue({
            code: 'custom',
            path: ['backend'],
            message: 'expected backend: redis to use redis',
          });
      })
      .default({ backend: 'sqlite' }),
    log: z
      .object({
        level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
        /** `auto`: pretty on a terminal, JSON otherwise. */
        format: z.enum(['auto', 'json', 'pretty']).default('auto'),
      })
      .strict()
      .default({ level: 'info', format: 'auto' }),
    plugins: z.array(pluginEntry).default([]),
    /**
     * Worker processes `petrel start` runs under its primary: a number, or `auto` for one per CPU
     * core. Each worker serves connections and owns its own part of the queue.
     */
    workers: z.union([z.literal('auto'), z.number().int().positive().max(64)]).default(1),
    /**
     * A worker whose event loop has not answered for this long (a plugin stuck in a loop) is
     * killed and replaced by the primary.
     */
    watchdog: duration
      .refine((ms) => ms >= 1000, { message: 'expected a duration of at least 1s' })
      .default(10_000),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.group !== undefined && c.user === undefined)
      ctx.addIssue({ code: 'custom', path: ['group'], message: 'expected user: with group:' });
  });

export type PetrelConfigInput = z.input<typeof configSchema>;
export type PetrelConfig = z.output<typeof configSchema>;
export type Limits = z.output<typeof limitsSchema>;
export type Timeouts = z.output<typeof timeoutsSchema>;
/** An SMTP listener (`smtp`, `submission`, `submissions`). */
export type ListenerConfig = z.output<typeof listenerSchema>;
export type HttpListenerConfig = z.output<typeof httpListenerSchema>;
export type AnyListenerConfig = PetrelConfig['listeners'][number];
export type PluginEntry = PetrelConfig['plugins'][number];

/** The config's `http` listener, if it has one. */
export function httpListener(config: PetrelConfig): HttpListenerConfig | undefined {
  return config.listeners.find((l): l is HttpListenerConfig => l.kind === 'http');
}
