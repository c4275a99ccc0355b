"""The quality suite on a tiny long-format file: its contract files, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT
from configs import rl as rl_config
from entrorouter_jax import suite
from entrorouter_jax.data import synthetic

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
# The recipe at a tiny size: TF-IDF only (no sentence encoder), few steps.
TINY = {'anchor.space': 'tfidf', 'anchor.k': 10, 'anchor.dim': 24, 'model.members': 2,
        'model.hidden': 16, 'sft.num_steps': 30, 'sft.batch_size': 32, 'sft.select_every': 10,
        'sft.soft_weight_choices': '0,0.3', 'rl.num_steps': 20, 'rl.batch_size': 32,
        'rl.select_every': 10, 'log_every': 10, 'checkpoint_every': 20, 'eval_batch_size': 128}


def write_long(path, num_train=240, num_test=100, seed=0, split=True):
  """The synthetic world as a long-format CSV (one row per query and model)."""
  data = synthetic.generate(seed=seed, num_train=num_train, num_validation=0, num_test=num_test)
  rows = []
  for i in range(data.num_queries):
    for j, name in enumerate(data.model_names):
      row = {'id': data.ids[i], 'query': data.queries[i], 'task': data.tasks[i], 'model': name,
             'score': float(data.outcomes[i, j]), 'cost': float(data.costs[i, j])}
      if split:
        row['split'] = data.splits[i]
      rows.append(row)
  pd.DataFrame(rows).to_csv(path, index=False)
  return path


def _suite_cmd(workdir, datasets, *extra):
  return ([sys.executable, '-m', 'entrorouter_jax.suite', f'--workdir={workdir}',
           f'--datasets={datasets}', '--seeds=2', '--bootstrap=50']
          + [f'--config.{k}={v}' for k, v in TINY.items()] + list(extra))


def test_suite_cli_writes_the_contract_and_resumes(tmp_path):
  long_file = write_long(tmp_path / 'tiny.csv')
  workdir = tmp_path / 'suite'
  cmd = _suite_cmd(workdir, f'tiny=long:{long_file}',
                   f'--config.data.data_dir={tmp_path / "tfds"}', '--train_sizes=all,20')
  first = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'suite: tiny: router AIQ' in first.stdout

  results = json.loads((workdir / 'suite.json').read_text())
  entry = results['tiny']
  for method in ('router', 'knn', 'linear', 'mlp', 'ensemble', 'random', 'task_best', 'oracle'):
    e = entry[method]
    assert len(e['aiq']) == 2 and e['aiq_mean'] == pytest.approx(np.mean(e['aiq']))
    lo, hi = e['aiq_ci95']
    assert 0.0 <= lo <= hi <= 1.0
    assert e['best_retained_at_48'] is None or 0.0 < e['best_retained_at_48'] < 2.0
  d = entry['router_minus_best']
  assert d['best'] in ('knn', 'linear', 'mlp', 'ensemble', 'random')   # references never count
  best = max(('knn', 'linear', 'mlp', 'ensemble', 'random'), key=lambda m: entry[m]['aiq_mean'])
  assert d['best'] == best
  assert d['mean'] == pytest.approx(entry['router']['aiq_mean'] - entry[best]['aiq_mean'])
  assert d['ci95'][0] <= d['ci95'][1]
  # The two seeds are two trainings.
  assert entry['router']['aiq'][0] != entry['router']['aiq'][1] or \
      entry['mlp']['aiq'][0] != entry['mlp']['aiq'][1]
  md = (workdir / 'suite.md').read_text()
  assert '| **router** |' in md and 'router - best baseline' in md and '(reference)' in md
  info = json.loads((workdir / 'suite_info.json').read_text())
  assert info['datasets']['tiny']['train'] == 240 and info['datasets']['tiny']['test'] == 100

  # The learning curve: "all" is the main table; 20 is a run on 20 training queries.
  curve = json.loads((workdir / 'learning_curve.json').read_text())
  assert list(curve) == ['tiny'] and list(curve['tiny']) == ['20', 'all']
  for method in ('router', 'knn', 'mlp', 'ensemble'):
    for size in ('20', 'all'):
      e = curve['tiny'][size][method]
      assert set(e) == {'aiq_mean', 'aiq_ci95', 'role'} and e['aiq_ci95'][0] <= e['aiq_ci95'][1]
    assert curve['tiny']['all'][method]['aiq_mean'] == entry[method]['aiq_mean']
  sizes = info['datasets']['tiny']['learning_curve']
  assert sizes['20']['train'] == 20 and sizes['all']['train'] == 240
  assert sizes['20']['router_minus_best']['best'] in ('knn', 'linear', 'mlp', 'ensemble', 'random')
  assert curve['tiny']['20']['router']['aiq_mean'] != entry['router']['aiq_mean']
  assert '## Learning curve' in md and '| 20 |' in md and '| all (240) |' in md
  assert (workdir / 'learning_curve.png').stat().st_size > 1000
  seeds = [json.loads((workdir / 'curve' / 'n20' / 'tiny' / f'seed{s}' / 'config.json')
                      .read_text())['data'] for s in (0, 1)]
  assert [(d['train_queries'], d['train_sample_seed']) for d in seeds] == [(20, 0), (20, 1)]

  # A rerun reads the scored seeds back (seed1), or re-scores a finished one
  # whose scores are gone (seed0): no step trained, the same figures.
  logs = {s: (workdir / 'tiny' / s / 'metrics.jsonl').read_text() for s in ('seed0', 'seed1')}
  (workdir / 'tiny' / 'seed0' / suite.SCORED).unlink()
  again = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  main_seed = lambda s: f"seed {s}: scored before, read from {workdir / 'tiny' / f'seed{s}'}"
  assert main_seed(1) in again.stdout and main_seed(0) not in again.stdout
  assert again.stdout.count('scored before') == 3   # seed1 and both learning-curve seeds
  assert json.loads((workdir / 'suite.json').read_text()) == results
  for seed, log in logs.items():
    assert (workdir / 'tiny' / seed / 'metrics.jsonl').read_text() == log
  assert json.loads((workdir / 'learning_curve.json').read_text()) == curve


def test_train_sizes_and_the_training_sample():
  from entrorouter_jax.data import sources
  from entrorouter_jax.data.dataset import DataError
  assert suite.parse_train_sizes('all, 500,20') == [20, 500, 'all']
  for bad in ('10,x', '1', '20,20', ''):
    with pytest.raises(ValueError, match='--train_sizes'):
      suite.parse_train_sizes(bad)
  train = synthetic.generate(seed=0, num_train=50, num_validation=0, num_test=0).split('train')
  a = sources.train_sample(train, 20, seed=3)
  assert a.num_queries == 20 and len(set(a.ids)) == 20 and set(a.ids) <= set(train.ids)
  rows = [list(train.ids).index(i) for i in a.ids]
  assert rows == sorted(rows)   # kept in their order
  np.testing.assert_array_equal(a.outcomes, train.outcomes[rows])
  assert list(sources.train_sample(train, 20, seed=3).ids) == list(a.ids)   # seeded
  assert list(sources.train_sample(train, 20, seed=4).ids) != list(a.ids)
  assert sources.train_sample(train, 0, seed=3) is train
  assert sources.train_sample(train, 500, seed=3) is train
  for bad in (-1, 1, 2.5, True):
    with pytest.raises(DataError, match='data.train_queries'):
      sources.train_sample(train, bad, seed=0)


def test_suite_bad_input_is_one_clear_line(tmp_path):
  long_file = write_long(tmp_path / 'tiny.csv', num_train=40, num_test=10)
  cases = [
      (f'tiny=csv:{long_file}', "format 'csv'"),
      (f'tiny=long:{tmp_path / "nope.csv"}', 'nope.csv does not exist'),
      (f'tiny:{long_file}', 'expected NAME=FORMAT:PATH'),
      (f'a=long:{long_file},a=long:{long_file}', "the name 'a' is given twice"),
  ]
  for spec, message in cases:
    out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.suite',
                          f'--workdir={tmp_path / "w"}', f'--datasets={spec}'],
                         cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2, (spec, out.stderr[-2000:])
    assert message in out.stderr and 'Traceback' not in out.stderr, (spec, out.stderr)
  with pytest.raises(ValueError, match='match no --datasets entry'):
    suite.parse_datasets(f'a=long:{long_file}', pools=f'b={long_file}')
  # `default` adds the default data sets (those present) before a user's file.
  names = [d.name for d in suite.parse_datasets(f'default,mine=long:{long_file}')]
  assert names == [d.name for d in suite.available_defaults()] + ['mine']


def test_ablations_table_in_process(tmp_path):
  """Two ablation rows on one seed: the table and ablations.json carry AIQ and the
  collapse diagnostics beside it."""
  config = rl_config.get_config()
  config = suite.apply_overrides(config, dict(TINY, **{'data.data_dir': str(tmp_path / 'tfds')}))
  datasets = suite.parse_datasets(f'tiny=long:{write_long(tmp_path / "tiny.csv")}')
  suite.run(config, tmp_path / 'w', datasets, seeds=1, bootstrap=20,
            ablations=('soft_supervision_only', 'plus_rl'))
  rows = json.loads((tmp_path / 'w' / 'ablations.json').read_text())
  assert list(rows) == ['soft_supervision_only', 'plus_rl']
  for row in rows.values():
    assert row['seeds'] == 1
    assert 0.0 < row['datasets']['tiny']['aiq_mean'] <= 1.0
    diag = row['diagnostics']
    assert diag['entropy'] >= 0.0 and 0.0 <= diag['strongest_share'] <= 1.0
    # A mean over seeds of a count of models (one seed here: a whole number of them).
    assert float(diag['needed_never_picked']).is_integer()
    assert 0 <= diag['needed_never_picked'] <= 3
  md = (tmp_path / 'w' / 'suite.md').read_text()
  assert '## Ablations' in md and 'Soft Supervision only' in md
  assert '| variant | seeds | tiny |' in md
  with pytest.raises(ValueError, match='ablation_seeds=0'):
    suite.run(config, tmp_path / 'w2', datasets, seeds=1, ablations=True, ablation_seeds=0)


def test_collapse_diagnostics_against_a_hand_count():
  """3 models, 100 queries: the anchor's rule sends 50 / 40 / 10 queries to the models,
  the policy picks model 0 for 99 and model 1 for 1: model 2 (needed, >= 2%) is never
  picked and model 1 (1%, >= 0.2%) is, so needed_never_picked is 1."""
  p_hat = np.zeros((100, 3))
  p_hat[:50, 0] = p_hat[50:90, 1] = p_hat[90:, 2] = 1.0
  c_bar = np.zeros((100, 3))
  probs = np.full((100, 3), 0.1)
  probs[:99, 0] = 0.8
  probs[99, 1] = 0.8
  diag = suite.collapse_diagnostics(probs, (p_hat, c_bar), 0.5, strongest=0)
  assert diag['needed_never_picked'] == 1
  assert diag['strongest_share'] == pytest.approx(0.99)
  entropy = -(0.8 * np.log(0.8) + 2 * 0.1 * np.log(0.1))
  assert diag['entropy'] == pytest.approx(entropy)
  # A cost weight that moves the anchor: c_bar makes model 0 dear, so its queries
  # go to model 1 (p_hat ties broken by the cost), which the policy still picks once.
  c_bar[:, 0] = 10.0
  p_hat[:50, 1] = 0.5
  assert suite.collapse_diagnostics(probs, (p_hat, c_bar), 0.5, 0)['needed_never_picked'] == 1
