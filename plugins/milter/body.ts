import type { Readable } from 'node:stream';

/**
 * The body of a message (what follows the first empty line, RFC 5322 §2.1) from its received
 * octets, in chunks of at most `max` octets. Reading is pulled by the consumer, so a slow milter
 * slows the spool read instead of filling memory.
 */
export async function* streamBody(raw: Readable, max: number): AsyncGenerator<Buffer> {
  let inBody = false;
  // The last octets of the header block seen so far, to find CRLF CRLF across chunk borders.
  let tail = Buffer.alloc(0);
  let first = true;
  try {
    for await (const c of raw) {
      let chunk = c as Buffer;
      if (!inBody) {
        // A message that starts with an empty line has an empty header block.
        if (first && chunk.length >= 2 && chunk[0] === 0x0d && chunk[1] === 0x0a) {
          inBody = true;
          chunk = chunk.subarray(2);
        } else {
          const joined = Buffer.concat([tail, chunk]);
          const at = joined.indexOf('\r\n\r\n');
          if (at < 0) {
            tail = joined.subarray(Math.max(0, joined.length - 3));
            first = false;
            continue;
          }
          inBody = true;
          chunk = joined.subarray(at + 4);
        }
      }
      first = false;
      for (let i = 0; i < chunk.length; i += max) yield chunk.subarray(i, Math.min(chunk.length, i + max));
    }
  } finally {
    raw.destroy();
  }
}
