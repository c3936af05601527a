// The pure part (backoff, close codes, retries, duplicates) and the client's
// use of it, with injected randomness: no timing thresholds on real time.
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { test } from 'node:test';
import { afterClose, Backoff, CcebClient, CloseCode, retryAction, Seen, type DisconnectedInfo } from '../src/index.js';

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
