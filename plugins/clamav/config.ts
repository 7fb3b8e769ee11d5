import { cidrProblem, duration, z } from '../../core/index.js';

const network = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

export const clamavConfig = z
  .object({
    /** clamd's `TCPAddr`/`TCPSocket`. Ignored when `socket` is set. */
    host: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).default(3310),
    /** clamd's `LocalSocket`: a unix socket path; when set, used instead of host and port. */
    socket: z.string().min(1).optional(),
    /** The whole scan (connect, send, reply): when it runs out, `fail` decides. Below `timeouts.hook`. */
    timeout: duration.default(25_000),
    /**
     * Messages larger than this (octets as received) are not scanned, and logged so. Keep it
     * under clamd's `StreamMaxLength` (25 MiB by default), which also counts the header fields
     * this server adds: clamd refuses a longer stream with an error, and `fail` applies.
     */
    maxSize: z
      .number()
      .int()
      .positive()
      .default(24 * 1024 * 1024),
    /** A virus: `reject` (554 5.7.1) or `quarantine` (accepted and held in the queue). */
    action: z.enum(['reject', 'quarantine']).default('reject'),
    /** clamd down, slow or erroring: `closed` (451 4.3.0, the client retries) or `open` (accepted, logged). */
    fail: z.enum(['closed', 'open']).default('closed'),
    /** Clients whose mail is not scanned. Default none: authenticated users and loopback are scanned too. */
    trustedNetworks: z.array(network).default([]),
  })
  .strict();

export type ClamavConfig = z.output<typeof clamavConfig>;
