/**
 * The entry of a script process: runs untrusted rule scripts inside vm2, one call at a time, for
 * the pool in `pool.ts`. It imports nothing of Petrel's, because Node's permission model lets it
 * read only this file and the packages vm2 needs (see `launch.ts`).
 *
 * Protocol: one JSON object per line, stdin from the parent, stdout to it (the parent bounds what
 * it reads and kills a child that breaks the protocol). Untrusted data crosses the vm2 bridge
 * only as JSON text, never as objects of this realm.
 *
 *   in   {"type":"init","scripts":[{"name":"rules/a.js","source":"…"}]}
 *   out  {"type":"ready"}  or  {"type":"init-error","script":0,"message":"SyntaxError: …"}
 *   in   {"type":"call","id":7,"script":0,"input":"<JSON text>"}
 *   out  {"type":"result","id":7,"ok":true,"value":"<JSON text>"}
 *        {"type":"result","id":7,"ok":false,"error":"TypeError: …"}
 *
 * Every call's reply is written from a macrotask (setImmediate), after the microtask queue has
 * drained: a script that leaves a microtask loop behind never gets a reply out, and the parent's
 * wall-clock kill ends it.
 */
import { createRequire } from 'node:module';

interface Vm2 {
  VM: new (options: Record<string, unknown>) => { run(script: unknown): unknown };
  VMScript: new (code: string, options: { filename: string; lineOffset: number }) => { compile(): unknown };
}

interface InitMessage {
  type: 'init';
  scripts: { name: string; source: string }[];
}
interface CallMessage {
  type: 'call';
  id: number;
  script: number;
  input: string;
}

/** An error's text, short: it goes to the parent's log, never to an SMTP client. */
function describe(err: unknown): string {
  let text: string;
  try {
    text = err instanceof Error ? `${err.name}: ${err.message}` : `threw ${String(err)}`;
  } catch {
    text = 'threw something that cannot be described';
  }
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

/** Where in the script a syntax error is: V8 puts `file:line` first in its stack. */
function where(err: unknown, source: string): string {
  const line = Number(/:(\d+)$/.exec(String((err as Error)?.stack).split('\n')[0] ?? '')?.[1]);
  if (!line) return '';
  return line > source.split('\n').length ? ' (at the end of the script)' : ` (line ${line})`;
}

function send(message: object): void {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

/**
 * The script is the body of a strict-mode function of `hook`, `session`, `envelope`, `headers`,
 * `header(name)` and `headersTruncated`. Its input arrives as JSON text, is parsed and
 * deep-frozen inside the sandbox, and its verdict leaves as JSON text made inside the sandbox.
 */
const PROLOGUE = `(function () {
  'use strict';
  const parse = JSON.parse, stringify = JSON.stringify, freeze = Object.freeze, keys = Object.keys;
  const deepFreeze = (v) => {
    if (typeof v === 'object' && v !== null) { freeze(v); for (const k of keys(v)) deepFreeze(v[k]); }
    return v;
  };
  const rule = function (hook, session, envelope, headers, header, headersTruncated) {
    'use strict';
`;
const EPILOGUE = `
  };
  return function (json) {
    const ctx = deepFreeze(parse(json));
    const header = (name) => {
      const lower = String(name).toLowerCase();
      const field = ctx.headers.find((h) => h.name.toLowerCase() === lower);
      return field === undefined ? undefined : field.value;
    };
    const verdict = rule.call(
      undefined, ctx.hook, ctx.session, ctx.envelope, ctx.headers, header, ctx.headersTruncated,
    );
    return stringify(verdict === undefined ? null : verdict);
  };
})()`;
const PROLOGUE_LINES = PROLOGUE.split('\n').length - 1;

/** Node's own capabilities this realm no longer needs once vm2 is loaded (defence in depth). */
function shedCapabilities(): void {
  const global = globalThis as Record<string, unknown>;
  for (const name of ['fetch', 'WebSocket', 'EventSource', 'Request', 'Response', 'Headers', 'FormData'])
    delete global[name];
  const proc = process as unknown as Record<string, unknown>;
  for (const name of ['getBuiltinModule', 'dlopen', 'binding', '_linkedBinding', 'kill', 'chdir'])
    proc[name] = undefined;
}

function main(vm2Path: string): void {
  const { VM, VMScript } = createRequire(import.meta.url)(vm2Path) as Vm2;
  let rules: ((json: string) => unknown)[] | null = null;
  let busy = false;

  const init = (message: InitMessage): void => {
    const compiled: ((json: string) => unknown)[] = [];
    for (const [i, { name, source }] of message.scripts.entries()) {
      try {
        const script = new VMScript(`${PROLOGUE}${source}${EPILOGUE}`, {
          filename: name,
          lineOffset: -PROLOGUE_LINES,
        });
        script.compile();
        // No `require`, no `process`, no timers, no eval or Function(), no WebAssembly, no
        // promise jobs. vm2's own timeout is not used: it cannot stop microtask loops, and the
        // parent's kill stops everything.
        const vm = new VM({ eval: false, wasm: false, allowAsync: false });
        vm.run('delete globalThis.Buffer;');
        const fn = vm.run(script);
        if (typeof fn !== 'function') throw new TypeError('the script did not compile to a function');
        compiled.push(fn as (json: string) => unknown);
      } catch (err) {
        send({ type: 'init-error', script: i, message: `${describe(err)}${where(err, source)}` });
        return;
      }
    }
    shedCapabilities();
    rules = compiled;
    send({ type: 'ready' });
  };

  const call = (message: CallMessage): void => {
    const rule = rules?.[message.script];
    if (!rule || busy) {
      send({ type: 'result', id: message.id, ok: false, error: 'protocol: no such script, or busy' });
      return;
    }
    busy = true;
    let reply: object;
    try {
      const value = rule(message.input);
      reply =
        typeof value === 'string'
          ? { type: 'result', id: message.id, ok: true, value }
          : { type: 'result', id: message.id, ok: false, error: 'the verdict is not JSON' };
    } catch (err) {
      reply = { type: 'result', id: message.id, ok: false, error: describe(err) };
    }
    setImmediate(() => {
      busy = false;
      send(reply);
    });
  };

  let pending = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk: string) => {
    pending += chunk;
    for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      const message = JSON.parse(line) as InitMessage | CallMessage;
      if (message.type === 'init' && rules === null) init(message);
      else if (message.type === 'call') call(message);
    }
  });
  // The parent holds the other end: when it goes away, so does this process.
  process.stdin.on('end', () => process.exit(0));
}

main(process.argv[2] ?? '');
