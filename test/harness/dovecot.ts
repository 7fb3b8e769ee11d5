/**
 * A real Dovecot (IMAP, POP3 and LMTP on 127.0.0.1) for tests, with a standalone config in a
 * temporary folder, and Python's imaplib/poplib to read what it serves.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  chownSync,
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type { TestContext } from 'node:test';
import type { DeliveryRecipient, QueuedMessageView } from '../../core/hooks/catalogue.js';
import { address } from '../../core/testing/index.js';
import { describeRun, run } from '../e2e/run.js';
import { has, PYTHON, requirePeer, freePort } from './peers.js';
import { SmtpClient } from './smtp-client.js';

/** Debian keeps the daemon in /usr/sbin, which a non-root PATH may lack. */
export const DOVECOT = ['/usr/sbin/dovecot', 'dovecot'].find((p) => has(p)) ?? 'dovecot';
export const DOVECOT_PACKAGES = 'apt-get install dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd';

/** Returns true when the test may use Dovecot; skips it (or fails under PETREL_REQUIRE_PEERS=1). */
export function requireDovecot(t: TestContext): boolean {
  return (
    requirePeer(t, DOVECOT, DOVECOT_PACKAGES) !== null &&
    requirePeer(t, PYTHON, 'apt-get install python3') !== null
  );
}

export interface DovecotUser {
  /** The login, a full address (`bob@example.test`): its mailbox is `<mailRoot>/<domain>/<local>/Maildir`. */
  readonly address: string;
  readonly password: string;
}

export interface Dovecot {
  /** Holds every mailbox, as `<domain>/<user>/Maildir` (Dovecot's `maildir:<mailRoot>/%d/%n/Maildir`). */
  readonly mailRoot: string;
  /** The uid and gid that own the mailboxes (mail processes never run as root). */
  readonly uid: number;
  readonly gid: number;
  readonly imapPort: number;
  readonly pop3Port: number;
  readonly lmtpPort: number;
  /** LMTP on a unix socket too. */
  readonly lmtpSocket: string;
  /** What Dovecot logged so far (for assertion messages). */
  log(): string;
  /** Stops Dovecot and its children (idempotent); the temporary folder is removed. */
  stop(): Promise<void>;
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ port, host: '127.0.0.1' });
    s.setTimeout(1000);
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.once('timeout', () => done(false));
  });
}

function exited(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** The users Dovecot runs its processes as: Debian's when root, the current user otherwise. */
function accounts(): {
  uid: number;
  gid: number;
  user: string;
  group: string;
  login: string;
  chroot: boolean;
} {
  const me = userInfo();
  if (me.uid === 0) {
    // Mail is owned by nobody:nogroup, a uid no Dovecot service uses.
    return { uid: 65534, gid: 65534, user: 'dovecot', group: 'dovecot', login: 'dovenull', chroot: true };
  }
  // Unprivileged, every Dovecot process runs as this user (and login processes cannot chroot).
  const group = readFileSync('/etc/group', 'utf8')
    .split('\n')
    .map((l) => l.split(':'))
    .find((f) => f[2] === String(me.gid))?.[0];
  if (!group) throw new Error(`no group name for gid ${me.gid}`);
  return { uid: me.uid, gid: me.gid, user: me.username, group, login: me.username, chroot: false };
}

/**
 * Starts Dovecot in the foreground (`dovecot -F -c CONF`) as a child process and waits, at most
 * `timeoutMs`, until its IMAP, POP3 and LMTP ports accept connections.
 */
export async function startDovecot(
  users: readonly DovecotUser[],
  opts: { timeoutMs?: number } = {},
): Promise<Dovecot> {
  const dir = mkdtempSync(join(tmpdir(), 'petrel-dovecot-'));
  chmodSync(dir, 0o755); // mail processes (not root) must reach the mail root below
  const acct = accounts();
  const mailRoot = join(dir, 'mail');
  mkdirSync(mailRoot, { mode: 0o700 });
  chownSync(mailRoot, acct.uid, acct.gid);
  const [imapPort, pop3Port, lmtpPort] = [await freePort(), await freePort(), await freePort()];
  const runDir = join(dir, 'run');
  const logFile = join(dir, 'dovecot.log');
  const passwd = join(dir, 'passwd');
  writeFileSync(
    passwd,
    users
      .map((u) => {
        const [local, domain] = u.address.split('@') as [string, string];
        return `${u.address}:{PLAIN}${u.password}:${acct.uid}:${acct.gid}::${join(mailRoot, domain, local)}::\n`;
      })
      .join(''),
    // Dovecot's auth process runs as its internal user; these are throwaway test passwords.
    { mode: 0o644 },
  );
  const noChroot = acct.chroot ? '' : '  chroot =\n';
  const conf = join(dir, 'dovecot.conf');
  writeFileSync(
    conf,
    `# Written by test/harness/dovecot.ts
base_dir = ${runDir}
state_dir = ${join(dir, 'state')}
log_path = ${logFile}
protocols = imap pop3 lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = ${acct.user}
default_internal_group = ${acct.group}
default_login_user = ${acct.login}
first_valid_uid = ${Math.min(acct.uid, 500)}
mail_location = maildir:${mailRoot}/%d/%n/Maildir
recipient_delimiter = +
postmaster_address = postmaster@example.test
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${passwd}
}
userdb {
  driver = passwd-file
  args = username_format=%u ${passwd}
}
service imap-login {
${noChroot}  inet_listener imap {
    address = 127.0.0.1
    port = ${imapPort}
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
${noChroot}  inet_listener pop3 {
    address = 127.0.0.1
    port = ${pop3Port}
  }
  inet_listener pop3s {
    port = 0
  }
}
service anvil {
${noChroot}}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = ${lmtpPort}
  }
  unix_listener lmtp {
    mode = 0666
  }
}
`,
  );
  const { log, stop } = await launchDovecot(
    dir,
    conf,
    logFile,
    [imapPort, pop3Port, lmtpPort],
    opts.timeoutMs,
  );
  return {
    mailRoot,
    uid: acct.uid,
    gid: acct.gid,
    imapPort,
    pop3Port,
    lmtpPort,
    lmtpSocket: join(runDir, 'lmtp'),
    log,
    stop,
  };
}

/**
 * Runs `dovecot -F -c conf` in its own process group and waits, at most `timeoutMs`, until every
 * port in `ports` accepts connections. `stop()` ends the group and removes `dir`.
 */
export async function launchDovecot(
  dir: string,
  conf: string,
  logFile: string,
  ports: readonly number[],
  timeoutMs = 15_000,
): Promise<{ log: () => string; stop: () => Promise<void> }> {
  // Its own process group, so that stop() reaches the master and every process it forked.
  const child = spawn(DOVECOT, ['-F', '-c', conf], { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
  const log = (): string => output + (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '');

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    const signal = (sig: NodeJS.Signals): void => {
      try {
        if (child.pid) process.kill(-child.pid, sig);
      } catch {
        // already gone
      }
    };
    signal('SIGTERM');
    if (!(await exited(child, 5000))) {
      signal('SIGKILL');
      await exited(child, 2000);
    }
    rmSync(dir, { recursive: true, force: true });
  };

  const deadline = Date.now() + timeoutMs;
  for (const port of ports) {
    while (!(await accepts(port))) {
      if (child.exitCode !== null || Date.now() > deadline) {
        const why = child.exitCode !== null ? `exited with ${child.exitCode}` : 'did not start in time';
        const text = log();
        await stop();
        throw new Error(`dovecot ${why}\n${text}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return { log, stop };
}

// ------------------------------------------------------------------ reading mail as a client

export interface FetchedMessage {
  /** Subject and the text/plain body as Python's `email` package decodes them. */
  readonly subject: string;
  readonly body: string;
  /** The message exactly as the server sent it. */
  readonly raw: Buffer;
}

const FETCH = String.raw`
import base64, email, imaplib, json, poplib, sys
from email import policy
job = json.load(sys.stdin)
raws = []
if job['protocol'] == 'imap':
    c = imaplib.IMAP4('127.0.0.1', job['port'], timeout=10)
    c.login(job['user'], job['password'])
    typ, data = c.select(job['mailbox'], readonly=True)
    if typ != 'OK':
        raise SystemExit('SELECT failed: %r' % data)
    typ, data = c.search(None, 'ALL')
    for num in data[0].split():
        typ, parts = c.fetch(num, '(BODY.PEEK[])')
        raws.append(parts[0][1])
    c.logout()
else:
    c = poplib.POP3('127.0.0.1', job['port'], timeout=10)
    c.user(job['user'])
    c.pass_(job['password'])
    for i in range(1, c.stat()[0] + 1):
        raws.append(b'\r\n'.join(c.retr(i)[1]) + b'\r\n')
    c.quit()
out = []
for raw in raws:
    m = email.message_from_bytes(raw, policy=policy.default)
    part = m.get_body(preferencelist=('plain',))
    out.append({'subject': str(m['subject'] or ''), 'body': part.get_content() if part else '',
                'raw': base64.b64encode(raw).decode()})
json.dump(out, sys.stdout)
`;

/** Logs in over IMAP (imaplib) or POP3 (poplib) with the user's password and fetches every message. */
export async function fetchMail(
  dovecot: Dovecot,
  protocol: 'imap' | 'pop3',
  user: DovecotUser,
  mailbox = 'INBOX',
): Promise<FetchedMessage[]> {
  const port = protocol === 'imap' ? dovecot.imapPort : dovecot.pop3Port;
  const r = await run(PYTHON, ['-c', FETCH], {
    input: JSON.stringify({ protocol, port, user: user.address, password: user.password, mailbox }),
    timeoutMs: 20_000,
  });
  if (r.code !== 0) throw new Error(`${protocol} fetch failed: ${describeRun(r)}\n${dovecot.log()}`);
  return (JSON.parse(r.stdout) as { subject: string; body: string; raw: string }[]).map((m) => ({
    subject: m.subject,
    body: m.body,
    raw: Buffer.from(m.raw, 'base64'),
  }));
}

/** Fetches (bounded) until a message matching `match` is there: delivery through a queue is not instant. */
export async function waitForMail(
  dovecot: Dovecot,
  protocol: 'imap' | 'pop3',
  user: DovecotUser,
  match: (m: FetchedMessage) => boolean,
  opts: { mailbox?: string; timeoutMs?: number } = {},
): Promise<FetchedMessage> {
  const deadline = Date.now() + (opts.timeoutMs ?? 15_000);
  for (;;) {
    const found = (await fetchMail(dovecot, protocol, user, opts.mailbox)).find(match);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`no such message for ${user.address}\n${dovecot.log()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Sends one message to Petrel over SMTP, as a transcript; resolves once it is queued. */
export async function sendOverSmtp(
  port: number,
  from: string,
  to: readonly string[],
  content: string,
): Promise<void> {
  const c = await SmtpClient.connect(port);
  try {
    await c.expect(/^220 /);
    await c.ehlo();
    await c.cmd(`MAIL FROM:<${from}>`, /^250 /);
    for (const rcpt of to) await c.cmd(`RCPT TO:<${rcpt}>`, /^250 /);
    await c.cmd('DATA', /^354 /);
    const stuffed = content.replace(/^\./gm, '..');
    c.write(Buffer.from(stuffed.endsWith('\r\n') ? `${stuffed}.\r\n` : `${stuffed}\r\n.\r\n`));
    await c.expect(/^250 /);
    await c.cmd('QUIT', /^221 /);
  } finally {
    c.close();
  }
}

// ------------------------------------------------------------------ delivery-side fakes

/**
 * A queued message as delivery hooks see it, streaming `content` in chunks of `chunkSize` octets
 * (small chunks exercise a transport's handling of boundaries).
 */
export function queuedMessage(
  content: string | Buffer,
  opts: { id?: string; sender?: string | null; chunkSize?: number } & Partial<
    Pick<QueuedMessageView, 'mailParams'>
  > = {},
): QueuedMessageView {
  const bytes = typeof content === 'string' ? Buffer.from(content) : content;
  const chunkSize = opts.chunkSize ?? 65_536;
  return {
    id: opts.id ?? 'TESTQUEUEID',
    sender: opts.sender === null ? null : address(opts.sender ?? 'alice@crepes.test'),
    mailParams: opts.mailParams ?? { smtputf8: false },
    receivedAt: new Date(),
    size: bytes.length,
    stream: () =>
      Readable.from(
        (function* () {
          for (let i = 0; i < bytes.length; i += chunkSize) yield bytes.subarray(i, i + chunkSize);
        })(),
      ),
  };
}

/**
 * A recipient on its first attempt, delivered with the null sender unless `over.sender` says
 * otherwise; override `attempts` or `maybeDelivered` for a retry.
 */
export function deliveryRecipient(text: string, over: Partial<DeliveryRecipient> = {}): DeliveryRecipient {
  return { address: address(text), params: {}, sender: null, attempts: 0, maybeDelivered: false, ...over };
}
