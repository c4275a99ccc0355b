"""Stage 0 (leave-one-out kNN capability estimates) and its neighbour search at N queries.

  python benchmarks/stage0_speed.py [--sizes=10000,100000,1000000] [--dim=640]

For each N: the seconds of the whole Stage-0 table (capability.knn_estimates,
leave-one-out over N training rows, K = 11 models, k = 50) with
anchor.search='auto' (exact up to neighbours.EXACT_MAX_ROWS rows, the
approximate k-means-cell search above), and the recall@k of the search it used
against exact neighbours on a sample of 1,000 rows. Exact at every N is timed
where it is cheap (N <= 100k) and extrapolated as N^2 from the largest exact
run otherwise (marked "extrapolated").

Synthetic features: unit vectors in `dim` dimensions (640 = the default
recipe's TF-IDF 256 + MiniLM 384) drawn from a two-level mixture (topics, then
sub-topics, then noise), so that neighbours are structured as in real
embeddings; recall on real features (the shared data sets' cached MiniLM
embeddings) is reported by `real_recall_figures`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from entrorouter_jax import capability, neighbours  # noqa: E402

K_MODELS, K = 11, 50
SAMPLE = 1000
DEFAULT_NPROBE = 8   # configs/common.py's anchor.nprobe


def synthetic_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
  """float32[n, dim] unit rows: 64 topics x 64 sub-topics + isotropic noise."""
  rng = np.random.default_rng(seed)
  topics = rng.standard_normal((64, dim), dtype=np.float32)
  subs = 0.8 * rng.standard_normal((64 * 64, dim), dtype=np.float32)
  sub_of = rng.integers(0, 64 * 64, n)
  x = np.empty((n, dim), np.float32)
  for start in range(0, n, 65536):
    s = sub_of[start:start + 65536]
    block = topics[s // 64] + subs[s] + 0.9 * rng.standard_normal((len(s), dim), dtype=np.float32)
    x[start:start + 65536] = block / np.linalg.norm(block, axis=1, keepdims=True)
  return x


def recall_at_k(x, rows: np.ndarray, nprobe: int, k: int = K) -> float:
  """Recall@k of the approximate search for the sampled training `rows`
  (leave-one-out: k + 1 neighbours, the row itself dropped) against exact.

  The sample is searched on its own, so its blocks are sparser than in the
  full run's: if anything this understates the full run's recall.
  """
  def without_self(found):
    return [f[f != r][:k] for f, r in zip(found, rows)]
  exact = without_self(neighbours.neighbours(x[rows], x, k + 1, False, 'exact'))
  approx = without_self(neighbours.neighbours(x[rows], x, k + 1, False, 'ivf', nprobe))
  return float(np.mean([len(np.intersect1d(e, a)) / k for e, a in zip(exact, approx)]))


def stage0_figure(n: int, dim: int, nprobe: int, time_exact: bool) -> dict:
  """One N: Stage 0's seconds with search='auto', its recall, and exact's seconds."""
  rng = np.random.default_rng(1)
  x = synthetic_features(n, dim)
  outcomes = (rng.random((n, K_MODELS)) < 0.6).astype(np.float32)
  mask = np.ones_like(outcomes, bool)
  cost = rng.random((n, K_MODELS)).astype(np.float32)
  search = 'exact' if n <= neighbours.EXACT_MAX_ROWS else 'ivf'
  start = time.perf_counter()
  capability.knn_estimates(x, outcomes, mask, cost, None, k=K, prior='global',
                           search='auto', nprobe=nprobe)
  fig = {'figure': 'stage0', 'n': n, 'dim': dim, 'k': K, 'search': search,
         'nprobe': nprobe if search == 'ivf' else None,
         'seconds': round(time.perf_counter() - start, 2)}
  rows = np.sort(rng.choice(n, min(n, SAMPLE), replace=False))
  fig['recall'] = 1.0 if search == 'exact' else round(recall_at_k(x, rows, nprobe), 4)
  if time_exact and search != 'exact':
    start = time.perf_counter()
    neighbours.neighbours(x, x, K, loo=True, search='exact')
    fig['exact_seconds'] = round(time.perf_counter() - start, 2)
  return fig


def real_recall_figures(nprobe: int, min_rows: int = 5000) -> list[dict]:
  """Recall@k of search='ivf' against exact, leave-one-out, on every cached
  real embedding table of at least `min_rows` rows (written by the suite or
  training runs on the shared data sets), and both searches' seconds."""
  from entrorouter_jax import features
  out = []
  for path in sorted(glob.glob(str(features.cache_dir() / 'embeddings' / '*.npy'))):
    x = np.load(path).astype(np.float32)
    if len(x) < min_rows:
      continue
    start = time.perf_counter()
    exact = neighbours.neighbours(x, x, K, True, 'exact')
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    approx = neighbours.neighbours(x, x, K, True, 'ivf', nprobe)
    ivf_s = time.perf_counter() - start
    recall = np.mean([len(np.intersect1d(e, a)) / K for e, a in zip(exact, approx)])
    out.append({'figure': 'stage0_real_recall', 'table': os.path.basename(path), 'n': len(x),
                'dim': x.shape[1], 'nprobe': nprobe, 'recall': round(float(recall), 4),
                'exact_seconds': round(exact_s, 2), 'ivf_seconds': round(ivf_s, 2)})
  return out


def stage0_figures(sizes, dim: int = 640, nprobe: int = DEFAULT_NPROBE,
                   time_exact_max: int = 100_000) -> list[dict]:
  """stage0_figure at every N; exact's seconds timed up to `time_exact_max` rows,
  extrapolated as N^2 from the largest exact timing above."""
  figs = [stage0_figure(n, dim, nprobe, time_exact=n <= time_exact_max) for n in sizes]
  exact = [f for f in figs if f['search'] == 'exact' or 'exact_seconds' in f]
  if exact:
    ref = max(exact, key=lambda f: f['n'])
    ref_s = ref['seconds'] if ref['search'] == 'exact' else ref['exact_seconds']
    for f in figs:
      if f['search'] == 'ivf' and 'exact_seconds' not in f:
        f['exact_seconds_extrapolated'] = round(ref_s * (f['n'] / ref['n']) ** 2, 2)
  return figs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='10000,100000,1000000')
  parser.add_argument('--dim', type=int, default=640)
  parser.add_argument('--nprobe', type=int, default=DEFAULT_NPROBE)
  parser.add_argument('--real', action='store_true', help='also the real-embedding recall')
  args = parser.parse_args()
  for fig in stage0_figures([int(s) for s in args.sizes.split(',')], args.dim, args.nprobe):
    print(json.dumps(fig), flush=True)
  if args.real:
    for fig in real_recall_figures(args.nprobe):
      print(json.dumps(fig), flush=True)


if __name__ == '__main__':
  main()
