// The generated types: they follow the schemas (the generator's --check), and
// handlers and action details are typed. The type assertions are checked by
// `tsc` when the tests are built (`@ts-expect-error` fails the build if the
// line compiles); the runtime asserts check the generator itself.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  ACTION_NAMES,
  browserStorage,
  CcebClient,
  MemoryStorage,
  NOTIFICATION_TYPES,
  type ActionDetailsMap,
  type KeyValueStorage,
  type NotificationDataMap,
} from '../src/index.js';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '../..');

test('the generated file is what the schemas give (gen-types --check)', () => {
  const out = execFileSync(process.execPath, [join(pkg, 'scripts/gen-types.mjs'), '--check'], { encoding: 'utf8' });
  assert.match(out, /up to date/);
});

test('snake_case as the bridge converts keys (schema/convert.rs)', async () => {
  const gen = (await import(join(pkg, 'scripts/gen-types.mjs') as string)) as { snakeCase: (s: string) => string };
  for (const [a, b] of [
    ['interactionId', 'interaction_id'],
    ['mediaResourceId', 'media_resource_id'],
    ['irInstance', 'ir_instance'],
    ['URLValue', 'url_value'],
    ['already_snake', 'already_snake'],
    ['line2Id', 'line2_id'],
  ]) {
    assert.equal(gen.snakeCase(a!), b);
  }
});

test('every notification id of the contract and the 36 actions are typed', () => {
  assert.equal(NOTIFICATION_TYPES.length, 14);
  assert.equal(ACTION_NAMES.length, 36);
  assert.ok(!(ACTION_NAMES as readonly string[]).includes('AgentChatAvailabilityEvent'), 'the bridge publishes that one itself');
  // Compile-time: the map has a key per id, and each id is a key of the map.
  const ids: Array<keyof NotificationDataMap> = [...NOTIFICATION_TYPES];
  const names: Array<keyof ActionDetailsMap> = [...ACTION_NAMES];
  assert.equal(ids.length + names.length, 50);
});

test('handlers and actions are typed by name (checked by tsc)', () => {
  const c = new CcebClient({ url: 'ws://127.0.0.1:9/ws/v1', getToken: () => 't' });
  c.on('interaction_update', (n) => {
    const id: string = n.data.interaction_id;
    const state: string = n.data.state;
    // @ts-expect-error the data is snake_case
    void n.data.interactionId;
    return [id, state];
  });
  c.on('provisioning', (n) => {
    if (n.data.event_type === 'AgentAddedEvent') {
      const contact: string | undefined = n.data.contact_id;
      void contact;
    }
  });
  c.on('off_hook', (n) => {
    if (n.data.state === 'offering') {
      const seconds: number | undefined = n.data.timeout;
      void seconds;
    } else if (n.data.state === 'authenticated') {
      void n.data.media_resource_id;
    } else {
      // @ts-expect-error only `authenticated` carries the media resource
      void n.data.media_resource_id;
    }
  });
  c.on('agent_phone_update', (n) => n.data.recording_controls + 1);
  c.on('notification', (n) => {
    if (n.type === 'presence') void n.data.state;
  });
  c.on('closed', ({ code, reason }) => void [code, reason]);
  const typed = () => {
    void c.action('ChangeAgentStateEvent', { state: 'Away' });
    void c.action('BlindTransferEvent', { interactionId: 'i', destinationAgentContactId: '1002' });
    void c.action('BlindTransferEvent', { interactionId: 'i', destinationAgentGuid: 'g' });
    // @ts-expect-error `state` is required
    void c.action('ChangeAgentStateEvent', {});
    // @ts-expect-error the identity fields are the bridge's
    void c.action('ChangeAgentStateEvent', { state: 'Away', tenantGuid: 't' });
    // @ts-expect-error a contact id or the GUID it replaces, not both
    void c.action('BlindTransferEvent', { interactionId: 'i', destinationAgentGuid: 'g', destinationAgentContactId: '1' });
  };
  void typed; // never called: this test is about types
  c.close();
  assert.equal(c.state, 'closed');
});

test('storage: memory by default, any Web-Storage-like object (sync or async) fits', async () => {
  const m = new MemoryStorage();
  m.setItem('k', 'v');
  assert.equal(m.getItem('k'), 'v');
  m.removeItem('k');
  assert.equal(m.getItem('k'), null);
  // No localStorage in Node: memory.
  assert.ok(browserStorage() instanceof MemoryStorage);
  const map = new Map<string, string>();
  const asyncStore: KeyValueStorage = {
    getItem: async (k) => map.get(k) ?? null,
    setItem: async (k, v) => void map.set(k, v),
    removeItem: async (k) => void map.delete(k),
  };
  await asyncStore.setItem('a', 'b');
  assert.equal(await asyncStore.getItem('a'), 'b');
});
