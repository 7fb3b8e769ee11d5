import { isAbsolute, resolve } from 'node:path';
import { domainToASCII } from 'node:url';
import { cidrProblem, z } from '../../core/index.js';

/**
 * The dkim plugin's config schema: its own module, so the plugin and its `petrel dkim` command
 * read the same keys from the same places.
 */

/** Header fields signed when present (RFC 6376 §5.4.1 lists what a signer should cover). */
export const DEFAULT_SIGNED_HEADERS = [
  'From',
  'Sender',
  'Reply-To',
  'Subject',
  'Date',
  'Message-ID',
  'To',
  'Cc',
  'In-Reply-To',
  'References',
  'MIME-Version',
  'Content-Type',
  'Content-Transfer-Encoding',
  'Content-ID',
  'Content-Description',
  'Content-Disposition',
  'List-Id',
  'List-Help',
  'List-Unsubscribe',
  'List-Unsubscribe-Post',
  'List-Subscribe',
  'List-Post',
  'List-Owner',
  'List-Archive',
] as const;

/**
 * Header fields named once more in `h=` than the message has them (RFC 6376 §5.4.2, §8.15), so
 * that an instance added after signing breaks the signature. RFC 5322 §3.6 allows each of these
 * at most once: a second `From:` or `Subject:` is exactly what a replay with a changed display
 * would add. The MIME fields decide how the body is shown, and a message has one of each at top
 * level. The same name in `h=` with no field to match hashes as nothing (§5.4.2).
 */
export const DEFAULT_OVERSIGNED_HEADERS = [
  'From',
  'To',
  'Cc',
  'Subject',
  'Date',
  'Reply-To',
  'Sender',
  'Message-ID',
  'MIME-Version',
  'Content-Type',
  'Content-Transfer-Encoding',
] as const;

const headerName = z.string().regex(/^[\x21-\x39\x3b-\x7e]+$/, 'expected a header field name');

/** A selector: a DNS label or several (RFC 6376 §3.1). */
const selectorName = z
  .string()
  .regex(/^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$/, {
    message: 'expected a selector: letters, digits and dashes, dot-separated',
  });

/** A domain as written in the config, checked and kept as its lower-case A-label. */
const domainName = z.string().transform((s, ctx) => {
  const ascii = domainToASCII(s.trim().replace(/\.$/, '')).toLowerCase();
  if (!ascii || !ascii.includes('.') || ascii.length > 253) {
    ctx.addIssue({ code: 'custom', message: `"${s}" is not a domain name` });
    return z.NEVER;
  }
  return ascii;
});

const selectorEntry = z.union([
  selectorName,
  z.object({ selector: selectorName, keyFile: z.string().min(1) }).strict(),
]);

// The same CIDR rules as relay and mailauth (host bits after the prefix are refused).
const cidr = z.string().superRefine((text, ctx) => {
  const problem = cidrProblem(text);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

export const dkimConfig = z
  .object({
    /**
     * The signing domains and their selectors. Each selector's key is read from
     * `<keyDir>/<domain>/<selector>.pem` unless it names its own `keyFile`. Two selectors of one
     * domain give two signatures (an RSA and an Ed25519 key, or the old and new key of a rotation).
     */
    domains: z
      .record(z.string(), z.array(selectorEntry).min(1))
      .default({})
      .transform((rec, ctx) => {
        const out: Record<string, (string | { selector: string; keyFile: string })[]> = {};
        for (const [name, selectors] of Object.entries(rec)) {
          const parsed = domainName.safeParse(name);
          if (!parsed.success) {
            ctx.addIssue({ code: 'custom', path: [name], message: `"${name}" is not a domain name` });
            continue;
          }
          out[parsed.data] = selectors;
        }
        return out;
      }),
    /** Where key files live, relative to the config file's folder. `petrel dkim keygen` writes there. */
    keyDir: z.string().min(1).default('./dkim'),
    /** Sign a `From:` in a subdomain of a signing domain with that domain's keys (`news.crepes.test` → `crepes.test`). */
    parentDomains: z.boolean().default(true),
    /** Sign mail whose `From:` domain has no key with this domain's keys (not aligned for DMARC, but it carries our name). */
    defaultDomain: domainName.optional(),
    /**
     * What to do with a message that should be signed but cannot be: its `From:` domain has no
     * key (and there is no default), or the key could not be read. `send-unsigned` (default)
     * delivers it as it is; `defer` leaves it in the queue to be tried again.
     */
    onError: z.enum(['send-unsigned', 'defer']).default('send-unsigned'),
    /**
     * Clients whose mail is ours to sign without AUTH (local applications, webmail): addresses or
     * networks. Mail from an authenticated session, or a submission listener, is always signed.
     */
    trustedNetworks: z.array(cidr).default(['127.0.0.0/8', '::1/128']),
    /** Header fields to sign when present. `From` is always signed (RFC 6376 §5.4). */
    headers: z
      .array(headerName)
      .min(1)
      .default([...DEFAULT_SIGNED_HEADERS]),
    /** Header fields signed once more than present, so that adding one breaks the signature. */
    oversign: z.array(headerName).default([...DEFAULT_OVERSIGNED_HEADERS]),
    /**
     * A message is held in memory up to this many octets while it is signed (the signature goes
     * in front, so the whole message is read first); beyond it the rest goes to an unlinked
     * temporary file in `tempDir`.
     */
    memoryLimit: z
      .number()
      .int()
      .min(64 * 1024)
      .default(1024 * 1024),
    /** Where a larger message waits while it is signed. Default: the system's temporary folder. */
    tempDir: z.string().min(1).optional(),
    /**
     * Threads that make the signatures (each one at a time), per worker process: an RSA-2048
     * signature is about 0.25 ms of CPU, so one thread makes some 4000 a second where a core is
     * free. Raise it on a machine with cores to spare when signing holds deliveries back.
     */
    signingThreads: z.number().int().min(1).max(64).default(1),
    /**
     * How much lower than the event loop's the signing threads' CPU priority is (Linux nice
     * increment, 0–19): on a busy machine the sessions get the CPU first and signatures wait.
     * 0 gives them the same priority. Ignored where a thread's priority cannot be set.
     */
    signingNice: z.number().int().min(0).max(19).default(10),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.defaultDomain && !(c.defaultDomain in c.domains)) {
      ctx.addIssue({
        code: 'custom',
        path: ['defaultDomain'],
        message: `${c.defaultDomain} has no keys: list it under domains`,
      });
    }
  });

export type DkimConfig = z.output<typeof dkimConfig>;

/** One key as the config places it: domain, selector, and the file it is read from. */
export interface KeyLocation {
  readonly domain: string;
  readonly selector: string;
  readonly file: string;
}

/** Every key the config names, with absolute file paths. */
export function keyLocations(config: DkimConfig, baseDir: string): KeyLocation[] {
  const dir = resolve(baseDir, config.keyDir);
  const out: KeyLocation[] = [];
  for (const [domain, selectors] of Object.entries(config.domains)) {
    for (const s of selectors) {
      if (typeof s === 'string') out.push({ domain, selector: s, file: defaultKeyFile(dir, domain, s) });
      else
        out.push({
          domain,
          selector: s.selector,
          file: isAbsolute(s.keyFile) ? s.keyFile : resolve(baseDir, s.keyFile),
        });
    }
  }
  return out;
}

/** Where a key lives when its entry names no file: `<keyDir>/<domain>/<selector>.pem`. */
export function defaultKeyFile(keyDir: string, domain: string, selector: string): string {
  return resolve(keyDir, domain, `${selector}.pem`);
}
