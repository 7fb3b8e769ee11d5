/**
 * One SMTP session's conversation with one milter: option negotiation, then one step per SMTP
 * event, each honouring what the milter asked to skip (SMFIP_NO*) and not to answer (SMFIP_NR_*).
 */
import type { MilterEntry } from './config.js';
import {
  ALL_ACTIONS,
  Cmd,
  MilterConnection,
  MilterError,
  OFFERED_PROTOCOL,
  Reply,
  VERSION,
  type Packet,
} from './protocol.js';

/** What a milter answered to one step. */
export type StepAnswer =
  | { readonly kind: 'continue' }
  /** Accept: no more steps for this message (or, at connect and helo, for this session). */
  | { readonly kind: 'accept' }
  | { readonly kind: 'reject' }
  | { readonly kind: 'tempfail' }
  | { readonly kind: 'discard' }
  | { readonly kind: 'skip' }
  | { readonly kind: 'reply'; readonly code: number; readonly enhanced: string; readonly text: string[] };

/** Parses SMFIR_REPLYCODE's text: `550 5.7.1 text`, or several lines `550-5.7.1 a\r\n550 5.7.1 b`. */
export function parseReplyCode(text: string): StepAnswer {
  const lines = text.replace(/\0+$/, '').split(/\r?\n/);
  const first = /^([45]\d\d)[ -]/.exec(lines[0] ?? '');
  if (!first) throw new MilterError(`milter sent a bad reply code: ${JSON.stringify(text.slice(0, 80))}`);
  const code = Number(first[1]);
  let enhanced = code >= 500 ? '5.7.1' : '4.7.1';
  const out: string[] = [];
  for (const line of lines) {
    const m = /^\d{3}[ -](?:([245]\.\d{1,3}\.\d{1,3}) ?)?(.*)$/.exec(line);
    if (!m) continue;
    if (m[1] && m[1][0] === String(code)[0]) enhanced = m[1];
    out.push(m[2] ?? '');
  }
  return { kind: 'reply', code, enhanced, text: out.length > 0 ? out : [''] };
}

export class MilterLink {
  /** SMFIP_* flags the milter chose. */
  protocol = 0;
  actions = 0;
  /** The milter accepted the session (at connect or helo): it sees nothing more. */
  sessionDone = false;
  /** The milter accepted or discarded this message: it sees nothing more of it. */
  messageDone = false;
  /** A transaction is open on the milter's side (MAIL sent, end of message not yet answered). */
  inMessage = false;

  private constructor(
    readonly entry: MilterEntry,
    readonly conn: MilterConnection,
  ) {}

  static async open(entry: MilterEntry): Promise<MilterLink> {
    const target = entry.path !== undefined ? { path: entry.path } : { host: entry.host, port: entry.port! };
    const conn = await MilterConnection.open(target, entry.connectTimeout);
    const link = new MilterLink(entry, conn);
    try {
      const data = Buffer.alloc(12);
      data.writeUInt32BE(VERSION, 0);
      data.writeUInt32BE(ALL_ACTIONS, 4);
      data.writeUInt32BE(OFFERED_PROTOCOL, 8);
      await conn.send(Cmd.optneg, data);
      const reply = await conn.read(Date.now() + entry.connectTimeout);
      if (reply.cmd !== Cmd.optneg || reply.data.length < 12)
        throw new MilterError(`milter answered option negotiation with '${reply.cmd}'`);
      const version = reply.data.readUInt32BE(0);
      if (version < 2 || version > VERSION)
        throw new MilterError(`milter speaks protocol version ${version}`);
      link.actions = reply.data.readUInt32BE(4);
      link.protocol = reply.data.readUInt32BE(8);
      // A milter may not ask for steps we did not offer (libmilter refuses the same way).
      if ((link.protocol & ~OFFERED_PROTOCOL) !== 0)
        throw new MilterError(`milter asked for protocol flags 0x${link.protocol.toString(16)} not offered`);
      if ((link.actions & ~ALL_ACTIONS) !== 0)
        throw new MilterError(`milter asked for actions 0x${link.actions.toString(16)} not offered`);
      // Any macro lists after the three words (SMFIF_SETSYMLIST) only narrow what we send: ignored.
      return link;
    } catch (err) {
      conn.close();
      throw err;
    }
  }

  has(flag: number): boolean {
    return (this.protocol & flag) !== 0;
  }

  /** Sends the macros for the command `cmd` that follows (SMFIC_MACRO; never answered). */
  async macros(cmd: string, values: Record<string, string | undefined>): Promise<void> {
    const parts: string[] = [];
    for (const [k, v] of Object.entries(values)) if (v !== undefined) parts.push(k, v);
    if (parts.length === 0) return;
    const body = Buffer.concat([
      Buffer.from(cmd, 'latin1'),
      ...parts.map((p) => Buffer.from(`${p}\0`, 'utf8')),
    ]);
    await this.conn.send(Cmd.macro, body);
  }

  /**
   * Sends one step and reads its answer, unless the milter asked for no answer (`noReply`). The
   * deadline is total for the step.
   */
  async step(cmd: string, data: Buffer, noReply: boolean, timeoutMs: number): Promise<StepAnswer> {
    await this.conn.send(cmd, data);
    if (noReply) return { kind: 'continue' };
    return this.answer(await this.readSkippingProgress(Date.now() + timeoutMs));
  }

  /** Reads one packet; SMFIR_PROGRESS only says the milter is still working (the deadline stands). */
  async readSkippingProgress(deadline: number): Promise<Packet> {
    for (;;) {
      const p = await this.conn.read(deadline);
      if (p.cmd !== Reply.progress) return p;
    }
  }

  answer(p: Packet): StepAnswer {
    switch (p.cmd) {
      case Reply.continue:
        return { kind: 'continue' };
      case Reply.accept:
        return { kind: 'accept' };
      case Reply.reject:
        return { kind: 'reject' };
      case Reply.tempfail:
        return { kind: 'tempfail' };
      case Reply.discard:
        return { kind: 'discard' };
      case Reply.skip:
        return { kind: 'skip' };
      case Reply.replyCode:
        return parseReplyCode(p.data.toString('utf8'));
      case Reply.connFail:
        return { kind: 'tempfail' };
      default:
        throw new MilterError(`milter sent '${p.cmd}' where a reply was expected`);
    }
  }

  /** Tells the milter the current message is over (SMFIC_ABORT; never answered). */
  async abort(): Promise<void> {
    if (!this.inMessage || this.conn.broken) return;
    this.inMessage = false;
    await this.conn.send(Cmd.abort);
  }

  quit(): void {
    this.conn.quit();
  }

  close(): void {
    this.conn.close();
  }
}
