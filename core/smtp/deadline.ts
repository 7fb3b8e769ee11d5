/**
 * The deadline of one message's content phase (DATA up to its end, or every BDAT chunk of one
 * message with the BDAT command lines between them): a base time plus the octets received so far
 * at a minimum rate, all counted from the start of the phase. This is Postfix's
 * `smtpd_min_data_rate` model: a client that keeps sending at least `minRate` octets per second
 * may send a message of any allowed size, and one that drips is cut off however often it sends a
 * byte, because a byte only buys `1000 / minRate` milliseconds.
 */
export class ContentDeadline {
  private readonly startedAt = Date.now();
  private octets = 0;

  constructor(
    /** Milliseconds allowed whatever the size (`timeouts.data`). */
    private readonly baseMs: number,
    /** Octets per second (`timeouts.minDataRate`). */
    private readonly minRate: number,
  ) {}

  /** Counts octets received from the client. */
  add(n: number): void {
    this.octets += n;
  }

  /** The absolute deadline (`Date.now()` milliseconds) given what was received so far. */
  get at(): number {
    return this.startedAt + this.baseMs + (this.octets * 1000) / this.minRate;
  }

  /** For the log line when the deadline passes. */
  describe(): { octets: number; ms: number } {
    return { octets: this.octets, ms: Date.now() - this.startedAt };
  }
}
