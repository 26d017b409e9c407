export * from './errors.js';
export * from './generation.js';
export * from './job.js';
export * from './agent.js';
export * from './webhook.js';
export * from './api.js';
export * from './protocol.js';
export * from './json-schemas.js';
