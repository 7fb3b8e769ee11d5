import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { Petrel } from '../../core/app.js';
import { ConfigError } from '../../core/config/errors.js';
import { SmtpClient } from '../harness/smtp-client.js';

describe('TLS certificates', () => {
  it('generates a self-signed certificate on first start when asked, and keeps it after', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-tls-'));
    const tls = { cert: join(dir, 'tls', 'cert.pem'), key: join(dir, 'tls', 'key.pem'), selfSigned: true };
    const config = {
      hostname: 'mail.petrel.test',
      listeners: [{ kind: 'smtp' as const, port: 0 }],
      tls,
      spool: { dir: join(dir, 'spool') },
    };
    try {
      let app = await Petrel.start({ config, logger: pino({ level: 'silent' }) });
      const first = readFileSync(tls.cert, 'utf8');
      assert.equal(statSync(tls.key).mode & 0o777, 0o600, 'the key is readable by its owner only');
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      await c.ehlo();
      await c.cmd('STARTTLS', /^220 /);
      const secure = await c.upgrade('mail.petrel.test');
      assert.equal(secure.getPeerCertificate().subject.CN, 'mail.petrel.test');
      c.close();
      await app.stop(500);
      app = await Petrel.start({ config, logger: pino({ level: 'silent' }) });
      assert.equal(readFileSync(tls.cert, 'utf8'), first, 'not regenerated');
      await app.stop(500);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses to start when a configured certificate is missing and generation was not asked for', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-tls-'));
    try {
      await assert.rejects(
        Petrel.start({
          config: {
            listeners: [{ kind: 'smtp', port: 0 }],
            tls: { cert: join(dir, 'nope.pem'), key: join(dir, 'nope.key') },
            spool: { dir },
          },
          logger: pino({ level: 'silent' }),
        }),
        (err: unknown) =>
          err instanceof ConfigError && /tls\.cert: expected a readable PEM certificate/.test(err.message),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses STARTTLS when no certificate is configured', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'petrel-tls-'));
    const app = await Petrel.start({
      config: { listeners: [{ kind: 'smtp', port: 0 }], spool: { dir } },
      logger: pino({ level: 'silent' }),
    });
    try {
      const c = await SmtpClient.connect(app.port());
      await c.expect(/^220 /);
      const words = await c.ehlo();
      assert.ok(!words.includes('STARTTLS'));
      await c.cmd('STARTTLS', /^454 4\.7\.0 TLS not available/);
      c.close();
    } finally {
      await app.stop(500);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
