"""How much of the gap a model's absence leaves does adding it with a few labels close?

  python benchmarks/add_model_gap.py [--workdir=DIR] [--labels=100,20] [--label_seeds=3]
      [--seed=0] [--min_share=0.05] [--models=NAME,...]

On RouterBench (../shared/data/routerbench, RouterDC's split; configs/routerbench.py,
the default recipe), it trains the router with every model, and for each model that
router sends at least --min_share of the test queries to at its operating cost weight
(or each of --models): the router trained without that model (data.models), the same
router with the model added by `add_model` from --labels of its labelled training
queries (a seeded sample of the training split, with their scores and costs from the
data; --label_seeds samples per count), and prints one JSON line per model with the test
AIQ of: without the model, + the added model (per label count: each sample's, and their
mean), retrained with all models, and the share of the gap closed, (added - without) /
(all - without). Each AIQ is over the single models' cost range of the whole pool on the
test split, the same range for all three routers (evaluate's own AIQ of the router
without the model would use its pool's range). One training seed (config.seed = --seed);
it prints figures and asserts nothing. Workdirs go under --workdir (default: a folder
under /tmp), so a rerun reuses trained routers.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import routerbench  # noqa: E402
from entrorouter_jax import add_model, evaluate, metrics, router as router_lib  # noqa: E402
from entrorouter_jax import train, workdir as workdir_lib  # noqa: E402
from entrorouter_jax.data import sources  # noqa: E402


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')


def config_for(base: pathlib.Path, models=None, seed: int = 0):
  config = routerbench.get_config()
  config.seed = seed
  config.data.data_dir = str(base / 'tfds')
  if models is not None:
    config.data.models = ','.join(models)
  return config


def trained(base: pathlib.Path, name: str, models=None, seed: int = 0) -> pathlib.Path:
  """The router trained on `models` (None: all) in base/name (a finished run is reused)."""
  workdir = base / name
  if not (workdir / 'eval' / 'results.json').is_file():
    started = time.time()
    train.train_and_evaluate(config_for(base, models, seed), workdir)
    print(f'trained {name} in {time.time() - started:.0f} s', file=sys.stderr)
  return workdir


def router_aiq(workdir, test, cost_range) -> float:
  """The router's test AIQ as evaluate computes it (its lambda sweep on Stage 0's test
  tables), its curve measured on `test`'s columns of its models, over `cost_range`."""
  router = router_lib.load_router(workdir)
  stage0 = workdir_lib.read_stage0(workdir)
  data = test.select_models(router.model_names)
  tables = (stage0.tables['test']['p_hat'], stage0.tables['test']['c_bar'])
  feats = stage0.features['test']
  probs = router.probs(data.queries.tolist(), tables=tables, feats=feats)
  curve = evaluate.router_curve(router, data, probs, tables, feats)
  return metrics.aiq([p['cost'] for p in curve], [p['accuracy'] for p in curve], cost_range)


def write_labels(path: pathlib.Path, train_split, model: str, count: int, seed: int) -> None:
  """`count` training queries drawn by `seed`, with `model`'s score and cost there."""
  j = train_split.model_names.index(model)
  rows = np.flatnonzero(train_split.outcome_mask[:, j])
  pick = np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
  with path.open('w', newline='', encoding='utf-8') as f:
    out = csv.writer(f)
    out.writerow(['query', 'score', 'cost'])
    for i in pick:
      out.writerow([train_split.queries[i], float(train_split.outcomes[i, j]),
                    float(train_split.costs[i, j])])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default=str(pathlib.Path(tempfile.gettempdir()) /
                                               'add_model_gap'))
  parser.add_argument('--labels', default='100,20', help='label counts, comma-separated')
  parser.add_argument('--label_seeds', type=int, default=3, help='label samples per count')
  parser.add_argument('--seed', type=int, default=0, help='training seed')
  parser.add_argument('--min_share', type=float, default=0.05)
  parser.add_argument('--models', default='', help='these models instead of --min_share')
  args = parser.parse_args(argv)
  base = pathlib.Path(args.workdir)
  counts = [int(c) for c in args.labels.split(',') if c.strip()]
  started = time.time()

  everything = trained(base, 'all', seed=args.seed)
  _, parts = sources.load_splits(config_for(base).data, ('train', 'test'))
  train_split, test = parts['train'], parts['test']
  share = json.loads((everything / 'eval' / 'results.json').read_text())['router']['share']
  cost_range = metrics.single_model_cost_range(metrics.single_models(
      test.outcomes, test.outcome_mask, test.costs, test.model_names))
  aiq_all = router_aiq(everything, test, cost_range)
  names = test.model_names
  chosen = ([m.strip() for m in args.models.split(',') if m.strip()] if args.models
            else [m for m in names if share[m] >= args.min_share])
  print(json.dumps({'data': 'routerbench', 'train_queries': train_split.num_queries,
                    'test_queries': test.num_queries, 'seed': args.seed, 'aiq_all': aiq_all,
                    'share_all': share, 'models': chosen}))

  for model in chosen:
    others = [m for m in names if m != model]
    without = trained(base, f'without_{slug(model)}', others, args.seed)
    row = {'model': model, 'share_all': share[model], 'aiq_without': router_aiq(
        without, test, cost_range), 'aiq_all': aiq_all}
    gap = row['aiq_all'] - row['aiq_without']
    for count in counts:
      aiqs = []
      for label_seed in range(args.label_seeds):
        labels_path = base / f'labels_{slug(model)}_{count}_{label_seed}.csv'
        write_labels(labels_path, train_split, model, count, label_seed)
        out = base / f'add{count}_{slug(model)}_{label_seed}'
        shutil.rmtree(out, ignore_errors=True)
        # RouterBench gives each answer's cost and no list prices: the labels' cost column
        # is what add_model uses, so the prices passed are never read.
        add_model.add_model(without, out, model, add_model.read_labels(labels_path), 0.0, 0.0)
        aiqs.append(router_aiq(out, test, cost_range))
      row[f'aiq_added_{count}'] = aiqs
      row[f'aiq_added_{count}_mean'] = float(np.mean(aiqs))
      row[f'gap_closed_{count}'] = [(a - row['aiq_without']) / gap for a in aiqs] if gap else None
      row[f'gap_closed_{count}_mean'] = ((float(np.mean(aiqs)) - row['aiq_without']) / gap
                                         if gap else None)
    print(json.dumps(row))
  print(json.dumps({'seconds': round(time.time() - started, 1)}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
