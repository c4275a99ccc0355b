"""The training loop around the step: `train.run_stage`'s steps/s against its
jitted step alone, for the default recipe.

  python benchmarks/loop_speed.py [--steps=300] [--workdir=DIR]

The problem is the default recipe's (configs/rl.py: TF-IDF + MiniLM features,
five MLP members, utility head) on the embedded synthetic data, prepared by
`train.prepare_problem` in DIR (default: a temporary folder; the sentence
encoder's embeddings come from the on-disk cache when it has them). Three
rates of Stage 1 (SFT) steps, after a run that compiled everything:

  loop_recipe   train.run_stage with the recipe's settings: the input pipeline
                (grain, batches placed on the device), metrics every
                log_every steps, the out-of-fold check every sft.select_every
                steps, a checkpoint every checkpoint_every steps
  loop_input    the same loop with logging, checks and checkpoints pushed past
                the last step: the input path and the loop's own work
  step          the jitted step run_stage compiled, called back to back on one
                batch already on the device: the floor

A loop's rate is marginal: `steps` / (the time of a run of 2 x `steps` steps
- the time of a run of `steps`), so that what every run pays once (reading
the problem into the pipeline, the last checkpoint) cancels out.

`loop_input_over_step` = step time / loop_input time per step: 1 means the
loop feeds the step without making it wait (the next batch is read and placed
while the step runs, and nothing in the loop waits for the step it has just
dispatched).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_stage(config, problem, mesh, workdir: pathlib.Path, compiled: dict) -> float:
  from entrorouter_jax import train
  workdir.mkdir(parents=True)
  start = time.perf_counter()
  train.run_stage(config, 'sft', problem, mesh, workdir, train.MetricsWriter(workdir),
                  compiled=compiled)
  return time.perf_counter() - start


def loop_figures(steps: int = 300, workdir: str | None = None,
                 overrides: dict | None = None) -> list[dict]:
  """One {"figure": "train_loop"} row (module docstring); `overrides`
  ({'dotted.key': value}) change the recipe (the tests' tiny sizes)."""
  import jax
  from configs import rl as rl_config
  from entrorouter_jax import logs, sharding, suite, train
  from entrorouter_jax.data import pipeline
  logs.show_progress_logs()
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory()
    workdir = tmp.name
  root = pathlib.Path(workdir)
  config = suite.apply_overrides(rl_config.get_config(), dict(overrides or {}))
  config = suite.apply_overrides(config, {'sft.num_steps': steps, 'sft.patience': 0})
  quiet = suite.apply_overrides(config, {'log_every': 10 * steps, 'sft.select_every': 10 * steps,
                                         'checkpoint_every': 10 * steps})
  problem = train.prepare_problem(config, root / 'problem')
  mesh = sharding.make_mesh(config.mesh)
  compiled = {}
  _run_stage(config, problem, mesh, root / 'warm', compiled)   # compiles the step and checks
  seconds = {}
  for name, cfg in (('loop_recipe', config), ('loop_input', quiet)):
    longer = suite.apply_overrides(cfg, {'sft.num_steps': 2 * steps})
    seconds[name] = (_run_stage(longer, problem, mesh, root / f'{name}_2n', compiled)
                     - _run_stage(cfg, problem, mesh, root / f'{name}_n', compiled))

  step_fn = compiled['step', 'sft']
  _, state, _ = train.create_state(config, 'sft', problem, mesh, compiled)
  batch_size = train.scaled_batch_size(config.sft.batch_size, problem.train.num_queries,
                                       sharding.batch_divisor(mesh))
  batch = next(iter(pipeline.make_table_dataset(problem.train_table(),
                                                global_batch_size=batch_size, seed=0)))
  soft_weight = jax.device_put(np.float32(config.sft.soft_weight), sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    batch = pipeline.to_global(batch, sharding.batch_sharding(mesh))
    for _ in range(3):
      state, metrics = step_fn(state, batch, soft_weight)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, batch, soft_weight)
    jax.block_until_ready((state, metrics))
    seconds['step'] = time.perf_counter() - start
  if tmp is not None:
    tmp.cleanup()
  # None where the longer run was not the slower one (too few steps to tell).
  per_s = {name: steps / s if s > 0 else None for name, s in seconds.items()}
  ratio = lambda name: (round(per_s[name] / per_s['step'], 3)
                        if per_s[name] and per_s['step'] else None)
  return [{'figure': 'train_loop', 'stage': 'sft', 'steps': steps, 'batch': batch_size,
           **{f'{name}_steps_per_s': v and round(v, 1) for name, v in per_s.items()},
           'loop_input_over_step': ratio('loop_input'),
           'loop_recipe_over_step': ratio('loop_recipe')}]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--workdir', default=None, help='where the problem is prepared')
  args = parser.parse_args()
  for fig in loop_figures(args.steps, args.workdir):
    print(json.dumps(fig), flush=True)


if __name__ == '__main__':
  main()
