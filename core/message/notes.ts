/**
 * Typed per-session and per-transaction state shared between plugins. A plugin exports the key;
 * other plugins import it and get the value's type with it. Keys compare by identity, so two
 * plugins that both call `defineNote('score')` never clobber each other.
 */
export interface NoteKey<T> {
  readonly name: string;
  /** Phantom field carrying the value type; never set. */
  readonly __type?: T;
}

export function defineNote<T>(name: string): NoteKey<T> {
  return Object.freeze({ name });
}

export class Notes {
  private readonly map = new Map<NoteKey<unknown>, unknown>();

  get<T>(key: NoteKey<T>): T | undefined {
    return this.map.get(key) as T | undefined;
  }

  set<T>(key: NoteKey<T>, value: T): void {
    this.map.set(key, value);
  }

  has(key: NoteKey<unknown>): boolean {
    return this.map.has(key);
  }

  delete(key: NoteKey<unknown>): boolean {
    return this.map.delete(key);
  }

  /** Note names, for logs and debugging. */
  names(): string[] {
    return [...this.map.keys()].map((k) => k.name);
  }
}
