import { ActionError, type ErrorCode } from './errors.js';
import type { ActionDetailsMap, ActionName, NotificationDataMap, NotificationType } from './generated/types.js';
import { NOTIFICATION_TYPES } from './generated/types.js';
import { Backoff, ReconnectPolicy, retryAction, Seen } from './policy.js';
import { OPEN, resolveWebSocket, type WebSocketConstructor, type WebSocketLike } from './socket.js';
import { MemoryStorage, type KeyValueStorage } from './storage.js';

/** The connection's state. */
export type State = 'connecting' | 'connected' | 'disconnected' | 'closed';

/** One notification, typed by its id. */
export interface Notification<K extends NotificationType = NotificationType> {
  type: K;
  uuid: string;
  /** Per session, strictly increasing in delivery order. */
  seq: number;
  data: NotificationDataMap[K];
}

/** Any notification: a union discriminated by `type`. */
export type AnyNotification = { [K in NotificationType]: Notification<K> }[NotificationType];

export interface AgentRef {
  tenant_guid: string;
  agent_guid: string;
  ir_instance: string;
}

/** What `hello_reply` said, plus where the client is connected. */
export interface ConnectedInfo {
  sessionId: string;
  resumed: boolean;
  longLived: boolean;
  autoAccept: boolean;
  /** On resume: notifications the mailbox dropped while the client was away. */
  dropped: number;
  heartbeatIntervalSeconds: number;
  sessionTtlSeconds: number;
  agent: AgentRef;
  endpoint: string;
}

/** Why a connection ended. `code`: the WebSocket close code (1006 when it dropped without one), `null` when no socket was open (token, discovery, connect failed). */
export interface CloseInfo {
  code: number | null;
  reason: string;
}

export interface DisconnectedInfo extends CloseInfo {
  /** ms until the next attempt; `null` when the client stops (a `closed` event follows). */
  retryInMs: number | null;
}

export type StateInfo = ConnectedInfo | DisconnectedInfo | CloseInfo | undefined;

export interface ClientOptions {
  /** Discovery (`http(s)://…/v1/discovery`, the usual) or the WebSocket endpoint itself (`ws(s)://…/ws/v1`). */
  url: string;
  /**
   * Called before each connection attempt: so at once after a 4002 (token
   * expired) that ends a connection that lived, through the backoff after a
   * 4002 that follows a refresh, and after a 4001 that follows a refresh (an
   * expired token from the provider: retried 3 times, then the client stops).
   */
  getToken: () => string | Promise<string>;
  /** A long-lived session, resumed with its stored key (default false). */
  longLived?: boolean;
  autoAccept?: boolean;
  /** The tenant to log into, for tokens that serve several. */
  tenantGuid?: string;
  /** Push announcements while disconnected (long-lived sessions). */
  push?: { provider: 'webhook'; token: string } | null;
  client?: { name?: string; version?: string };
  /** Where the session key and the last handled uuids are kept (default: memory). `localStorage` fits as it is. */
  storage?: KeyValueStorage;
  /** Prefix of the storage keys (default `cceb:`): one per agent/tab sharing a storage. */
  storagePrefix?: string;
  /**
   * Reconnect delay: `minMs` doubling up to `maxMs`, jittered (default 500 → 20000).
   * `stableAfterMs`: how long a connection must stay up before the delay starts
   * from `minMs` again (default 10000).
   */
  backoff?: { minMs?: number; maxMs?: number; stableAfterMs?: number };
  /** Longest wait for the token, discovery, the WebSocket handshake and `hello_reply` (default 10000). */
  connectTimeoutMs?: number;
  /** How long `action()` keeps trying before rejecting with `timeout` (default 30000; `Infinity`: until closed). */
  actionDeadlineMs?: number;
  /** First wait before an action refused with a transient code is sent again (doubles up to `backoff.maxMs`; default 200). */
  actionRetryMinMs?: number;
  /** Notification uuids remembered to suppress redeliveries (default 4096). */
  seenCapacity?: number;
  /** Handled uuids written to `storage`, for a resume after a reload (default 256; 0: none). */
  persistSeen?: number;
  /**
   * App-level liveness (contract section 1: `ping` → `pong`), for runtimes that
   * cannot see protocol pings (browsers): after `intervalMs` without any frame
   * from the bridge the client sends `ping`; no frame within `timeoutMs` after
   * it ends the connection and reconnects. `intervalMs` defaults to the
   * bridge's `heartbeat_interval_seconds`; `timeoutMs` to 10000. `false`: off.
   */
  ping?: { intervalMs?: number; timeoutMs?: number } | false;
  /** A WebSocket constructor (default: the global one, else the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** `fetch` for discovery (default: the global one). */
  fetch?: typeof fetch;
  /** Random source in [0, 1) for backoff jitter (tests). */
  random?: () => number;
}

/** The handler of a notification: the ack is sent once its result settles. */
export type NotificationHandler<K extends NotificationType> = (n: Notification<K>) => unknown;

export interface ClientEvents {
  state: (state: State, info: StateInfo) => void;
  connecting: () => void;
  connected: (info: ConnectedInfo) => void;
  disconnected: (info: DisconnectedInfo) => void;
  /** The last event: the client stopped and will not reconnect. */
  closed: (info: CloseInfo) => void;
  /** Every notification, after the handlers of its type (in one sequence with them). */
  notification: (n: AnyNotification) => unknown;
  /** A handler that threw, a storage failure, an `error` frame for no pending action. */
  error: (err: unknown) => void;
}

interface Slot {
  uuid: string;
  frame: string;
  resolve: () => void;
  reject: (e: ActionError) => void;
  retries: Backoff;
  retryTimer?: ReturnType<typeof setTimeout>;
  deadlineTimer?: ReturnType<typeof setTimeout>;
  promise: Promise<void>;
}

interface Ended extends CloseInfo {
  /** Stop whatever the code says (discovery refused the token, close()). */
  stop?: boolean;
  /** The endpoint could not be reached: ask discovery again. */
  unreachable?: boolean;
}

interface Conn {
  ws: WebSocketLike;
  endpoint: string;
  /** Resolves once when the connection ends. */
  ended: Promise<Ended>;
  end: (e: Ended) => void;
  /** `hello_reply` arrived. */
  ready: boolean;
  lastFrameAt: number;
  timers: Array<ReturnType<typeof setTimeout>>;
  pongTimer?: ReturnType<typeof setTimeout>;
}

const isWs = (url: string) => url.startsWith('ws://') || url.startsWith('wss://');

/**
 * A client of the CCEB contract: discovery, `hello`, resume with the stored
 * key, notifications handed to typed handlers and acked once they settle
 * (redeliveries suppressed), actions that resolve on `ack`, reconnect with
 * jittered backoff.
 *
 * ```ts
 * const client = new CcebClient({ url, getToken, longLived: true, storage: localStorage });
 * client.on('interaction_update', async (n) => show(n.data.interaction_id, n.data.state));
 * client.on('closed', ({ code, reason }) => console.warn('stopped', code, reason));
 * client.connect();
 * await client.action('ChangeAgentStateEvent', { state: 'Available' });
 * ```
 */
export class CcebClient {
  private readonly opts: ClientOptions;
  private readonly storage: KeyValueStorage;
  private readonly prefix: string;
  private readonly reconnects: ReconnectPolicy;
  private readonly seen: Seen;
  private readonly listeners = new Map<string, Set<(...a: never[]) => unknown>>();
  private readonly actions = new Map<string, Slot>();
  private readonly queue: Array<{ type: NotificationType; uuid: string; seq: number; data: unknown }> = [];
  private pumping = false;
  private _state: State = 'disconnected';
  private started = false;
  private stopped = false;
  private conn: Conn | null = null;
  private endpoint: string | null;
  private wake: (() => void) | null = null;
  private persistTimer?: ReturnType<typeof setTimeout>;
  private restored = false;
  private _sessionId: string | null = null;
  /** The `end_session` in flight: its uuid, whether the bridge acked it, and the caller's promise. */
  private ending: { uuid: string; acked: boolean; confirmed: boolean; promise: Promise<void>; resolve: () => void; reject: (e: ActionError) => void } | null = null;
  /** When the current connection got its `hello_reply` (for `backoff.stableAfterMs`). */
  private connectedAt: number | null = null;
  /** Set by `close()`: the reason reported when the client stops. */
  private stopInfo: CloseInfo | null = null;

  constructor(opts: ClientOptions) {
    if (!opts || typeof opts.url !== 'string') throw new TypeError('CcebClient: `url` is required');
    if (typeof opts.getToken !== 'function') throw new TypeError('CcebClient: `getToken` is required');
    this.opts = opts;
    this.storage = opts.storage ?? new MemoryStorage();
    this.prefix = opts.storagePrefix ?? 'cceb:';
    const random = opts.random ?? Math.random;
    const backoff = new Backoff(opts.backoff?.minMs ?? 500, opts.backoff?.maxMs ?? 20_000, random);
    this.reconnects = new ReconnectPolicy(backoff, opts.backoff?.stableAfterMs ?? 10_000);
    this.seen = new Seen(opts.seenCapacity ?? 4096);
    this.endpoint = isWs(opts.url) ? opts.url : null;
  }

  /** The current state (`disconnected` before `connect()`). */
  get state(): State {
    return this._state;
  }

  /** The session of the current or last connection. */
  get sessionId(): string | null {
    return this._sessionId;
  }

  /**
   * Subscribes to an event or to a notification id. Returns the unsubscribe
   * function. Register handlers before `connect()`: a notification with no
   * handler of its type is acked once the `notification` listeners settle.
   */
  on<K extends NotificationType>(type: K, fn: NotificationHandler<K>): () => void;
  on<E extends keyof ClientEvents>(event: E, fn: ClientEvents[E]): () => void;
  on(event: string, fn: (...args: never[]) => unknown): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => void set.delete(fn);
  }

  off<K extends NotificationType>(type: K, fn: NotificationHandler<K>): void;
  off<E extends keyof ClientEvents>(event: E, fn: ClientEvents[E]): void;
  off(event: string, fn: (...args: never[]) => unknown): void {
    this.listeners.get(event)?.delete(fn);
  }

  /** Resolves with the arguments of the next `event`. */
  once<E extends keyof ClientEvents>(event: E): Promise<Parameters<ClientEvents[E]>> {
    return new Promise((resolve) => {
      const off = this.on(event, ((...args: Parameters<ClientEvents[E]>) => {
        off();
        resolve(args);
      }) as ClientEvents[E]);
    });
  }

  /** Starts connecting (in the background); idempotent. */
  connect(): void {
    if (this.started) return;
    this.started = true;
    this.run().catch((e: unknown) => {
      // A bug, not a connection failure: report it and stop rather than loop.
      this.emit('error', e);
      if (this._state !== 'closed') this.finish({ code: null, reason: `internal error: ${message(e)}` });
    });
  }

  /**
   * Sends `name` with `details` (the record's fields, camelCase) and resolves
   * on its `ack`. Rejects with an `ActionError` carrying the contract code and
   * field. Sent again under the same uuid after `backend_unavailable` /
   * `rate_limited` (with backoff) and after every reconnect until it is
   * acknowledged, refused for good, or `deadlineMs` passes; the bridge
   * deduplicates by uuid, so it is published once. Before the client is
   * connected the action waits for the connection.
   */
  action<N extends ActionName>(name: N, details: ActionDetailsMap[N], opts?: { uuid?: string; deadlineMs?: number }): Promise<void>;
  /** An action this package has no type for (an operator's own record set, or a name known only at run time), untyped. */
  action<N extends string>(
    name: N & (N extends ActionName ? never : unknown),
    details?: Record<string, unknown>,
    opts?: { uuid?: string; deadlineMs?: number },
  ): Promise<void>;
  action(name: string, details?: object, opts: { uuid?: string; deadlineMs?: number } = {}): Promise<void> {
    const uuid = opts.uuid ?? newUuid();
    const existing = this.actions.get(uuid);
    if (existing) return existing.promise;
    if (this.stopped) return Promise.reject(new ActionError('closed', 'the client is closed', undefined, uuid));
    if (details !== undefined && (details === null || typeof details !== 'object' || Array.isArray(details))) {
      return Promise.reject(new ActionError('invalid_message', '`action_details` must be an object', 'data.action_details', uuid));
    }
    const frame = JSON.stringify({ type: 'action', uuid, data: { action: name, action_details: details ?? {} } });
    let resolve!: () => void;
    let reject!: (e: ActionError) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const retryMin = this.opts.actionRetryMinMs ?? 200;
    const slot: Slot = {
      uuid,
      frame,
      resolve,
      reject,
      promise,
      retries: new Backoff(retryMin, Math.max(retryMin, this.opts.backoff?.maxMs ?? 20_000), this.opts.random),
    };
    const deadline = opts.deadlineMs ?? this.opts.actionDeadlineMs ?? 30_000;
    if (Number.isFinite(deadline)) {
      slot.deadlineTimer = setTimeout(() => {
        this.settle(uuid, new ActionError('timeout', `no ack within ${deadline} ms (it may have been published: retry with the same uuid)`, undefined, uuid));
      }, deadline);
    }
    this.actions.set(uuid, slot);
    this.sendIfReady(frame);
    return promise;
  }

  /**
   * Ends a long-lived session at once (`end_session`): the bridge drops its
   * mailbox and closes with 1000, the stored key is forgotten, and the client
   * stops. Resolves once the client is closed.
   *
   * Rejects with an `ActionError` when the bridge refuses it (an `error`
   * frame, e.g. `backend_unavailable` while its store cannot write): the
   * session and its stored key stay, the client stays connected, and
   * `endSession()` may be called again. Rejects with `closed` when the
   * connection ends without the bridge confirming it (the key is kept; the
   * client stops, as it would not resume a session the user ended).
   * Not connected: the key is forgotten and the client closes; the bridge ends
   * the session at its TTL.
   */
  async endSession(): Promise<void> {
    if (this.ending) return this.ending.promise;
    const c = this.conn;
    if (!(c?.ready && c.ws.readyState === OPEN && !this.stopped)) {
      await this.forgetSession();
      this.close();
      return;
    }
    const uuid = newUuid();
    let resolve!: () => void;
    let reject!: (e: ActionError) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const ending = { uuid, acked: false, confirmed: false, promise, resolve, reject };
    this.ending = ending;
    try {
      c.ws.send(JSON.stringify({ type: 'end_session', uuid }));
    } catch {
      // The close event follows, and says how it ended.
    }
    return promise;
  }

  /** Closes the connection (1000) and stops; a long-lived session stays resumable for its TTL with the stored key. */
  close(): void {
    if (this.stopped) return;
    this.stopped = true;
    const c = this.conn;
    this.stopInfo = { code: c?.ws.readyState === OPEN ? 1000 : null, reason: 'closed by the client' };
    if (c) {
      // Detached first: closing may report an error or a close synchronously.
      c.end({ code: 1000, reason: 'closed by the client', stop: true });
      try {
        c.ws.close(1000, 'client closed');
      } catch {
        // Already closing.
      }
    }
    this.wake?.();
    if (!this.started) this.finish(this.stopInfo);
  }

  // ---- the connection loop

  private async run(): Promise<void> {
    let last: CloseInfo | null = null;
    while (!this.stopped) {
      this.setState('connecting', undefined);
      this.connectedAt = null;
      const ended = await this.attempt();
      const livedMs = this.connectedAt === null ? null : Date.now() - this.connectedAt;
      last = this.stopInfo ?? { code: ended.code, reason: ended.reason };
      if (this.ending) {
        // Whatever ended the connection, the client stops: no new session behind the user's back.
        const ending = this.ending;
        // The ack, or the close 1000 that follows it (not one of close()).
        if (ending.acked || (ended.code === 1000 && !this.stopInfo)) {
          ending.confirmed = true;
          await this.forgetSession();
        }
      }
      const decision = ended.stop || this.stopped || this.ending ? { kind: 'stop' as const } : this.reconnects.ended(ended.code, livedMs);
      if (decision.kind === 'stop') {
        this.setState('disconnected', { ...last, retryInMs: null });
        break;
      }
      if ((decision.rediscover || ended.unreachable) && !isWs(this.opts.url)) this.endpoint = null;
      const delay = decision.delayMs;
      this.setState('disconnected', { ...last, retryInMs: delay });
      if (delay > 0) await this.sleep(delay);
    }
    // Stopped while waiting for the next attempt: close() says why.
    this.finish(this.stopInfo ?? last ?? { code: null, reason: 'closed by the client' });
  }

  private finish(info: CloseInfo): void {
    this.stopped = true;
    clearTimeout(this.persistTimer);
    void this.persistSeen();
    for (const slot of [...this.actions.values()]) {
      this.settle(slot.uuid, new ActionError('closed', `the client is closed (${info.reason})`, undefined, slot.uuid));
    }
    this.queue.length = 0;
    const ending = this.ending;
    this.ending = null;
    this.setState('closed', info);
    if (ending?.confirmed) ending.resolve();
    else if (ending) {
      ending.reject(new ActionError('closed', `the client closed before end_session was confirmed (${info.reason}); the session key is kept`, undefined, ending.uuid));
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.wake = () => {
        this.wake = null;
        done();
      };
    });
  }

  private setState(state: State, info: StateInfo): void {
    this._state = state;
    this.emit('state', state, info);
    if (state === 'connecting') this.emit('connecting');
    else if (state === 'connected') this.emit('connected', info as ConnectedInfo);
    else if (state === 'disconnected') this.emit('disconnected', info as DisconnectedInfo);
    else this.emit('closed', info as CloseInfo);
  }

  private timeout<T>(p: Promise<T>, what: string): Promise<T> {
    const ms = this.opts.connectTimeoutMs ?? 10_000;
    let t: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    });
    return Promise.race([p, expired]).finally(() => clearTimeout(t));
  }

  /** One connection, from the token to its end. */
  private async attempt(): Promise<Ended> {
    let token: string;
    try {
      token = await this.timeout(Promise.resolve().then(() => this.opts.getToken()), 'getToken');
      if (typeof token !== 'string' || !token) throw new Error('getToken gave no token');
    } catch (e) {
      return { code: null, reason: `token provider: ${message(e)}` };
    }
    if (this.stopped) return { code: null, reason: 'closed by the client', stop: true };
    if (!this.restored) {
      this.restored = true;
      await this.restoreSeen();
    }
    let endpoint = this.endpoint;
    if (!endpoint) {
      const found = await this.discover(token);
      if ('code' in found) return found;
      endpoint = this.endpoint = found.endpoint;
    }
    if (this.stopped) return { code: null, reason: 'closed by the client', stop: true };
    let Ctor: WebSocketConstructor;
    try {
      Ctor = await resolveWebSocket(this.opts.WebSocket);
    } catch (e) {
      return { code: null, reason: message(e), stop: true };
    }
    let sessionKey: string | null = null;
    if (this.opts.longLived) {
      try {
        sessionKey = (await this.storage.getItem(this.prefix + 'session_key')) ?? null;
      } catch (e) {
        this.emit('error', e);
      }
    }
    let ws: WebSocketLike;
    try {
      ws = new Ctor(endpoint);
    } catch (e) {
      return { code: null, reason: `connect ${endpoint}: ${message(e)}`, unreachable: true };
    }
    let end!: (e: Ended) => void;
    const ended = new Promise<Ended>((resolve) => {
      let done = false;
      end = (e) => {
        if (done) return;
        done = true;
        this.detach(c);
        resolve(e);
      };
    });
    const c: Conn = { ws, endpoint, ended, end, ready: false, lastFrameAt: Date.now(), timers: [] };
    this.conn = c;
    let opened = false;
    let refused = '';
    const helloUuid = newUuid();
    const handshake = setTimeout(() => {
      end({ code: null, reason: opened ? 'no hello_reply in time' : `connect ${endpoint}: timed out`, unreachable: !opened });
      try {
        ws.close();
      } catch {}
    }, this.opts.connectTimeoutMs ?? 10_000);
    c.timers.push(handshake);
    ws.onopen = () => {
      opened = true;
      const data: Record<string, unknown> = {
        token,
        long_lived: !!this.opts.longLived,
        session_key: sessionKey,
        auto_accept: !!this.opts.autoAccept,
        push: this.opts.push ?? null,
        client: { name: this.opts.client?.name ?? '@cceb/client', version: this.opts.client?.version ?? VERSION },
      };
      if (this.opts.tenantGuid) data.tenant_guid = this.opts.tenantGuid;
      ws.send(JSON.stringify({ type: 'hello', uuid: helloUuid, data }));
    };
    ws.onerror = () => {
      // Browsers and `ws` follow an error with the close event, which has the
      // code. Not every implementation does: Node 20's experimental WebSocket
      // reports a refused connection with an error alone, and stays CONNECTING.
      if (!opened) {
        // Detached first: closing may report another error, synchronously.
        end({ code: null, reason: `could not connect to ${endpoint}`, unreachable: true });
        try {
          ws.close();
        } catch {}
      } else {
        c.timers.push(setTimeout(() => end({ code: 1006, reason: 'the socket failed' }), 1000));
      }
    };
    ws.onclose = (ev) => {
      const code = typeof ev?.code === 'number' ? ev.code : 1006;
      const reason = refused || ev?.reason || (opened ? 'the socket closed' : `could not connect to ${endpoint}`);
      end({ code: opened ? code : null, reason, unreachable: !opened });
    };
    ws.onmessage = (ev) => {
      c.lastFrameAt = Date.now();
      clearTimeout(c.pongTimer);
      c.pongTimer = undefined;
      if (typeof ev.data !== 'string') return;
      let msg: { type?: unknown; uuid?: unknown; seq?: unknown; data?: unknown };
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return; // Not the contract: ignore, as a newer bridge may send what this client does not know.
      }
      if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') return;
      if (!c.ready) {
        if (msg.type === 'hello_reply') {
          clearTimeout(handshake);
          this.onHelloReply(c, (msg.data ?? {}) as Record<string, unknown>);
        } else if (msg.type === 'error') {
          const d = (msg.data ?? {}) as { code?: string; message?: string };
          refused = `${d.code ?? 'error'}: ${d.message ?? ''}`;
        }
        return;
      }
      this.onMessage(c, msg as { type: string; uuid?: unknown; seq?: unknown; data?: unknown });
    };
    const r = await ended;
    return this.stopped ? { ...r, stop: true } : r;
  }

  private detach(c: Conn): void {
    for (const t of c.timers) {
      clearTimeout(t);
      clearInterval(t);
    }
    clearTimeout(c.pongTimer);
    // No-ops rather than null: `ws` throws an 'error' event nobody listens to
    // (a socket closed while still connecting reports one after the fact).
    const ignore = () => {};
    c.ws.onopen = c.ws.onmessage = c.ws.onclose = c.ws.onerror = ignore;
    if (this.conn === c) this.conn = null;
    for (const slot of this.actions.values()) {
      clearTimeout(slot.retryTimer);
      slot.retryTimer = undefined;
    }
  }

  private async discover(token: string): Promise<{ endpoint: string } | Ended> {
    const f = this.opts.fetch ?? (globalThis.fetch as typeof fetch | undefined);
    if (!f) return { code: null, reason: 'no fetch for discovery: pass `fetch` or a ws:// url', stop: true };
    const ac = typeof AbortController === 'function' ? new AbortController() : undefined;
    try {
      const res = await this.timeout(
        f(this.opts.url, { headers: { Authorization: `Bearer ${token}` }, signal: ac?.signal }),
        'discovery',
      );
      if (res.status === 401) return { code: null, reason: 'discovery refused the token (401)', stop: true };
      if (!res.ok) return { code: null, reason: `discovery answered ${res.status}` };
      const body = (await this.timeout(res.json(), 'discovery')) as { endpoint?: unknown };
      if (typeof body?.endpoint !== 'string' || !isWs(body.endpoint)) {
        return { code: null, reason: 'discovery: no ws(s):// `endpoint` in the answer' };
      }
      return { endpoint: body.endpoint };
    } catch (e) {
      ac?.abort();
      return { code: null, reason: `discovery: ${message(e)}` };
    }
  }

  private onHelloReply(c: Conn, d: Record<string, unknown>): void {
    const key = typeof d.session_key === 'string' ? d.session_key : null;
    // Not awaited: the notifications that follow hello_reply are handled meanwhile.
    void (async () => {
      if (key) await this.storage.setItem(this.prefix + 'session_key', key);
      else if (!this.opts.longLived) await this.storage.removeItem(this.prefix + 'session_key');
    })().catch((e) => this.emit('error', e));
    c.ready = true;
    this.connectedAt = Date.now();
    this._sessionId = String(d.session_id ?? '');
    const heartbeat = Number(d.heartbeat_interval_seconds) || 25;
    const info: ConnectedInfo = {
      sessionId: this._sessionId,
      resumed: d.resumed === true,
      longLived: d.long_lived === true,
      autoAccept: d.auto_accept === true,
      dropped: Number(d.dropped) || 0,
      heartbeatIntervalSeconds: heartbeat,
      sessionTtlSeconds: Number(d.session_ttl_seconds) || 0,
      agent: (d.agent ?? {}) as AgentRef,
      endpoint: c.endpoint,
    };
    this.setState('connected', info);
    if (this.conn !== c) return;
    // Everything not yet acknowledged goes again, same uuids, in the order it was asked for.
    for (const slot of this.actions.values()) c.ws.send(slot.frame);
    this.startLiveness(c, heartbeat * 1000);
  }

  private startLiveness(c: Conn, heartbeatMs: number): void {
    if (this.opts.ping === false) return;
    const interval = Math.max(10, this.opts.ping?.intervalMs ?? heartbeatMs);
    const timeout = Math.max(10, this.opts.ping?.timeoutMs ?? 10_000);
    const tick = setInterval(() => {
      if (c.pongTimer || Date.now() - c.lastFrameAt < interval) return;
      try {
        c.ws.send(JSON.stringify({ type: 'ping', uuid: newUuid() }));
      } catch {
        return;
      }
      c.pongTimer = setTimeout(() => {
        c.end({ code: null, reason: `no answer to ping within ${timeout} ms` });
        try {
          const t = (c.ws as { terminate?: () => void }).terminate;
          if (typeof t === 'function') t.call(c.ws);
          else c.ws.close(4000, 'liveness timeout');
        } catch {}
      }, timeout);
    }, Math.max(10, Math.min(interval, timeout) / 2));
    c.timers.push(tick);
  }

  private onMessage(c: Conn, msg: { type: string; uuid?: unknown; seq?: unknown; data?: unknown }): void {
    const uuid = typeof msg.uuid === 'string' ? msg.uuid : '';
    switch (msg.type) {
      case 'ack': {
        if (uuid && uuid === this.ending?.uuid) {
          // The session is gone at the bridge; the close 1000 follows.
          this.ending.acked = true;
          void this.forgetSession();
          return;
        }
        const slot = this.actions.get(uuid);
        if (slot) this.settle(uuid, null);
        return;
      }
      case 'error': {
        const d = (msg.data ?? {}) as { code?: string; message?: string; field?: string };
        const code = (d.code ?? 'invalid_message') as ErrorCode;
        const ending = this.ending;
        if (uuid && ending && uuid === ending.uuid && !ending.acked) {
          // Refused (the store cannot write, say): the session goes on, and so does the client.
          this.ending = null;
          ending.reject(new ActionError(code, d.message ?? '', d.field, uuid));
          return;
        }
        const slot = this.actions.get(uuid);
        if (!slot) {
          this.emit('error', new ActionError(code, d.message ?? '', d.field, uuid || undefined));
          return;
        }
        if (retryAction(code)) {
          const delay = slot.retries.next();
          clearTimeout(slot.retryTimer);
          slot.retryTimer = setTimeout(() => {
            slot.retryTimer = undefined;
            if (this.conn === c && this.actions.get(uuid) === slot) this.sendIfReady(slot.frame);
          }, delay);
          return;
        }
        this.settle(uuid, new ActionError(code, d.message ?? '', d.field, uuid));
        return;
      }
      case 'pong':
      case 'hello_reply':
        return;
      default: {
        if (!(NOTIFICATION_TYPES as readonly string[]).includes(msg.type) || !uuid) return;
        switch (this.seen.offer(uuid)) {
          case 'handle':
            this.queue.push({ type: msg.type as NotificationType, uuid, seq: Number(msg.seq) || 0, data: msg.data ?? {} });
            void this.pump();
            return;
          case 'ack-again':
            this.sendIfReady(JSON.stringify({ type: 'ack', uuid }));
            return;
          case 'ignore':
            return;
        }
      }
    }
  }

  /** Hands notifications over one at a time, in order; each is acked once its handlers settle. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length && !this.stopped) {
        const n = this.queue.shift()!;
        const handlers = [...(this.listeners.get(n.type) ?? []), ...(this.listeners.get('notification') ?? [])];
        const results = await Promise.allSettled(
          handlers.map((h) => new Promise((resolve) => resolve((h as (x: unknown) => unknown)(n)))),
        );
        for (const r of results) if (r.status === 'rejected') this.emit('error', r.reason);
        if (this.stopped) break;
        this.seen.finished(n.uuid);
        // On the connection of the moment: after a reconnect the bridge has it
        // in the mailbox again, and the ack clears it there.
        this.sendIfReady(JSON.stringify({ type: 'ack', uuid: n.uuid }));
        this.schedulePersist();
      }
    } finally {
      this.pumping = false;
    }
  }

  private sendIfReady(frame: string): void {
    const c = this.conn;
    if (!c?.ready || c.ws.readyState !== OPEN) return;
    try {
      c.ws.send(frame);
    } catch {
      // The close event follows; what is pending goes again after the reconnect.
    }
  }

  private settle(uuid: string, err: ActionError | null): void {
    const slot = this.actions.get(uuid);
    if (!slot) return;
    this.actions.delete(uuid);
    clearTimeout(slot.retryTimer);
    clearTimeout(slot.deadlineTimer);
    if (err) slot.reject(err);
    else slot.resolve();
  }

  private emit(event: string, ...args: unknown[]): void {
    for (const fn of [...(this.listeners.get(event) ?? [])]) {
      try {
        (fn as (...a: unknown[]) => unknown)(...args);
      } catch (e) {
        if (event !== 'error') this.emit('error', e);
      }
    }
  }

  // ---- handled uuids across reloads

  private schedulePersist(): void {
    if ((this.opts.persistSeen ?? 256) <= 0 || this.persistTimer) return;
    this.persistTimer = setTimeout(() => {
      this.persistTimer = undefined;
      void this.persistSeen();
    }, 250);
  }

  private async persistSeen(): Promise<void> {
    const n = this.opts.persistSeen ?? 256;
    if (n <= 0 || !this.opts.longLived) return;
    try {
      await this.storage.setItem(this.prefix + 'handled', JSON.stringify(this.seen.recentFinished(n)));
    } catch (e) {
      this.emit('error', e);
    }
  }

  private async restoreSeen(): Promise<void> {
    if ((this.opts.persistSeen ?? 256) <= 0 || !this.opts.longLived) return;
    try {
      const raw = await this.storage.getItem(this.prefix + 'handled');
      const list: unknown = raw ? JSON.parse(raw) : [];
      if (Array.isArray(list)) this.seen.restore(list.filter((x): x is string => typeof x === 'string'));
    } catch (e) {
      this.emit('error', e);
    }
  }

  private async forgetSession(): Promise<void> {
    try {
      await this.storage.removeItem(this.prefix + 'session_key');
      await this.storage.removeItem(this.prefix + 'handled');
    } catch (e) {
      this.emit('error', e);
    }
  }
}

export const VERSION = '0.1.0';

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** A random (version 4) UUID. */
export function newUuid(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (typeof c?.randomUUID === 'function') return c.randomUUID();
  const b = new Uint8Array(16);
  if (typeof c?.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
