// The pure part (backoff, close codes, retries, duplicates) and the client's
// use of it, with injected randomness: no timing thresholds on real time.
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { test } from 'node:test';
import WebSocket, { WebSocketServer } from 'ws';
import { ActionError, afterClose, Backoff, CcebClient, CloseCode, MemoryStorage, ReconnectPolicy, retryAction, Seen, type ClientOptions, type DisconnectedInfo } from '../src/index.js';

test('backoff doubles from min to max with jitter in the upper half', () => {
  const top = new Backoff(500, 20_000, () => 1);
  assert.deepEqual(
    Array.from({ length: 9 }, () => top.next()),
    [500, 1000, 2000, 4000, 8000, 16_000, 20_000, 20_000, 20_000],
  );
  const b = new Backoff(500, 20_000);
  assert.equal(b.next(0), 250);
  assert.equal(b.next(0.5), 750); // base 1000
  // Any jitter stays within [base/2, base], however many attempts.
  let r = 0.123;
  const rand = () => (r = (r * 9301 + 49297) % 233280 / 233280);
  const j = new Backoff(500, 20_000, rand);
  for (let i = 0; i < 200; i++) {
    const base = j.base(j.attempt);
    const d = j.next();
    assert.ok(d >= base / 2 && d <= base && d >= 250 && d <= 20_000, `${d}`);
  }
});

test('backoff resets after success, never overflows, and raises a max below min', () => {
  const b = new Backoff(10, 80, () => 1);
  for (let i = 0; i < 10_000; i++) b.next();
  assert.equal(b.next(), 80);
  b.reset();
  assert.equal(b.attempt, 0);
  assert.equal(b.next(), 10);
  assert.equal(new Backoff(10, 1, () => 1).next(), 10);
  assert.equal(new Backoff(10, 100).next(Number.NaN), 10, 'a bad random value is clamped');
  assert.throws(() => new Backoff(0, 10), RangeError);
});

test('close codes as the contract says', () => {
  const plain = { kind: 'reconnect', rediscover: false, refreshToken: false };
  assert.deepEqual(afterClose(null), plain);
  assert.deepEqual(afterClose(1006), plain);
  assert.deepEqual(afterClose(1001), plain);
  assert.deepEqual(afterClose(CloseCode.HELLO_TIMEOUT), plain);
  assert.deepEqual(afterClose(CloseCode.TOO_MANY_UNACKED), plain);
  assert.deepEqual(afterClose(1012), { kind: 'reconnect', rediscover: true, refreshToken: false });
  assert.deepEqual(afterClose(4002), { kind: 'reconnect', rediscover: false, refreshToken: true });
  for (const stop of [1000, 1003, 1009, 4001, 4005, 4006]) assert.deepEqual(afterClose(stop), { kind: 'stop' }, `${stop}`);
});

test('4002: at once after a connection that lived, through the backoff after a refresh that did not live', () => {
  // Backoff 100 → 800 at full jitter; stable after 1000 ms of connection.
  const p = new ReconnectPolicy(new Backoff(100, 800, () => 1), 1000, 3);
  const at = (d: ReturnType<ReconnectPolicy['ended']>) => (d.kind === 'stop' ? 'stop' : `${d.delayMs}${d.refreshToken ? ' refresh' : ''}`);
  // A token that ran out on a connection that lived: a new one at once.
  assert.equal(at(p.ended(4002, 60_000)), '0 refresh');
  // The provider's token was expired too: the bridge closed at once after hello_reply.
  assert.equal(at(p.ended(4002, 0)), '100 refresh');
  assert.equal(at(p.ended(4002, 5)), '200 refresh');
  assert.equal(at(p.ended(4002, null)), '400 refresh');
  assert.equal(at(p.ended(4002, 999)), '800 refresh', 'below stableAfterMs: not lived');
  // A connection that stayed up resets both the backoff and the refresh.
  assert.equal(at(p.ended(4002, 1000)), '0 refresh');
  assert.equal(at(p.ended(4002, 0)), '100 refresh');
  // hello_reply alone resets nothing: a plain drop right after it continues the backoff.
  assert.equal(at(p.ended(1006, 10)), '200');
  // ... and a first 4002 after that (no refresh before it) goes at once again.
  assert.equal(at(p.ended(4002, 10)), '0 refresh');
});

test('4001 after a 4002 refresh is retried through the backoff a bounded number of times, then stops', () => {
  const p = new ReconnectPolicy(new Backoff(100, 800, () => 1), 1000, 3);
  assert.deepEqual(p.ended(4002, 5000), { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: 0 });
  assert.deepEqual(p.ended(4001, null), { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: 100 });
  assert.deepEqual(p.ended(4001, null), { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: 200 });
  assert.deepEqual(p.ended(4001, null), { kind: 'reconnect', rediscover: false, refreshToken: true, delayMs: 400 });
  assert.deepEqual(p.ended(4001, null), { kind: 'stop' });
  // Without a refresh before it, 4001 stops at once; so do the other final codes.
  const q = new ReconnectPolicy(new Backoff(100, 800, () => 1), 1000, 3);
  assert.deepEqual(q.ended(4001, null), { kind: 'stop' });
  for (const code of [1000, 1003, 1009, 4005, 4006]) assert.deepEqual(q.ended(code, 10), { kind: 'stop' }, `${code}`);
  // A provider that catches up: the count starts again once a connection lived.
  const r = new ReconnectPolicy(new Backoff(100, 800, () => 1), 1000, 1);
  assert.equal(r.ended(4002, 5000).kind, 'reconnect');
  assert.equal(r.ended(4001, null).kind, 'reconnect');
  assert.equal(r.ended(4002, 5000).kind, 'reconnect');
  assert.equal(r.ended(4001, null).kind, 'reconnect');
  assert.equal(r.ended(4001, null).kind, 'stop');
  // Other codes keep afterClose's meaning, with the backoff's delay.
  const o = new ReconnectPolicy(new Backoff(100, 800, () => 1), 1000, 3);
  assert.deepEqual(o.ended(1012, 10), { kind: 'reconnect', rediscover: true, refreshToken: false, delayMs: 100 });
  assert.deepEqual(o.ended(null, null), { kind: 'reconnect', rediscover: false, refreshToken: false, delayMs: 200 });
});

/** A fake bridge: answers hello, and `end_session` as `onEnd` says. */
async function fakeBridge(onEnd: (ws: WebSocket, uuid: string, n: number) => void): Promise<{ url: string; hellos: unknown[]; close: () => Promise<void> }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const hellos: unknown[] = [];
  let ends = 0;
  wss.on('connection', (ws) => {
    ws.on('message', (raw) => {
      const m = JSON.parse(String(raw)) as { type: string; uuid: string; data?: { session_key?: string } };
      if (m.type === 'hello') {
        hellos.push(m.data);
        const data = { session_id: 's1', session_key: 'k1', resumed: m.data?.session_key === 'k1', long_lived: true, heartbeat_interval_seconds: 25 };
        ws.send(JSON.stringify({ type: 'hello_reply', uuid: m.uuid, data }));
      } else if (m.type === 'end_session') onEnd(ws, m.uuid, ends++);
    });
  });
  const port = (wss.address() as { port: number }).port;
  return {
    url: `ws://127.0.0.1:${port}/ws/v1`,
    hellos,
    close: () => {
      for (const c of wss.clients) c.terminate();
      return new Promise((r) => wss.close(() => r()));
    },
  };
}

test('end_session refused by the bridge rejects with its code, keeps the key and the connection; the next one ends it', async () => {
  // The first end_session is refused as a bridge whose store cannot write refuses it; the second is acked, then closed with 1000.
  const fake = await fakeBridge((ws, uuid, n) => {
    if (n === 0) ws.send(JSON.stringify({ type: 'error', uuid, data: { code: 'backend_unavailable', message: 'the store cannot write' } }));
    else {
      ws.send(JSON.stringify({ type: 'ack', uuid }));
      ws.close(1000, 'session ended');
    }
  });
  const storage = new MemoryStorage();
  const c = new CcebClient({ url: fake.url, getToken: () => 't', longLived: true, storage, WebSocket: WebSocket as unknown as ClientOptions['WebSocket'] });
  const errors: unknown[] = [];
  c.on('error', (e) => void errors.push(e));
  const up = c.once('connected');
  c.connect();
  await up;
  await new Promise((r) => setTimeout(r, 20)); // the key is written behind hello_reply
  assert.equal(storage.getItem('cceb:session_key'), 'k1');
  const refused = await c.endSession().then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(refused instanceof ActionError, String(refused));
  assert.equal(refused.code, 'backend_unavailable');
  assert.equal(storage.getItem('cceb:session_key'), 'k1', 'the session lives on: its key is kept');
  assert.equal(c.state, 'connected');
  assert.deepEqual(errors, [], 'the refusal is the promise\'s, not an unowned error');
  const closed = c.once('closed');
  await c.endSession();
  assert.deepEqual((await closed)[0], { code: 1000, reason: 'session ended' });
  assert.equal(storage.getItem('cceb:session_key'), null);
  assert.equal(fake.hellos.length, 1);
  await fake.close();
});

test('end_session whose connection drops unconfirmed rejects with closed, keeps the key, and stops', async () => {
  const fake = await fakeBridge((ws) => ws.terminate());
  const storage = new MemoryStorage();
  const c = new CcebClient({ url: fake.url, getToken: () => 't', longLived: true, storage, WebSocket: WebSocket as unknown as ClientOptions['WebSocket'] });
  const up = c.once('connected');
  c.connect();
  await up;
  await new Promise((r) => setTimeout(r, 20));
  const e = await c.endSession().then(
    () => null,
    (x: unknown) => x,
  );
  assert.ok(e instanceof ActionError && e.code === 'closed', String(e));
  assert.equal(storage.getItem('cceb:session_key'), 'k1');
  assert.equal(c.state, 'closed');
  assert.equal(fake.hellos.length, 1, 'no new session behind the user\'s back');
  await fake.close();
});

test('only transient action errors are retried', () => {
  for (const code of ['backend_unavailable', 'rate_limited']) assert.ok(retryAction(code));
  for (const code of ['invalid_json', 'invalid_message', 'unknown_type', 'not_authenticated', 'unauthorized', 'unknown_action', 'reserved_field', 'invalid_action_details', 'unknown_agent', 'too_many_sessions']) {
    assert.ok(!retryAction(code), code);
  }
});

test('a redelivered notification is handled once, in bounded memory', () => {
  const s = new Seen(2);
  assert.equal(s.offer('a'), 'handle');
  assert.equal(s.offer('a'), 'ignore');
  s.finished('a');
  assert.equal(s.offer('a'), 'ack-again');
  assert.equal(s.offer('b'), 'handle');
  assert.equal(s.offer('c'), 'handle');
  assert.equal(s.size, 2);
  // "a" was the oldest of three with room for two: forgotten.
  assert.equal(s.offer('a'), 'handle');
  // Restored from storage: finished already.
  const r = new Seen(10);
  r.restore(['x', 'y']);
  assert.equal(r.offer('x'), 'ack-again');
  assert.deepEqual(r.recentFinished(1), ['y']);
});

test('the client waits the backoff delays between failed attempts (injected random, no clock)', async () => {
  // Nothing listens on port 9 of loopback: every attempt fails to connect.
  const delays: number[] = [];
  const jitter = [1, 0, 0.5, 1, 1, 1, 1];
  let i = 0;
  const client = new CcebClient({
    url: 'ws://127.0.0.1:9/ws/v1',
    getToken: () => 'irrelevant',
    backoff: { minMs: 1, maxMs: 8 },
    random: () => jitter[i++ % jitter.length]!,
  });
  const states: string[] = [];
  client.on('state', (s) => states.push(s));
  const done = new Promise<void>((resolve) => {
    client.on('disconnected', (d: DisconnectedInfo) => {
      assert.equal(d.code, null, 'no socket was opened');
      assert.match(d.reason, /connect/);
      delays.push(d.retryInMs!);
      if (delays.length === 6) {
        client.close();
        resolve();
      }
    });
  });
  const closedP = client.once('closed');
  client.connect();
  await done;
  // base 1, 2, 4, 8, 8, 8 with jitter 1, 0, 0.5, 1, 1, 1 → [base/2, base]
  assert.deepEqual(delays, [1, 1, 3, 8, 8, 8]);
  const [closed] = await closedP;
  assert.deepEqual(closed, { code: null, reason: 'closed by the client' });
  assert.equal(client.state, 'closed');
  assert.deepEqual(states.slice(0, 4), ['connecting', 'disconnected', 'connecting', 'disconnected']);
});

test('a handshake that never completes times out, and close() while connecting is clean', async () => {
  // Accepts TCP connections and never answers the WebSocket handshake.
  const held: Socket[] = [];
  const server = createServer((s) => void held.push(s));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const client = new CcebClient({
    url: `ws://127.0.0.1:${port}/ws/v1`,
    getToken: () => 't',
    connectTimeoutMs: 50,
    backoff: { minMs: 1, maxMs: 2 },
  });
  const closed = client.once('closed');
  const reasons: string[] = [];
  client.on('disconnected', (d) => {
    reasons.push(d.reason);
    if (reasons.length === 2) {
      client.on('connecting', () => setTimeout(() => client.close(), 5));
    }
  });
  client.connect();
  const [info] = await closed;
  assert.deepEqual(reasons.slice(0, 2), [`connect ws://127.0.0.1:${port}/ws/v1: timed out`, `connect ws://127.0.0.1:${port}/ws/v1: timed out`]);
  assert.deepEqual(info, { code: null, reason: 'closed by the client' }, 'no socket was open');
  // An 'error' the socket reports after the fact must not crash the process.
  await new Promise((r) => setTimeout(r, 50));
  for (const s of held) s.destroy();
  await new Promise((r) => server.close(r));
});
