/**
 * The streaming 8-bit → 7-bit rewrite: a MIME splitter, a transform over its nodes, a joiner.
 * Nothing holds more than a small, fixed window of the message.
 */
import { PassThrough, pipeline, Readable, Transform, type TransformCallback } from 'node:stream';
import { Joiner, Splitter, type MessageChunk, type MimeNode, type SplitterChunk } from '@zone-eu/mailsplit';
import {
  Base64Encoder,
  Base64Repair,
  maskEightBit,
  QuotedPrintableEncoder,
  QuotedPrintableRepair,
  SevenBitScanner,
  type ChunkCoder,
} from './encoders.js';
import { encodeHeaderLine, hasEightBit } from './headers.js';

export interface DowngradeOptions {
  /** Re-encode 8-bit bodies (the peer does not offer 8BITMIME). */
  readonly body: boolean;
  /** Turn 8-bit header text into encoded words (the message cannot go as SMTPUTF8). */
  readonly headers: boolean;
  /**
   * How much of a part labelled 7bit/8bit/binary (or not labelled) is held before it is sent. A
   * part that ends within it and is 7-bit data goes out exactly as it came; a longer one, or one
   * with 8-bit content, is re-encoded, in an encoding chosen from what was held.
   */
  readonly window?: number;
  /** How much of the message is read first: one that ends within it and is clean is not parsed. */
  readonly probe?: number;
  /** Nested `message/rfc822` parts are followed this deep; deeper ones are encoded as a whole. */
  readonly maxDepth?: number;
}

/** What the rewrite did, for logs and tests. */
export interface DowngradeReport {
  /** The message was clean and went out untouched, without being parsed. */
  untouched: boolean;
  /** Parts whose body was re-encoded (quoted-printable or base64). */
  encoded: number;
  /** Parts labelled base64 or quoted-printable whose stray 8-bit octets or long lines were repaired. */
  repaired: number;
  /** Header fields rewritten as encoded words. */
  headers: number;
}

const DEFAULT_WINDOW = 128 * 1024;
const DEFAULT_PROBE = 256 * 1024;
const DEFAULT_MAX_DEPTH = 8;

const IDENTITY = new Set(['', '7bit', '8bit', 'binary']);

function toBuffer(chunk: unknown): Buffer {
  if (Buffer.isBuffer(chunk)) return chunk;
  if (typeof chunk === 'string') return Buffer.from(chunk, 'utf8');
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  throw new TypeError('message content must be bytes');
}

/**
 * Rewrites a message for a peer that takes 7-bit only (`body`) and/or no UTF-8 headers
 * (`headers`). Returns at once; the work happens as the result is read.
 */
export function downgrade(
  input: Readable,
  options: DowngradeOptions,
  report: DowngradeReport = { untouched: false, encoded: 0, repaired: 0, headers: 0 },
): Readable {
  return Readable.from(run(input, options, report), { objectMode: false });
}

async function* run(
  input: Readable,
  options: DowngradeOptions,
  report: DowngradeReport,
): AsyncGenerator<Buffer> {
  const source = input[Symbol.asyncIterator]();
  try {
    // The fast path: a message that ends within the probe and needs nothing goes out as it was.
    const probe = options.probe ?? DEFAULT_PROBE;
    const scanner = new SevenBitScanner(!options.body);
    const head: Buffer[] = [];
    let size = 0;
    let ended = false;
    while (size <= probe && !scanner.unsafe) {
      const next = await source.next();
      if (next.done) {
        ended = true;
        break;
      }
      const chunk = toBuffer(next.value);
      head.push(chunk);
      size += chunk.length;
      scanner.update(chunk);
    }
    if (ended && !scanner.unsafe) {
      report.untouched = true;
      yield* head;
      return;
    }
    const rest = (async function* (): AsyncGenerator<Buffer> {
      yield* head;
      head.length = 0;
      for (let next = await source.next(); !next.done; next = await source.next()) {
        yield toBuffer(next.value);
      }
    })();
    yield* rewrite(Readable.from(rest, { objectMode: false }), options, report, 0);
  } finally {
    // Reading stopped early (an error, or the reader gave up): release the input.
    await source.return?.();
  }
}

/** Splitter → node rewriter → joiner, as one readable of bytes. */
function rewrite(
  source: Readable,
  options: DowngradeOptions,
  report: DowngradeReport,
  depth: number,
): Readable {
  const joiner = new Joiner();
  pipeline(
    source,
    new Splitter({ ignoreEmbedded: true }),
    new NodeRewriter(options, report, depth),
    joiner,
    () => {
      // An error destroys every stream of the pipeline, the joiner included: its reader sees it.
    },
  );
  // The package declares its own `data` overloads, which hide those of Readable.
  return joiner as unknown as Readable;
}

type Leaf =
  /** Body goes out as it comes. */
  | { readonly kind: 'pass' }
  /** Body goes through a coder (an encoder or a repair). */
  | { readonly kind: 'code'; readonly coder: ChunkCoder }
  /** Node and body held back while deciding. */
  | {
      readonly kind: 'hold';
      readonly node: MimeNode;
      readonly chunks: Buffer[];
      size: number;
      readonly scanner: SevenBitScanner;
      /** A NUL was seen: whatever the label says, this is not text for quoted-printable. */
      nul: boolean;
    }
  /** A message/rfc822 body, rewritten by a nested rewrite. */
  | { readonly kind: 'nested'; readonly input: PassThrough; readonly done: Promise<void> };

const PASS: Leaf = { kind: 'pass' };

function setTransferEncoding(node: MimeNode, encoding: string): void {
  if (!node.headers) node.parseHeaders();
  const headers = node.headers;
  if (!headers) return;
  const lines = headers.getList();
  const line = { key: 'content-transfer-encoding', line: `Content-Transfer-Encoding: ${encoding}` };
  const first = lines.findIndex((l) => l.key === 'content-transfer-encoding');
  if (first < 0) lines.push(line);
  else {
    lines[first] = line;
    for (let i = lines.length - 1; i > first; i--) {
      if (lines[i]!.key === 'content-transfer-encoding') lines.splice(i, 1);
    }
  }
  headers.changed = true;
  node.encoding = encoding;
}

/**
 * The transform over the splitter's objects. Multipart structure, boundaries and untouched
 * parts pass as they are (the joiner then writes them back byte for byte).
 */
class NodeRewriter extends Transform {
  private leaf: Leaf = PASS;
  private readonly window: number;
  private readonly maxDepth: number;

  constructor(
    private readonly options: DowngradeOptions,
    private readonly report: DowngradeReport,
    private readonly depth: number,
  ) {
    super({ readableObjectMode: true, writableObjectMode: true, highWaterMark: 4 });
    this.window = options.window ?? DEFAULT_WINDOW;
    this.maxDepth = options.maxDepth ?? DEFAULT_MAX_DEPTH;
  }

  override _transform(chunk: SplitterChunk, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      if (chunk.type === 'body') {
        this.body(chunk, callback);
        return;
      }
      this.endLeaf((err) => {
        if (err) return callback(err);
        try {
          if (chunk.type === 'node') this.node(chunk);
          else this.data(chunk);
          callback();
        } catch (e) {
          callback(e as Error);
        }
      });
    } catch (err) {
      callback(err as Error);
    }
  }

  override _flush(callback: TransformCallback): void {
    this.endLeaf((err) => callback(err));
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    if (this.leaf.kind === 'nested') this.leaf.input.destroy();
    this.leaf = PASS;
    callback(err);
  }

  // ---------------------------------------------------------------- nodes

  private node(node: MimeNode): void {
    if (this.options.headers) this.encodeHeaders(node);
    if (node.multipart) {
      // A multipart entity may only be 7bit, 8bit or binary (RFC 2045 §6.4); its parts are made 7-bit.
      if (this.options.body && (node.encoding === '8bit' || node.encoding === 'binary')) {
        setTransferEncoding(node, '7bit');
      }
      this.push(node);
      this.leaf = PASS;
      return;
    }
    this.leaf = this.startLeaf(node);
  }

  private encodeHeaders(node: MimeNode): void {
    if (!node.headers) node.parseHeaders();
    const headers = node.headers;
    if (!headers) return;
    let changed = false;
    for (const line of headers.getList()) {
      if (!hasEightBit(line.line)) continue;
      line.line = encodeHeaderLine(line.line, node.charset);
      this.report.headers++;
      changed = true;
    }
    if (changed) headers.changed = true;
  }

  private startLeaf(node: MimeNode): Leaf {
    const label = node.encoding || '';
    if (node.contentType === 'message/rfc822' && IDENTITY.has(label) && this.depth < this.maxDepth) {
      // The enclosed message is rewritten the same way; it then is 7-bit itself.
      if (this.options.body && (label === '8bit' || label === 'binary')) setTransferEncoding(node, '7bit');
      this.push(node);
      return this.startNested();
    }
    if (!this.options.body) {
      this.push(node);
      return PASS;
    }
    if (label === 'base64' || label === 'quoted-printable') {
      this.push(node);
      return { kind: 'code', coder: new RepairCounter(label, this.report) };
    }
    // 7bit, 8bit, binary, no label, or a label we cannot decode: look before deciding.
    return { kind: 'hold', node, chunks: [], size: 0, scanner: new SevenBitScanner(), nul: false };
  }

  private startNested(): Leaf {
    const input = new PassThrough();
    const output = rewrite(input, this.options, this.report, this.depth + 1);
    const done = new Promise<void>((resolve, reject) => {
      output.on('data', (value: Buffer) => this.push({ type: 'body', value }));
      output.once('end', resolve);
      output.once('error', reject);
    });
    // Keep a rejection from being reported as unhandled before endLeaf awaits it.
    done.catch(() => undefined);
    return { kind: 'nested', input, done };
  }

  /**
   * The held part needs re-encoding: out goes the node with its new label, then what was held,
   * encoded. Text in a charset that writes line breaks as ASCII CR LF becomes quoted-printable;
   * anything else (other types, UTF-16 text, text with NULs, content under an encoding label we
   * cannot decode) becomes base64, which keeps every octet.
   */
  private encode(hold: Extract<Leaf, { kind: 'hold' }>): ChunkCoder {
    const { node } = hold;
    const text =
      IDENTITY.has(node.encoding || '') &&
      (node.contentType || 'text/plain').startsWith('text/') &&
      !hold.nul &&
      !/^(utf-?16|utf-?32|ucs-?2|ucs-?4)/i.test(node.charset || '');
    setTransferEncoding(node, text ? 'quoted-printable' : 'base64');
    const coder: ChunkCoder = text ? new QuotedPrintableEncoder() : new Base64Encoder(!node.parentNode);
    this.report.encoded++;
    this.push(node);
    for (const chunk of hold.chunks) this.pushBody(coder.update(chunk));
    hold.chunks.length = 0;
    return coder;
  }

  // ---------------------------------------------------------------- content

  private body(chunk: MessageChunk, callback: TransformCallback): void {
    const leaf = this.leaf;
    switch (leaf.kind) {
      case 'pass':
        this.push(chunk);
        return callback();
      case 'code':
        this.pushBody(leaf.coder.update(chunk.value));
        return callback();
      case 'hold':
        // Held to the end of the window, so that the choice of encoding sees a fair sample.
        leaf.chunks.push(chunk.value);
        leaf.size += chunk.value.length;
        leaf.scanner.update(chunk.value);
        if (!leaf.nul && chunk.value.includes(0)) leaf.nul = true;
        if (leaf.size > this.window) this.leaf = { kind: 'code', coder: this.encode(leaf) };
        return callback();
      case 'nested':
        if (leaf.input.write(chunk.value)) return callback();
        leaf.input.once('drain', () => callback());
        return;
    }
  }

  /** Multipart preamble, boundaries and epilogue: readers ignore the text around boundaries. */
  private data(chunk: MessageChunk): void {
    if (this.options.body) chunk.value = maskEightBit(chunk.value);
    this.push(chunk);
  }

  private pushBody(value: Buffer): void {
    if (value.length) this.push({ type: 'body', value });
  }

  /** Finishes the current leaf before the next object; calls back once its output is all out. */
  private endLeaf(callback: (err?: Error | null) => void): void {
    const leaf = this.leaf;
    this.leaf = PASS;
    switch (leaf.kind) {
      case 'pass':
        return callback();
      case 'code':
        this.pushBody(leaf.coder.end());
        return callback();
      case 'hold':
        if (leaf.scanner.unsafe) {
          this.pushBody(this.encode(leaf).end());
        } else {
          // It ended within the window and is 7-bit data: out as it came.
          this.push(leaf.node);
          for (const value of leaf.chunks) this.pushBody(value);
        }
        return callback();
      case 'nested':
        leaf.input.end();
        leaf.done.then(
          () => callback(),
          (err: Error) => callback(err),
        );
        return;
    }
  }
}

/** A repair coder that counts the part as repaired the first time it changes anything. */
class RepairCounter implements ChunkCoder {
  private readonly inner: ChunkCoder;
  private counted = false;

  constructor(
    label: 'base64' | 'quoted-printable',
    private readonly report: DowngradeReport,
  ) {
    this.inner = label === 'base64' ? new Base64Repair() : new QuotedPrintableRepair();
  }

  update(chunk: Buffer): Buffer {
    const out = this.inner.update(chunk);
    if (out !== chunk && !this.counted) {
      this.counted = true;
      this.report.repaired++;
    }
    return out;
  }

  end(): Buffer {
    return this.inner.end();
  }
}
