// A real bridge process (`cceb serve`, the embedded default) on free loopback
// ports with a temp data dir, and what the tests need around it: tokens,
// the backend port, a TCP proxy that can cut or stall connections, waits.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { createServer, connect, type Server, type Socket, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/** At least 32 bytes: shorter HS256 secrets are refused at start. */
export const SECRET = 'cceb-ts-test-secret-0123456789abcdef';
export const ADMIN = 'test-admin';
/** Generous bound for what should happen "at once"; never a threshold under test. */
export const PATIENCE = 15_000;

const here = dirname(fileURLToPath(import.meta.url));
// build-test/test → the package → the repository.
const repo = resolve(here, '../../../..');
/** The bridge binary: `CCEB_BIN`, else the one `cargo build` leaves in target/debug. */
export const CCEB_BIN = process.env.CCEB_BIN ?? join(repo, 'target/debug/cceb');

const live = new Set<ChildProcess>();
const dirs = new Set<string>();
const closers = new Set<() => unknown>();

/** Something to close after the test, passed or failed. */
export function track<T>(x: T, close: (x: T) => unknown): T {
  closers.add(() => close(x));
  return x;
}

/** After each test: every bridge it started is killed, everything it tracked closed. */
export async function cleanup(): Promise<void> {
  for (const c of [...closers]) await Promise.resolve().then(c).catch(() => {});
  closers.clear();
  for (const p of live) p.kill('SIGKILL');
  await Promise.all([...live].map((p) => new Promise((r) => (p.exitCode !== null ? r(null) : p.once('exit', r)))));
}
process.on('exit', () => {
  for (const p of live) p.kill('SIGKILL');
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

export function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'cceb-ts-'));
  dirs.add(d);
  return d;
}

export interface BridgeOptions {
  dataDir?: string;
  listen?: string;
  backendListen?: string;
  env?: Record<string, string>;
}

/** A `cceb serve` process. */
export class Bridge {
  private constructor(
    readonly proc: ChildProcess,
    readonly addr: string,
    readonly backend: string,
    readonly dataDir: string,
    readonly exited: Promise<number | null>,
  ) {}

  static async start(o: BridgeOptions = {}): Promise<Bridge> {
    if (!existsSync(CCEB_BIN)) throw new Error(`no bridge binary at ${CCEB_BIN}: build it (cargo build -p cceb) or set CCEB_BIN`);
    const dataDir = o.dataDir ?? tempDir();
    const proc = spawn(CCEB_BIN, ['serve'], {
      env: {
        PATH: process.env.PATH ?? '',
        CCEB_LISTEN: o.listen ?? '127.0.0.1:0',
        CCEB_BACKEND_LISTEN: o.backendListen ?? '127.0.0.1:0',
        CCEB_DATA_DIR: dataDir,
        CCEB_JWT_HS256_SECRET: SECRET,
        CCEB_ADMIN_TOKEN: ADMIN,
        CCEB_SHUTDOWN_GRACE_MS: '2000',
        CCEB_LOG: 'warn',
        ...o.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    live.add(proc);
    let stderr = '';
    proc.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
    const exited = new Promise<number | null>((res) => proc.on('exit', (code) => (live.delete(proc), res(code))));
    const lines = createInterface({ input: proc.stdout! });
    const listening = await new Promise<string>((res, rej) => {
      lines.on('line', (l) => l.startsWith('listening on ') && res(l));
      exited.then((c) => rej(new Error(`cceb exited (${c}) before listening: ${stderr}`)));
    });
    // `listening on ADDR (backend port ADDR)`
    const words = listening.slice('listening on '.length).split(/\s+/);
    const b = new Bridge(proc, words[0]!, words[words.length - 1]!.replace(/\)$/, ''), dataDir, exited);
    await waitFor(async () => (await fetch(`http://${b.addr}/readyz`).catch(() => null))?.status === 200, 'the bridge is ready');
    return b;
  }

  get discoveryUrl(): string {
    return `http://${this.addr}/v1/discovery`;
  }
  get wsUrl(): string {
    return `ws://${this.addr}/ws/v1`;
  }

  /** Sends `sig` and waits for the exit code. */
  async stop(sig: NodeJS.Signals = 'SIGKILL'): Promise<number | null> {
    this.proc.kill(sig);
    return this.exited;
  }

  async event(record: string, value: object, id?: string): Promise<void> {
    const r = await fetch(`http://${this.backend}/backend/v1/events`, {
      method: 'POST',
      headers: { authorization: `Bearer ${ADMIN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ record, value, id }),
    });
    if (r.status !== 202) throw new Error(`event ${record} refused: ${r.status} ${await r.text()}`);
  }

  async presence(agent: string, state: string, id: string): Promise<void> {
    await this.event('AgentPresenceEvent', { tenantGuid: 't1', agentGuid: agent, state }, id);
  }

  /** The records this process published (its log is in memory). */
  async published(waitMs = 0): Promise<Array<{ record: string; key: string; value: Record<string, unknown> }>> {
    const r = await fetch(`http://${this.backend}/backend/v1/actions?after=0&wait_ms=${waitMs}`, {
      headers: { authorization: `Bearer ${ADMIN}` },
    });
    return ((await r.json()) as { records: never[] }).records;
  }

  async setBus(body: { accepting: boolean; delay_ms?: number }): Promise<void> {
    const r = await fetch(`http://${this.backend}/backend/v1/bus`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${ADMIN}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    if (r.status !== 200) throw new Error(`bus switch: ${r.status}`);
  }

  async metric(series: string): Promise<number> {
    const text = await (await fetch(`http://${this.addr}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(series + ' '));
    return line ? Number(line.split(' ').pop()) : 0;
  }
}

function b64url(v: object): string {
  return Buffer.from(JSON.stringify(v)).toString('base64url');
}

/** An HS256 client token, as `cceb token` mints it. */
export function token(agent: string, ttlSeconds = 3600, tenant = 't1'): string {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url({ sub: agent, tenant_guid: tenant, ir_instance: 'ir-1', exp: Math.floor(Date.now() / 1000) + ttlSeconds });
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `f` until it holds; fails after `PATIENCE`. */
export async function waitFor(f: () => boolean | Promise<boolean>, what: string, patience = PATIENCE): Promise<void> {
  const until = Date.now() + patience;
  for (;;) {
    if (await f()) return;
    if (Date.now() > until) throw new Error(`timed out waiting: ${what}`);
    await sleep(20);
  }
}

/** Resolves when `p` does, fails after `PATIENCE`. */
export function within<T>(p: Promise<T>, what: string, patience = PATIENCE): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<never>((_, rej) => (t = setTimeout(() => rej(new Error(`timed out: ${what}`)), patience))),
  ]).finally(() => clearTimeout(t));
}

/**
 * A TCP proxy in front of the bridge: the network between client and bridge.
 * `cut()` resets every connection; `mode` drops bytes server→client
 * (`drop-down`: the client sees no answers) or both ways (`stall`: a dead peer
 * that keeps the socket open).
 */
export class Proxy {
  mode: 'pass' | 'drop-down' | 'stall' = 'pass';
  upBytes = 0;
  private readonly pairs = new Set<[Socket, Socket]>();
  private constructor(
    private readonly server: Server,
    public target: string,
  ) {}

  static async start(target = ''): Promise<Proxy> {
    const server = createServer();
    const p = track(new Proxy(server, target), (x) => x.close());
    server.on('connection', (client) => p.accept(client));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return p;
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  private accept(client: Socket): void {
    const [host, port] = this.target.split(':');
    const upstream = connect(Number(port), host!);
    const pair: [Socket, Socket] = [client, upstream];
    this.pairs.add(pair);
    const done = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (d) => {
      if (this.mode === 'stall') return;
      this.upBytes += d.length;
      upstream.write(d);
    });
    upstream.on('data', (d) => {
      if (this.mode === 'pass') client.write(d);
    });
    client.on('close', done).on('error', done);
    upstream.on('close', done).on('error', done);
  }

  /** Resets every connection through the proxy. */
  cut(): void {
    for (const [a, b] of this.pairs) {
      a.resetAndDestroy();
      b.resetAndDestroy();
    }
    this.pairs.clear();
  }

  get connections(): number {
    return this.pairs.size;
  }

  async close(): Promise<void> {
    this.cut();
    if (this.server.listening) await new Promise((r) => this.server.close(r));
  }
}

/**
 * A discovery service in front of several bridges, as a cluster has one:
 * `GET /v1/discovery` is answered by the discovery of the bridge at `target`
 * (its own endpoint), so a client that asks again finds the new node.
 */
export class DiscoveryFront {
  requests = 0;
  private constructor(
    private readonly server: HttpServer,
    public target: string,
  ) {}

  static async start(target: string): Promise<DiscoveryFront> {
    const front: DiscoveryFront = new DiscoveryFront(
      createHttpServer(async (req, res) => {
        front.requests++;
        try {
          const r = await fetch(`http://${front.target}/v1/discovery`, { headers: { authorization: req.headers.authorization ?? '' } });
          res.writeHead(r.status, { 'content-type': 'application/json' }).end(await r.text());
        } catch {
          res.writeHead(503).end('{"code":"unavailable","message":"no node"}');
        }
      }),
      target,
    );
    await new Promise<void>((r) => front.server.listen(0, '127.0.0.1', r));
    return track(front, (f) => f.close());
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/v1/discovery`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    if (this.server.listening) await new Promise((r) => this.server.close(r));
  }
}
