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

import jax
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
  Router.probs, plus the share of a one-query call spent in each part, the
  query encoder alone against PyTorch (`encoder_figures`), and the encoder
  embedding a data set of long texts against PyTorch (`embedding_figures`)."""
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
  encoder = encoder_figures(router, queries[:calls]) + embedding_figures(router, queries)
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
  space = getattr(router.stage0, 'space', None)
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
  uses (router.device_neighbours). One {"figure": "route_encoder"} row, with
  the encoder's distance from the machine's matmul speed (`encoder_floor`);
  [] where the router's space has no encoder or torch is missing."""
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
  floor = encoder_floor(model_dir, tok, enc, queries, times['jax'])
  return [{'figure': 'route_encoder', 'batch': 1, 'calls': len(queries),
           **{f'{name}_ms_p50': round(p50[name], 3) for name in before},
           'encoder': enc.checkpoint or 'all-MiniLM-L6-v2',
           'latency_ms_p50': round(p50['jax'], 3), 'torch_latency_ms_p50': round(p50['torch'], 3),
           'jax_over_torch': round(p50['torch'] / p50['jax'], 3),
           'max_abs_diff': diff, **floor}]


def embedding_figures(router, queries: list[str], texts: int = 256, rounds: int = 3,
                      torch_threads=None) -> list[dict]:
  """Stage 0's encoder embedding a data set, what a first run on new data (or
  the suite with an empty cache) waits for: `texts` long texts (eight of the
  router's queries joined, cut to the encoder's max_len tokens, as real
  prompts are) in the encoder's batches, through features.EncoderSpace
  (disk cache off), against the same checkpoint in PyTorch on the same
  token batches. The two alternate `rounds` times (timing.alternate);
  queries/s of each side's median round. One {"figure": "embed"} row; []
  where the router's space has no encoder or torch is missing."""
  from benchmarks import timing, train_speed
  from entrorouter_jax import features
  from entrorouter_jax.backbones import hf_encoder
  enc = _encoder_space(router)
  ref = train_speed._torch_reference() if enc is not None else None
  if ref is None:
    return []
  model_dir = enc.checkpoint or features.default_encoder()
  space = features.EncoderSpace(enc.checkpoint, enc.max_len, enc.truncate,
                                batch_size=enc.batch_size)
  space.disk_cache = False
  long = [' '.join(queries[(8 * i + j) % len(queries)] for j in range(8)) for i in range(texts)]
  ids, mask = hf_encoder.HFTokenizer.load(model_dir).encode_batch(long, enc.max_len, enc.truncate)
  torch_embed = ref.sentence_encoder(model_dir, threads=torch_threads)
  step = space.batch_size
  runs = {'jax': lambda: space.transform(long),
          'torch': lambda: np.concatenate([torch_embed(ids[s:s + step], mask[s:s + step])
                                           for s in range(0, texts, step)])}
  diff = float(np.abs(runs['jax']() - runs['torch']()).max())   # warm-up, same vectors

  def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start

  times = timing.alternate({name: (lambda run=run: timed(run)) for name, run in runs.items()},
                           rounds, pause=train_speed.pause())
  rate = {name: texts / float(np.median(t)) for name, t in times.items()}
  return [{'figure': 'embed', 'batch': step, 'texts': texts, 'rounds': rounds,
           'tokens_p50': int(np.median(mask.sum(1))),
           'encoder': enc.checkpoint or 'all-MiniLM-L6-v2',
           'queries_per_s': round(rate['jax'], 1), 'torch_queries_per_s': round(rate['torch'], 1),
           'jax_over_torch': round(rate['jax'] / rate['torch'], 3), 'max_abs_diff': diff}]


def encoder_floor(model_dir, tok, enc, queries: list[str], seconds: list[float]) -> dict:
  """How far the one-query encoder is from the machine's matmul speed: the
  model FLOPs of each query's forward at the width it is padded to
  (train_speed.model_flops' forward: the blocks' matmuls and attention's two
  products), against the rate of a large jitted jnp.dot measured now
  (train_speed.matmul_figure). `floor_ms_p50` is the median query's FLOPs at
  that rate: no implementation of this encoder in this precision on this
  chip computes the query faster (small matrices run below the large dot's
  rate, so the true floor is higher). `matmul_fraction` is the median of
  each call's FLOP/s over that rate."""
  from benchmarks import train_speed
  from entrorouter_jax.backbones import hf_encoder
  from entrorouter_jax.layers import width_bucket
  cfg = hf_encoder.EncoderConfig.from_dir(model_dir)
  _, mask = tok.encode_batch(queries, enc.max_len, enc.truncate)
  widths = [width_bucket(int(n), enc.max_len) for n in mask.sum(1)]
  flops = np.array([train_speed.model_flops(
      dict(num_layers=cfg.num_layers, d_model=cfg.hidden_size, mlp_dim=cfg.intermediate_size,
           batch=1, seq=w), num_models=0, passes=1 / 3) for w in widths])
  matmul = train_speed.matmul_figure(quick=True, device=jax.default_backend())
  rate = matmul['flops_per_s']
  return {'width_p50': int(np.median(widths)), 'gflop_p50': round(float(np.median(flops)) / 1e9, 4),
          'matmul_flops_per_s': rate, 'matmul_dtype': matmul['dtype'],
          'floor_ms_p50': round(1000 * float(np.median(flops)) / rate, 3),
          'matmul_fraction': round(float(np.median(flops / np.asarray(seconds))) / rate, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='a trained router (default: train one)')
  parser.add_argument('--calls', type=int, default=200)
  args = parser.parse_args()
  for fig in routing_figures(args.workdir, args.calls):
    print(json.dumps(fig), flush=True)


if __name__ == '__main__':
  main()
