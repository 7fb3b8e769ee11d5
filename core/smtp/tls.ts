import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContext } from 'node:tls';
import { ConfigError } from '../config/errors.js';
import type { PetrelConfig } from '../config/schema.js';

/** The server's certificates: a default one and, by SNI name, others. */
export interface TlsContexts {
  readonly default: SecureContext;
  byName(servername: string): SecureContext;
}

function load(pair: { cert: string; key: string }, file: string, key: string): SecureContext {
  let cert: Buffer;
  let pem: Buffer;
  try {
    cert = readFileSync(pair.cert);
  } catch (err) {
    throw ConfigError.one(
      file,
      `${key}.cert`,
      `expected a readable PEM certificate at ${pair.cert} (${(err as NodeJS.ErrnoException).code})`,
    );
  }
  try {
    pem = readFileSync(pair.key);
  } catch (err) {
    throw ConfigError.one(
      file,
      `${key}.key`,
      `expected a readable PEM private key at ${pair.key} (${(err as NodeJS.ErrnoException).code})`,
    );
  }
  try {
    return createSecureContext({ cert, key: pem, minVersion: 'TLSv1.2' });
  } catch (err) {
    throw ConfigError.one(
      file,
      key,
      `expected a matching PEM certificate and key: ${(err as Error).message}`,
    );
  }
}

/** Loads every certificate at boot (or reload), so a bad file fails there and not mid-session. */
export function loadTls(config: PetrelConfig, file: string): TlsContexts | null {
  if (!config.tls) return null;
  const fallback = load(config.tls, file, 'tls');
  const named = new Map<string, SecureContext>();
  for (const [name, pair] of Object.entries(config.tls.sni)) {
    named.set(name.toLowerCase(), load(pair, file, `tls.sni.${name}`));
  }
  return {
    default: fallback,
    byName(servername) {
      const n = servername.toLowerCase();
      return named.get(n) ?? named.get(`*.${n.slice(n.indexOf('.') + 1)}`) ?? fallback;
    },
  };
}
