#!/usr/bin/env node
// The browser bundle size of the package: dist/index.js bundled, minified
// (esbuild) and gzipped (level 9). `ws` stays out: a browser never loads it.
import { build } from 'esbuild';
import { gzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
async function measure(label, contents) {
  const r = await build({
    stdin: { contents, resolveDir: pkg, loader: 'js' },
    bundle: true,
    minify: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2020',
    external: ['ws'],
    write: false,
  });
  const code = r.outputFiles[0].contents;
  const kib = (n) => `${(n / 1024).toFixed(1)} KiB (${n} B)`;
  console.log(`${label}: minified ${kib(code.length)}, gzipped ${kib(gzipSync(code, { level: 9 }).length)}`);
}

// Everything the package exports.
await measure('@cceb/client, whole package', "export * from './dist/index.js';");
// What an application that uses the client alone ships.
await measure('@cceb/client, CcebClient only', "import { CcebClient, MemoryStorage } from './dist/index.js'; globalThis.c = new CcebClient({ url: '', getToken: () => '', storage: new MemoryStorage() });");
