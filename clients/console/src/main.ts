// The console: a token (pasted, from `#token=…`, or minted by `serve --dev`),
// a CcebClient of the SDK, live notifications (acked by the SDK once shown),
// any action from a form generated from its Avro schema, and the wire frames.
import { ActionError, CcebClient, type AnyNotification, type StateInfo, type WebSocketConstructor } from '@cceb/client';
import { renderForm, type ActionSchema } from './form';

declare const __ACTION_SCHEMAS__: ActionSchema[];
const SCHEMAS: ActionSchema[] = __ACTION_SCHEMAS__;
const DEV_TOKEN = 'dev/token';
const KEEP = 200;

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing`);
  return el as T;
};
const text = (id: string, value: string | number) => ($(id).textContent = String(value));
const input = (id: string) => $<HTMLInputElement>(id);
const el = (tag: string, cls: string, content?: string): HTMLElement => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (content !== undefined) e.textContent = content;
  return e;
};
const prepend = (list: HTMLElement, item: HTMLElement) => {
  list.prepend(item);
  while (list.children.length > KEEP) list.lastElementChild?.remove();
};

let client: CcebClient | null = null;
let received = 0;
let acked = 0;
/** Notification uuid → its badge, so the ack frame written for it can mark it. */
const badges = new Map<string, HTMLElement>();

// ---- the wire: the browser's WebSocket, with every frame shown
function frame(dir: 'in' | 'out', data: string): void {
  const li = el('li', '');
  // Shown, not kept: the token (hello) and the session key (hello_reply) masked, for screenshots.
  const shown = data.replace(/"(token|session_key)":"[^"]*"/g, '"$1":"…"');
  li.append(el('span', 'dir', dir === 'in' ? '←' : '→'), shown);
  prepend($('frames'), li);
  if (dir !== 'out') return;
  try {
    const msg = JSON.parse(data) as { type?: string; uuid?: string };
    const badge = msg.type === 'ack' && msg.uuid ? badges.get(msg.uuid) : undefined;
    if (badge && !badge.classList.contains('acked')) {
      badge.className = 'badge acked';
      badge.textContent = 'acked';
      text('s-acked', ++acked);
    }
  } catch {
    // Not JSON: shown as it is.
  }
}

const Tapped = class extends WebSocket {
  constructor(url: string) {
    super(url);
    this.addEventListener('message', (e) => frame('in', String(e.data)));
  }
  override send(data: string): void {
    frame('out', data);
    super.send(data);
  }
} as unknown as WebSocketConstructor;

// ---- connection
function showState(state: string, info: StateInfo): void {
  const pill = $('state');
  pill.dataset.state = state;
  pill.textContent = state;
  text('s-state', state);
  let detail = '';
  if (info && 'sessionId' in info) {
    text('s-session', info.sessionId);
    text('s-agent', `${info.agent.tenant_guid} / ${info.agent.agent_guid} / ${info.agent.ir_instance}`);
    text('s-kind', `${info.longLived ? 'long-lived' : 'short-lived'}${info.resumed ? ', resumed' : ''}${info.dropped ? `, ${info.dropped} dropped` : ''}`);
    text('s-endpoint', info.endpoint);
  } else if (info && 'code' in info) {
    detail = `${info.code ?? 'no socket'}${info.reason ? `: ${info.reason}` : ''}`;
    if ('retryInMs' in info && info.retryInMs !== null) detail += ` (retry in ${Math.round(info.retryInMs)} ms)`;
  }
  text('state-detail', detail);
  const live = state !== 'closed';
  $<HTMLButtonElement>('connect').disabled = live;
  $<HTMLButtonElement>('disconnect').disabled = !live;
  $<HTMLButtonElement>('end-session').disabled = state !== 'connected';
}

function showError(message: string): void {
  const p = $('connection-error');
  p.hidden = !message;
  p.textContent = message;
}

function onNotification(n: AnyNotification): void {
  text('s-received', ++received);
  text('s-seq', n.seq);
  const li = el('li', 'notification');
  li.dataset.type = n.type;
  li.dataset.uuid = n.uuid;
  const head = el('div', 'head');
  const badge = el('span', 'badge', 'received');
  badges.set(n.uuid, badge);
  if (badges.size > KEEP) badges.delete(badges.keys().next().value as string);
  head.append(el('span', 'seq', `#${n.seq}`), el('span', 'type', n.type), badge, el('code', 'muted', n.uuid), el('span', 'muted', new Date().toLocaleTimeString()));
  li.append(head, el('pre', '', JSON.stringify(n.data, null, 1)));
  prepend($('notification-list'), li);
  // Returns: the SDK acks it now (the ack frame marks the badge).
}

function connect(): void {
  showError('');
  client?.close();
  received = acked = 0;
  text('s-received', 0);
  text('s-acked', 0);
  text('s-seq', '–');
  const c = new CcebClient({
    url: input('url').value.trim(),
    getToken: () => $<HTMLTextAreaElement>('token').value.trim(),
    longLived: input('long-lived').checked,
    autoAccept: input('auto-accept').checked,
    storage: sessionStorage,
    storagePrefix: 'cceb-console:',
    client: { name: 'cceb-console', version: '0.1.0' },
    WebSocket: Tapped,
  });
  client = c;
  c.on('state', (state, info) => client === c && showState(state, info));
  c.on('notification', onNotification);
  c.on('error', (e) => showError(e instanceof Error ? e.message : String(e)));
  c.connect();
}

async function mint(): Promise<void> {
  showError('');
  const body = {
    tenant_guid: input('mint-tenant').value,
    agent_guid: input('mint-agent').value,
    ir_instance: input('mint-ir').value,
    contact_id: input('mint-contact').value || null,
  };
  const r = await fetch(DEV_TOKEN, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const answer = (await r.json().catch(() => ({}))) as { token?: string; error?: string };
  if (!r.ok || !answer.token) return showError(`mint: ${r.status} ${answer.error ?? ''}`);
  $<HTMLTextAreaElement>('token').value = answer.token;
}

/** `GET dev/token` answers only under `serve --dev`: then the mint form is shown, with its defaults. */
async function offerMint(): Promise<void> {
  const r = await fetch(DEV_TOKEN).catch(() => null);
  if (!r || !r.ok) return;
  const d = (await r.json()) as Record<string, string | null>;
  input('mint-tenant').value = d.tenant_guid ?? '';
  input('mint-agent').value = d.agent_guid ?? '';
  input('mint-ir').value = d.ir_instance ?? '';
  input('mint-contact').value = d.contact_id ?? '';
  $('mint').hidden = false;
}

// ---- actions
let readForm: () => Record<string, unknown> = () => ({});

function selectAction(name: string): void {
  const schema = SCHEMAS.find((s) => s.name === name);
  if (!schema) return;
  text('action-doc', schema.doc ?? '');
  const sync = () => ($<HTMLTextAreaElement>('action-details').value = JSON.stringify(readForm(), null, 1));
  readForm = renderForm($('action-form'), schema, sync);
  sync();
}

function send(): void {
  const name = $<HTMLSelectElement>('action-name').value;
  const li = el('li', 'result');
  const badge = el('span', 'badge pending', 'sending');
  const head = el('div', 'head');
  li.append(head);
  prepend($('results'), li);
  let details: Record<string, unknown>;
  try {
    details = JSON.parse($<HTMLTextAreaElement>('action-details').value || '{}') as Record<string, unknown>;
  } catch (e) {
    head.append(el('span', 'type', name), el('span', 'badge error', 'error'), el('span', 'error', `action_details is not JSON: ${(e as Error).message}`));
    return;
  }
  if (!client) {
    head.append(el('span', 'type', name), el('span', 'badge error', 'error'), el('span', 'error', 'not connected'));
    return;
  }
  const uuid = input('action-uuid').value.trim() || crypto.randomUUID();
  li.dataset.uuid = uuid;
  head.append(el('span', 'type', name), badge, el('code', 'muted', uuid));
  // A name known only at run time: the SDK's untyped overload.
  const untyped = client as unknown as { action(n: string, d: object, o: { uuid: string }): Promise<void> };
  untyped.action(name, details, { uuid }).then(
    () => {
      badge.className = 'badge ack';
      badge.textContent = 'ack';
      li.dataset.outcome = 'ack';
    },
    (e: unknown) => {
      badge.className = 'badge error';
      badge.textContent = e instanceof ActionError ? e.code : 'error';
      li.dataset.outcome = 'error';
      const why = e instanceof ActionError ? `${e.message}${e.field ? ` (field ${e.field})` : ''}` : String(e);
      li.append(el('div', 'error', why));
    },
  );
}

// ---- start
function start(): void {
  input('url').value = `${location.origin}/v1/discovery`;
  // `#token=…`: taken, then dropped from the address bar.
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromFragment) {
    $<HTMLTextAreaElement>('token').value = fromFragment;
    history.replaceState(null, '', location.pathname + location.search);
  }
  const select = $<HTMLSelectElement>('action-name');
  for (const s of SCHEMAS) select.append(new Option(s.name, s.name));
  select.addEventListener('change', () => selectAction(select.value));
  selectAction(select.value);
  $('connect').addEventListener('click', connect);
  $('disconnect').addEventListener('click', () => client?.close());
  $('end-session').addEventListener('click', () =>
    void client?.endSession().catch((e: unknown) => showError(`end session: ${String(e)}`)),
  );
  $('mint-button').addEventListener('click', () => void mint().catch((e: unknown) => showError(`mint: ${String(e)}`)));
  $('send').addEventListener('click', send);
  void offerMint();
  document.body.dataset.ready = 'true';
}

start();
