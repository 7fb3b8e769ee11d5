/**
 * What this process's main thread is running, readable from another thread while the main
 * thread is stuck: a heartbeat counter and the plugin hook whose synchronous code is executing.
 * The hook runner marks each call (`enterHook` / `leaveHook`); the watchdog thread of a worker
 * (see monitor.ts) reads the marks. Without a watchdog the marks go to a plain array: a few
 * integer stores per hook call.
 *
 * A hook that blocks after its first `await` has already handed back its promise: the mark is
 * gone by then, and the watchdog can only say that the loop is blocked, not where.
 */

/** [0]: heartbeat counter, [1]: index of the running hook in `names` plus one (0: none). */
let marks: Int32Array<ArrayBufferLike> = new Int32Array(2);
const names: string[] = [];
const ids = new Map<string, Map<string, number>>();
let announce: ((index: number, name: string) => void) | null = null;

/** The index of a plugin's hook in the name table (made on first use). */
function hookId(plugin: string, hook: string): number {
  let byHook = ids.get(plugin);
  if (!byHook) ids.set(plugin, (byHook = new Map()));
  let id = byHook.get(hook);
  if (id === undefined) {
    id = names.length;
    names.push(`${plugin}\0${hook}`);
    byHook.set(hook, id);
    announce?.(id, names[id]!);
  }
  return id;
}

/** Marks `plugin`'s `hook` as running; returns what was running before, for `leaveHook`. */
export function enterHook(plugin: string, hook: string): number {
  const previous = marks[1]!;
  marks[1] = hookId(plugin, hook) + 1;
  return previous;
}

export function leaveHook(previous: number): void {
  marks[1] = previous;
}

/** Advances the heartbeat (the main thread's proof that its event loop turns). */
export function beat(): void {
  Atomics.add(marks, 0, 1);
}

/**
 * Moves the marks into shared memory for a watchdog thread, and tells it every hook name, now and
 * as new ones appear.
 */
export function shareActivity(onName: (index: number, name: string) => void): SharedArrayBuffer {
  const shared = new SharedArrayBuffer(8);
  const view = new Int32Array(shared);
  view.set(marks);
  marks = view;
  announce = onName;
  names.forEach((n, i) => onName(i, n));
  return shared;
}
