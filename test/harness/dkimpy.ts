/**
 * dkimpy (Debian `python3-dkim`, with `python3-authres` for ARC) as an independent DKIM and ARC
 * implementation for tests: verify what Petrel signs, sign and seal what Petrel should verify.
 *
 * Every function runs Debian's python3 once with the message on standard input. Keys are looked
 * up in DNS through the server given (`127.0.0.1:<port>`, e.g. a test dnsmasq's `server`), never
 * through /etc/resolv.conf. Private keys are PEM (RSA or Ed25519); for Ed25519 the raw seed
 * dkimpy wants is derived here.
 */
import { spawn } from 'node:child_process';
import { createPrivateKey } from 'node:crypto';
import type { TestContext } from 'node:test';
import { PYTHON, REQUIRE_PEERS } from './peers.js';

export const DKIMPY_PACKAGE = 'apt-get install python3-dkim python3-authres';

const SCRIPT = String.raw`
import sys, json, base64
import dkim
import dns.resolver

op = json.loads(sys.argv[1])
msg = sys.stdin.buffer.read()

def dnsfunc_for(server):
    host, port = server.rsplit(':', 1)
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [host]
    res.port = int(port)
    def dnsfunc(name, timeout=5):
        try:
            ans = res.resolve(name.decode().rstrip('.'), 'TXT', lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b''.join(ans[0].strings)
    return dnsfunc

def key_of(op):
    return op['key'].encode()

out = {}
kind = op['op']
if kind == 'verify':
    f = dnsfunc_for(op['dns'])
    d = dkim.DKIM(msg)
    count = sum(1 for k, v in d.headers if k.lower() == b'dkim-signature')
    results = []
    for i in range(count):
        try:
            ok = bool(dkim.DKIM(msg).verify(idx=i, dnsfunc=f))
            results.append({'ok': ok, 'error': None})
        except Exception as e:
            results.append({'ok': False, 'error': '%s: %s' % (type(e).__name__, e)})
    out = {'signatures': results}
elif kind == 'sign':
    alg = op.get('algorithm', 'rsa-sha256').encode()
    headers = [h.encode() for h in op['headers']] if op.get('headers') else None
    sig = dkim.sign(msg, op['selector'].encode(), op['domain'].encode(), key_of(op),
                    canonicalize=(b'relaxed', b'relaxed'), signature_algorithm=alg,
                    include_headers=headers)
    out = {'message': base64.b64encode(sig + msg).decode()}
elif kind == 'arcsign':
    lines = dkim.arc_sign(msg, op['selector'].encode(), op['domain'].encode(), key_of(op),
                          op['srvId'].encode())
    out = {'message': base64.b64encode(b''.join(lines) + msg).decode(), 'added': len(lines)}
elif kind == 'arcverify':
    cv, results, comment = dkim.arc_verify(msg, dnsfunc=dnsfunc_for(op['dns']))
    out = {'cv': cv.decode(), 'comment': comment}
print(json.dumps(out))
`;

/** Is dkimpy importable? Skips the test when not (fails it under PETREL_REQUIRE_PEERS=1). */
export async function requireDkimpy(t: TestContext): Promise<boolean> {
  const { code } = await run(['-c', 'import dkim, dns.resolver, authres'], Buffer.alloc(0));
  if (code === 0) return true;
  const why = `dkimpy not installed (${DKIMPY_PACKAGE})`;
  if (REQUIRE_PEERS) throw new Error(`required peer missing: ${why}`);
  t.skip(why);
  return false;
}

function run(
  args: string[],
  input: Buffer,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input);
  });
}

async function dkimpy<T>(op: Record<string, unknown>, message: Buffer): Promise<T> {
  const { code, stdout, stderr } = await run(['-c', SCRIPT, JSON.stringify(op)], message);
  if (code !== 0) throw new Error(`dkimpy ${String(op.op)} failed (exit ${code}): ${stderr}`);
  return JSON.parse(stdout) as T;
}

/** A PEM private key as dkimpy takes it: PEM for RSA, the base64 of the 32-octet seed for Ed25519. */
function dkimpyKey(pem: string | Buffer): string {
  const key = createPrivateKey(pem);
  if (key.asymmetricKeyType !== 'ed25519') return pem.toString();
  return key.export({ type: 'pkcs8', format: 'der' }).subarray(-32).toString('base64');
}

export interface DkimpyVerdict {
  readonly ok: boolean;
  /** dkimpy's exception, e.g. `ValidationError: body hash mismatch`, when it raised one. */
  readonly error: string | null;
}

/**
 * Verifies every DKIM-Signature of `message` (index 0 is the topmost), keys from DNS at `dns`.
 * A message without a signature gives an empty list.
 */
export async function dkimpyVerify(message: Buffer, dns: string): Promise<DkimpyVerdict[]> {
  const out = await dkimpy<{ signatures: DkimpyVerdict[] }>({ op: 'verify', dns }, message);
  return out.signatures;
}

export interface DkimpySignOptions {
  readonly domain: string;
  readonly selector: string;
  /** PEM, RSA or Ed25519. */
  readonly privateKey: string | Buffer;
  /** Default `rsa-sha256`; `ed25519-sha256` for an Ed25519 key. */
  readonly algorithm?: 'rsa-sha256' | 'ed25519-sha256';
  /** Header fields to sign (dkimpy's default list otherwise). */
  readonly headers?: readonly string[];
}

/** Signs `message` (relaxed/relaxed) and returns it with the DKIM-Signature on top. */
export async function dkimpySign(message: Buffer, opts: DkimpySignOptions): Promise<Buffer> {
  const out = await dkimpy<{ message: string }>(
    {
      op: 'sign',
      domain: opts.domain,
      selector: opts.selector,
      key: dkimpyKey(opts.privateKey),
      algorithm: opts.algorithm ?? 'rsa-sha256',
      headers: opts.headers ?? null,
    },
    message,
  );
  return Buffer.from(out.message, 'base64');
}

export interface ArcSignOptions {
  readonly domain: string;
  readonly selector: string;
  /** PEM; RSA (dkimpy's ARC verifier knows no ed25519-sha256). */
  readonly privateKey: string | Buffer;
  /**
   * The authserv-id of the `Authentication-Results:` field the seal is made over: dkimpy adds
   * nothing (and `added` is 0) unless the message has one with this id.
   */
  readonly srvId: string;
}

/** Adds an ARC set (RFC 8617) to `message`; `added` is how many header fields it wrote (3, or 0). */
export async function dkimpyArcSign(
  message: Buffer,
  opts: ArcSignOptions,
): Promise<{ message: Buffer; added: number }> {
  const out = await dkimpy<{ message: string; added: number }>(
    {
      op: 'arcsign',
      domain: opts.domain,
      selector: opts.selector,
      key: dkimpyKey(opts.privateKey),
      srvId: opts.srvId,
    },
    message,
  );
  return { message: Buffer.from(out.message, 'base64'), added: out.added };
}

/** Validates the ARC chain of `message`: `cv` is `pass`, `fail` or `none`, with dkimpy's reason. */
export async function dkimpyArcVerify(
  message: Buffer,
  dns: string,
): Promise<{ cv: string; comment: string }> {
  return dkimpy({ op: 'arcverify', dns }, message);
}
