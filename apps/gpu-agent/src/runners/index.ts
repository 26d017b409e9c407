import { CacheRunner } from './cache.js';
import { GenerationRunner } from './generation.js';
import type { JobKind, Runner, RunnerDeps } from './runner.js';
import { SelfTestRunner } from './self-test.js';
import { TrainingRunner } from './training.js';

export type { JobKind, JobOf, Run, Runner, RunnerDeps } from './runner.js';

/** Every kind of job's runner. A new kind is one runner file and one line here. */
export type Runners = { [K in JobKind]: Runner<K, any, any> };

export function createRunners(d: RunnerDeps): Runners {
  return {
    generation: new GenerationRunner(d),
    training: new TrainingRunner(d),
    cache: new CacheRunner(d),
    self_test: new SelfTestRunner(d),
  };
}
