/**
 * An MTA-STS policy host for tests (RFC 8461 §3.3): HTTPS on `<ip>:443` serving
 * `/.well-known/mta-sts.txt` for `mta-sts.<domain>`, recording every request.
 *
 * Port 443 is fixed because policy clients (mailauth's among them) always fetch from 443, as
 * the RFC says; tests run as root and give each policy host its own 127.0.0.x address (all of
 * 127/8 is on the loopback interface), so no port is shared and nothing is redirected.
 */
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import type { TestContext } from 'node:test';
import type { CertFiles } from './test-ca.js';

export interface PolicyServer {
  /** `Host` header and path of each request, in order. */
  readonly requests: { host: string; path: string }[];
  /** The policy served from now on. */
  policy: string;
  close(): Promise<void>;
}

/** The text of a policy file: `mode`, `max_age` (seconds) and the `mx` patterns. */
export function policyText(
  mode: 'enforce' | 'testing' | 'none',
  mx: readonly string[],
  maxAge = 86_400,
): string {
  return ['version: STSv1', `mode: ${mode}`, ...mx.map((m) => `mx: ${m}`), `max_age: ${maxAge}`, ''].join(
    '\r\n',
  );
}

export async function startPolicyServer(
  t: TestContext,
  opts: { ip: string; policy: string; tls: CertFiles },
): Promise<PolicyServer> {
  const requests: { host: string; path: string }[] = [];
  const handle: PolicyServer = { requests, policy: opts.policy, close: async () => undefined };
  const server = createServer(
    { key: readFileSync(opts.tls.key), cert: readFileSync(opts.tls.cert) },
    (req, res) => {
      requests.push({ host: String(req.headers.host ?? ''), path: String(req.url) });
      if (req.url !== '/.well-known/mta-sts.txt') {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'Content-Type': 'text/plain' }).end(handle.policy);
    },
  );
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        err.code === 'EACCES'
          ? new Error(`binding ${opts.ip}:443 needs root (policy hosts listen on 443 by RFC 8461)`, {
              cause: err,
            })
          : err,
      ),
    );
    server.listen(443, opts.ip, () => resolve());
  });
  let closed: Promise<void> | null = null;
  handle.close = () =>
    (closed ??= new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }));
  t.after(() => handle.close());
  return handle;
}
