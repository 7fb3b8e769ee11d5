import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { stringify } from 'yaml';
import { Petrel } from '../../core/app.js';
import { describeRun, run } from '../../test/e2e/run.js';
import { PYTHON, requirePeer } from '../../test/harness/peers.js';
import { TLS } from '../../test/harness/server.js';
import { SmtpClient } from '../../test/harness/smtp-client.js';
import { hashPassword, hashScrypt } from './password.js';

/**
 * AUTH SCRAM-SHA-256 with a real client: Python's smtplib over STARTTLS, with the SCRAM
 * exchange (RFC 7677) written over hashlib and hmac as smtplib's `auth(mechanism, authobject)`
 * expects it. The client checks the server's signature too.
 */
const CLIENT = String.raw`
import base64, hashlib, hmac, json, os, smtplib, ssl, sys
job = json.load(sys.stdin)

class Scram:
    def __init__(self, user, password):
        self.user, self.password = user, password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.server_signature = None
    def __call__(self, challenge=None):
        if challenge is None:
            self.first_bare = 'n=%s,r=%s' % (self.user.replace('=', '=3D').replace(',', '=2C'), self.nonce)
            return 'n,,' + self.first_bare
        text = challenge.decode()
        if self.server_signature is None:
            f = dict(kv.split('=', 1) for kv in text.split(','))
            assert f['r'].startswith(self.nonce), 'the server nonce extends ours'
            salted = hashlib.pbkdf2_hmac('sha256', self.password, base64.b64decode(f['s']), int(f['i']))
            client_key = hmac.new(salted, b'Client Key', 'sha256').digest()
            final_bare = 'c=biws,r=' + f['r']
            auth_message = ','.join([self.first_bare, text, final_bare]).encode()
            signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, 'sha256').digest()
            proof = bytes(a ^ b for a, b in zip(client_key, signature))
            self.server_signature = hmac.new(hmac.new(salted, b'Server Key', 'sha256').digest(), auth_message, 'sha256').digest()
            return final_bare + ',p=' + base64.b64encode(proof).decode()
        v = dict(kv.split('=', 1) for kv in text.split(','))
        self.verified_server = base64.b64decode(v['v']) == self.server_signature
        return ''

s = smtplib.SMTP('127.0.0.1', job['port'], timeout=20)
s.ehlo()
before_tls = s.has_extn('auth') and 'SCRAM-SHA-256' in s.esmtp_features['auth'].split()
ctx = ssl.create_default_context(cafile=job['ca'])
ctx.check_hostname = False
s.starttls(context=ctx)
s.ehlo()
offered = s.esmtp_features.get('auth', '').split()
scram = Scram(job['user'], job['password'])
try:
    code, text = s.auth('SCRAM-SHA-256', scram)
except smtplib.SMTPAuthenticationError as e:
    code, text = e.smtp_code, e.smtp_error
out = {'offered': offered, 'beforeTls': before_tls, 'code': code, 'text': text.decode(),
       'serverVerified': getattr(scram, 'verified_server', False)}
if code == 235:
    refused = s.sendmail(job['user'], [job['user']], 'Subject: scram\r\n\r\nsent without a password\r\n')
    out['sent'] = refused == {}
s.quit()
json.dump(out, sys.stdout)
`;

interface ClientResult {
  offered: string[];
  beforeTls: boolean;
  code: number;
  text: string;
  serverVerified: boolean;
  sent?: boolean;
}

async function smtplibScram(port: number, user: string, password: string): Promise<ClientResult> {
  const r = await run(PYTHON, ['-c', CLIENT], {
    input: JSON.stringify({ port, user, password, ca: TLS.cert }),
    timeoutMs: 30_000,
  });
  assert.equal(r.code, 0, describeRun(r));
  return JSON.parse(r.stdout) as ClientResult;
}

describe('users: AUTH SCRAM-SHA-256 with smtplib over STARTTLS', () => {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-scram-'));
  let app: Petrel | null = null;
  before(async () => {
    writeFileSync(
      join(dir, 'users.json'),
      JSON.stringify({
        users: {
          'bob@hamburger.edu': { password: await hashPassword('bob pw', { iterations: 4096 }) },
          'carol@hamburger.edu': { password: await hashScrypt('carol pw', { N: 1024, r: 8, p: 1 }) },
        },
      }),
    );
    writeFileSync(
      join(dir, 'petrel.yaml'),
      stringify({
        hostname: 'mx.test',
        localDomains: ['hamburger.edu'],
        listeners: [{ kind: 'submission', address: '127.0.0.1', port: 0 }],
        tls: TLS,
        spool: { dir: './spool' },
        plugins: [
          'relay',
          { name: 'users', config: { auth: { delayMs: 0, maxFailures: 50 } } },
          'submission',
          'queue',
          { name: 'maildir', config: { root: './mail' } },
        ],
      }),
    );
    app = await Petrel.start({ configFile: join(dir, 'petrel.yaml'), logger: pino({ level: 'silent' }) });
  });
  after(async () => {
    await app?.stop(1000);
    rmSync(dir, { recursive: true, force: true });
  });

  it('offers SCRAM-SHA-256 after STARTTLS only, authenticates with the stored hash, and the client verifies the server', async (t: TestContext) => {
    if (!requirePeer(t, PYTHON, 'apt-get install python3')) return;
    const r = await smtplibScram(app!.port('submission'), 'bob@hamburger.edu', 'bob pw');
    assert.equal(r.beforeTls, false, 'no AUTH in the clear');
    assert.ok(r.offered.includes('SCRAM-SHA-256'), JSON.stringify(r));
    assert.equal(r.code, 235, JSON.stringify(r));
    assert.equal(r.serverVerified, true, 'the server signature matches: it holds the credentials');
    assert.equal(r.sent, true, 'the authenticated session may send as bob');
  });

  it('reads like a transcript: a malformed first message, a cancel after the server-first message, and the session goes on', async () => {
    const c = await SmtpClient.connect(app!.port('submission'));
    try {
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('STARTTLS', /^220 /);
      await c.upgrade();
      await c.ehlo();
      const b64 = (text: string): string => Buffer.from(text).toString('base64');
      await c.cmd(`AUTH SCRAM-SHA-256 ${b64('p=tls-unique,,n=bob@hamburger.edu,r=abc')}`, /^501 5\.5\.2 /);
      const challenge = await c.cmd(`AUTH SCRAM-SHA-256 ${b64('n,,n=bob@hamburger.edu,r=abcdef')}`, /^334 /);
      const serverFirst = Buffer.from(challenge.text.trim(), 'base64').toString();
      assert.match(serverFirst, /^r=abcdef[A-Za-z0-9+/=]+,s=[A-Za-z0-9+/=]+,i=4096$/);
      await c.cmd('*', /^501 5\.0\.0 Authentication cancelled/);
      await c.cmd('NOOP', /^250 /);
    } finally {
      c.close();
    }
  });

  it('refuses a wrong password, an unknown login, and an scrypt user until a PLAIN login upgrades the hash', async (t: TestContext) => {
    if (!requirePeer(t, PYTHON, 'apt-get install python3')) return;
    if (!requirePeer(t, 'swaks', 'apt-get install swaks')) return;
    const port = app!.port('submission');
    for (const [user, pass] of [
      ['bob@hamburger.edu', 'bob pW'],
      ['nobody@hamburger.edu', 'bob pw'],
      ['carol@hamburger.edu', 'carol pw'],
    ] as const) {
      const r = await smtplibScram(port, user, pass);
      assert.equal(r.code, 535, `${user}: ${JSON.stringify(r)}`);
      assert.match(r.text, /^5\.7\.8 Authentication credentials invalid/);
    }
    const plain = await run(
      'swaks',
      [
        ...['--server', '127.0.0.1', '--port', String(port), '--tls', '--auth', 'PLAIN'],
        ...['--auth-user', 'carol@hamburger.edu', '--auth-password', 'carol pw', '--quit-after', 'AUTH'],
      ],
      { timeoutMs: 30_000 },
    );
    assert.equal(plain.code, 0, describeRun(plain));
    assert.match(
      readFileSync(join(dir, 'users.json'), 'utf8'),
      /"carol@hamburger.edu": \{\s*"password": "\{SCRAM/,
    );
    const r = await smtplibScram(port, 'carol@hamburger.edu', 'carol pw');
    assert.equal(r.code, 235, JSON.stringify(r));
  });
});
