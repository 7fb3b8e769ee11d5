/**
 * A min-heap of (time, message id): when each queued message is next due. Two parallel arrays
 * rather than an object per item: one item per queued message, so with a million of them the
 * objects (and the boxed times in them) would be tens of megabytes.
 */
export class DueHeap {
  private readonly ats: number[] = [];
  private readonly ids: string[] = [];

  get size(): number {
    return this.ats.length;
  }

  push(at: number, id: string): void {
    const { ats, ids } = this;
    ats.push(at);
    ids.push(id);
    let i = ats.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (ats[p]! <= ats[i]!) break;
      this.swap(p, i);
      i = p;
    }
  }

  peek(): { at: number; id: string } | undefined {
    return this.ats.length ? { at: this.ats[0]!, id: this.ids[0]! } : undefined;
  }

  pop(): { at: number; id: string } | undefined {
    const { ats, ids } = this;
    if (!ats.length) return undefined;
    const top = { at: ats[0]!, id: ids[0]! };
    const lastAt = ats.pop()!;
    const lastId = ids.pop()!;
    if (ats.length) {
      ats[0] = lastAt;
      ids[0] = lastId;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < ats.length && ats[l]! < ats[m]!) m = l;
        if (r < ats.length && ats[r]! < ats[m]!) m = r;
        if (m === i) break;
        this.swap(m, i);
        i = m;
      }
    }
    return top;
  }

  private swap(a: number, b: number): void {
    const { ats, ids } = this;
    [ats[a], ats[b]] = [ats[b]!, ats[a]!];
    [ids[a], ids[b]] = [ids[b]!, ids[a]!];
  }
}
