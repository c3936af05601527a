#!/usr/bin/env node
// Builds the console into crates/cceb/console/ (committed; the binary embeds it
// with include_dir, so `cargo build` needs no npm):
//
//   index.html, style.css   copied from static/
//   app.js                  src/main.ts bundled and minified by esbuild, with
//                           the SDK's source (../typescript/src) and the action
//                           schemas (schemas/actions/*.avsc, the identity fields
//                           the bridge sets left out) built in
//
// The output depends on the inputs alone (no dates, no absolute paths), so
// `scripts/test` can rebuild and `git diff --exit-code` it.
import { build } from 'esbuild';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../..');
const out = join(repo, 'crates/cceb/console');
const actionsDir = join(repo, 'schemas/actions');

// Set by the bridge from the session, refused in action_details (contract section 4).
const RESERVED = ['irInstance', 'tenantGuid', 'agentGuid', 'isSystemAction', 'isRelocate', 'source'];

const schemas = readdirSync(actionsDir)
  .filter((f) => f.endsWith('.avsc'))
  .sort()
  .map((f) => {
    const s = JSON.parse(readFileSync(join(actionsDir, f), 'utf8'));
    if (s.type !== 'record') throw new Error(`schemas/actions/${f}: not a record`);
    return { ...s, fields: s.fields.filter((x) => !RESERVED.includes(x.name)) };
  });

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, 'src/main.ts')],
  outfile: join(out, 'app.js'),
  bundle: true,
  minify: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2020',
  charset: 'utf8',
  legalComments: 'none',
  alias: { '@cceb/client': resolve(here, '../typescript/src/index.ts') },
  define: { __ACTION_SCHEMAS__: JSON.stringify(schemas) },
  logLevel: 'warning',
});
for (const f of ['index.html', 'style.css']) copyFileSync(join(here, 'static', f), join(out, f));

let total = 0;
let gz = 0;
for (const f of readdirSync(out).sort()) {
  const bytes = readFileSync(join(out, f));
  total += statSync(join(out, f)).size;
  gz += gzipSync(bytes, { level: 9 }).length;
}
const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
console.log(`console: ${schemas.length} actions; crates/cceb/console/ ${kib(total)}, gzipped ${kib(gz)}`);
