#!/usr/bin/env node
// Generates src/generated/types.ts from the bridge's record set: the event
// schemas (schemas/events/*.avsc) and their mapping to notifications
// (schemas/mapping.toml) give the notification payloads; the action schemas
// (schemas/actions/*.avsc) give the action details.
//
//   node scripts/gen-types.mjs [--schemas DIR] [--check]
//
// --check: fail (exit 1) when the committed file differs from what the schemas
// give. No dependencies: the mapping's TOML subset is parsed here.
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const schemaDir = resolve(opt('--schemas') ?? join(here, '../../../schemas'));
const outFile = join(here, '../src/generated/types.ts');

// The contract's notification ids (section 5), in its order.
const NOTIFICATION_IDS = [
  'interactions_list', 'agent_interaction', 'interaction_update', 'presence', 'call_leg', 'switch_line',
  'recording_ready', 'campaign_status', 'agent_line_status', 'monitoring_agent_list', 'provisioning',
  'phone_validation', 'off_hook', 'agent_phone_update',
];
// Set by the bridge from the session, refused in action_details (contract section 4).
const RESERVED = ['irInstance', 'tenantGuid', 'agentGuid', 'isSystemAction', 'isRelocate', 'source'];
// A contact id the bridge resolves to the agent GUID field it replaces (contract section 4).
const CONTACT_FIELDS = { destinationAgentGuid: 'destinationAgentContactId', secondAgentGuid: 'secondAgentContactId' };
const OFF_HOOK_STATES = ['enabled', 'disabled', 'answered', 'dropped', 'rejected', 'connected', 'disconnected', 'authenticated', 'authentication_failed', 'offering'];
const PHONE_VALIDATION_STATES = ['offering', 'answered', 'verified', 'invalid', 'rejected', 'dropped'];
// Records only the bridge publishes (schemas/bridge): not client actions.

function fail(msg) {
  console.error(`gen-types: ${msg}`);
  process.exit(1);
}

// ---- mapping.toml: [events.Name] tables of `key = "string"` and one-line inline tables.
function parseMapping(text) {
  const events = {};
  let cur = null;
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/(^|\s)#.*$/, '').trim();
    if (!line) return;
    let m = line.match(/^\[events\.([A-Za-z0-9_]+)\]$/);
    if (m) {
      cur = events[m[1]] = {};
      return;
    }
    m = line.match(/^([a-z_]+)\s*=\s*(.+)$/);
    if (!m || !cur) fail(`mapping.toml:${i + 1}: cannot read \`${raw.trim()}\``);
    cur[m[1]] = parseValue(m[2], i + 1);
  });
  return events;
}
function parseValue(v, line) {
  v = v.trim();
  if (/^"[^"]*"$/.test(v)) return v.slice(1, -1);
  if (v === 'true' || v === 'false') return v === 'true';
  const m = v.match(/^\{(.*)\}$/);
  if (m) {
    const obj = {};
    for (const part of m[1].split(',')) {
      const kv = part.match(/^\s*([a-z_]+)\s*=\s*(.+?)\s*$/);
      if (!kv) fail(`mapping.toml:${line}: cannot read inline table \`${v}\``);
      obj[kv[1]] = parseValue(kv[2], line);
    }
    return obj;
  }
  fail(`mapping.toml:${line}: unsupported value \`${v}\``);
}

// ---- Avro → TypeScript
export function snakeCase(name) {
  const c = [...name];
  let out = '';
  const isUpper = (ch) => ch !== undefined && ch !== ch.toLowerCase() && ch === ch.toUpperCase();
  const isLower = (ch) => ch !== undefined && ch !== ch.toUpperCase() && ch === ch.toLowerCase();
  const isDigit = (ch) => ch !== undefined && ch >= '0' && ch <= '9';
  c.forEach((ch, i) => {
    if (isUpper(ch)) {
      const prev = c[i - 1];
      const boundary = isLower(prev) || isDigit(prev) || (isUpper(prev) && isLower(c[i + 1]));
      if (boundary && !out.endsWith('_')) out += '_';
      out += ch.toLowerCase();
    } else out += ch;
  });
  return out;
}

const pascal = (s) => s.replace(/(^|_)([a-z0-9])/g, (_, __, ch) => ch.toUpperCase());
const doc = (text, indent = '') => (text ? `${indent}/** ${String(text).replace(/\*\//g, '*\\/')} */\n` : '');
const key = (k) => (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(k) ? k : JSON.stringify(k));

/** Emits TS for Avro records; `keys`: 'snake' (notification data) or 'asis' (action details). */
class Emitter {
  constructor(keys, suffix) {
    this.keys = keys;
    this.suffix = suffix; // appended to nested record names so the two namespaces never clash
    this.named = new Map(); // avro full or short name → TS type name
    this.decls = [];
  }
  typeName(name) {
    return name.split('.').pop() + this.suffix;
  }
  /** TS type of an Avro schema; `{optional}` when it is a union with null. */
  type(s) {
    if (typeof s === 'string') {
      switch (s) {
        case 'null': return { ts: 'null' };
        case 'boolean': return { ts: 'boolean' };
        case 'int': case 'long': case 'float': case 'double': return { ts: 'number' };
        case 'string': case 'bytes': return { ts: 'string' };
        default: {
          const t = this.named.get(s) ?? this.named.get(s.split('.').pop());
          if (!t) fail(`unknown named type ${s}`);
          return { ts: t };
        }
      }
    }
    if (Array.isArray(s)) {
      const optional = s.some((b) => b === 'null');
      const rest = s.filter((b) => b !== 'null').map((b) => this.type(b).ts);
      return { ts: rest.length ? [...new Set(rest)].join(' | ') : 'null', optional };
    }
    if (s.logicalType && ['int', 'long'].includes(s.type)) return { ts: 'number' };
    if (s.logicalType === 'uuid' || s.logicalType === 'decimal') return { ts: 'string' };
    switch (s.type) {
      case 'record': return { ts: this.record(s) };
      case 'enum': {
        const name = this.typeName(s.name);
        this.named.set(s.name, name);
        this.decls.push(`${doc(s.doc)}export type ${name} = ${s.symbols.map((x) => JSON.stringify(x)).join(' | ')};\n`);
        return { ts: name };
      }
      case 'array': return { ts: `Array<${this.type(s.items).ts}>` };
      case 'map': return { ts: `Record<string, ${this.type(s.values).ts}>` };
      case 'fixed': return { ts: 'string' };
      default: return this.type(s.type);
    }
  }
  /** Declares the record's interface (nested records first); returns its name. */
  record(s, nameOverride, { omit = [] } = {}) {
    const name = nameOverride ?? this.typeName(s.name);
    this.named.set(s.name, name);
    const lines = [];
    for (const f of s.fields) {
      if (omit.includes(f.name)) continue;
      const t = this.type(f.type);
      const k = this.keys === 'snake' ? snakeCase(f.name) : f.name;
      // Notification data leaves out null values; action details may leave out
      // what is nullable or has a default.
      const optional = t.optional || (this.keys === 'asis' && f.default !== undefined);
      lines.push(`${doc(f.doc, '  ')}  ${key(k)}${optional ? '?' : ''}: ${t.ts};`);
    }
    this.decls.push(`${doc(s.doc)}export interface ${name} {\n${lines.join('\n')}\n}\n`);
    return name;
  }
}

function readSchemas(dir) {
  return readdirSync(join(schemaDir, dir))
    .filter((f) => f.endsWith('.avsc'))
    .sort()
    .map((f) => {
      const s = JSON.parse(readFileSync(join(schemaDir, dir, f), 'utf8'));
      if (s.type !== 'record') fail(`${dir}/${f}: not a record`);
      return s;
    });
}

function generate() {
  const mapping = parseMapping(readFileSync(join(schemaDir, 'mapping.toml'), 'utf8'));
  const events = new Map(readSchemas('events').map((s) => [s.name, s]));
  const actions = readSchemas('actions');
  for (const name of Object.keys(mapping)) if (!events.has(name)) fail(`mapping.toml names ${name}, which has no schema`);
  for (const name of events.keys()) if (!mapping[name]) fail(`events/${name}.avsc has no mapping entry`);

  // ---- notifications
  const ev = new Emitter('snake', 'Data');
  const byNotification = new Map(); // notification id → TS type expressions (a union)
  const add = (id, ts) => {
    if (!NOTIFICATION_IDS.includes(id)) fail(`mapping names notification \`${id}\`, not one of the contract`);
    if (!byNotification.has(id)) byNotification.set(id, []);
    byNotification.get(id).push(ts);
  };
  for (const [record, m] of Object.entries(mapping)) {
    const s = events.get(record);
    const fieldsOf = (n) => s.fields.find((f) => f.name === n);
    if (m.transform === 'off_hook') {
      const base = ev.record(s, `${record}Data`, { omit: ['mediaResourceId'] });
      const states = OFF_HOOK_STATES.filter((x) => x !== 'authenticated' && x !== 'offering');
      ev.decls.push(
        `/** \`off_hook\` from an ${record}: the record plus \`state\` (messageId 250-255); \`media_resource_id\` only when \`authenticated\`. */\n` +
          `export type OffHookPlatformData =\n` +
          `  | (${base} & { state: 'authenticated'; media_resource_id?: string })\n` +
          `  | (${base} & { state: ${states.map((x) => `'${x}'`).join(' | ')} });\n` +
          `/** The offering the bridge synthesises when an off-hook agent becomes Available: exactly this. */\n` +
          `export interface OffHookOfferingData {\n  state: 'offering';\n  /** Seconds. */\n  timeout: number;\n}\n`,
      );
      add(m.notification, 'OffHookPlatformData');
      add(m.notification, 'OffHookOfferingData');
    } else if (m.transform === 'phone_validation') {
      const base = ev.record(s, `${record}Base`, { omit: ['state', 'timeout'] });
      const timeout = fieldsOf('timeout') ? ev.type(fieldsOf('timeout').type).ts : 'number';
      const others = PHONE_VALIDATION_STATES.filter((x) => x !== 'offering');
      ev.decls.push(
        `/** \`phone_validation\`: only \`offering\` carries \`timeout\`. */\n` +
          `export type ${record}Data =\n` +
          `  | (${base} & { state: 'offering'; timeout?: ${timeout} })\n` +
          `  | (${base} & { state: ${others.map((x) => `'${x}'`).join(' | ')} });\n`,
      );
      add(m.notification, `${record}Data`);
    } else if (m.transform !== undefined) {
      fail(`mapping.toml: ${record} has transform \`${m.transform}\`, which this generator does not know`);
    } else if (m.notification === 'provisioning') {
      const base = ev.record(s, `${record}Data`);
      add('provisioning', `(${base} & { event_type: '${record}' })`);
    } else {
      add(m.notification, ev.record(s, `${record}Data`));
    }
    if (m.each) {
      const f = fieldsOf(m.each.field);
      if (!f || typeof f.type !== 'object' || f.type.type !== 'array') fail(`${record}.${m.each.field} is not an array`);
      add(m.each.notification, ev.type(f.type.items).ts);
    }
    if (m.directory === 'agent_updated') add('agent_phone_update', 'AgentPhoneUpdateData');
  }
  if (byNotification.has('agent_phone_update')) {
    ev.decls.push(
      `/** Sent to the agent alone when an AgentUpdatedEvent changes its recording controls. */\n` +
        `export interface AgentPhoneUpdateData {\n  /** 0, 1 or 2. */\n  recording_controls: number;\n}\n`,
    );
  }

  // ---- actions
  const ac = new Emitter('asis', 'Details');
  const actionNames = [];
  for (const s of actions) {
    actionNames.push(s.name);
    const contact = Object.keys(CONTACT_FIELDS).filter((g) => s.fields.some((f) => f.name === g));
    const base = ac.record(s, contact.length ? `${s.name}Fields` : `${s.name}Details`, { omit: [...RESERVED, ...contact] });
    if (contact.length) {
      // Either the agent GUID or the contact id the bridge resolves to it, not both.
      const parts = contact.map((g) => {
        const f = s.fields.find((x) => x.name === g);
        const t = ac.type(f.type);
        const opt = t.optional || f.default !== undefined;
        const c = CONTACT_FIELDS[g];
        return opt
          ? `({ ${g}?: ${t.ts}; ${c}?: never } | { ${c}: string; ${g}?: never })`
          : `({ ${g}: ${t.ts}; ${c}?: never } | { ${c}: string; ${g}?: never })`;
      });
      ac.decls.push(`${doc(s.doc)}export type ${s.name}Details = ${base} & ${parts.join(' & ')};\n`);
    }
  }

  const out = [];
  out.push(
    `// Generated by scripts/gen-types.mjs from the bridge's record set (schemas/:\n` +
      `// events/*.avsc + mapping.toml, actions/*.avsc). Do not edit: run \`npm run gen\`.\n` +
      `/* eslint-disable */\n`,
  );
  out.push(`/** The notification ids of the contract (section 5). */\nexport const NOTIFICATION_TYPES = [\n${NOTIFICATION_IDS.map((x) => `  '${x}',`).join('\n')}\n] as const;\nexport type NotificationType = (typeof NOTIFICATION_TYPES)[number];\n`);
  out.push(`// ---- notification payloads (snake_case keys, null fields left out)\n`);
  out.push(...ev.decls);
  const dataType = (id) => {
    const ts = [...new Set(byNotification.get(id) ?? [])];
    if (ts.length === 0) return 'Record<string, unknown>';
    if (ts.length === 1) return ts[0];
    // Several records (or shapes) make this notification: a named union.
    const name = `${pascal(id)}Data`;
    out.push(`/** \`${id}\`: one of these shapes. */\nexport type ${name} =\n${ts.map((t) => `  | ${t}`).join('\n')};\n`);
    return name;
  };
  const rows = NOTIFICATION_IDS.map((id) => `  ${id}: ${dataType(id)};`);
  out.push(
    `/** Notification id → its \`data\`. Ids no record of this set produces get a generic object. */\nexport interface NotificationDataMap {\n` +
      rows.join('\n') +
      `\n}\n`,
  );
  out.push(`// ---- action details (the Avro field names, camelCase; the identity fields are the bridge's)\n`);
  out.push(...ac.decls);
  out.push(`/** The supported actions (contract section 4). */\nexport const ACTION_NAMES = [\n${actionNames.map((x) => `  '${x}',`).join('\n')}\n] as const;\nexport type ActionName = (typeof ACTION_NAMES)[number];\n`);
  out.push(`/** Action name → its \`action_details\`. */\nexport interface ActionDetailsMap {\n${actionNames.map((n) => `  ${n}: ${n}Details;`).join('\n')}\n}\n`);
  return out.join('\n');
}

function main() {
  const text = generate();
  if (args.includes('--check')) {
    let committed = '';
    try {
      committed = readFileSync(outFile, 'utf8');
    } catch {}
    if (committed !== text) fail(`${outFile} is out of date with ${schemaDir}: run \`npm run gen\` and commit it`);
    console.log('gen-types: src/generated/types.ts is up to date');
  } else {
    writeFileSync(outFile, text);
    console.log(`gen-types: wrote ${outFile} from ${schemaDir}`);
  }
}

// Run when executed, not when imported (the tests import `snakeCase` and `generate`).
if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) main();

export { generate };
