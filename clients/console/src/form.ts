// An action's form, generated from its Avro record schema: one input per
// field (the identity fields the bridge sets are already left out at build
// time), and the `action_details` object the inputs give.

export type AvroType = string | AvroType[] | { type: string | AvroType; [k: string]: unknown };
export interface AvroField {
  name: string;
  type: AvroType;
  doc?: string;
  default?: unknown;
}
export interface ActionSchema {
  name: string;
  doc?: string;
  fields: AvroField[];
}

/** An agent GUID a client may give as the contact id the bridge resolves (contract section 4). */
const CONTACT_FIELDS: Record<string, string> = {
  destinationAgentGuid: 'destinationAgentContactId',
  secondAgentGuid: 'secondAgentContactId',
};

type Kind =
  | { kind: 'string' }
  | { kind: 'number'; integer: boolean }
  | { kind: 'boolean' }
  | { kind: 'enum'; symbols: string[] }
  | { kind: 'json' };

/** What an input edits: a field's type without its `null` branch, and whether it may be left out. */
function describe(field: AvroField): { kind: Kind; optional: boolean; typeText: string } {
  let t = field.type;
  let optional = field.default !== undefined;
  if (Array.isArray(t)) {
    const rest = t.filter((b) => b !== 'null');
    if (rest.length < t.length) optional = true;
    if (rest.length !== 1) return { kind: { kind: 'json' }, optional, typeText: 'union' };
    t = rest[0]!;
  }
  if (Array.isArray(t)) return { kind: { kind: 'json' }, optional, typeText: 'union' };
  const name = typeof t === 'string' ? t : typeof t.type === 'string' ? t.type : 'complex';
  const logical = typeof t === 'object' ? (t.logicalType as string | undefined) : undefined;
  const typeText = logical ? `${name} (${logical})` : name;
  switch (name) {
    case 'string':
      return { kind: { kind: 'string' }, optional, typeText };
    case 'int':
    case 'long':
      return { kind: { kind: 'number', integer: true }, optional, typeText };
    case 'float':
    case 'double':
      return { kind: { kind: 'number', integer: false }, optional, typeText };
    case 'boolean':
      return { kind: { kind: 'boolean' }, optional, typeText };
    case 'enum':
      return { kind: { kind: 'enum', symbols: ((t as { symbols?: string[] }).symbols ?? []).slice() }, optional, typeText: 'enum' };
    default:
      return { kind: { kind: 'json' }, optional, typeText };
  }
}

interface Input {
  name: string;
  kind: Kind;
  el: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement;
}

/** Renders `schema`'s inputs into `form` (replacing what was there); the returned function reads them. */
export function renderForm(form: HTMLElement, schema: ActionSchema, onInput: () => void): () => Record<string, unknown> {
  form.replaceChildren();
  const inputs: Input[] = [];
  const add = (name: string, d: ReturnType<typeof describe>, doc: string | undefined, hint: string) => {
    const label = document.createElement('label');
    label.className = 'field';
    label.append(`${name}${d.optional ? '' : ' *'} `);
    const type = document.createElement('span');
    type.className = 'hint';
    type.textContent = `${d.typeText}${hint ? ` · ${hint}` : ''}${doc ? ` · ${doc}` : ''}`;
    label.append(type);
    let el: Input['el'];
    if (d.kind.kind === 'boolean' || d.kind.kind === 'enum') {
      const select = document.createElement('select');
      const values = d.kind.kind === 'boolean' ? ['true', 'false'] : d.kind.symbols;
      for (const v of ['', ...values]) select.append(new Option(v === '' ? '(not set)' : v, v));
      el = select;
    } else if (d.kind.kind === 'json') {
      el = document.createElement('textarea');
      el.rows = 2;
      el.placeholder = 'JSON';
    } else {
      const input = document.createElement('input');
      if (d.kind.kind === 'number') {
        input.type = 'number';
        if (!d.kind.integer) input.step = 'any';
      }
      el = input;
    }
    el.name = name;
    el.dataset.field = name;
    el.addEventListener('input', onInput);
    el.addEventListener('change', onInput);
    label.append(el);
    form.append(label);
    inputs.push({ name, kind: d.kind, el });
  };
  for (const f of schema.fields) {
    const d = describe(f);
    const contact = CONTACT_FIELDS[f.name];
    if (contact) {
      add(f.name, { ...d, optional: true }, f.doc, d.optional ? '' : `or ${contact}`);
      add(contact, { kind: { kind: 'string' }, optional: true, typeText: 'string' }, undefined, `or ${f.name}: the bridge resolves it`);
    } else add(f.name, d, f.doc, '');
  }
  return () => {
    const details: Record<string, unknown> = {};
    for (const { name, kind, el } of inputs) {
      const raw = el.value;
      // Left empty: left out (a required field left out is the bridge's to refuse, with its name).
      if (raw.trim() === '') continue;
      switch (kind.kind) {
        case 'number':
          details[name] = Number(raw);
          break;
        case 'boolean':
          details[name] = raw === 'true';
          break;
        case 'json':
          try {
            details[name] = JSON.parse(raw);
          } catch {
            details[name] = raw;
          }
          break;
        default:
          details[name] = raw;
      }
    }
    return details;
  };
}
