import { readFile, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  definePlugin,
  proceed,
  type HeaderField,
  type Hooks,
  type PluginApi,
  type SessionView,
  type Verdict,
} from '../../core/index.js';
import { scriptConfigSchema, type ScriptConfig, type ScriptHook } from './config.js';
import { scriptAddress, scriptSession, serializeInput, type ScriptEnvelope } from './input.js';
import { launchCommand, namespacesWork, vm2Folders } from './launch.js';
import { ScriptPool } from './pool.js';
import { scriptDecision, toVerdict, type ScriptDecision } from './verdict.js';

export { scriptConfigSchema, type ScriptConfig } from './config.js';

/** A script file larger than this is refused at boot: rules are small. */
const MAX_SCRIPT_BYTES = 1024 * 1024;

async function readScripts(
  config: ScriptConfig,
  baseDir: string,
): Promise<{ name: string; source: string; hooks: ScriptHook[] }[]> {
  return Promise.all(
    config.scripts.map(async ({ file, hooks }) => {
      const path = resolve(baseDir, file);
      const size = (await stat(path)).size;
      if (size > MAX_SCRIPT_BYTES)
        throw new Error(`${file} is ${size} octets; a script may have at most ${MAX_SCRIPT_BYTES}`);
      return { name: file, source: await readFile(path, 'utf8'), hooks };
    }),
  );
}

async function useNamespaces(
  mode: ScriptConfig['namespaces'],
  log: PluginApi<unknown>['log'],
): Promise<boolean> {
  if (mode === 'off') return false;
  if (await namespacesWork()) return true;
  const why = 'Linux user namespaces are not available to this user (unshare failed)';
  if (mode === 'require') throw new Error(`namespaces: require, but ${why}`);
  log.warn(
    {},
    `${why}: script processes run without network and PID namespaces, and only vm2 keeps a script off the network (Node 24's permission model does not cover it)`,
  );
  return false;
}

/**
 * script — rule scripts by people who are not trusted with the server (a customer's filter),
 * run in a pool of child processes under Node's permission model, Linux namespaces and resource
 * limits, with vm2 inside. A script gets JSON copies of the session facts, the envelope and (at
 * `data_post`) the header fields, and returns `continue`, `reject`, `defer` (or, if allowed,
 * `accept`). Anything else it does — loop, exhaust memory, throw, return garbage, reach for
 * `require`, `process`, files or the network — gives the `onFailure` verdict (`451 4.3.0`), and
 * its process is replaced. See README.md and docs/security.md for what each layer enforces.
 */
export default definePlugin({
  name: 'script',
  config: scriptConfigSchema,
  async setup({ config, log, baseDir, onClose }) {
    const scripts = await readScripts(config, baseDir);
    const namespaces = await useNamespaces(config.namespaces, log);
    const { vm2, folders } = vm2Folders();
    const entry = fileURLToPath(new URL('./child.js', import.meta.url));
    const pool = await ScriptPool.start({
      command: launchCommand({
        entry,
        readable: [entry, ...folders],
        maxHeapMb: config.maxHeapMb,
        maxMemoryMb: config.maxMemoryMb,
        namespaces,
        args: [vm2],
      }),
      scripts: scripts.map(({ name, source }) => ({ name, source })),
      size: config.poolSize,
      maxQueued: config.maxQueued,
      timeoutMs: config.timeout,
      log,
    });
    onClose(() => pool.close());
    log.info(
      { scripts: scripts.map((s) => s.name), childPids: pool.pids(), namespaces },
      'script pool ready',
    );

    const failure = toVerdict(config.onFailure);
    const parse = (value: unknown): ScriptDecision => {
      const decision = scriptDecision.parse(value);
      if (decision.action === 'accept' && !config.allowAccept)
        throw new Error('"accept" is not allowed (allowAccept is off)');
      return decision;
    };

    /** Asks each script of this hook in turn; the first decisive verdict wins. */
    const judge = async (
      hook: ScriptHook,
      session: SessionView,
      envelope: ScriptEnvelope | null,
      headers: readonly HeaderField[],
      signal: AbortSignal,
    ): Promise<Verdict> => {
      const fields = { session: session.id, hook };
      const input = serializeInput(
        { hook, session: scriptSession(session), envelope },
        headers,
        config.maxInputBytes,
      );
      if (input === null) {
        log.error({ ...fields, maxInputBytes: config.maxInputBytes }, 'script input too large; not run');
        return failure;
      }
      for (const [i, script] of scripts.entries()) {
        if (!script.hooks.includes(hook)) continue;
        const outcome = await pool.run(i, input, signal, parse);
        if (!outcome.ok) {
          log.error(
            { ...fields, script: script.name, childPid: outcome.pid, reason: outcome.reason },
            'script failed',
          );
          return failure;
        }
        if (outcome.value.action !== 'continue') {
          log.info({ ...fields, script: script.name, ...outcome.value }, 'script decided');
          return toVerdict(outcome.value);
        }
      }
      return proceed();
    };

    const used = new Set(scripts.flatMap((s) => s.hooks));
    const hooks: { -readonly [K in keyof Hooks]: Hooks[K] } = {};
    if (used.has('connect'))
      hooks.connect = async ({ session, signal }) => judge('connect', session, null, [], signal);
    if (used.has('helo'))
      hooks.helo = async ({ session, signal }) => judge('helo', session, null, [], signal);
    if (used.has('mail')) {
      hooks.mail = async ({ session, transaction, sender, params, signal }) =>
        judge(
          'mail',
          session,
          {
            sender: sender && scriptAddress(sender),
            recipients: transaction.recipients.map((r) => scriptAddress(r.address)),
            recipient: null,
            size: params.size ?? null,
          },
          [],
          signal,
        );
    }
    if (used.has('rcpt')) {
      hooks.rcpt = async ({ session, transaction, recipient, signal }) =>
        judge(
          'rcpt',
          session,
          {
            sender: transaction.sender && scriptAddress(transaction.sender),
            recipients: transaction.recipients.map((r) => scriptAddress(r.address)),
            recipient: scriptAddress(recipient),
            size: transaction.mailParams.size ?? null,
          },
          [],
          signal,
        );
    }
    if (used.has('data_post')) {
      hooks.data_post = async ({ session, transaction, message, signal }) =>
        judge(
          'data_post',
          session,
          {
            sender: transaction.sender && scriptAddress(transaction.sender),
            recipients: transaction.recipients.map((r) => scriptAddress(r.address)),
            recipient: null,
            size: message.size,
          },
          message.headers.list(),
          signal,
        );
    }
    return hooks;
  },
});
