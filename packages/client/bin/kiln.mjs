#!/usr/bin/env node
// The kiln command, run from the TypeScript source (as every Kiln process is, through tsx).
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli.ts');
process.exitCode = await main(process.argv);
