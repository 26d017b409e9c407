import { protocolJsonSchemas, WorkerToAgent } from '@kiln/contracts';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';

/**
 * Checks what the worker writes against the protocol. zod's WorkerToAgent is the definition, but
 * its parse of a result costs 0.2–0.5 ms here: it runs once per job, so V8 never gets it hot, and
 * it sits on the GPU's idle gap (the next job's request goes out only once the result is known
 * to be one). The same rules, compiled by ajv from the JSON Schema zod generates from them (the
 * schema the worker checks its own frames against), accept a result in about a quarter of that.
 * A message they refuse is handed to zod, whose error names the field: zod stays the one source
 * of both the rules and the words, and contracts' tests hold the two to the same verdicts.
 */
export class WorkerMessages {
  /** one compiled validator per message type: a lookup, not a oneOf tried branch by branch */
  private readonly byType = new Map<string, ValidateFunction>();

  constructor() {
    const schema = protocolJsonSchemas()['worker-to-agent.json'] as { $schema: string; oneOf: { properties: { type: { const: string } } }[] };
    const ajv = new Ajv2020({ strict: false, allErrors: false });
    for (const branch of schema.oneOf) this.byType.set(branch.properties.type.const, ajv.compile({ $schema: schema.$schema, ...branch }));
  }

  /** One protocol message from a parsed line; throws (zod's error) when it is not one. */
  parse(json: unknown): WorkerToAgent {
    const type = typeof json === 'object' && json !== null ? (json as { type?: unknown }).type : undefined;
    const validate = typeof type === 'string' ? this.byType.get(type) : undefined;
    if (validate?.(json)) return json as WorkerToAgent;
    return WorkerToAgent.parse(json); // refused (or a type we do not know): zod says why
  }
}

let shared: WorkerMessages | null = null;
/** The agent's one set of compiled validators (compiling them takes about 100 ms). */
export const workerMessages = (): WorkerMessages => (shared ??= new WorkerMessages());
