/**
 * The only runtime dependency is a WebSocket: the browser's (and Node 22+'s)
 * global `WebSocket`, else the `ws` package, imported on first use. `ws` is an
 * optional peer dependency: a browser bundle never loads it, and Node 22+
 * does not need it.
 */

/** The part of the WHATWG WebSocket interface the client uses (`ws` implements it too). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export const OPEN = 1;

export async function resolveWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return given;
  const g = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (typeof g === 'function') return g as WebSocketConstructor;
  // A variable specifier keeps bundlers from pulling `ws` into browser builds.
  const name = 'ws';
  try {
    const m = (await import(/* @vite-ignore */ /* webpackIgnore: true */ name)) as {
      WebSocket?: WebSocketConstructor;
      default?: WebSocketConstructor;
    };
    const ctor = m.WebSocket ?? m.default;
    if (typeof ctor === 'function') return ctor;
  } catch {
    // Reported below.
  }
  throw new Error('no WebSocket implementation: install the `ws` package (Node before 22) or pass `WebSocket` in the options');
}
