import { Readable } from 'node:stream';

/**
 * The mark that says "ours to sign", carried by the queued message itself.
 *
 * Whether a message is ours to sign is known when it arrives (who sent it); it is signed when it
 * leaves. The decision travels with the message as a header field the plugin adds at
 * `data_post`, which the server stores above its own `Received:` field:
 *
 *     Petrel-DKIM: sign            <- added here, at data_post
 *     Received: from … by …        <- added by the server
 *     From: …                      <- the client's octets start here
 *
 * Only a mark above the first `Received:` field counts: a client can write its own
 * `Petrel-DKIM:` field, but only below the server's `Received:`, where it is ignored (and left
 * as it is). The transform removes the mark from the message it signs, so it never leaves the
 * server. It is stored with the message, so it is as durable as the message (retries, restarts,
 * another worker taking over a queue part) at no cost of its own.
 */
export const MARK_NAME = 'Petrel-DKIM';
export const MARK_VALUE = 'sign';
const MARK = Buffer.from(`${MARK_NAME}: ${MARK_VALUE}\r\n`);

/** How far to look for the mark: the fields the server added are small. */
const HEAD_LIMIT = 64 * 1024;

export interface Head {
  /** The start of the message as read, with the mark taken out when it was there. */
  readonly head: Buffer;
  /** The mark was above the first `Received:` field. */
  readonly marked: boolean;
  /** The rest of the message, after `head`. */
  readonly rest: AsyncIterator<unknown>;
}

/**
 * Reads the start of `content` up to the first `Received:` field (or the end of the header, or
 * 64 KiB) and says whether the mark is above it.
 */
export async function readHead(content: Readable): Promise<Head> {
  const rest = content[Symbol.asyncIterator]();
  const chunks: Buffer[] = [];
  let size = 0;
  let head: Buffer;
  for (;;) {
    head = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size);
    const end = searchEnd(head);
    if (end >= 0) {
      const at = findMark(head.subarray(0, end));
      if (at < 0) return { head, marked: false, rest };
      return {
        head: Buffer.concat([head.subarray(0, at), head.subarray(at + MARK.length)]),
        marked: true,
        rest,
      };
    }
    if (size >= HEAD_LIMIT) return { head, marked: false, rest };
    const r = await rest.next();
    if (r.done) return { head, marked: false, rest };
    const chunk = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value as string);
    chunks.push(chunk);
    size += chunk.length;
  }
}

/** Where the region the mark may be in ends: the first `Received:` line, or the header's end. */
function searchEnd(buf: Buffer): number {
  let line = 0;
  while (line < buf.length) {
    const eol = buf.indexOf('\n', line);
    if (eol < 0) return -1;
    // An empty line ends the header; a line starting with Received: is the server's own.
    if (eol === line || (eol === line + 1 && buf[line] === 0x0d)) return line;
    if (eol - line >= 9 && buf.toString('latin1', line, line + 9).toLowerCase() === 'received:') return line;
    line = eol + 1;
  }
  return -1;
}

/** The offset of the mark at the start of a line of `region`, or -1. */
function findMark(region: Buffer): number {
  for (let at = region.indexOf(MARK); at >= 0; at = region.indexOf(MARK, at + 1)) {
    if (at === 0 || region[at - 1] === 0x0a) return at;
  }
  return -1;
}

/** `head` then the rest of the message, as one stream; destroying it ends the source too. */
export function rejoined(head: Head, source: Readable): Readable {
  const stream = Readable.from(
    (async function* () {
      if (head.head.length) yield head.head;
      for (let r = await head.rest.next(); !r.done; r = await head.rest.next()) yield r.value as Buffer;
    })(),
    { objectMode: false },
  );
  stream.once('close', () => source.destroy());
  return stream;
}

/** The rest of the message as an async iterable, for reading it whole. */
export function remainder(head: Head): AsyncIterable<unknown> {
  return { [Symbol.asyncIterator]: () => head.rest };
}
