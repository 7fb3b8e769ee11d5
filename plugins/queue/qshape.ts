import { domainOf, type MessageBrief } from './select.js';

/*
 * The queue's shape, as Postfix's qshape draws it: one row per destination (or sender) domain,
 * one column per age band, counting messages. Pure: briefs in, a table out.
 */

/**
 * The age bands' upper bounds in minutes, as qshape's: a message `m` minutes old counts in the
 * first band whose bound is above `m`, and in the last (`1280+`) when none is.
 */
export const AGE_BANDS = [5, 10, 20, 40, 80, 160, 320, 640, 1280] as const;

/** One row: a domain (or TOTAL), its messages, and how many in each age band (AGE_BANDS, then 1280+). */
export interface ShapeRow {
  readonly domain: string;
  readonly total: number;
  readonly counts: readonly number[];
}

/** A queue part's shape, as the `summary` request answers it. */
export interface QueueShape {
  /** Rows by recipient domain, or by sender domain (`<>` for the null sender). */
  readonly by: 'recipient' | 'sender';
  /** Every matching message once. */
  readonly total: ShapeRow;
  /** The largest rows, most messages first, at most the `top` asked for. */
  readonly rows: readonly ShapeRow[];
  /** Domains seen, shown or not. */
  readonly domains: number;
}

function band(ageMs: number): number {
  const minutes = ageMs / 60_000;
  const i = AGE_BANDS.findIndex((bound) => minutes < bound);
  return i < 0 ? AGE_BANDS.length : i;
}

/**
 * Counts briefs as they come (a walk's batches), keeping one row per domain: memory grows with
 * the number of domains, never with the number of messages.
 */
export class ShapeTally {
  private readonly total = new Array<number>(AGE_BANDS.length + 1).fill(0);
  private readonly rows = new Map<string, number[]>();

  constructor(
    private readonly by: 'recipient' | 'sender',
    private readonly now: number,
  ) {}

  add(b: MessageBrief): void {
    const i = band(this.now - b.receivedAt);
    this.total[i]!++;
    // A message with recipients in two domains counts in both rows, and once in TOTAL.
    const domains = this.by === 'sender' ? [b.sender === '' ? '<>' : domainOf(b.sender)] : b.domains;
    for (const d of domains) {
      let row = this.rows.get(d);
      if (!row) {
        row = new Array<number>(AGE_BANDS.length + 1).fill(0);
        this.rows.set(d, row);
      }
      row[i]!++;
    }
  }

  /** The shape, with the `top` largest rows. */
  result(top: number): QueueShape {
    const row = (domain: string, counts: number[]): ShapeRow => ({
      domain,
      total: counts.reduce((a, b) => a + b, 0),
      counts,
    });
    return {
      by: this.by,
      total: row('TOTAL', this.total),
      rows: largest(
        [...this.rows].map(([d, c]) => row(d, c)),
        top,
      ),
      domains: this.rows.size,
    };
  }
}

/** The `top` largest rows: most messages first, then by name. */
export function largest(rows: readonly ShapeRow[], top: number): ShapeRow[] {
  return [...rows]
    .sort((a, b) => b.total - a.total || (a.domain < b.domain ? -1 : a.domain > b.domain ? 1 : 0))
    .slice(0, top);
}

/**
 * Adds up the shapes of several queue parts. Each part sent its own largest rows, so a domain
 * that is below the cut in every part may be missing from the sum; TOTAL is always exact.
 */
export function mergeShapes(shapes: readonly QueueShape[], top: number): QueueShape {
  const add = (a: readonly number[], b: readonly number[]): number[] => a.map((n, i) => n + (b[i] ?? 0));
  const zero = new Array<number>(AGE_BANDS.length + 1).fill(0);
  const rows = new Map<string, number[]>();
  let total = zero;
  for (const s of shapes) {
    total = add(total, s.total.counts);
    for (const r of s.rows) rows.set(r.domain, add(rows.get(r.domain) ?? zero, r.counts));
  }
  const sum = (counts: number[]): number => counts.reduce((a, b) => a + b, 0);
  return {
    by: shapes[0]?.by ?? 'recipient',
    total: { domain: 'TOTAL', total: sum(total), counts: total },
    rows: largest(
      [...rows].map(([domain, counts]) => ({ domain, total: sum(counts), counts })),
      top,
    ),
    domains: Math.max(rows.size, ...shapes.map((s) => s.domains)),
  };
}

/** The table as qshape prints it: a header of bands, TOTAL, then the rows, right-aligned. */
export function formatShape(shape: QueueShape): string[] {
  const header = ['', 'T', ...AGE_BANDS.map(String), `${AGE_BANDS.at(-1)}+`];
  const lines = [shape.total, ...shape.rows].map((r) => [r.domain, String(r.total), ...r.counts.map(String)]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  return [header, ...lines].map((cells) =>
    cells
      .map((c, i) => c.padStart(widths[i]!))
      .join(' ')
      .trimEnd(),
  );
}
