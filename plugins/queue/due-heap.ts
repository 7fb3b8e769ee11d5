/** A min-heap of (time, message id): when each queued message is next due. */
export class DueHeap {
  private readonly items: { at: number; id: string }[] = [];

  get size(): number {
    return this.items.length;
  }

  push(at: number, id: string): void {
    const a = this.items;
    a.push({ at, id });
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p]!.at <= a[i]!.at) break;
      [a[p], a[i]] = [a[i]!, a[p]!];
      i = p;
    }
  }

  peek(): { at: number; id: string } | undefined {
    return this.items[0];
  }

  pop(): { at: number; id: string } | undefined {
    const a = this.items;
    const top = a[0];
    const last = a.pop();
    if (a.length && last) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && a[l]!.at < a[m]!.at) m = l;
        if (r < a.length && a[r]!.at < a[m]!.at) m = r;
        if (m === i) break;
        [a[m], a[i]] = [a[i]!, a[m]!];
        i = m;
      }
    }
    return top;
  }
}
