/**
 * The domains of the URLs in a message body, read as a stream: the message goes through a MIME
 * splitter; each `text/plain` and `text/html` part (a part without Content-Type is text/plain,
 * RFC 2045 §5.2; parts of attached `message/rfc822` messages included) is decoded from its
 * transfer encoding (quoted-printable or base64, RFC 2045 §6; any other passes as it is), then
 * from its charset (one `TextDecoder` supports; UTF-8 otherwise), then, for HTML, from character
 * references, and searched for URLs (`urls.ts`). Other parts (images, attachments that are not
 * text) and the header fields are not read. Reading stops once `maxDomains` distinct domains are
 * found. Memory: one chunk of the message, the splitter's bounded header buffer, a few hundred
 * characters carried between chunks, and the domains found.
 */
import { once } from 'node:events';
import { pipeline, type Readable, type Transform } from 'node:stream';
import { finished } from 'node:stream/promises';
import { TextDecoder } from 'node:util';
import { Splitter, type MimeNode, type SplitterChunk } from '@zone-eu/mailsplit';
import { HtmlEntities, UrlHosts } from './urls.js';

export interface BodyDomains {
  /** Distinct domains, in the order they first appear; at most `maxDomains`. */
  readonly domains: readonly string[];
  /** `maxDomains` was reached: reading stopped there, and later URLs were not looked at. */
  readonly limitReached: boolean;
  /** Text parts read. */
  readonly parts: number;
}

export interface BodyOptions {
  readonly maxDomains: number;
  /** The name looked up for a host (the host itself, or its registered domain), or null to skip it. */
  readonly nameOf: (host: string) => string | null;
}

const TEXT_TYPES = new Set(['text/plain', 'text/html']);

function isText(node: MimeNode): boolean {
  if (node.multipart) return false;
  return node.contentType === false || TEXT_TYPES.has(node.contentType.toLowerCase());
}

function textDecoder(charset: string | false): TextDecoder {
  try {
    return new TextDecoder(charset || 'utf-8');
  } catch {
    // An unknown charset: URLs are ASCII (or UTF-8 IDNs), which UTF-8 reads.
    return new TextDecoder('utf-8');
  }
}

/** One text part being read: its transfer decoder, then the text decoders. */
interface Part {
  readonly decoder: Transform;
  readonly done: Promise<void>;
}

/** Reads `message` and resolves to the domains of the URLs in its text parts. */
export async function bodyDomains(message: Readable, opts: BodyOptions): Promise<BodyDomains> {
  const found = new Set<string>();
  let limitReached = false;
  let parts = 0;

  const add = (hosts: readonly string[]): void => {
    for (const host of hosts) {
      const name = opts.nameOf(host);
      if (name === null || found.has(name)) continue;
      if (found.size >= opts.maxDomains) {
        limitReached = true;
        return;
      }
      found.add(name);
    }
  };

  function open(node: MimeNode): Part {
    const decoder = node.getDecoder() as Transform;
    const text = textDecoder(node.charset);
    const html = node.contentType !== false && node.contentType.toLowerCase() === 'text/html';
    const entities = html ? new HtmlEntities() : null;
    const urls = new UrlHosts();
    const read = (chunk: Buffer): void => {
      const s = text.decode(chunk, { stream: true });
      add(urls.write(entities ? entities.write(s) : s));
    };
    decoder.on('data', read);
    const done = finished(decoder).then(() => {
      const s = text.decode();
      add(urls.write(entities ? entities.write(s) + entities.end() : s));
      add(urls.end());
    });
    // Awaited by `close`; a part abandoned when reading stops early rejects unheard.
    done.catch(() => undefined);
    return { decoder, done };
  }

  async function close(part: Part | null): Promise<void> {
    if (!part) return;
    part.decoder.end();
    await part.done;
  }

  const splitter = new Splitter();
  // An error of either stream destroys both; the loop below then throws it.
  pipeline(message, splitter, () => undefined);
  let part: Part | null = null;
  try {
    for await (const chunk of splitter as AsyncIterable<SplitterChunk>) {
      if (chunk.type === 'node') {
        await close(part);
        part = null;
        if (isText(chunk)) {
          part = open(chunk);
          parts++;
        }
      } else if (chunk.type === 'body' && part) {
        if (!part.decoder.write(chunk.value)) await once(part.decoder, 'drain');
      }
      if (limitReached) break;
    }
    if (!limitReached) await close(part);
  } finally {
    // Stopped early (the limit, an error): release the spool file and the splitter.
    part?.decoder.destroy();
    splitter.destroy();
  }
  return { domains: [...found], limitReached, parts };
}
