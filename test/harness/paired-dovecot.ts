/**
 * Dovecot as docs/mailboxes.md sets it up: the config files from contrib/dovecot/, copied with
 * the site paths (the passwd-file, the mail root, the TLS files) pointed at a test's folders, and
 * a small config of the test's own around them that only moves it onto free ports and a private
 * run folder. Clients read over STARTTLS with Python's imaplib and poplib.
 */
import { chmodSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeRun, run } from '../e2e/run.js';
import { launchDovecot } from './dovecot.js';
import { freePort, PYTHON } from './peers.js';
import { ROOT, TLS } from './server.js';

export const CONTRIB = join(ROOT, 'contrib', 'dovecot');

export interface PairedDovecot {
  readonly imapPort: number;
  readonly pop3Port: number;
  /** LMTP's port with lmtp.conf; 0 without it. */
  readonly lmtpPort: number;
  log(): string;
  stop(): Promise<void>;
}

/** The site values in contrib/dovecot/*.conf, as docs/mailboxes.md names them. */
const SITE = {
  passwdFile: '/etc/dovecot/petrel.passwd',
  mailRoot: '/var/mail/petrel',
  cert: '/etc/petrel/tls/cert.pem',
  key: '/etc/petrel/tls/key.pem',
} as const;

/**
 * Starts Dovecot from contrib/dovecot/ with the passwd-file and mail root given. The
 * mail user is the config's own (`vmail`), which must exist.
 */
export async function startPairedDovecot(opts: {
  /** `maildir`: dovecot.conf alone; `lmtp`: with lmtp.conf beside it. */
  variant: 'maildir' | 'lmtp';
  passwdFile: string;
  mailRoot: string;
  /** LMTP's port with lmtp.conf (the test's Petrel config names it first); a free one if not given. */
  lmtpPort?: number;
  timeoutMs?: number;
}): Promise<PairedDovecot> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-paired-dovecot-'));
  chmodSync(dir, 0o755);
  for (const name of opts.variant === 'lmtp' ? ['dovecot.conf', 'lmtp.conf'] : ['dovecot.conf']) {
    const text = readFileSync(join(CONTRIB, name), 'utf8')
      .replaceAll(SITE.passwdFile, opts.passwdFile)
      .replaceAll(SITE.mailRoot, opts.mailRoot)
      .replaceAll(SITE.cert, TLS.cert)
      .replaceAll(SITE.key, TLS.key);
    writeFileSync(join(dir, name), text);
  }
  const [imapPort, pop3Port] = [await freePort(), await freePort()];
  const lmtpPort = opts.variant === 'lmtp' ? (opts.lmtpPort ?? (await freePort())) : 0;
  const logFile = join(dir, 'dovecot.log');
  const conf = join(dir, 'test.conf');
  const lmtp =
    lmtpPort === 0
      ? ''
      : `service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = ${lmtpPort}
  }
}
`;
  writeFileSync(
    conf,
    `# The test's own: free ports and a private run folder around the contrib config.
!include dovecot.conf
base_dir = ${join(dir, 'run')}
state_dir = ${join(dir, 'state')}
log_path = ${logFile}
listen = 127.0.0.1
service imap-login {
  inet_listener imap {
    port = ${imapPort}
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = ${pop3Port}
  }
  inet_listener pop3s {
    port = 0
  }
}
${lmtp}`,
  );
  const ports = [imapPort, pop3Port, ...(lmtpPort ? [lmtpPort] : [])];
  const { log, stop } = await launchDovecot(dir, conf, logFile, ports, opts.timeoutMs);
  return { imapPort, pop3Port, lmtpPort, log, stop };
}

export interface ReadResult {
  /** False when the login was refused; `error` then has the server's answer. */
  readonly ok: boolean;
  readonly error?: string;
  readonly subjects: readonly string[];
  readonly raws: readonly string[];
}

// STARTTLS first (the contrib config refuses a password in the clear), then the login: LOGIN in
// IMAP, USER/PASS in POP3, or SASL SCRAM-SHA-256 (RFC 7677) in IMAP.
const READ = String.raw`
import base64, email, hashlib, hmac, imaplib, json, os, poplib, ssl, sys
from email import policy
job = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile=job['ca'])
ctx.check_hostname = False
raws = []

class Scram:
    def __init__(self, user, password):
        self.user, self.password, self.step = user, password.encode(), 0
        self.nonce = base64.b64encode(os.urandom(18)).decode()
    def __call__(self, challenge):
        self.step += 1
        if self.step == 1:
            self.first_bare = 'n=%s,r=%s' % (self.user.replace('=', '=3D').replace(',', '=2C'), self.nonce)
            return ('n,,' + self.first_bare).encode()
        if self.step == 2:
            server_first = challenge.decode()
            f = dict(kv.split('=', 1) for kv in server_first.split(','))
            if not f['r'].startswith(self.nonce):
                raise SystemExit('server nonce does not extend ours')
            salted = hashlib.pbkdf2_hmac('sha256', self.password, base64.b64decode(f['s']), int(f['i']))
            client_key = hmac.new(salted, b'Client Key', 'sha256').digest()
            final_bare = 'c=biws,r=' + f['r']
            auth_message = ','.join([self.first_bare, server_first, final_bare]).encode()
            signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, 'sha256').digest()
            proof = bytes(a ^ b for a, b in zip(client_key, signature))
            self.server_signature = hmac.new(hmac.new(salted, b'Server Key', 'sha256').digest(), auth_message, 'sha256').digest()
            return (final_bare + ',p=' + base64.b64encode(proof).decode()).encode()
        v = dict(kv.split('=', 1) for kv in challenge.decode().split(','))
        if base64.b64decode(v['v']) != self.server_signature:
            raise SystemExit('the server does not know the credentials')
        return b''

try:
    if job['protocol'] == 'imap':
        c = imaplib.IMAP4('127.0.0.1', job['port'], timeout=10)
        c.starttls(ctx)
        if job['mechanism'] == 'SCRAM-SHA-256':
            c.authenticate('SCRAM-SHA-256', Scram(job['user'], job['password']))
        else:
            c.login(job['user'], job['password'])
        typ, data = c.select('INBOX', readonly=True)
        typ, data = c.search(None, 'ALL')
        for num in data[0].split():
            typ, parts = c.fetch(num, '(BODY.PEEK[])')
            raws.append(parts[0][1])
        c.logout()
    else:
        c = poplib.POP3('127.0.0.1', job['port'], timeout=10)
        c.stls(ctx)
        c.user(job['user'])
        c.pass_(job['password'])
        for i in range(1, c.stat()[0] + 1):
            raws.append(b'\r\n'.join(c.retr(i)[1]) + b'\r\n')
        c.quit()
except (imaplib.IMAP4.error, poplib.error_proto) as e:
    json.dump({'ok': False, 'error': str(e), 'subjects': [], 'raws': []}, sys.stdout)
    sys.exit(0)
subjects = [str(email.message_from_bytes(r, policy=policy.default)['subject'] or '') for r in raws]
json.dump({'ok': True, 'subjects': subjects, 'raws': [r.decode('latin-1') for r in raws]}, sys.stdout)
`;

/** Logs in over STARTTLS and lists the inbox; a refused login is `ok: false`, not an exception. */
export async function readMailbox(
  dovecot: PairedDovecot,
  protocol: 'imap' | 'pop3',
  user: string,
  password: string,
  mechanism: 'LOGIN' | 'SCRAM-SHA-256' = 'LOGIN',
): Promise<ReadResult> {
  const port = protocol === 'imap' ? dovecot.imapPort : dovecot.pop3Port;
  const r = await run(PYTHON, ['-c', READ], {
    input: JSON.stringify({ protocol, port, user, password, mechanism, ca: TLS.cert }),
    timeoutMs: 20_000,
  });
  if (r.code !== 0) throw new Error(`${protocol} read failed: ${describeRun(r)}\n${dovecot.log()}`);
  return JSON.parse(r.stdout) as ReadResult;
}

/** Reads (bounded) until a message with `subject` is in the inbox: delivery through a queue is not instant. */
export async function waitForSubject(
  dovecot: PairedDovecot,
  protocol: 'imap' | 'pop3',
  user: string,
  password: string,
  subject: string,
  timeoutMs = 20_000,
): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await readMailbox(dovecot, protocol, user, password);
    if (!got.ok) throw new Error(`${protocol} login of ${user} refused: ${got.error}\n${dovecot.log()}`);
    const i = got.subjects.indexOf(subject);
    if (i >= 0) return got.raws[i]!;
    if (Date.now() > deadline) throw new Error(`no "${subject}" for ${user}\n${dovecot.log()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
