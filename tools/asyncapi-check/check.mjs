// Validates an AsyncAPI document with @asyncapi/parser (its schema and its
// rules): prints every diagnostic, exits 1 on any error. scripts/test runs it
// on docs/asyncapi.json.
import { readFile } from 'node:fs/promises';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node check.mjs <asyncapi.json>');
  process.exit(2);
}
const text = await readFile(file, 'utf8');
const { document, diagnostics } = await new Parser().parse(text, { source: file });
const names = { [DiagnosticSeverity.Error]: 'error', [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info', [DiagnosticSeverity.Hint]: 'hint' };
for (const d of diagnostics) {
  console.log(`${names[d.severity] ?? d.severity} ${d.code} at ${d.path.join('/')}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
const warnings = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Warning).length;
if (!document || errors > 0) {
  console.error(`${file}: ${errors} errors, ${warnings} warnings: not a valid AsyncAPI document`);
  process.exit(1);
}
const messages = document.allMessages().length;
const operations = document.operations().length;
console.log(`${file}: valid AsyncAPI ${document.version()} (${messages} messages, ${operations} operations): ${errors} errors, ${warnings} warnings`);
