import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describeRun, run } from '../e2e/run.js';
import { PYTHON, requirePeer } from './peers.js';
import { FIXTURES } from './server.js';

const SCRIPT = join(FIXTURES, 'email_read.py');

/** What Python's email parser (default policy) reads of a message. */
export interface PythonReading {
  readonly subject: string | null;
  /** Attached messages (message/rfc822, message/global), in order. */
  readonly attached: readonly { readonly subject: string | null }[];
}

/**
 * Reads a message with Python's `email.message_from_bytes(..., policy=email.policy.default)`, a
 * parser many mail programs are built on; null (the test skipped) when python3 is missing.
 */
export async function readWithPython(t: TestContext, message: Buffer): Promise<PythonReading | null> {
  if (!requirePeer(t, PYTHON, 'apt-get install python3')) return null;
  const r = await run(PYTHON, [SCRIPT], {
    input: message,
    env: { ...process.env, PYTHONIOENCODING: 'utf-8' },
    timeoutMs: 20_000,
  });
  assert.equal(r.code, 0, describeRun(r));
  return JSON.parse(r.stdout) as PythonReading;
}
