"""What routing a query really costs: router.Router end to end (Stage 0's query
space, i.e. TF-IDF + MiniLM for the default recipe, the kNN tables over the
training set, and the jitted policy), at batch 1 and batch 256; and the
query encoder alone against the same checkpoint in PyTorch (jax_over_torch).

  python benchmarks/routing_speed.py [--workdir=DIR]

Without --workdir it trains the default recipe (configs/rl.py) on the embedded
synthetic data with few steps (the routing cost depends on the architecture,
not on how long it trained) into a temporary folder, and times that router.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Few steps: the router's shape is the recipe's, only its training is short.
SHORT = {'sft.num_steps': 40, 'sft.select_every': 20, 'sft.soft_weight_choices': '0',
         'rl.num_steps': 20, 'rl.select_every': 10, 'log_every': 20, 'checkpoint_every': 40}


def train_short_router(workdir: str) -> str:
  """The default recipe, briefly trained on the synthetic data, in `workdir`."""
  from configs import rl as rl_config
  from entrorouter_jax import logs, suite, train
  logs.show_progress_logs()
  config = suite.apply_overrides(rl_config.get_config(), SHORT)
  train.train_and_evaluate(config, workdir)
  return workdir


def _queries(router, n: int) -> list[str]:
  """n distinct queries of the router's own test split (or its training table)."""
  from entrorouter_jax.data import sources
  try:
    _, splits = sources.load_splits(router.config.data, ('test',))
    texts = [str(q) for q in splits['test'].queries]
  except (OSError, ValueError, KeyError):  # data not at hand: made-up queries
    texts = []
  texts = texts or [f'What is {i} times {i + 3}, and why?' for i in range(n)]
  return [texts[i % len(texts)] + ('' if i < len(texts) else f' ({i})') for i in range(n)]


def routing_figures(workdir: str | None = None, calls: int = 200) -> list[dict]:
  """Latency p50/p99 (ms) of one query and queries/s at batch 256 through
  Router.probs, plus the share of a one-query call spent in each part, and
  the query encoder alone against PyTorch (`encoder_figures`)."""
  from entrorouter_jax import router as router_lib
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory()
    workdir = train_short_router(os.path.join(tmp.name, 'router'))
  start = time.perf_counter()
  router = router_lib.load_router(workdir)
  load_s = time.perf_counter() - start
  queries = _queries(router, calls + 4 * 256)
  # Distinct texts for every timed call: routing keeps no embedding cache.
  singles = queries[:calls]
  batches = [queries[calls + r * 256:calls + (r + 1) * 256] for r in range(4)]
  router.warm_up(64)       # compile every shape a query or a batch of <= 64 can hit
  router.probs(batches[-1])
  one, feats_t, table_t = [], [], []
  for q in singles:
    t0 = time.perf_counter()
    feats = router.features([q])
    t1 = time.perf_counter()
    tables = router.anchor_tables([q], feats)
    t2 = time.perf_counter()
    router.probs([q], tables=tables, feats=feats)
    t3 = time.perf_counter()
    one.append(t3 - t0)
    feats_t.append(t1 - t0)
    table_t.append(t2 - t1)
  batch_t = []
  for batch in batches[:3]:
    t0 = time.perf_counter()
    router.probs(batch)
    batch_t.append(time.perf_counter() - t0)
  encoder = encoder_figures(router, queries[:calls])
  ms = lambda v, p: round(1000 * float(np.percentile(v, p)), 3)
  out = [{'figure': 'route', 'batch': 1, 'space': router.config.anchor.space,
          'backbone': router.config.model.backbone, 'calls': calls,
          'latency_ms_p50': ms(one, 50), 'latency_ms_p99': ms(one, 99),
          'features_ms_p50': ms(feats_t, 50), 'knn_tables_ms_p50': ms(table_t, 50),
          'policy_ms_p50': round(ms(one, 50) - ms(feats_t, 50) - ms(table_t, 50), 3),
          'load_seconds': round(load_s, 2)},
         {'figure': 'route', 'batch': 256, 'queries_per_s': round(256 / min(batch_t), 1)},
         *encoder]
  if tmp is not None:
    tmp.cleanup()
  return out


def _encoder_space(router):
  """The router's query encoder (features.EncoderSpace), or None where its space has none."""
  from entrorouter_jax import features
  space = (router.stage0 or {}).get('space')
  parts = getattr(space, 'spaces', [space])
  return next((p for p in parts if isinstance(p, features.EncoderSpace)), None)


def encoder_figures(router, queries: list[str], torch_threads=None) -> list[dict]:
  """The query encoder alone, one query a call, against the same checkpoint in
  PyTorch (`transformers`, benchmarks/torch_reference.sentence_encoder): both
  tokenize with the package's tokenizer of the checkpoint (torch gets the
  query's real tokens, unpadded) and return the mean-pooled unit vector. The
  two alternate query by query (who goes first swaps each time), on the same
  texts. Then the JAX encoder again, each call right after a kNN product of
  the router's table: NumPy's, and the device's screened search that routing
  uses (router.device_neighbours). One {"figure": "route_encoder"} row; [] where
  the router's space has no encoder or torch is missing."""
  from entrorouter_jax import features
  from entrorouter_jax.backbones import hf_encoder
  enc = _encoder_space(router)
  if enc is None:
    return []
  from benchmarks import train_speed
  ref = train_speed._torch_reference()
  if ref is None:
    return []
  model_dir = enc.checkpoint or features.default_encoder()
  tok = hf_encoder.HFTokenizer.load(model_dir)
  torch_embed = ref.sentence_encoder(model_dir, threads=torch_threads)

  def torch_call(q):
    ids, mask = tok.encode_batch([q], enc.max_len, enc.truncate)
    n = int(mask.sum())
    return torch_embed(ids[:, :n], mask[:, :n])

  diff = 0.0
  for q in queries[:8]:   # warm-up, and the two sides compute the same vectors
    diff = max(diff, float(np.abs(enc.transform([q]) - torch_call(q)).max()))
  calls = {'jax': lambda q: enc.transform([q]), 'torch': torch_call}
  times = {'jax': [], 'torch': []}
  for i, q in enumerate(queries):
    for name in (('jax', 'torch') if i % 2 == 0 else ('torch', 'jax')):
      start = time.perf_counter()
      calls[name](q)
      times[name].append(time.perf_counter() - start)
  # What a kNN product right before the encoder does to it: NumPy's (OpenBLAS,
  # whose threads keep spinning after it) against the device's search, which routing uses.
  feats = router.features(queries[:1])
  table = router.knn_table()
  before = {'after_numpy_product': lambda: feats @ table.x.T,
            'after_device_search': lambda: table.exact_search(feats, table.k)}
  for name, product in before.items():
    times[name] = []
    for q in queries:
      product()
      start = time.perf_counter()
      enc.transform([q])
      times[name].append(time.perf_counter() - start)
  p50 = {name: 1000 * float(np.percentile(t, 50)) for name, t in times.items()}
  return [{'figure': 'route_encoder', 'batch': 1, 'calls': len(queries),
           **{f'{name}_ms_p50': round(p50[name], 3) for name in before},
           'encoder': enc.checkpoint or 'all-MiniLM-L6-v2',
           'latency_ms_p50': round(p50['jax'], 3), 'torch_latency_ms_p50': round(p50['torch'], 3),
           'jax_over_torch': round(p50['torch'] / p50['jax'], 3),
           'max_abs_diff': diff}]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='a trained router (default: train one)')
  parser.add_argument('--calls', type=int, default=200)
  args = parser.parse_args()
  for fig in routing_figures(args.workdir, args.calls):
    print(json.dumps(fig), flush=True)


if __name__ == '__main__':
  main()
