import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { chmod, lstat, mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { SocketReader, writeDrained } from '../../core/index.js';
import { answer, type Send } from './control-answer.js';
import { CONTROL_SOCKET, parseRequest, type ControlTarget } from './control-protocol.js';

export * from './control-protocol.js';

/** Longest request line accepted. */
const MAX_LINE = 16 * 1024;
/** A connection that sends no whole request for this long is closed. */
const IDLE_MS = 10 * 60_000;
/** A client that does not take a line of an answer within this long is cut off. */
const WRITE_MS = 60_000;

/**
 * The queue's control socket, `<queue dir>/control.sock`, for `petrel queue`: owner-only
 * (mode 0600, in a 0700 folder), newline-delimited JSON, one answer per request, in order (an
 * answer is one line, or for `list` and the bulk actions a line per batch). Requests are taken one
 * at a time, and each line is written only once the socket has taken the one before
 * (back-pressure): a client that never reads stops being read and being walked for, holds at most
 * one line in the server's memory, and is cut off after `WRITE_MS`.
 */
export class ControlServer {
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    readonly path: string,
  ) {}

  /**
   * Before the queue opens its folder: fails when a server already answers on the folder's
   * socket (two processes must never share a journal), and removes a socket left by a crash.
   */
  static async claim(dir: string): Promise<void> {
    const path = join(dir, CONTROL_SOCKET);
    const found = await lstat(path).catch(() => null);
    if (!found) return;
    if (found.isSocket() && (await answers(path))) {
      throw new Error(
        `the queue folder ${dir} is in use by another running Petrel (it answers on ${path}); stop that one first`,
      );
    }
    await rm(path, { force: true });
  }

  static async listen(dir: string, engine: ControlTarget, log: Logger): Promise<ControlServer> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const path = join(dir, CONTROL_SOCKET);
    await rm(path, { force: true });
    const server = createServer();
    const control = new ControlServer(server, path);
    server.on('connection', (socket) => control.serve(socket, engine, log));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // The socket is bound at once: with this umask it is never more open than 0600.
      let previous: number | null = null;
      try {
        previous = process.umask(0o177);
      } catch {
        // worker threads cannot change the umask; the chmod below still applies
      }
      try {
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      } finally {
        if (previous !== null) process.umask(previous);
      }
    });
    server.on('error', (err) => log.error({ err, path }, 'queue control socket error'));
    await chmod(path, 0o600);
    return control;
  }

  private serve(socket: Socket, engine: ControlTarget, log: Logger): void {
    this.sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => this.sockets.delete(socket));
    const reader = new SocketReader();
    reader.attach(socket);
    void this.converse(socket, reader, engine, log)
      .then(
        () => socket.end(), // let the last response leave
        () => socket.destroy(), // idle past IDLE_MS, or not reading its responses
      )
      .finally(() => reader.detach());
  }

  /**
   * One request at a time: read a line, answer it line by line, each line once the socket took
   * the one before, and read the next request only after the answer's last line.
   */
  private async converse(
    socket: Socket,
    reader: SocketReader,
    engine: ControlTarget,
    log: Logger,
  ): Promise<void> {
    let gone = false;
    const send: Send = async (r) => {
      const sent = await writeDrained(socket, `${JSON.stringify(r)}\n`, WRITE_MS);
      if (sent === 'timeout') {
        log.warn({ ms: WRITE_MS }, 'queue control client did not read its responses; cutting it off');
        throw new ClientNotReading();
      }
      if (sent === 'closed') gone = true;
      return !gone;
    };
    for (;;) {
      const got = await reader.readLine(MAX_LINE, Date.now() + IDLE_MS);
      if (got === null) return;
      if (got.overlong) {
        await send({ ok: false, error: 'bad-request', message: 'request line too long' });
        return;
      }
      const line = got.line.toString('utf8').trim();
      if (!line) continue;
      const req = parseRequest(line);
      if (typeof req === 'string') await send({ ok: false, error: 'bad-request', message: req });
      else {
        try {
          await answer(engine, req, send, log);
        } catch (err) {
          if (err instanceof ClientNotReading) throw err;
          log.error({ err, op: req.op, queueId: req.id }, 'queue control request failed');
          // Also ends an answer of several lines: `ok: false` is always its last line.
          await send({ ok: false, error: 'failed', message: (err as Error).message });
        }
      }
      if (gone) return;
    }
  }

  /** Stops answering and removes the socket file. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
    await rm(this.path, { force: true });
  }
}

/** A client that does not take its answer: it is cut off. */
class ClientNotReading extends Error {}

/** True when something accepts a connection on the socket within a second. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    const done = (v: boolean): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => done(false), 1000);
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}
