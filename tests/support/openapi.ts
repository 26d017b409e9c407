import { Ajv2020 } from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

/**
 * Checks real responses against the OpenAPI document the API serves: the operation the request
 * matched (path template and method), the status it answered (which must be documented) and
 * the JSON body against that status's schema, with ajv (JSON Schema 2020-12, as OpenAPI 3.1).
 */
export class OpenApiChecker {
  private readonly ajv = new Ajv2020({ strict: false, allErrors: true });
  private readonly id = 'https://kiln.test/openapi.json';
  private readonly templates: { method: string; path: string; re: RegExp }[] = [];

  constructor(readonly doc: any) {
    addFormats.default(this.ajv);
    this.ajv.addSchema({ ...doc, $id: this.id }, undefined, undefined, false);
    for (const [path, ops] of Object.entries<Record<string, unknown>>(doc.paths)) {
      const re = new RegExp(`^${path.replace(/\{[^}]+\}/g, '[^/]+')}$`);
      for (const method of Object.keys(ops)) this.templates.push({ method: method.toUpperCase(), path, re });
    }
  }

  /** The documented operation a concrete request path and method match, e.g. GET /v1/jobs/{id}. */
  operation(method: string, url: string): { path: string; op: any } {
    const path = new URL(url, 'http://x').pathname;
    const t = this.templates.find((x) => x.method === method && x.re.test(path));
    if (!t) throw new Error(`${method} ${path} is not in the OpenAPI document`);
    return { path: t.path, op: this.doc.paths[t.path][method.toLowerCase()] };
  }

  /** Throws with ajv's errors unless the response's status is documented and its JSON body matches. */
  check(method: string, url: string, status: number, body: unknown, contentType = 'application/json'): void {
    const { path, op } = this.operation(method, url);
    const documented = op.responses[String(status)];
    if (!documented) throw new Error(`${method} ${path} answered ${status}, which the document does not list (it lists ${Object.keys(op.responses).join(', ')})`);
    const media = Object.keys(documented.content ?? {});
    const type = media.find((m) => contentType.startsWith(m));
    if (!type) throw new Error(`${method} ${path} ${status}: content-type ${contentType} is not documented (${media.join(', ') || 'no body'})`);
    if (type !== 'application/json') return;
    const pointer = ['paths', path, method.toLowerCase(), 'responses', String(status), 'content', type, 'schema'].map((s) => s.replace(/~/g, '~0').replace(/\//g, '~1')).join('/');
    const validate = this.ajv.getSchema(`${this.id}#/${pointer}`);
    if (!validate) throw new Error(`no schema at ${pointer}`);
    if (!validate(body)) {
      throw new Error(`${method} ${path} ${status} does not match its documented schema:\n${JSON.stringify(validate.errors?.slice(0, 5), null, 2)}\nbody: ${JSON.stringify(body).slice(0, 500)}`);
    }
  }

  /** Validates a request body against the operation's documented request schema. */
  checkRequest(method: string, url: string, body: unknown): void {
    const { path } = this.operation(method, url);
    const pointer = ['paths', path, method.toLowerCase(), 'requestBody', 'content', 'application/json', 'schema'].map((s) => s.replace(/~/g, '~0').replace(/\//g, '~1')).join('/');
    const validate = this.ajv.getSchema(`${this.id}#/${pointer}`);
    if (!validate) throw new Error(`${method} ${path} documents no JSON request body`);
    if (!validate(body)) throw new Error(`${method} ${path}: example does not match the request schema: ${JSON.stringify(validate.errors?.slice(0, 5))}`);
  }
}
