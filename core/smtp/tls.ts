import { existsSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Logger } from 'pino';
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

/**
 * With `tls.selfSigned`, writes a self-signed certificate and key where the config says, if they
 * are not there yet, and says so in the log. Without it nothing is generated: a config whose
 * files are missing fails at boot rather than fall back to a key anyone could have.
 */
export async function ensureSelfSigned(config: PetrelConfig, log: Logger): Promise<void> {
  const tls = config.tls;
  if (!tls?.selfSigned || (existsSync(tls.cert) && existsSync(tls.key))) return;
  const names = [...new Set([config.hostname, 'localhost'])];
  // Loaded only here: it is large, and most starts have their certificate already.
  const { generate } = await import('selfsigned');
  const pems = await generate([{ name: 'commonName', value: config.hostname }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notAfterDate: new Date(Date.now() + 825 * 86_400_000),
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
      { name: 'extKeyUsage', serverAuth: true },
      {
        name: 'subjectAltName',
        altNames: [
          ...names.map((value) => ({ type: 2 as const, value })),
          { type: 7, ip: '127.0.0.1' },
          { type: 7, ip: '::1' },
        ],
      },
    ],
  });
  await mkdir(dirname(tls.key), { recursive: true, mode: 0o700 });
  await mkdir(dirname(tls.cert), { recursive: true });
  await writeFile(tls.key, pems.private, { mode: 0o600 });
  await writeFile(tls.cert, pems.cert, { mode: 0o644 });
  log.warn(
    { certFile: tls.cert, keyFile: tls.key, names },
    'generated a self-signed TLS certificate; clients cannot verify it — configure a real certificate for production',
  );
}
