import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * How a script process is started. Each layer below is enforced by something other than the
 * script's own realm, from the outside in:
 *
 * 1. `setpriv` (util-linux): the kernel sends SIGKILL when Petrel dies (`PR_SET_PDEATHSIG`), so
 *    no script process outlives it, even after a SIGKILL; `no_new_privs`.
 * 2. `unshare` (util-linux), when namespaces are on: new user, network, PID and mount namespaces.
 *    The network namespace has no interface but a loopback that is down, so no IP traffic at all;
 *    in the PID namespace (with its own /proc) the script process sees and signals no other
 *    process. Inside, it keeps Petrel's user id, so it holds no capability to undo any of this.
 * 3. `prlimit` (util-linux): `RLIMIT_DATA` bounds all the process's memory, V8 heap and array
 *    buffers alike (with `--jitless`, V8 reserves no code range, so a small limit works);
 *    `RLIMIT_FSIZE` 0 (no file can grow), `RLIMIT_CORE` 0 (no core dump holding mail),
 *    `RLIMIT_NOFILE`.
 * 4. Node itself: `--permission` allows reading only the entry file and vm2's packages, and
 *    nothing else: no file writes, child processes, worker threads, addons, WASI or inspector.
 *    Node 24's permission model does not cover the network (`--allow-net` came in Node 25);
 *    that is layer 2's job. `--max-old-space-size` bounds the V8 heap; `--jitless` also removes
 *    JIT compilation and WebAssembly; `--disallow-code-generation-from-strings`.
 * 5. An empty environment (no secrets from Petrel's) and `/` as the working folder.
 *
 * The wrappers exec one another, so the process Petrel spawns is the one it kills; with
 * namespaces `unshare` forks once (a new PID namespace needs a new process) and `--kill-child`
 * takes the script process with it.
 */
export interface LaunchOptions {
  /** The script process's entry file (child.js). */
  readonly entry: string;
  /** Files and folders the script process may read. */
  readonly readable: readonly string[];
  readonly maxHeapMb: number;
  readonly maxMemoryMb: number;
  readonly namespaces: boolean;
  /** Arguments to the entry file. */
  readonly args: readonly string[];
}

export interface LaunchCommand {
  readonly file: string;
  readonly args: readonly string[];
  /** An empty environment (whatever secrets Petrel's holds stay there) and `/` as the folder. */
  readonly env: Record<string, string>;
  readonly cwd: string;
}

const TOOL_DIRS = ['/usr/bin', '/bin', '/usr/sbin', '/sbin'];

/** The absolute path of a util-linux tool, or null. */
export function findTool(name: string): string | null {
  for (const dir of TOOL_DIRS) {
    const path = join(dir, name);
    if (existsSync(path)) return path;
  }
  return null;
}

function tool(name: string): string {
  const path = findTool(name);
  if (!path) {
    throw new Error(
      `the script plugin needs util-linux's ${name}; looked in ${TOOL_DIRS.join(', ')} (Linux only)`,
    );
  }
  return path;
}

const NAMESPACE_ARGS = [
  '--user',
  '--map-current-user',
  '--net',
  '--pid',
  '--mount',
  '--mount-proc',
  '--fork',
  '--kill-child',
];

/** File descriptors a script process may hold: Node needs about 20 of its own. */
const MAX_FILES = 64;

export function launchCommand(o: LaunchOptions): LaunchCommand {
  const node = [
    process.execPath,
    '--jitless',
    '--disallow-code-generation-from-strings',
    `--max-old-space-size=${o.maxHeapMb}`,
    '--permission',
    ...o.readable.map((p) => `--allow-fs-read=${p}`),
    o.entry,
    ...o.args,
  ];
  const limits = [
    tool('prlimit'),
    `--data=${o.maxMemoryMb * 1024 * 1024}`,
    '--fsize=0',
    '--core=0',
    `--nofile=${MAX_FILES}`,
    '--',
  ];
  const namespaces = o.namespaces ? [tool('unshare'), ...NAMESPACE_ARGS, '--'] : [];
  return {
    file: tool('setpriv'),
    args: ['--pdeathsig', 'KILL', '--no-new-privs', '--', ...namespaces, ...limits, ...node],
    env: {},
    cwd: '/',
  };
}

/**
 * Whether this system lets Petrel's user create the namespaces (unprivileged user namespaces
 * can be switched off, e.g. by `kernel.unprivileged_userns_clone=0` or an AppArmor policy).
 */
export function namespacesWork(): Promise<boolean> {
  const unshare = findTool('unshare');
  if (!unshare) return Promise.resolve(false);
  return new Promise((resolve) => {
    execFile(
      unshare,
      [...NAMESPACE_ARGS, '--', process.execPath, '--version'],
      { env: {}, cwd: '/', timeout: 10_000 },
      (err) => resolve(err === null),
    );
  });
}

/** The folder of an installed package, found from `from` (a file or folder path). */
function packageDir(name: string, from: string): string {
  return dirname(createRequire(join(from, 'noop.js')).resolve(`${name}/package.json`));
}

/** vm2's folder and those of its dependencies, recursively: what the script process reads. */
export function vm2Folders(): { vm2: string; folders: string[] } {
  const here = dirname(fileURLToPath(import.meta.url));
  const seen = new Set<string>();
  const visit = (dir: string): void => {
    if (seen.has(dir)) return;
    seen.add(dir);
    const meta = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as {
      dependencies?: Record<string, string>;
    };
    for (const dep of Object.keys(meta.dependencies ?? {})) visit(packageDir(dep, dir));
  };
  visit(packageDir('vm2', here));
  return { vm2: createRequire(join(here, 'noop.js')).resolve('vm2'), folders: [...seen] };
}
