/** The connection limits that apply to one new connection: the top level and its listener's. */
export interface ConnectionLimits {
  readonly maxConnections: number;
  readonly maxConnectionsPerIp: number;
  readonly listenerMaxConnections?: number;
  readonly listenerMaxConnectionsPerIp?: number;
}

/**
 * Decides whether a new connection may be served, counting the connections open per client
 * address and per listener. Contract: every `admit` that returned true is matched by exactly one
 * `leave` with the same arguments when the connection ends; `admit` answers at once (a boolean)
 * when it can, so the single-process path costs no promise.
 */
export interface ConnectionGate {
  admit(ip: string, listener: string, limits: ConnectionLimits): boolean | Promise<boolean>;
  leave(ip: string, listener: string): void;
}

function dec(m: Map<string, number>, key: string): void {
  const n = (m.get(key) ?? 1) - 1;
  if (n > 0) m.set(key, n);
  else m.delete(key);
}

/** The counts of one process (or, in the primary, of every worker together). */
export class LocalGate implements ConnectionGate {
  private total = 0;
  private readonly perIp = new Map<string, number>();
  private readonly byListener = new Map<string, { count: number; perIp: Map<string, number> }>();

  private listener(name: string): { count: number; perIp: Map<string, number> } {
    let c = this.byListener.get(name);
    if (!c) {
      c = { count: 0, perIp: new Map() };
      this.byListener.set(name, c);
    }
    return c;
  }

  admit(ip: string, listener: string, limits: ConnectionLimits): boolean {
    const own = this.listener(listener);
    const over =
      this.total >= limits.maxConnections ||
      (this.perIp.get(ip) ?? 0) >= limits.maxConnectionsPerIp ||
      (limits.listenerMaxConnections !== undefined && own.count >= limits.listenerMaxConnections) ||
      (limits.listenerMaxConnectionsPerIp !== undefined &&
        (own.perIp.get(ip) ?? 0) >= limits.listenerMaxConnectionsPerIp);
    if (over) return false;
    this.total++;
    this.perIp.set(ip, (this.perIp.get(ip) ?? 0) + 1);
    own.count++;
    own.perIp.set(ip, (own.perIp.get(ip) ?? 0) + 1);
    return true;
  }

  leave(ip: string, listener: string): void {
    const own = this.listener(listener);
    this.total--;
    dec(this.perIp, ip);
    own.count--;
    dec(own.perIp, ip);
  }
}
