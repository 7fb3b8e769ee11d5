import { parseDuration, z } from '../../core/index.js';
import { parseSchedule } from './schedule.js';

/** The queue plugin's config schema: its own module, so the plugin and its command share it. */
const durationText = z.string().refine(
  (s) => {
    try {
      parseDuration(s);
      return true;
    } catch {
      return false;
    }
  },
  { message: 'expected a duration like 30m, 4h or 5d' },
);

export const queueConfig = z
  .object({
    /** Where the queue lives; default `<spool.dir>/queue`. Relative to the config file's folder. */
    dir: z.string().min(1).optional(),
    /** Delays between attempts; `...` repeats the last one (RFC 5321 §4.5.4.1: at least 30 minutes apart is usual). */
    retry: z
      .string()
      .default('5m, 10m, 20m, 30m...')
      .refine(
        (s) => {
          try {
            parseSchedule(s);
            return true;
          } catch {
            return false;
          }
        },
        { message: 'expected a list of durations like "5m, 10m, 30m..."' },
      ),
    /** How long a message may stay before its undelivered recipients fail (RFC 5321 §4.5.4.1: 4–5 days). */
    lifetime: durationText.default('5d'),
    /** Deliveries in progress at once. */
    concurrency: z.number().int().positive().default(20),
    /** Messages larger than this are stored as their own file; smaller ones inline in the journal. */
    inlineLimit: z.number().int().nonnegative().default(262_144),
    /**
     * Octets of newly queued inline messages kept in memory for their first delivery attempt, so
     * that it need not read them back from disk; 0 turns this off.
     */
    memoryCache: z
      .number()
      .int()
      .nonnegative()
      .default(32 * 1024 * 1024),
    /**
     * Queued messages held loaded (envelope, replies, kept attempts), at most: by count, and by the
     * octets of their envelopes. The others are an index entry, read back from the journal when needed.
     */
    activeWindow: z
      .object({
        messages: z.number().int().positive().default(10_000),
        bytes: z
          .number()
          .int()
          .positive()
          .default(16 * 1024 * 1024),
      })
      .strict()
      .prefault({}),
    /** Journal segment size before a new one is started. */
    segmentSize: z
      .number()
      .int()
      .min(65_536)
      .default(16 * 1024 * 1024),
    /** More `Received:` fields than this is a mail loop: refused with 554 5.4.6. */
    maxReceived: z.number().int().positive().default(50),
    /** Every message's history: what is kept while it is queued, and for how long after. */
    history: z
      .object({
        /** Attempts kept per recipient while queued: the first few, then the latest. */
        attempts: z
          .object({
            first: z.number().int().nonnegative().default(3),
            last: z.number().int().positive().default(10),
          })
          .strict()
          .prefault({}),
        /** How long a delivered, bounced or deleted message's story is kept (`petrel trace`). */
        retention: durationText.default('7d'),
        /** Finished messages' stories kept at most; the oldest go first. */
        maxMessages: z.number().int().positive().default(1_000_000),
      })
      .strict()
      .prefault({}),
  })
  .strict();

export type QueueConfig = z.output<typeof queueConfig>;
