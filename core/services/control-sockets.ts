/**
 * Control sockets: the Unix sockets through which a plugin lets administration tools act on what
 * it owns (the queue's `control.sock`, spoken by `petrel queue`). A plugin that serves one adds it
 * here with `resolve(Tokens.ControlSockets).add(...)`, so that the web console, served by the
 * primary process (which runs no plugin code), can find it: the primary asks each worker which
 * sockets its plugins added, and speaks each socket's own protocol. One way to reach the queue,
 * whether from `petrel queue` or from the console.
 *
 * The contract: `add(socket)` returns the function that removes it (hand it to `onClose`). `kind`
 * names the protocol spoken on the socket; the console knows `queue` (newline-delimited JSON,
 * defined in plugins/queue/control.ts) and ignores kinds it does not know. The path is absolute
 * and the socket answers while the plugin runs. One registry per process, shared by every config
 * generation.
 */
export interface ControlSocket {
  readonly kind: string;
  readonly path: string;
}

export class ControlSockets {
  private readonly sockets = new Map<symbol, ControlSocket>();

  add(socket: ControlSocket): () => void {
    const key = Symbol(socket.kind);
    this.sockets.set(key, Object.freeze({ kind: socket.kind, path: socket.path }));
    return () => {
      this.sockets.delete(key);
    };
  }

  /** Every socket added and not removed, once per path. */
  list(): ControlSocket[] {
    const seen = new Map<string, ControlSocket>();
    for (const s of this.sockets.values()) seen.set(`${s.kind}\0${s.path}`, s);
    return [...seen.values()];
  }
}
