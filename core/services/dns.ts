import { Resolver } from 'node:dns/promises';
import { inject, injectable } from 'tsyringe';
import type { PetrelConfig } from '../config/schema.js';
import { Tokens } from '../di/tokens.js';

export interface MxRecord {
  readonly exchange: string;
  readonly priority: number;
}

/**
 * DNS lookups for plugins. With `dns.servers` in the config every query goes to those servers
 * (tests point it at a local dnsmasq); otherwise the system resolver's servers are used.
 */
@injectable()
export class DnsResolver {
  private readonly resolver: Resolver;

  constructor(@inject(Tokens.Config) config: PetrelConfig) {
    this.resolver = new Resolver({ timeout: config.dns.timeout, tries: 2 });
    if (config.dns.servers) this.resolver.setServers(config.dns.servers);
  }

  servers(): string[] {
    return this.resolver.getServers();
  }

  resolveMx(name: string): Promise<MxRecord[]> {
    return this.resolver.resolveMx(name);
  }

  resolve4(name: string): Promise<string[]>;
  /** With `ttl: true`, each address with the TTL its answer gave (what a cache needs). */
  resolve4(name: string, opts: { ttl: true }): Promise<{ address: string; ttl: number }[]>;
  resolve4(name: string, opts?: { ttl: true }): Promise<string[] | { address: string; ttl: number }[]> {
    return opts ? this.resolver.resolve4(name, opts) : this.resolver.resolve4(name);
  }

  resolve6(name: string): Promise<string[]> {
    return this.resolver.resolve6(name);
  }

  resolveTxt(name: string): Promise<string[][]> {
    return this.resolver.resolveTxt(name);
  }

  reverse(ip: string): Promise<string[]> {
    return this.resolver.reverse(ip);
  }

  /** The generic form (`resolver(name, rrtype)`) that mailauth and similar libraries take. */
  resolve(name: string, rrtype: string): Promise<unknown> {
    return this.resolver.resolve(name, rrtype);
  }
}
