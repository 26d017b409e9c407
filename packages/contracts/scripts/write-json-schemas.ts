// Writes the protocol's JSON Schema files into workers-py. Run after changing a contract:
// `npm run gen:schemas`. The contracts test fails while the files are stale.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { JSON_SCHEMA_DIR, protocolJsonSchemas, renderJsonSchema } from '../src/index.js';

const root = resolve(import.meta.dirname, '../../..');
const dir = join(root, JSON_SCHEMA_DIR);
mkdirSync(dir, { recursive: true });
for (const [name, schema] of Object.entries(protocolJsonSchemas())) {
  writeFileSync(join(dir, name), renderJsonSchema(schema));
  console.log(`wrote ${join(JSON_SCHEMA_DIR, name)}`);
}
