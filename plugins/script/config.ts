import { duration, z } from '../../core/index.js';
import { failureDecision } from './verdict.js';

/** The hooks a script can judge: the session hooks whose verdicts are accept, reject or defer. */
export const SCRIPT_HOOKS = ['connect', 'helo', 'mail', 'rcpt', 'data_post'] as const;
export type ScriptHook = (typeof SCRIPT_HOOKS)[number];

const MiB = 1024 * 1024;

/** The script plugin's config. Script paths are relative to the config file's folder. */
export const scriptConfigSchema = z
  .object({
    /** The scripts, asked in this order at each of their hooks; the first decisive verdict wins. */
    scripts: z
      .array(
        z
          .object({
            file: z.string().min(1),
            hooks: z
              .array(z.enum(SCRIPT_HOOKS))
              .min(1)
              .default(['mail', 'rcpt', 'data_post'])
              .transform((hooks) => [...new Set(hooks)]),
          })
          .strict(),
      )
      .min(1),
    /** Script processes kept running; each runs one call at a time. */
    poolSize: z.number().int().min(1).max(64).default(2),
    /** Calls that may wait for a free process; one more gets the failure verdict at once. */
    maxQueued: z.number().int().min(0).max(100_000).default(100),
    /** Wall-clock limit per call; past it the process is killed (SIGKILL) and replaced. */
    timeout: duration.default(1000).refine((ms) => ms >= 10 && ms <= 60_000, {
      message: 'expected a timeout from 10ms to 60s',
    }),
    /** V8 heap limit of a script process (`--max-old-space-size`), in MiB. */
    maxHeapMb: z.number().int().min(16).max(4096).default(64),
    /** All memory of a script process (`RLIMIT_DATA`), in MiB: heap, array buffers, Node itself. */
    maxMemoryMb: z.number().int().min(128).max(65_536).default(256),
    /** Largest input of one call (JSON); header fields past it are left out and flagged. */
    maxInputBytes: z
      .number()
      .int()
      .min(64 * 1024)
      .max(16 * MiB)
      .default(128 * 1024),
    /** May a script answer `accept`? Off: an untrusted script can refuse, never let through. */
    allowAccept: z.boolean().default(false),
    /**
     * Linux namespaces around each process (no network, no other processes in sight). Required by
     * default: without them only vm2 keeps a script off the network, so running without them is
     * something an operator chooses (`auto` or `off`), not something that happens quietly.
     */
    namespaces: z.enum(['auto', 'require', 'off']).default('require'),
    /** The verdict when a script fails: loops, runs out of memory, throws, returns garbage. */
    onFailure: failureDecision.default({
      action: 'defer',
      code: 451,
      enhanced: '4.3.0',
      text: 'Temporary local problem, please try again later',
    }),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.maxMemoryMb < c.maxHeapMb + 64) {
      ctx.addIssue({
        code: 'custom',
        path: ['maxMemoryMb'],
        message: `expected at least maxHeapMb + 64 (${c.maxHeapMb + 64}): Node needs room beside its heap`,
      });
    }
  });

export type ScriptConfig = z.output<typeof scriptConfigSchema>;
