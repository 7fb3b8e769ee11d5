import type { MessageView, SessionView } from '../../core/index.js';
import type { Origin } from './history.js';

/** Longest header field kept as a verdict, and longest Message-ID kept (RFC 5322 §2.1.1: 998). */
const MAX_FIELD = 1000;
const MAX_MESSAGE_ID = 998;

function cut(text: string, max: number): string {
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/** Unfolds a header field value (RFC 5322 §2.2.3) for a one-line story. */
function unfold(value: string): string {
  return value.replace(/\r?\n[ \t]+/g, ' ').trim();
}

/**
 * A message's origin, from what the `queue` hook is given: the session (client, HELO, AUTH user,
 * TLS, listener) and the message (its Message-ID, and the header fields plugins added at
 * acceptance, which are their visible verdicts; see `Origin` in history.ts for the rule).
 */
export function originOf(session: SessionView, message: MessageView): Origin {
  const messageId = message.headers.get('message-id');
  const verdicts = message.addedHeaders
    .filter((f) => f.name.toLowerCase() !== 'received')
    .map((f) => cut(`${f.name}: ${unfold(f.value)}`, MAX_FIELD));
  return {
    client: { address: session.remote.address, port: session.remote.port },
    ...(session.helo ? { helo: session.helo.hostname } : {}),
    ...(session.user ? { user: session.user } : {}),
    ...(session.tls ? { tls: `${session.tls.protocol} ${session.tls.cipher}` } : {}),
    listener: `${session.listener.name} (${session.listener.kind})`,
    ...(messageId ? { messageId: cut(unfold(messageId), MAX_MESSAGE_ID) } : {}),
    ...(verdicts.length ? { verdicts } : {}),
  };
}
