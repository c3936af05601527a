/**
 * The pure part of the client: reconnect backoff, what a close code means,
 * which action errors are retried, and duplicate suppression. No IO, no clock:
 * the randomness is injected, so all of it is unit-tested without real time.
 * Mirrors `crates/cceb-client/src/policy.rs`.
 */

/**
 * Jittered exponential backoff ("equal jitter"): attempt `n` waits a random
 * time in `[base/2, base]` where `base = min(max, min * 2^n)`. Never zero,
 * never above the cap, and clients that lost the same bridge spread out.
 */
export class Backoff {
  readonly minMs: number;
  readonly maxMs: number;
  private n = 0;

  constructor(minMs: number, maxMs: number, private readonly random: () => number = Math.random) {
    if (!(minMs > 0) || !Number.isFinite(minMs)) throw new RangeError(`backoff minimum must be a positive number of ms, got ${minMs}`);
    this.minMs = minMs;
    // A maximum below the minimum is raised to it.
    this.maxMs = Math.max(minMs, maxMs);
  }

  /** The cap of attempt `n`, before jitter. */
  base(attempt: number): number {
    // 2^31 * min is beyond any cap worth having; stop doubling there.
    return Math.min(this.maxMs, this.minMs * 2 ** Math.min(attempt, 31));
  }

  /** The next delay in ms; `jitter` in [0, 1] (the injected random source by default). */
  next(jitter: number = this.random()): number {
    const base = this.base(this.n);
    this.n = Math.min(this.n + 1, Number.MAX_SAFE_INTEGER);
    const j = Number.isFinite(jitter) ? Math.min(1, Math.max(0, jitter)) : 1;
    return base * (0.5 + 0.5 * j);
  }

  /** After a connection that was stable: the next failure starts from the minimum again. */
  reset(): void {
    this.n = 0;
  }

  get attempt(): number {
    return this.n;
  }
}

/** What the client does after its connection ended. */
export type AfterClose =
  /**
   * Connect again. `rediscover`: ask discovery for the endpoint again (1012).
   * `refreshToken`: get a new token and connect at once, without backoff (4002).
   */
  | { kind: 'reconnect'; rediscover: boolean; refreshToken: boolean }
  /** Stop for good: the client reports `closed` and fails what is pending. */
  | { kind: 'stop' };

/** Close codes of the contract (section 7) and of this bridge (docs/PROTOCOL.md). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  SERVICE_RESTART: 1012,
  UNAUTHORIZED: 4001,
  TOKEN_EXPIRED: 4002,
  HELLO_TIMEOUT: 4003,
  TOO_MANY_UNACKED: 4004,
  TAKEN_OVER: 4005,
  TOO_MANY_SESSIONS: 4006,
} as const;

/**
 * Contract section 7 from a client's side. `null`: there was no close frame
 * (no socket, or it dropped: network, crash): reconnect.
 */
export function afterClose(code: number | null): AfterClose {
  switch (code) {
    // The session ended (`end_session`) or the client closed: nothing to resume.
    case CloseCode.NORMAL:
    // The token was refused; the same token would be refused again.
    case CloseCode.UNAUTHORIZED:
    // Another connection holds the session now; taking it back would make the two fight.
    case CloseCode.TAKEN_OVER:
    // Every allowed session of the agent is connected; retrying cannot help.
    case CloseCode.TOO_MANY_SESSIONS:
    // Frames this client should never send; resending them would loop.
    case CloseCode.UNSUPPORTED_DATA:
    case CloseCode.MESSAGE_TOO_BIG:
      return { kind: 'stop' };
    case CloseCode.SERVICE_RESTART:
      return { kind: 'reconnect', rediscover: true, refreshToken: false };
    case CloseCode.TOKEN_EXPIRED:
      return { kind: 'reconnect', rediscover: false, refreshToken: true };
    // 4003 (hello too late), 4004 (window stalled: the mailbox keeps all), 1001, 1006, ...
    default:
      return { kind: 'reconnect', rediscover: false, refreshToken: false };
  }
}

/** What to do once a connection ended: `afterClose` plus how long to wait. */
export type Reconnect =
  | { kind: 'reconnect'; rediscover: boolean; refreshToken: boolean; delayMs: number }
  | { kind: 'stop' };

/**
 * The reconnect decision with its history, so that a token provider handing
 * out an (almost) expired token cannot make the client hot-loop:
 *
 * - the backoff is reset only by a connection that stayed up `stableAfterMs`
 *   (not by `hello_reply`: the bridge may close at once after it);
 * - 4002 after a connection that lived, or the first 4002: a new token and
 *   reconnect at once;
 * - 4002 again after a 4002 refresh, the connection not having lived: a new
 *   token, through the backoff;
 * - 4001 after a 4002 refresh (the provider handed an expired token): a new
 *   token through the backoff, at most `expiredTokenRetries` times in a row,
 *   then stop (a 4001 otherwise stops at once, as `afterClose` says).
 *
 * Pure: the caller says how long the connection lived; the randomness is the
 * backoff's.
 */
export class ReconnectPolicy {
  /** The last connection ran on a token fetched because of a 4002 (or a 4001 after one). */
  private refreshed = false;
  private expiredRetries = 0;

  constructor(
    readonly backoff: Backoff,
    readonly stableAfterMs = 10_000,
    readonly expiredTokenRetries = 3,
  ) {}

  /**
   * `code`: the close code (`null`: no close frame); `livedMs`: how long the
   * connection was up after `hello_reply` (`null`: it never got there).
   */
  ended(code: number | null, livedMs: number | null): Reconnect {
    if (livedMs !== null && livedMs >= this.stableAfterMs) {
      this.backoff.reset();
      this.refreshed = false;
      this.expiredRetries = 0;
    }
    const d = afterClose(code);
    if (code === CloseCode.TOKEN_EXPIRED) {
      const again = this.refreshed;
      this.refreshed = true;
      return { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: again ? this.backoff.next() : 0 };
    }
    if (code === CloseCode.UNAUTHORIZED && this.refreshed && this.expiredRetries < this.expiredTokenRetries) {
      this.expiredRetries++;
      return { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: this.backoff.next() };
    }
    this.refreshed = false;
    this.expiredRetries = 0;
    if (d.kind === 'stop') return d;
    return { ...d, delayMs: this.backoff.next() };
  }
}

/** Whether an action refused with `code` is sent again with the same uuid. */
export function retryAction(code: string): boolean {
  return code === 'backend_unavailable' || code === 'rate_limited';
}

/** What to do with a notification frame. */
export type Delivery =
  /** New: hand it to the application. */
  | 'handle'
  /** Handled already: only ack it again. */
  | 'ack-again'
  /** The application still holds it: its ack follows when its handler settles. */
  | 'ignore';

/**
 * Notification uuids handed to the application, so that a redelivery (after
 * `ack_timeout`, or on resume after an ack that was lost with its connection)
 * is acked again instead of handled twice. Bounded: the oldest uuid is
 * forgotten first.
 */
export class Seen {
  readonly capacity: number;
  // Insertion order is age; value: whether the application finished with it.
  private readonly done = new Map<string, boolean>();

  constructor(capacity: number) {
    this.capacity = Math.max(1, Math.floor(capacity));
  }

  offer(uuid: string): Delivery {
    const d = this.done.get(uuid);
    if (d === true) return 'ack-again';
    if (d === false) return 'ignore';
    if (this.done.size >= this.capacity) {
      const oldest = this.done.keys().next();
      if (!oldest.done) this.done.delete(oldest.value);
    }
    this.done.set(uuid, false);
    return 'handle';
  }

  /** The application is done with `uuid` (its ack is sent or owed). */
  finished(uuid: string): void {
    if (this.done.has(uuid)) this.done.set(uuid, true);
  }

  /** Marks uuids finished by an earlier run (from storage), oldest first. */
  restore(uuids: readonly string[]): void {
    for (const u of uuids) {
      if (!this.done.has(u)) {
        this.offer(u);
        this.finished(u);
      }
    }
  }

  /** The newest `n` finished uuids, oldest first (what is persisted). */
  recentFinished(n: number): string[] {
    const out: string[] = [];
    for (const [u, d] of this.done) if (d) out.push(u);
    return out.slice(Math.max(0, out.length - n));
  }

  get size(): number {
    return this.done.size;
  }
}
