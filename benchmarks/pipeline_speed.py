"""The training input pipeline of the default recipe (grain, in-memory tables:
the embeddings backbone reads no text) at N queries: examples/s and the time
to the first batch.

  python benchmarks/pipeline_speed.py [--sizes=10000,100000,1000000]

The tables are what `train.run_stage` feeds for the default recipe: outcomes,
outcome_mask, costs (K = 11 models), Stage 0's p_hat / c_bar and the
640-d query features, drawn at random (the pipeline's cost does not depend on
the values). The iterator is `pipeline.make_table_dataset`, batches of 256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from entrorouter_jax.data import pipeline  # noqa: E402

K_MODELS, DIM, BATCH = 11, 640, 256


def tables(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {'outcomes': (rng.random((n, K_MODELS)) < 0.6).astype(np.float32),
          'outcome_mask': np.ones((n, K_MODELS), bool),
          'costs': rng.random((n, K_MODELS), dtype=np.float32),
          'p_hat': rng.random((n, K_MODELS), dtype=np.float32),
          'c_bar': rng.random((n, K_MODELS), dtype=np.float32),
          'features': rng.standard_normal((n, DIM), dtype=np.float32)}


def pipeline_figure(n: int, batches: int = 200) -> dict:
  data = tables(n)
  start = time.perf_counter()
  it = iter(pipeline.make_table_dataset(data, global_batch_size=BATCH, seed=0,
                                        process_index=0, process_count=1))
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  return {'figure': 'pipeline', 'n': n, 'batch': BATCH, 'first_batch_s': round(first, 3),
          'examples_per_s': round(batches * BATCH / seconds, 1)}


def pipeline_figures(sizes) -> list[dict]:
  return [pipeline_figure(n) for n in sizes]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='10000,100000,1000000')
  args = parser.parse_args()
  for fig in pipeline_figures([int(s) for s in args.sizes.split(',')]):
    print(json.dumps(fig), flush=True)


if __name__ == '__main__':
  main()
