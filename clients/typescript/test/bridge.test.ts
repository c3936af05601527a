// The client against a real `cceb serve` process on loopback (embedded bus and
// store, temp data dir), seen only from the outside: WebSocket, discovery,
// the backend port, metrics, signals.
import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';
import WebSocket from 'ws';
import { ActionError, CcebClient, MemoryStorage, type ClientOptions, type ConnectedInfo, type DisconnectedInfo, type Notification } from '../src/index.js';
import { Bridge, cleanup, DiscoveryFront, PATIENCE, Proxy, sleep, token, track, waitFor, within } from './support.js';

afterEach(cleanup);

/**
 * Which WebSocket the client uses: `ws` (the Node package, as on Node 20), or
 * `global`: the WHATWG one of the runtime (Node's undici one with
 * --experimental-websocket on Node 20), which behaves as a browser's does.
 */
const impl = process.env.CCEB_TEST_WEBSOCKET === 'global' ? 'global' : 'ws';
const WebSocketImpl = impl === 'global' ? (globalThis as { WebSocket?: unknown }).WebSocket : WebSocket;
if (typeof WebSocketImpl !== 'function') throw new Error('CCEB_TEST_WEBSOCKET=global needs a global WebSocket (Node 22+, or --experimental-websocket)');

function it(name: string, fn: () => Promise<void>): void {
  test(`${name} [${impl} WebSocket]`, { timeout: 60_000 }, fn);
}

/** Reconnects in milliseconds; actions give up only after `PATIENCE`. */
function client(o: Partial<ClientOptions> & Pick<ClientOptions, 'url'>): CcebClient {
  const c = new CcebClient({
    getToken: () => token('a1'),
    backoff: { minMs: 20, maxMs: 200 },
    actionRetryMinMs: 20,
    connectTimeoutMs: PATIENCE,
    actionDeadlineMs: PATIENCE,
    WebSocket: WebSocketImpl as ClientOptions['WebSocket'],
    ...o,
  });
  return track(c, (x) => x.close());
}

function connected(c: CcebClient): Promise<ConnectedInfo> {
  return within(c.once('connected').then(([i]) => i), 'connected');
}

function disconnected(c: CcebClient): Promise<DisconnectedInfo> {
  return within(c.once('disconnected').then(([i]) => i), 'disconnected');
}

/** The ActionError a refused action rejects with. */
async function refusal(p: Promise<void>): Promise<ActionError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ActionError, String(e));
    return e;
  }
  throw new Error('expected a refusal');
}

/** Presence records of `state` the bridge published. */
async function publishedStates(b: Bridge, state: string): Promise<number> {
  return (await b.published()).filter((r) => r.record === 'ChangeAgentStateEvent' && r.value.state === state).length;
}

it('a resume after the bridge is killed (SIGKILL) delivers every notification once', async () => {
  // Unacked notifications come again after 500 ms too, within the session.
  const env = { CCEB_ACK_TIMEOUT_MS: '500' };
  let b = await Bridge.start({ env });
  const storage = new MemoryStorage();
  const c = client({ url: b.discoveryUrl, longLived: true, storage });
  const handled: Array<Notification<'presence'>> = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  c.on('presence', async (n) => {
    handled.push(n);
    // The application is still busy with the third when the bridge dies.
    if (n.data.state === 'S3') await gate;
  });
  const first = connected(c);
  c.connect();
  const session = await first;
  assert.equal(session.resumed, false);
  for (let i = 1; i <= 5; i++) await b.presence('a1', `S${i}`, `e${i}`);
  await waitFor(() => handled.length === 3, 'S3 is being handled');

  // The bridge dies without closing anything: no close frame, no flush of acks.
  const down = disconnected(c);
  const { addr, backend, dataDir } = b;
  await b.stop('SIGKILL');
  const d = await down;
  assert.equal(d.code, 1006, 'the socket dropped without a close frame');
  assert.ok(d.retryInMs! > 0);
  release(); // S3's ack, and S4's and S5's, have no connection to go on.
  await waitFor(() => handled.length === 5, 'S4 and S5 handled while disconnected');

  // A new process on the same data directory and ports.
  const again = connected(c);
  b = await Bridge.start({ dataDir, listen: addr, backendListen: backend, env });
  const resumed = await again;
  assert.equal(resumed.resumed, true, 'resumed with the stored key');
  assert.equal(resumed.sessionId, session.sessionId);
  for (let i = 6; i <= 8; i++) await b.presence('a1', `S${i}`, `e${i}`);
  await waitFor(() => handled.length >= 8, 'S6..S8 handled');
  // Let redeliveries (ack timeout 500 ms) come if the acks went missing.
  await sleep(1200);
  assert.deepEqual(handled.map((n) => n.data.state), ['S1', 'S2', 'S3', 'S4', 'S5', 'S6', 'S7', 'S8'], 'each once, in order');
  assert.equal(new Set(handled.map((n) => n.uuid)).size, 8);
  const seqs = handled.map((n) => n.seq);
  assert.deepEqual([...seqs].sort((x, y) => x - y), seqs, 'seq increases');

  // Everything was acked: resuming the session from outside finds an empty mailbox.
  const key = storage.getItem('cceb:session_key');
  assert.ok(key);
  const closed = within(c.once('closed'), 'closed');
  c.close();
  assert.deepEqual((await closed)[0], { code: 1000, reason: 'closed by the client' });
  const raw = track(new WebSocket(b.wsUrl), (w) => w.terminate());
  const frames: Array<{ type: string; uuid: string; data?: { resumed?: boolean } }> = [];
  raw.on('message', (m) => frames.push(JSON.parse(String(m))));
  await within(new Promise((r) => raw.once('open', r)), 'raw open');
  raw.send(JSON.stringify({ type: 'hello', uuid: 'h', data: { token: token('a1'), session_key: key } }));
  await waitFor(() => frames.length >= 1, 'hello_reply');
  assert.equal(frames[0]!.type, 'hello_reply');
  assert.equal(frames[0]!.data!.resumed, true);
  raw.send(JSON.stringify({ type: 'ping', uuid: 'p' }));
  await waitFor(() => frames.some((f) => f.type === 'pong'), 'pong');
  assert.deepEqual(frames.map((f) => f.type), ['hello_reply', 'pong'], 'no notification left unacked');
  raw.close();
  await b.stop('SIGTERM');
});

it('an action in flight across a reconnect is published once', async () => {
  // The network between client and bridge: discovery hands out the proxy.
  const proxy = await Proxy.start();
  const b = await Bridge.start({ env: { CCEB_PUBLIC_URL: `ws://127.0.0.1:${proxy.port}` } });
  proxy.target = b.addr;
  const c = client({ url: b.discoveryUrl });
  const first = connected(c);
  c.connect();
  assert.equal((await first).endpoint, `ws://127.0.0.1:${proxy.port}/ws/v1`);

  // 1. Published, but the ack is lost with the connection.
  proxy.mode = 'drop-down';
  const lostAck = c.action('ChangeAgentStateEvent', { state: 'lost-ack' }, { uuid: 'action-lost-ack' });
  await waitFor(async () => (await publishedStates(b, 'lost-ack')) === 1, 'published');
  let down = disconnected(c);
  let up = connected(c);
  proxy.cut();
  proxy.mode = 'pass';
  assert.equal((await down).code, 1006);
  await up;
  await within(lostAck, 'acked after the reconnect');
  assert.equal(await publishedStates(b, 'lost-ack'), 1, 'the retry was recognised, not published again');

  // 2. Still publishing (a slow bus) when the connection goes: the bridge drops it, the retry publishes it.
  await b.setBus({ accepting: true, delay_ms: 2000 });
  const before = proxy.upBytes;
  down = disconnected(c);
  up = connected(c);
  const slow = c.action('ChangeAgentStateEvent', { state: 'in-flight' });
  await waitFor(() => proxy.upBytes > before, 'the action reached the bridge');
  await sleep(100);
  proxy.cut();
  await b.setBus({ accepting: true, delay_ms: 0 });
  await down;
  await up;
  await within(slow, 'acked after the reconnect');
  await sleep(2500); // past the slow publish, had it gone on
  assert.equal(await publishedStates(b, 'in-flight'), 1, 'published once');
  c.close();
  await proxy.close();
  await b.stop('SIGTERM');
});

it('a new token is fetched on 4002 (short-lived token)', async () => {
  const b = await Bridge.start();
  let calls = 0;
  // The first token runs out within two seconds; the next ones last.
  const c = client({ url: b.wsUrl, getToken: async () => token('a1', calls++ === 0 ? 2 : 3600) });
  const seen: Array<[string, number | null | undefined, number | null | undefined]> = [];
  c.on('state', (s, info) => seen.push([s, (info as DisconnectedInfo | undefined)?.code, (info as DisconnectedInfo | undefined)?.retryInMs]));
  const first = connected(c);
  c.connect();
  await first;
  assert.equal(calls, 1);
  const down = disconnected(c);
  const up = within(
    new Promise<ConnectedInfo>((r) => c.on('connected', (i) => calls === 2 && r(i))),
    'connected with the new token',
  );
  const d = await down;
  assert.equal(d.code, 4002);
  assert.equal(d.retryInMs, 0, 'no backoff: the token simply ran out');
  await up;
  assert.equal(calls, 2);
  assert.deepEqual(seen.map(([s, code]) => `${s}${code ? ` ${code}` : ''}`), ['connecting', 'connected', 'disconnected 4002', 'connecting', 'connected']);
  await within(c.action('ChangeAgentStateEvent', { state: 'Away' }), 'acked');
  c.close();
  await b.stop('SIGTERM');
});

it('a provider that keeps handing out the same expired token: no hot loop, and a stop after bounded retries', async () => {
  const b = await Bridge.start();
  // Valid for about a second, then expired: always the same one.
  const stale = token('a1', 1);
  let calls = 0;
  const c = client({ url: b.wsUrl, getToken: () => (calls++, stale) });
  const downs: Array<[number | null, number | null]> = [];
  c.on('disconnected', (d) => void downs.push([d.code, d.retryInMs]));
  const closed = within(c.once('closed'), 'closed after the bounded retries');
  c.connect();
  const [info] = await closed;
  assert.equal(info.code, 4001, JSON.stringify(downs));
  // Before the fix: a reconnect at once after every 4002, hundreds of hellos per second.
  assert.ok(calls < 30, `${calls} connection attempts: ${JSON.stringify(downs)}`);
  const expired = downs.filter(([code]) => code === 4002);
  assert.ok(expired.length >= 1, JSON.stringify(downs));
  // Only the first 4002 reconnects at once; the ones after a refresh that did not live wait, longer each time.
  assert.equal(expired[0]![1], 0);
  const waits = expired.slice(1).map(([, ms]) => ms!);
  assert.ok(waits.every((ms, i) => ms > 0 && (i === 0 || ms >= waits[i - 1]! / 2)), JSON.stringify(downs));
  // 4001 after the refresh: retried 3 times through the backoff, then the stop.
  const refused = downs.filter(([code]) => code === 4001);
  assert.equal(refused.length, 4, JSON.stringify(downs));
  assert.ok(refused.slice(0, 3).every(([, ms]) => ms !== null && ms > 0), JSON.stringify(downs));
  assert.equal(refused[3]![1], null);
  await b.stop('SIGTERM');
});

it('a drain (SIGTERM, 1012) sends the client back to discovery, which finds the new bridge', async () => {
  const b1 = await Bridge.start();
  const front = await DiscoveryFront.start(b1.addr);
  const storage = new MemoryStorage();
  const c = client({ url: front.url, longLived: true, storage });
  const handled: string[] = [];
  c.on('notification', (n) => void handled.push(n.uuid));
  const first = connected(c);
  c.connect();
  const s1 = await first;
  assert.equal(s1.endpoint, b1.wsUrl);
  await b1.presence('a1', 'before', 'd1');
  await waitFor(() => handled.length === 1, 'handled');

  const down = disconnected(c);
  const stopping = b1.stop('SIGTERM');
  const d = await down;
  assert.equal(d.code, 1012);
  assert.equal(await stopping, 0, 'the bridge drained and exited 0');
  // Asked while no bridge runs: it waits for the next connection.
  const pending = c.action('ChangeAgentStateEvent', { state: 'after-drain' });

  // Another node (new ports) takes over the data directory.
  const b2 = await Bridge.start({ dataDir: b1.dataDir });
  front.target = b2.addr;
  const requestsBefore = front.requests;
  const s2 = await within(
    new Promise<ConnectedInfo>((r) => c.on('connected', r)),
    'connected to the new bridge',
  );
  assert.equal(s2.endpoint, b2.wsUrl, 'found through discovery');
  assert.ok(front.requests > requestsBefore || front.requests >= 2);
  assert.equal(s2.resumed, true);
  assert.equal(s2.sessionId, s1.sessionId);
  await within(pending, 'the queued action is acked');
  assert.equal(await publishedStates(b2, 'after-drain'), 1);
  await b2.presence('a1', 'after', 'd2');
  await waitFor(() => handled.length === 2, 'handled on the new bridge');
  c.close();
  await front.close();
  await b2.stop('SIGTERM');
});

it('a node that died without draining (SIGKILL) is left for the one discovery names', async () => {
  const b1 = await Bridge.start();
  const front = await DiscoveryFront.start(b1.addr);
  const c = client({ url: front.url, longLived: true });
  const first = connected(c);
  c.connect();
  const s1 = await first;
  const down = disconnected(c);
  await b1.stop('SIGKILL');
  assert.equal((await down).code, 1006, 'no 1012: the endpoint is simply gone');
  // Another node on other ports; the old endpoint refuses connections.
  const b2 = await Bridge.start({ dataDir: b1.dataDir });
  front.target = b2.addr;
  const s2 = await within(new Promise<ConnectedInfo>((r) => c.on('connected', r)), 'connected to the new node');
  assert.equal(s2.endpoint, b2.wsUrl);
  assert.equal(s2.resumed, true);
  assert.equal(s2.sessionId, s1.sessionId);
});

it('actions resolve on ack, are retried after backend_unavailable, and refusals are typed', async () => {
  const b = await Bridge.start();
  const c = client({ url: b.wsUrl });
  c.connect();
  await within(c.action('ChangeAgentStateEvent', { state: 'Available' }), 'acked');
  await b.setBus({ accepting: false });
  const retried = c.action('ChangeAgentStateEvent', { state: 'Away' }, { uuid: 'retry-1' });
  await waitFor(async () => (await b.metric('cceb_errors_total{code="backend_unavailable"}')) >= 2, 'refused twice');
  await b.setBus({ accepting: true });
  await within(retried, 'acked once the bus is back');
  const states = (await b.published()).map((r) => r.value.state);
  assert.deepEqual(states, ['Available', 'Away'], 'published once each');

  // A field the bridge sets itself: refused for good, with the field.
  const reserved: Record<string, unknown> = { state: 'Away', tenantGuid: 't2' };
  const err = await refusal(c.action('ChangeAgentStateEvent' as string, reserved));
  assert.equal(err.code, 'reserved_field');
  assert.equal(err.field, 'tenantGuid');
  const unknown = await refusal(c.action('NoSuchEvent', {}));
  assert.equal(unknown.code, 'unknown_action');
  const invalid = await refusal(c.action('ChangeAgentStateEvent', { state: 'Away', bogus: 1 } as never));
  assert.equal(invalid.code, 'invalid_action_details');
  assert.equal(invalid.field, 'bogus');
  assert.equal((await b.published()).length, 2, 'a refused action is not retried');
  c.close();
  await b.stop('SIGTERM');
});

it('a refused token stops the client with 4001 and fails what is pending', async () => {
  const b = await Bridge.start();
  const c = client({ url: b.discoveryUrl.replace('/v1/discovery', '/ws/v1').replace('http', 'ws'), getToken: () => 'not-a-jwt' });
  const closed = within(c.once('closed'), 'closed');
  const pending = refusal(c.action('ChangeAgentStateEvent', { state: 'Away' }));
  c.connect();
  const [info] = await closed;
  assert.equal(info.code, 4001);
  assert.match(info.reason, /unauthorized/);
  assert.equal((await pending).code, 'closed');
  assert.equal(c.state, 'closed');
  await assert.rejects(c.action('ChangeAgentStateEvent', { state: 'Away' }), (e: ActionError) => e.code === 'closed');
  // Discovery refuses it too, before any socket: the client stops.
  const d = client({ url: b.discoveryUrl, getToken: () => 'not-a-jwt' });
  const dClosed = within(d.once('closed'), 'closed');
  d.connect();
  assert.deepEqual((await dClosed)[0], { code: null, reason: 'discovery refused the token (401)' });
  await b.stop('SIGTERM');
});

it('a silent connection is detected by app-level ping and replaced', async () => {
  const proxy = await Proxy.start();
  const b = await Bridge.start();
  proxy.target = b.addr;
  const c = client({ url: `ws://127.0.0.1:${proxy.port}/ws/v1`, ping: { intervalMs: 100, timeoutMs: 300 } });
  const first = connected(c);
  c.connect();
  await first;
  // Pings are answered while the network works.
  await sleep(400);
  assert.equal(c.state, 'connected');
  const down = disconnected(c);
  const up = connected(c);
  proxy.mode = 'stall'; // a peer that keeps the socket open and says nothing
  const d = await down;
  assert.equal(d.code, null);
  assert.match(d.reason, /no answer to ping within 300 ms/);
  proxy.mode = 'pass';
  await up;
  await within(c.action('ChangeAgentStateEvent', { state: 'Away' }), 'the new connection works');
  c.close();
  await proxy.close();
  await b.stop('SIGTERM');
});

it('end_session forgets the key, and a long-lived session resumes from storage after a "reload"', async () => {
  const b = await Bridge.start();
  const storage = new MemoryStorage();
  const c1 = client({ url: b.discoveryUrl, longLived: true, storage });
  const got: string[] = [];
  c1.on('presence', (n) => void got.push(n.uuid));
  const s1 = connected(c1);
  c1.connect();
  const first = await s1;
  await b.presence('a1', 'x', 'r1');
  await waitFor(() => got.length === 1, 'handled');
  c1.close();
  await sleep(300); // the handled uuids are written behind, within 250 ms
  // A new client object on the same storage (a page reload) resumes the session.
  const c2 = client({ url: b.discoveryUrl, longLived: true, storage });
  const s2 = connected(c2);
  c2.connect();
  const second = await s2;
  assert.equal(second.resumed, true);
  assert.equal(second.sessionId, first.sessionId);
  assert.deepEqual(JSON.parse(String(storage.getItem('cceb:handled'))), got);
  const closed = within(c2.once('closed'), 'closed');
  await within(c2.endSession(), 'session ended');
  assert.deepEqual((await closed)[0], { code: 1000, reason: 'session ended' });
  assert.equal(storage.getItem('cceb:session_key'), null);
  await b.stop('SIGTERM');
});
