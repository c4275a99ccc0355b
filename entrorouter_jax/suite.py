"""The quality suite: the router against every simple router, on every data set, over seeds.

  python -m entrorouter_jax.suite --workdir=DIR [--seeds=3]
      [--datasets=NAME=FORMAT:PATH,NAME=FORMAT:PATH] [--pools=NAME=POOL.yaml]
      [--train_sizes=20,100,500,all] [--ablations] [--bootstrap=1000] [--readme=README.md] [--config.KEY=VALUE ...]

For every data set it trains the router with the one default recipe
(configs/common.py; no setting differs between data sets), once per seed, and
scores the test split:

  router                          the trained router's cost/quality curve (lambda sweep)
  knn, linear, mlp, ensemble      on the router's own features (Stage 0's space)
  <each>_tfidf, <each>_encoder    on TF-IDF alone and on the sentence encoder alone
  random                          random routing at matched cost (the single models' hull)
  task_best, oracle               references: they read the task label / the outcomes,
                                  so they are not baselines to beat
Each gets its AIQ per seed, the mean, a 95% bootstrap interval (test queries
resampled; every method sees the same resamples) and the best point of its
curve saving at least 48.25% of the strongest model's cost. The best baseline
is the one with the highest mean AIQ; `router_minus_best` is the paired
bootstrap interval of (router - best baseline), seeds averaged in every
replicate.

Data sets: without --datasets, everything in ../shared/data (RouterBench
subset, RouteLLM MMLU and GSM8K, RouterDC's in-distribution tasks); with it,
NAME=FORMAT:PATH where FORMAT is wide | long | routerdc | routellm |
routerbench and PATH a file or folder (several joined with '+'), and the item
`default` for the default sets (--datasets=default,mine=long:mine.csv). A file with
a split column keeps its split; one without is split by a seeded hash of the
query id (80% train / 10% validation / 10% test). Formats without costs
(routerdc, routellm) need --pools=NAME=POOL.yaml.

Writes DIR/suite.json (the figures), DIR/suite.md (the tables), DIR/suite_info.json
(timings, sizes, the recipe) and, with --ablations, DIR/ablations.json: the recipe with
one part changed at a time, beside the Trust-Region-Collapse diagnostics.

--train_sizes=20,100,500,all adds the learning curve: every method trained on a seeded
sample of N training queries (data.train_queries = N, data.train_sample_seed = the seed:
the same sample for every method, a fresh one per seed), scored on the whole test split
with the main table's test resamples; "all" is the main table itself. It writes
DIR/learning_curve.json ({data set: {N: {method: {"aiq_mean", "aiq_ci95", "role"}}}}), a
table per data set in suite.md, DIR/learning_curve.png, and per N the training size and
router - best baseline (paired) in suite_info.json's "learning_curve".
Runs resume: a seed already scored with the same config is read back from
its seed folder (suite_scores.pkl), and one whose training finished is only
re-scored.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import sys
import time
from typing import Optional

import numpy as np

from entrorouter_jax import baselines, evaluate, logs, metrics, paths, train
from entrorouter_jax import router as router_lib, workdir as workdir_lib
from entrorouter_jax.data import sources
from entrorouter_jax.policy import is_utility
from entrorouter_jax.suite_datasets import (REPO, SHARED, Dataset, available_defaults,  # noqa: F401
                                            chosen_datasets, parse_datasets)
from entrorouter_jax.suite_tables import fmt_ci, render, update_readme

log = logging.getLogger('entrorouter_jax.suite')  # not __name__: '__main__' under python -m

HEADLINE_SAVED = evaluate.HEADLINE_SAVED


# ================================================================ ablations ===
# The method as METHOD.md has it, on the recipe's features and head: Stage 1
# on soft targets only (no dense loss, one weight), 600 steps; RL without the
# dense loss at the token transformer's learning rate (3e-4, ten times the
# recipe's); no stage keeps a best checkpoint, so a collapse shows.
_METHOD_SFT = {'sft.dense_weight': 0.0, 'sft.soft_weight': 1.0, 'sft.soft_weight_choices': '',
               'sft.select': '', 'sft.num_steps': 600}
_METHOD_RL = {'rl.dense_weight': 0.0, 'rl.select': '', 'rl.learning_rate': 3e-4}
_NO_ANCHOR = {'rl.beta_start': 0.0, 'rl.beta_end': 0.0}
_NO_ENTROPY_CONTROL = {'rl.entropy_lr': 0.0}
# (name, what changes, config overrides): each applied to the recipe.
ABLATIONS = (
    ('soft_supervision_only', 'Soft Supervision only (cross-entropy on soft targets)',
     dict(_METHOD_SFT, stages='sft')),
    ('plus_rl', '+ RL (REINFORCE, no anchor, no entropy control)',
     {**_METHOD_SFT, **_METHOD_RL, **_NO_ANCHOR, **_NO_ENTROPY_CONTROL}),
    ('plus_anchor', '+ Soft Anchor (beta 0.1 -> 0.01)',
     {**_METHOD_SFT, **_METHOD_RL, **_NO_ENTROPY_CONTROL}),
    ('plus_entropy', '+ entropy control = the method without additions',
     {**_METHOD_SFT, **_METHOD_RL}),
    ('recipe', '+ dense supervision, soft weight chosen out of fold, best checkpoints kept '
     '= the default recipe', {}),
    ('one_soft_weight', 'recipe with one soft weight (0.1), not chosen',
     {'sft.soft_weight_choices': ''}),
    ('no_rl', 'recipe without RL (Stage 1 only)', {'stages': 'sft'}),
    ('softmax_head', 'recipe with the softmax head (threshold curve)',
     {'model.head': 'softmax', 'model.temperature': 1.0, 'sft.soft_weight_choices': '',
      'rl.select': 'bce'}),
    ('anchor_in_policy', 'recipe + kNN anchor inside the policy', {'model.anchor_in_logits': True}),
    ('exact_estimator', 'recipe with the exact RL estimator', {'rl.estimator': 'exact'}),
    ('input_noise', 'recipe + input noise (std 0.05)', {'model.input_noise': 0.05}),
    ('tfidf_features', 'recipe on TF-IDF features only (no sentence encoder)',
     {'anchor.space': 'tfidf'}),
    ('one_member', 'recipe with one member (20% held out for selection)', {'model.members': 1}),
)


def apply_overrides(config, overrides: dict):
  """A copy of `config` with {"dotted.key": value} set (ml_collections' own flattened
  update: an unknown key or a value of the wrong type raises)."""
  config = copy.deepcopy(config)
  config.update_from_flattened_dict(dict(overrides))
  return config


# ============================================================ one data set ===
@dataclasses.dataclass
class Method:
  """One router's curves on the test split, one per seed."""
  name: str
  role: str                                   # 'router' | 'baseline' | 'reference'
  seeds: list = dataclasses.field(default_factory=list)       # full-test AIQ per seed
  boot: list = dataclasses.field(default_factory=list)        # float[B] per seed
  retained: list = dataclasses.field(default_factory=list)    # best point >= 48.25%, per seed


def _choices_of(router: baselines.ScoreRouter) -> list[np.ndarray]:
  return router.choices()[1]


def router_choices(config, workdir, test, tables, feats) -> tuple[list, dict]:
  """The trained router's curve (its routing rules on the test split) and the
  Trust-Region-Collapse diagnostics at its operating lambda."""
  router = router_lib.load_router(workdir)
  probs = router.probs(test.queries.tolist(), tables=tables, feats=feats)
  if is_utility(config):
    success, c_bar = router.scores(test.queries.tolist(), tables=tables, feats=feats)
    choices = _choices_of(baselines.ScoreRouter('router', success, c_bar))
  else:
    choices = metrics.threshold_choices(probs, router.model_costs, evaluate.THRESHOLDS)
  return choices, collapse_diagnostics(probs, tables, router.default_cost_weight,
                                       router.strongest)


def collapse_diagnostics(probs: np.ndarray, tables, lam: float, strongest: int) -> dict:
  """Trust-Region-Collapse signs of a policy pi[N, K] at cost weight `lam`:
  its mean entropy, its argmax share on the strongest model, and how many models
  the anchor's own rule (argmax p_hat - lam c_bar) sends >= 2% of queries to
  that the policy picks for < 0.2%."""
  pick = np.argmax(probs, axis=1)
  anchor = np.argmax(tables[0] - lam * tables[1], axis=1)
  k = probs.shape[1]
  anchor_share = np.bincount(anchor, minlength=k) / len(anchor)
  policy_share = np.bincount(pick, minlength=k) / len(pick)
  return {'entropy': float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1))),
          'strongest_share': float(policy_share[strongest]),
          'needed_never_picked': int(np.sum((anchor_share >= 0.02) & (policy_share < 0.002)))}


def evaluate_seed(config, workdir, seed: int, with_baselines: bool):
  """{method: (role, routing rules)} on the test split, and the router's diagnostics."""
  _, parts = sources.load_splits(config.data, ('train', 'test'))
  train_data, test = parts['train'], parts['test']
  stage0 = workdir_lib.read_stage0(workdir)
  tables = (stage0.tables['test']['p_hat'], stage0.tables['test']['c_bar'])
  feats = stage0.features
  choices, diag = router_choices(config, workdir, test, tables, feats['test'])
  out = {'router': ('router', choices)}
  if with_baselines:
    c_ref = stage0.c_ref
    routers = baselines.score_routers(train_data, feats['train'], feats['test'], *tables, c_ref,
                                      seed=seed)
    routers += evaluate.other_space_routers(config, c_ref, train_data, test, seed=seed)
    for r in routers:
      out[r.name] = ('baseline', _choices_of(r))
    task_best = baselines.task_best_router(train_data, test, c_ref)
    if task_best is not None:
      out['task_best'] = ('reference', _choices_of(task_best))
    out['oracle'] = ('reference', _choices_of(baselines.oracle_router(test, c_ref)))
  return out, diag, test, stage0.strongest, train_data.num_queries


def score_methods(per_seed: list[dict], test, strongest: int, counts) -> dict[str, Method]:
  """Full-test AIQ, bootstrap AIQs and the 48.25% point of every method and seed."""
  y, mask, costs = test.outcomes, test.outcome_mask, test.costs
  k = y.shape[1]
  singles = [np.full(len(y), j) for j in range(k)]
  single_y, single_c = metrics.chosen_tables(singles, y, mask, costs)
  names = test.model_names
  single = metrics.single_models(y, mask, costs, names)
  cost_range = metrics.single_model_cost_range(single)
  strong = single[names[strongest]]
  methods: dict[str, Method] = {}
  for rules in per_seed:
    rules = dict(rules)
    rules['random'] = ('baseline', singles)   # random at matched cost = the single models' hull
    for name, (role, choices) in rules.items():
      method = methods.setdefault(name, Method(name, role))
      cy, cc = metrics.chosen_tables(choices, y, mask, costs)
      acc, cost = cy.mean(axis=1), cc.mean(axis=1)
      method.seeds.append(metrics.aiq(cost, acc, cost_range))
      method.boot.append(metrics.bootstrap_aiq(cy, cc, single_y, single_c, counts))
      best = metrics.best_retained([{'accuracy': a, 'cost': c} for a, c in zip(acc, cost)],
                                   strong, HEADLINE_SAVED)
      method.retained.append(None if best is None else best['retained_accuracy'])
  return methods


def summarize(methods: dict[str, Method]) -> dict:
  """suite.json's entry for one data set."""
  out = {}
  for name, m in methods.items():
    kept = [r for r in m.retained if r is not None]
    out[name] = {'aiq': [float(v) for v in m.seeds], 'aiq_mean': float(np.mean(m.seeds)),
                 'aiq_ci95': metrics.interval(np.mean(m.boot, axis=0)),
                 'best_retained_at_48': float(np.mean(kept)) if kept else None,
                 'role': m.role}
  contenders = [n for n, m in methods.items() if m.role == 'baseline']
  if 'router' in methods and contenders:
    best = max(contenders, key=lambda n: out[n]['aiq_mean'])
    diff = np.mean(methods['router'].boot, axis=0) - np.mean(methods[best].boot, axis=0)
    out['router_minus_best'] = {
        'mean': out['router']['aiq_mean'] - out[best]['aiq_mean'],
        'ci95': metrics.interval(diff), 'best': best}
  return out


# ===================================================================== run ===
def run_dataset(config, ds: Dataset, workdir: pathlib.Path, seeds: int, counts_seed: int,
                bootstrap: int, with_baselines: bool = True):
  """Trains and scores one data set over the seeds: (methods, info, diagnostics)."""
  started = time.time()
  base = apply_overrides(config, {f'data.{k}': v for k, v in ds.data.items()})
  per_seed, diags = [], []
  sample = bool(base.data.get('train_queries', 0))   # a learning-curve point
  for seed in range(seeds):
    cfg = apply_overrides(base, {'seed': seed, **({'data.train_sample_seed': seed} if sample
                                                  else {})})
    seed_dir = workdir / f'seed{seed}'
    key = _scored_key(cfg, with_baselines)   # before training, which may fill in defaults
    scored = _scored_seed(key, seed_dir)
    if scored is not None:
      print(f'suite: {ds.name}, seed {seed}: scored before, read from {seed_dir / SCORED}',
            flush=True)
      rules, diag, strongest, n_train = scored
      test = sources.load_splits(cfg.data, ('test',))[1]['test']
    else:
      log.info('suite: %s, seed %d -> %s', ds.name, seed, seed_dir)
      train.train_and_evaluate(cfg, seed_dir)
      rules, diag, test, strongest, n_train = evaluate_seed(cfg, seed_dir, seed, with_baselines)
      _store_scored_seed(key, seed_dir, (rules, diag, strongest, n_train))
    per_seed.append(rules)
    diags.append(diag)
  counts = metrics.bootstrap_counts(test.num_queries, bootstrap, counts_seed)
  methods = score_methods(per_seed, test, strongest, counts)
  info = {'about': ds.about, 'train': n_train, 'test': test.num_queries,
          'models': test.num_models, 'seeds': seeds, 'seconds': round(time.time() - started, 1)}
  diag = {k: float(np.mean([d[k] for d in diags])) for k in diags[0]}
  return methods, info, diag


SCORED = 'suite_scores.pkl'


def _scored_key(cfg, with_baselines: bool) -> str:
  return json.dumps({'config': json.loads(cfg.to_json_best_effort()),
                     'baselines': bool(with_baselines)}, sort_keys=True)


def _scored_seed(key: str, seed_dir: pathlib.Path):
  """A seed's routing rules and diagnostics from an earlier run of the same
  config (seed_dir/suite_scores.pkl), or None."""
  path = seed_dir / SCORED
  if not path.is_file():
    return None
  try:
    with path.open('rb') as f:
      stored = pickle.load(f)
  except (OSError, pickle.UnpicklingError, EOFError):
    return None
  if not isinstance(stored, dict) or stored.get('key') != key:
    return None
  return stored['scored']


def _store_scored_seed(key: str, seed_dir: pathlib.Path, scored) -> None:
  paths.write_atomic(seed_dir / SCORED, pickle.dumps({'key': key, 'scored': scored}))


def parse_train_sizes(text: str) -> list:
  """'20,100,all' -> [20, 100, 'all'] (sizes ascending, 'all' last); ValueError naming
  --train_sizes for anything but distinct integers >= 2 and 'all'."""
  sizes = []
  for item in (t.strip() for t in str(text).split(',') if t.strip()):
    if item.lower() == 'all':
      sizes.append('all')
      continue
    try:
      value = int(item)
    except ValueError:
      value = None
    if value is None or value < 2:
      raise ValueError(f'--train_sizes={text}: {item!r} is not a size; expected training '
                       'query counts >= 2 and "all", comma-separated (e.g. 20,100,500,all)')
    sizes.append(value)
  if not sizes or len(set(sizes)) != len(sizes):
    raise ValueError(f'--train_sizes={text}: expected distinct sizes, e.g. 20,100,500,all')
  return sorted(sizes, key=lambda v: (v == 'all', 0 if v == 'all' else v))


def learning_curve(config, ds: Dataset, workdir: pathlib.Path, sizes: list, seeds: int,
                   counts_seed: int, bootstrap: int, full: dict, full_info: dict):
  """One data set's learning curve: ({N: {method: {aiq_mean, aiq_ci95, role}}}, {N:
  {train, router_minus_best, seconds}}). `full` / `full_info` are the main table's entry
  and info (the "all" point, and any N at least the training split's size)."""
  curve, info = {}, {}
  for size in sizes:
    key = str(size)
    if size == 'all' or size >= full_info['train']:
      entry, n, seconds = full, full_info['train'], full_info['seconds']
    else:
      methods, run_info, _ = run_dataset(
          apply_overrides(config, {'data.train_queries': size}), ds,
          workdir / 'curve' / f'n{size}' / ds.name, seeds, counts_seed, bootstrap)
      entry, n, seconds = summarize(methods), run_info['train'], run_info['seconds']
    curve[key] = {m: {'aiq_mean': e['aiq_mean'], 'aiq_ci95': e['aiq_ci95'], 'role': e['role']}
                  for m, e in entry.items() if m != 'router_minus_best'}
    info[key] = {'train': n, 'router_minus_best': entry.get('router_minus_best'),
                 'seconds': seconds}
    d = entry.get('router_minus_best')
    print(f"suite: {ds.name}, {key} training queries ({n}): router AIQ "
          f"{entry['router']['aiq_mean']:.4f}" + (
              f"; router - best ({d['best']}) {d['mean']:+.4f} {fmt_ci(d['ci95'])}" if d else ''),
          flush=True)
  return curve, info


def plot_learning_curve(curves: dict, curve_infos: dict, path: pathlib.Path) -> None:
  """learning_curve.png: per data set, mean AIQ with its 95% interval against the
  training size (log scale; "all" at the split's size) for the curve's methods."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from entrorouter_jax.suite_tables import CURVE_METHODS
  fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
  for ax, (name, curve) in zip(axes[0], curves.items()):
    xs = [curve_infos[name][k]['train'] for k in curve]
    for method in CURVE_METHODS:
      if not all(method in curve[k] for k in curve):
        continue
      mean = np.array([curve[k][method]['aiq_mean'] for k in curve])
      lo = np.array([curve[k][method]['aiq_ci95'][0] for k in curve])
      hi = np.array([curve[k][method]['aiq_ci95'][1] for k in curve])
      ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], marker='o', ms=3, capsize=2,
                  lw=2 if method == 'router' else 1, label=method)
    ax.set_xscale('log')
    ax.set_title(name)
    ax.set_xlabel('training queries')
    ax.set_ylabel('AIQ (test)')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config, workdir, datasets: list[Dataset], seeds: int = 3, bootstrap: int = 1000,
        ablations=False, command: str = 'python -m entrorouter_jax.suite',
        ablation_seeds: Optional[int] = None, train_sizes: Optional[list] = None) -> dict:
  """The whole suite; returns suite.json's content (also written, with suite.md).

  `ablations`: True for every row of ABLATIONS, or a sequence of their names.
  `ablation_seeds`: seeds per ablation row (default `seeds`); the recipe's own row
  always reuses the main table's runs. `train_sizes` (parse_train_sizes' list): also the
  learning curve, data set by data set after its main table (`learning_curve`).
  """
  ablation_seeds = seeds if ablation_seeds is None else ablation_seeds
  if ablation_seeds < 1:
    raise ValueError(f'ablation_seeds={ablation_seeds}; expected >= 1')
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  results, infos = {}, {}
  curves = {} if train_sizes else None
  for i, ds in enumerate(datasets):
    methods, infos[ds.name], diag = run_dataset(config, ds, workdir / ds.name, seeds, i, bootstrap)
    results[ds.name] = summarize(methods)
    infos[ds.name]['diagnostics'] = diag
    _write(workdir, results, infos, None, command, time.time() - started)
    _print_summary(ds.name, results[ds.name])
    if train_sizes:
      curves[ds.name], infos[ds.name]['learning_curve'] = learning_curve(
          config, ds, workdir, train_sizes, seeds, i, bootstrap, results[ds.name],
          infos[ds.name])
      _write(workdir, results, infos, None, command, time.time() - started, curves)
  ablation_rows = None
  if ablations:
    wanted = [a[0] for a in ABLATIONS] if ablations is True else list(ablations)
    unknown = set(wanted) - {a[0] for a in ABLATIONS}
    if unknown:
      raise ValueError(f'ablations {sorted(unknown)}; expected names of {[a[0] for a in ABLATIONS]}')
    ablation_rows = {}
    for name, about, overrides in (a for a in ABLATIONS if a[0] in wanted):
      row = {'about': about, 'overrides': overrides, 'datasets': {},
             'seeds': seeds if name == 'recipe' else ablation_seeds}
      diags = []
      for i, ds in enumerate(datasets):
        if name == 'recipe':
          methods = None
          entry = results[ds.name]['router']
          diags.append(infos[ds.name]['diagnostics'])
        else:
          methods, _, diag = run_dataset(apply_overrides(config, overrides), ds,
                                         workdir / 'ablations' / name / ds.name, ablation_seeds, i,
                                         bootstrap, with_baselines=False)
          entry = summarize(methods)['router']
          diags.append(diag)
        row['datasets'][ds.name] = entry
      row['diagnostics'] = {k: float(np.mean([d[k] for d in diags])) for k in diags[0]}
      ablation_rows[name] = row
      _write(workdir, results, infos, ablation_rows, command, time.time() - started, curves)
  total = time.time() - started
  _write(workdir, results, infos, ablation_rows, command, total, curves)
  print(f'suite: {total / 60:.1f} min; tables in {workdir / "suite.md"}')
  return results


def _write(workdir, results, infos, ablations, command, seconds, curves=None):
  paths.write_atomic(workdir / 'suite.json', json.dumps(results, indent=2) + '\n')
  paths.write_atomic(workdir / 'suite_info.json', json.dumps(
      {'datasets': infos, 'seconds': round(seconds, 1), 'command': command}, indent=2) + '\n')
  if ablations is not None:
    paths.write_atomic(workdir / 'ablations.json', json.dumps(ablations, indent=2) + '\n')
  plot = None
  if curves:
    paths.write_atomic(workdir / 'learning_curve.json', json.dumps(curves, indent=2) + '\n')
    curve_infos = {n: infos[n]['learning_curve'] for n in curves}
    plot = 'learning_curve.png'
    plot_learning_curve(curves, curve_infos, workdir / plot)
  paths.write_atomic(workdir / 'suite.md', render(
      results, infos, ablations, command, seconds, curves,
      {n: infos[n].get('learning_curve', {}) for n in (curves or {})}, plot))


def _print_summary(name, entry):
  r = entry['router']
  line = f"suite: {name}: router AIQ {r['aiq_mean']:.4f} {fmt_ci(r['aiq_ci95'])}"
  d = entry.get('router_minus_best')
  if d:
    line += (f"; best baseline {d['best']} {entry[d['best']]['aiq_mean']:.4f}; router - best "
             f"{d['mean']:+.4f} {fmt_ci(d['ci95'])}")
  print(line, flush=True)


# ===================================================================== CLI ===
def main(argv):
  from absl import flags
  from entrorouter_jax import cli
  FLAGS = flags.FLAGS
  del argv
  logs.show_progress_logs()
  try:
    if FLAGS.seeds < 1:
      raise ValueError(f'--seeds={FLAGS.seeds}; expected >= 1')
    if FLAGS.bootstrap < 10:
      raise ValueError(f'--bootstrap={FLAGS.bootstrap}; expected >= 10 replicates')
    sizes = parse_train_sizes(FLAGS.train_sizes) if FLAGS.train_sizes else None
    datasets = chosen_datasets(FLAGS.datasets, FLAGS.pools)
    command = ' '.join(['python -m entrorouter_jax.suite'] + sys.argv[1:])
    run(FLAGS.config, FLAGS.workdir, datasets, FLAGS.seeds, FLAGS.bootstrap, FLAGS.ablations,
        command, FLAGS.ablation_seeds, sizes)
  except cli.user_errors() + (router_lib.RouterError,) as e:
    if os.environ.get('ENTROROUTER_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if FLAGS.readme:
    body = (pathlib.Path(FLAGS.workdir) / 'suite.md').read_text()
    update_readme(pathlib.Path(FLAGS.readme), body.split('\n', 1)[1])
    print(f'suite: tables written into {FLAGS.readme}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'rl.py'),
                                  'The recipe (default configs/rl.py); override keys with '
                                  '--config.KEY=VALUE (the same for every data set).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where the runs, suite.json and suite.md go.',
                      required=True)
  flags.DEFINE_integer('seeds', 3, 'Seeds per data set.')
  flags.DEFINE_string('datasets', '', 'NAME=FORMAT:PATH[,...]; default: ../shared/data.')
  flags.DEFINE_string('pools', '', 'NAME=POOL.yaml[,...]: prices for --datasets entries '
                      'whose files carry no costs.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap replicates of the test queries.')
  flags.DEFINE_bool('ablations', False, 'Also run the ablation table (the recipe with one part '
                    'changed at a time).')
  flags.DEFINE_integer('ablation_seeds', None, 'Seeds per ablation row (default: --seeds); '
                       'the recipe row reuses the main runs.')
  flags.DEFINE_string('readme', '', 'Also put the tables into this README between its suite '
                      'markers.')
  flags.DEFINE_string('train_sizes', '', 'Also the learning curve: training-query counts and '
                      '"all", comma-separated (e.g. 20,50,100,200,500,all).')
  app.run(main)
