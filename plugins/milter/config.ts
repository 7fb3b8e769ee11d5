import { duration, z } from '../../core/index.js';

/** What to do when a milter is down, times out or breaks the protocol (Postfix's `milter_default_action`). */
const defaultAction = z.enum(['accept', 'tempfail', 'reject']);

const milter = z
  .object({
    /** A name for the logs. */
    name: z.string().min(1),
    /** TCP host and port of the milter... */
    host: z.string().min(1).default('127.0.0.1'),
    port: z.number().int().min(1).max(65535).optional(),
    /** ...or the path of its unix socket. */
    path: z.string().min(1).optional(),
    /** How long connecting and option negotiation may take. */
    connectTimeout: duration.default(5_000),
    /** How long the milter may take to answer one step (connect, helo, mail, rcpt, data, headers, body). */
    stepTimeout: duration.default(10_000),
    /** How long the end of message (its modification actions and the final reply) may take. */
    eomTimeout: duration.default(20_000),
    /** Overrides the plugin's `defaultAction` for this milter. */
    defaultAction: defaultAction.optional(),
  })
  .strict()
  .refine((m) => (m.port === undefined) !== (m.path === undefined), {
    message: 'give either port (with host) or path',
  });

export const milterConfig = z
  .object({
    /** The milters, in order: each sees the message after the ones before it. */
    milters: z.array(milter).min(1),
    /** When a milter fails: `accept` (go on without it), `tempfail` (451 4.7.1) or `reject` (550 5.7.1). */
    defaultAction: defaultAction.default('tempfail'),
  })
  .strict();

export type MilterConfig = z.output<typeof milterConfig>;
export type MilterEntry = MilterConfig['milters'][number];
