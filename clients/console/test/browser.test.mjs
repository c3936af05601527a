// The console in a real browser: headless Chromium (Debian's `chromium`,
// CHROMIUM_BIN) driven by playwright-core, against a real `cceb serve`
// (CCEB_BIN, default target/debug/cceb) on free loopback ports with a temp
// data dir. The console is the one the binary embeds (crates/cceb/console/).
//
//   CONSOLE_SCREENSHOT=path   where the screenshot goes (default: a temp file)
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const CCEB_BIN = process.env.CCEB_BIN ?? join(repo, 'target/debug/cceb');
const CHROMIUM_BIN = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const SCREENSHOT = process.env.CONSOLE_SCREENSHOT ?? join(tmpdir(), 'cceb-console.png');
const SECRET = 'cceb-console-test-secret-0123456789abcdef';
const ADMIN = 'console-test-admin';
const PATIENCE = 15_000;
const ACTIONS = readdirSync(join(repo, 'schemas/actions')).filter((f) => f.endsWith('.avsc')).length;

const cleanups = [];
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {});
});

function tempDir() {
  const d = mkdtempSync(join(tmpdir(), 'cceb-console-'));
  cleanups.push(async () => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** `cceb serve [--dev]`; resolves once it is ready. */
async function bridge(args, env = {}) {
  assert.ok(existsSync(CCEB_BIN), `no bridge binary at ${CCEB_BIN}: build it or set CCEB_BIN`);
  const proc = spawn(CCEB_BIN, ['serve', ...args], {
    env: {
      PATH: process.env.PATH ?? '',
      CCEB_LISTEN: '127.0.0.1:0',
      CCEB_BACKEND_LISTEN: '127.0.0.1:0',
      CCEB_DATA_DIR: tempDir(),
      // --dev mints only with a secret it made itself.
      ...(args.includes('--dev') ? {} : { CCEB_JWT_HS256_SECRET: SECRET }),
      CCEB_ADMIN_TOKEN: ADMIN,
      CCEB_LOG: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise((r) => proc.once('exit', r));
  cleanups.push(async () => {
    proc.kill('SIGKILL');
    await exited;
  });
  let stderr = '';
  proc.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  const lines = [];
  const listening = await new Promise((res, rej) => {
    createInterface({ input: proc.stdout }).on('line', (l) => {
      lines.push(l);
      if (l.startsWith('listening on ')) res(l);
    });
    exited.then((c) => rej(new Error(`cceb exited (${c}) before listening: ${stderr}`)));
  });
  // `listening on ADDR (backend port ADDR)`
  const words = listening.slice('listening on '.length).split(/\s+/);
  const b = { addr: words[0], backend: words.at(-1).replace(/\)$/, ''), lines };
  await waitFor(async () => (await fetch(`http://${b.addr}/readyz`).catch(() => null))?.status === 200, 'the bridge is ready');
  return b;
}

async function metric(b, series) {
  const text = await (await fetch(`http://${b.addr}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function waitFor(f, what) {
  const until = Date.now() + PATIENCE;
  while (!(await f())) {
    if (Date.now() > until) throw new Error(`timed out waiting: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A fresh headless Chromium profile; the page's console errors and uncaught exceptions are collected. */
async function browser() {
  assert.ok(existsSync(CHROMIUM_BIN), `no Chromium at ${CHROMIUM_BIN}: apt-get install chromium, or set CHROMIUM_BIN`);
  const profile = tempDir();
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM_BIN,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 900 },
  });
  cleanups.push(() => context.close());
  const page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && !m.text().startsWith('Failed to load resource') && problems.push(`console: ${m.text()}`));
  page.on('response', (r) => r.status() >= 400 && problems.push(`${r.status()} ${new URL(r.url()).pathname}`));
  return { page, problems };
}

function b64url(v) {
  return Buffer.from(JSON.stringify(v)).toString('base64url');
}

/** An HS256 client token, as `cceb token` mints it. */
function token(tenant, agent) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url({ sub: agent, tenant_guid: tenant, ir_instance: 'ir-1', exp: Math.floor(Date.now() / 1000) + 3600 });
  return `${head}.${body}.${createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url')}`;
}

test('console in --dev: mint a token, connect, a notification from the backend port shown and acked, an action from its form acked, an error shown', async () => {
  // A short ack timeout: an unacked notification would be redelivered within the test.
  const b = await bridge(['--dev'], { CCEB_ACK_TIMEOUT_MS: '500' });
  const { page, problems } = await browser();

  const res = await page.goto(`http://${b.addr}/console/`);
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'], /^text\/html/);
  await page.waitForSelector('body[data-ready=true]');
  assert.equal(await page.locator('#action-name option').count(), ACTIONS, 'every action schema has a form');

  // --dev: the mint form is offered; mint for tenant-1/agent-1.
  await page.waitForSelector('#mint:not([hidden])');
  await page.fill('#mint-tenant', 'tenant-1');
  await page.fill('#mint-agent', 'agent-1');
  await page.click('#mint-button');
  await page.waitForFunction(() => document.querySelector('#token').value.startsWith('ey'));

  await page.click('#connect');
  await page.waitForSelector('#state[data-state=connected]');
  assert.equal(await page.textContent('#s-agent'), 'tenant-1 / agent-1 / ir-1');
  assert.match(await page.textContent('#s-session'), /\S/);

  // A notification injected through the backend port.
  const r = await fetch(`http://${b.backend}/backend/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ record: 'AgentPresenceEvent', id: 'console-1', value: { tenantGuid: 'tenant-1', agentGuid: 'agent-1', state: 'Away' } }),
  });
  assert.equal(r.status, 202, await r.text());
  const shown = page.locator('#notification-list li[data-type=presence]');
  await shown.waitFor();
  assert.match(await shown.locator('pre').textContent(), /"state": "Away"/);
  // Acked: the page saw its ack frame go out, and the bridge counted it…
  await shown.locator('.badge.acked').waitFor();
  await waitFor(async () => (await metric(b, 'cceb_notifications_acked_total')) === 1, 'the bridge counts the ack');
  assert.equal(await page.textContent('#s-seq'), '1');
  assert.equal(await page.textContent('#s-acked'), '1');

  // An action from its generated form: ChangeAgentStateEvent {state: Available}.
  await page.selectOption('#action-name', 'ChangeAgentStateEvent');
  await page.fill('#action-form [data-field=state]', 'Available');
  assert.deepEqual(JSON.parse(await page.inputValue('#action-details')), { state: 'Available' });
  await page.click('#send');
  const sent = page.locator('#results li').first();
  await sent.locator('.badge.ack').waitFor();
  const uuid = await sent.getAttribute('data-uuid');
  const published = await (
    await fetch(`http://${b.backend}/backend/v1/actions?after=0&wait_ms=1000`, { headers: { authorization: `Bearer ${ADMIN}` } })
  ).json();
  const record = published.records.find((x) => x.record === 'ChangeAgentStateEvent');
  assert.ok(record, JSON.stringify(published));
  assert.equal(record.value.state, 'Available');
  assert.equal(record.value.agentGuid, 'agent-1');
  assert.ok(uuid);

  // A refused action shows the bridge's code and field: a required field left empty.
  await page.selectOption('#action-name', 'AcceptInteractionEvent');
  await page.click('#send');
  const refused = page.locator('#results li').first();
  await refused.locator('.badge.error').waitFor();
  assert.match(await refused.textContent(), /interactionId/);

  // …and nothing was redelivered, though the ack timeout (500 ms) has passed.
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(await metric(b, 'cceb_notifications_redelivered_total'), 0);
  assert.equal(await page.locator('#notification-list li').count(), 1);

  // The wire log shows the frames both ways, the token masked.
  const wire = await page.textContent('#frames');
  assert.match(wire, /"type":"hello"/);
  assert.match(wire, /"type":"ack"/);
  assert.doesNotMatch(wire, /eyJ/);

  await page.selectOption('#action-name', 'ChangeAgentStateEvent');
  await page.fill('#action-form [data-field=state]', 'Available');
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  assert.deepEqual(problems, []);
});

test('console without --dev: no minting, a pasted token connects', async () => {
  const b = await bridge([]);
  assert.equal((await fetch(`http://${b.addr}/console/dev/token`)).status, 404);
  const { page, problems } = await browser();
  await page.goto(`http://${b.addr}/console`); // redirected to /console/
  await page.waitForSelector('body[data-ready=true]');
  await page.fill('#token', token('t-7', 'a-7'));
  await page.click('#connect');
  await page.waitForSelector('#state[data-state=connected]');
  assert.equal(await page.textContent('#s-agent'), 't-7 / a-7 / ir-1');
  assert.equal(await page.isHidden('#mint'), true);
  // A token the bridge refuses: the client stops, and the page says why.
  await page.click('#disconnect');
  await page.waitForSelector('#state[data-state=closed]');
  await page.fill('#token', 'not-a-token');
  await page.click('#connect');
  await page.waitForSelector('#state[data-state=closed]');
  assert.match(await page.textContent('#state-detail'), /unauthorized|401|token/i);
  // The mint probe finds nothing, and discovery refuses the bad token: nothing else failed.
  assert.deepEqual(problems, ['404 /console/dev/token', '401 /v1/discovery']);
});
