/**
 * Where the client keeps what must outlive a connection (and, with a
 * persistent store, the page or process): the long-lived `session_key` and the
 * uuids of the notifications it handled last (so a redelivery after a reload
 * is acked, not handled again).
 *
 * The interface is the Web Storage one, so `window.localStorage` and
 * `sessionStorage` can be passed as they are; each method may also return a
 * promise (React Native AsyncStorage, IndexedDB wrappers, a file).
 */
export interface KeyValueStorage {
  getItem(key: string): string | null | undefined | Promise<string | null | undefined>;
  setItem(key: string, value: string): void | Promise<void>;
  removeItem(key: string): void | Promise<void>;
}

/** The default: kept as long as the client object (the process, the page). */
export class MemoryStorage implements KeyValueStorage {
  private readonly items = new Map<string, string>();
  getItem(key: string): string | null {
    return this.items.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    this.items.set(key, String(value));
  }
  removeItem(key: string): void {
    this.items.delete(key);
  }
}

/**
 * `globalThis.localStorage` when there is one (browsers), else a
 * `MemoryStorage`. Note that a `localStorage` key is shared by every tab of the
 * origin: give each tab its own `storagePrefix`, or use `sessionStorage`, since
 * a second connection with the same key takes the session over (close 4005).
 */
export function browserStorage(): KeyValueStorage {
  try {
    const ls = (globalThis as { localStorage?: KeyValueStorage }).localStorage;
    if (ls) return ls;
  } catch {
    // Access denied (privacy settings, sandboxed iframe): fall back to memory.
  }
  return new MemoryStorage();
}
