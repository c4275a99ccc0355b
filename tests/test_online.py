"""The replay simulator: what a learner is told, its logged propensities, the regret reference,
and the CLI's contract files on a tiny long-format file."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT
from entrorouter_jax import bandits, online
from entrorouter_jax.data import synthetic

ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def _stream(seed=0, n_train=120, n_test=30, d=5, k=4, seed_labels=10):
  rng = np.random.default_rng(seed)

  def table(n):
    y = (rng.random((n, k)) < np.linspace(0.3, 0.9, k)).astype(np.float64)
    mask = rng.random((n, k)) > 0.05
    return online.Table(rng.normal(size=(n, d)).astype(np.float32), np.where(mask, y, 0.0),
                        mask, rng.random((n, k)) * 0.1 + np.linspace(0.1, 1.0, k))

  names = [f'm{j}' for j in range(k)]
  return online.make_stream(table(n_train), table(n_test), names, seed, seed_labels)


class Spy(bandits.Learner):
  """Routes by a fixed softmax of its features and records every Logs it is given."""

  name = 'spy'

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.given, self.deployed, self.shadows = [], [], []
    self.w = np.random.default_rng(0).normal(size=(5, self.num_models))

  def __deepcopy__(self, memo):
    twin = Spy(self.num_models, self.cost_weight, seed=self.seed)
    self.shadows.append(twin)
    return twin

  def update(self, logs):
    self.given.append(logs)

  def estimates(self, feats):
    s = np.asarray(feats, np.float64) @ self.w
    return s, np.zeros_like(s)

  def policy(self, feats):
    z = np.exp(np.asarray(feats, np.float64) @ self.w)
    return z / z.sum(axis=1, keepdims=True)

  def deploy(self, feats):
    choice, prop = super().deploy(feats)
    self.deployed.append((self.policy(feats), choice, prop))
    return choice, prop


def test_a_learner_is_told_only_the_chosen_cell_with_its_propensity():
  stream = _stream()
  spy = Spy(4, stream.cost_weight, seed=0)
  run = online.simulate(spy, stream)
  sizes = bandits.round_sizes(110)
  assert run['round_sizes'] == sizes == [20, 40, 50]
  assert len(spy.given) == 1 + len(sizes) and len(spy.deployed) == len(sizes)
  logs = spy.given[-1]
  train, seed = stream.train, stream.seed_rows
  np.testing.assert_array_equal(logs.feats[:10], train.feats[seed])
  np.testing.assert_array_equal(logs.mask[:10], train.mask[seed])      # seed labels: every cell
  rows = stream.stream_rows
  choice = np.concatenate([c for _, c, _ in spy.deployed])
  assert np.array_equal(logs.logged[10:], choice)
  chosen = np.eye(4, dtype=bool)[choice]
  np.testing.assert_array_equal(logs.mask[10:], chosen & train.mask[rows])
  np.testing.assert_array_equal(logs.outcomes[10:], np.where(chosen, train.outcomes[rows], 0.0))
  assert np.isnan(logs.cost_hat[10:][~chosen]).all()
  np.testing.assert_allclose(logs.cost_hat[10:][chosen], train.costs[rows, choice] / stream.c_ref)
  for dist, c, p in spy.deployed:
    assert np.all((p > 0) & (p <= 1))
    np.testing.assert_array_equal(p, dist[np.arange(len(c)), c])
  np.testing.assert_array_equal(logs.propensity[10:], np.concatenate([p for *_, p in spy.deployed]))
  for earlier, later in zip(spy.given, spy.given[1:]):          # logs only grow, by appending
    np.testing.assert_array_equal(later.logged[:earlier.num_rows], earlier.logged)
  u = train.outcomes[rows, choice] - stream.cost_weight * train.costs[rows, choice] / stream.c_ref
  np.testing.assert_allclose(run['utility'], u)
  ends = np.cumsum(sizes)
  np.testing.assert_allclose(run['round_utility'],
                             [u[e - s:e].mean() for e, s in zip(ends, sizes)])
  assert len(run['aiq_by_round']) == 1 + len(sizes)


def test_full_info_sees_whole_rows_and_has_no_regret_against_itself():
  stream = _stream(seed=1)
  full = bandits.make_learner('full_info', 4, stream.cost_weight, seed=1)
  seen = []
  update = full.update
  full.update = lambda logs: (seen.append(logs), update(logs))
  run = online.simulate(full, stream)
  rows = stream.stream_rows
  np.testing.assert_array_equal(seen[-1].mask[10:], stream.train.mask[rows])
  assert online.cumulative_regret(run, run) == [0.0] * len(run['round_sizes'])
  other = dict(run, utility=run['utility'] - 0.5)
  np.testing.assert_allclose(online.cumulative_regret(other, run),
                             0.5 * np.cumsum(run['round_sizes']))
  assert all(0.0 < a <= 1.0 for a in run['aiq_by_round'])
  np.testing.assert_allclose(run['shares'].sum(), 1.0)


def _dr_reference(spy, stream, logs, positions, rows):
  """NumPy DR value and true utility of `spy`'s policy on the logged rows at `positions`."""
  lam = stream.cost_weight
  feats, a = logs.feats[positions], logs.logged[positions]
  pi = spy.policy(feats)
  s, c_pred = spy.estimates(feats)
  q = s - lam * c_pred
  idx = np.arange(len(a))
  r = stream.train.outcomes[rows, a] - lam * stream.cost_hat[rows, a]
  rho = pi[idx, a] / logs.propensity[positions]
  dr = np.mean(np.sum(pi * q, axis=1) + rho * (r - q[idx, a]))
  true = np.mean(np.sum(pi * (stream.train.outcomes[rows] - lam * stream.cost_hat[rows]), axis=1))
  return dr, true


def test_dr_check_matches_numpy_on_the_held_out_fold():
  stream = _stream(seed=2)
  spy = Spy(4, stream.cost_weight, seed=0)
  run = online.simulate(spy, stream, dr=True)
  logs, rows = spy.given[-1], stream.stream_rows
  check = online.dr_check(spy, stream, logs, rows, seed=5)
  dr, true = _dr_reference(spy, stream, logs, np.arange(10, logs.num_rows), rows)
  assert check['dr'] == pytest.approx(dr) and check['true'] == pytest.approx(true)
  lo, hi = check['ci95']
  assert lo <= check['dr'] <= hi and check['covered'] == (lo <= true <= hi)
  assert check['rows'] == len(rows)
  # Rounds of 20, 40, 50: checked before rounds 2 and 3 where 10 or more of the rows logged
  # so far are held out, each on exactly those rows.
  fit = online.fit_fold(rows, spy.seed)
  expected = [end for end in (20, 60) if np.sum(~fit[:end]) >= online.DR_MIN_HELD]
  assert expected and len(run['dr_rounds']) == len(expected)
  for i, (end, got) in enumerate(zip(expected, run['dr_rounds'])):
    held = np.flatnonzero(~fit[:end])
    dr, true = _dr_reference(spy, stream, logs, 10 + held, rows[held])
    assert got['dr'] == pytest.approx(dr) and got['true'] == pytest.approx(true)
    assert got['rows'] == len(held) >= online.DR_MIN_HELD
    assert got == online.dr_check(spy, stream, online.subset_logs(logs, 10 + held), rows[held],
                                  seed=i)
  with pytest.raises(ValueError, match='one per logged row'):
    online.dr_check(spy, stream, logs, rows[:5])


def test_the_dr_shadow_never_trains_on_the_held_out_rows():
  stream = _stream(seed=3, n_train=250)
  spy = Spy(4, stream.cost_weight, seed=7)
  run = online.simulate(spy, stream, dr=True)
  assert len(spy.shadows) == 1
  shadow, logs, rows = spy.shadows[0], spy.given[-1], stream.stream_rows
  fit = online.fit_fold(rows, 7)
  assert 0.6 < fit.mean() < 0.95 and np.array_equal(fit, online.fit_fold(rows, 7))
  assert not np.array_equal(fit, online.fit_fold(rows, 8))
  assert len(spy.given) == len(shadow.given) == 1 + len(run['round_sizes'])
  for told, end in zip(shadow.given, np.cumsum([0] + run['round_sizes'])):
    keep = np.concatenate([np.arange(10), 10 + np.flatnonzero(fit[:end])])
    for field in ('feats', 'outcomes', 'mask', 'logged', 'propensity'):
      np.testing.assert_array_equal(getattr(told, field), getattr(logs, field)[keep])
    held_feats = stream.train.feats[rows[:end][~fit[:end]]]
    assert not (told.feats[:, None, :] == held_feats[None, :, :]).all(axis=2).any()
  assert logs.num_rows == 10 + len(rows)                  # the routing learner is told every row
  assert len(run['dr_rounds']) >= 2 and all(c['rows'] >= 10 for c in run['dr_rounds'])


def test_make_stream_seed_labels_and_lambda_from_the_seed_rows_alone():
  a, b = _stream(seed=0), _stream(seed=0)
  np.testing.assert_array_equal(a.seed_rows, b.seed_rows)
  assert sorted(np.concatenate([a.seed_rows, a.stream_rows]).tolist()) == list(range(120))
  seed = a.seed_rows
  assert a.cost_weight == bandits.operating_cost_weight(
      a.train.outcomes[seed], a.train.mask[seed], a.train.costs[seed] / a.c_ref)
  with pytest.raises(ValueError, match='seed_labels=1'):
    online.make_stream(a.train, a.test, a.model_names, 0, 1)


def test_t_interval_matches_scipy_free_formula():
  v = [0.5, 0.7, 0.6]
  half = 4.302652729911275 * np.std(v, ddof=1) / np.sqrt(3)     # t(0.975, 2)
  np.testing.assert_allclose(online.t_interval(v), [0.6 - half, 0.6 + half])
  assert online.t_interval([0.5]) is None


def test_run_rejects_unknown_methods(tmp_path):
  with pytest.raises(ValueError, match="'nonesuch' is unknown"):
    online.run(None, tmp_path, [], methods=['greedy', 'nonesuch'])


def _write_long(path, num_train=160, num_test=60):
  data = synthetic.generate(seed=0, num_train=num_train, num_validation=0, num_test=num_test)
  rows = [{'id': data.ids[i], 'query': data.queries[i], 'task': data.tasks[i], 'model': name,
           'score': float(data.outcomes[i, j]), 'cost': float(data.costs[i, j]),
           'split': data.splits[i]}
          for i in range(data.num_queries) for j, name in enumerate(data.model_names)]
  pd.DataFrame(rows).to_csv(path, index=False)
  return path, data.model_names


def _entry(final, utility, shares=None, tries=None):
  return {'final_aiq_mean': final, 'stream_utility_mean': utility,
          'shares': shares or {'a': 0.5, 'b': 0.5}, 'tries_min': tries or {'a': 50, 'b': 50}}


def test_check_targets_reads_the_issue_thresholds():
  entry = {'seed_only': _entry(0.70, 0.6), 'full_info': _entry(0.80, 0.8,
                                                                 {'a': 0.97, 'b': 0.01, 'c': 0.02}),
           'greedy': _entry(0.75, 0.70), 'linucb': _entry(0.74, 0.72),
           'entrorouter': _entry(0.791, 0.716, tries={'a': 900, 'b': 0, 'c': 20}),
           'dr_coverage': 0.9}
  t = online.check_targets(entry)
  assert t['gap_closure'] == {'value': pytest.approx(0.91), 'met': True, 'small_gap': False}
  assert t['stream']['value'] == pytest.approx(-0.004) and t['stream']['met']
  assert t['no_collapse'] == {'value': 20, 'models': ['a', 'c'], 'met': True}
  assert t['dr_coverage'] == {'value': 0.9, 'met': True}
  entry['entrorouter'] = _entry(0.789, 0.714, tries={'a': 900, 'b': 0, 'c': 19})
  entry['dr_coverage'] = 0.85
  t = online.check_targets(entry)
  assert not any(v['met'] for v in t.values()), t
  entry['seed_only'] = _entry(0.797, 0.6)          # a gap under 0.005: within 0.005 of full_info
  t = online.check_targets(entry)
  assert t['gap_closure']['small_gap'] and not t['gap_closure']['met']      # 0.789: 0.011 off
  entry['entrorouter']['final_aiq_mean'] = 0.796
  t = online.check_targets(entry)
  assert t['gap_closure']['small_gap'] and t['gap_closure']['met']
  assert online.check_targets({'greedy': _entry(0.7, 0.7), 'dr_coverage': None}) == {}


def test_online_cli_writes_the_contract(tmp_path):
  path, names = _write_long(tmp_path / 'tiny.csv')
  workdir = tmp_path / 'online'
  cmd = [sys.executable, '-m', 'entrorouter_jax.online', f'--workdir={workdir}',
         f'--datasets=tiny=long:{path}', '--seeds=1', '--seed_labels=20',
         '--methods=greedy,seed_only', '--config.anchor.space=tfidf', '--config.anchor.dim=24',
         f'--config.data.data_dir={tmp_path / "tfds"}']
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'wall time' in out.stdout
  results = json.loads((workdir / 'online.json').read_text())
  assert list(results) == ['tiny']
  entry = results['tiny']
  assert set(entry) == {'greedy', 'seed_only', 'dr_coverage'} and entry['dr_coverage'] is None
  for method in ('greedy', 'seed_only'):
    e = entry[method]
    assert set(e) == {'final_aiq', 'final_aiq_mean', 'regret', 'regret_mean',
                      'stream_utility_mean', 'never_tried', 'shares', 'tries_min'}
    assert len(e['final_aiq']) == 1 and 0.0 < e['final_aiq'][0] <= 1.0
    assert list(e['tries_min']) == names and sum(e['tries_min'].values()) == 140
    assert set(e['never_tried']) == {n for n, t in e['tries_min'].items() if t == 0}
    assert e['final_aiq_mean'] == e['final_aiq'][0] and e['regret_mean'] == e['regret'][0]
    assert set(e['never_tried']) <= set(names)
    assert list(e['shares']) == names and sum(e['shares'].values()) == pytest.approx(1.0)
  info = json.loads((workdir / 'online_info.json').read_text())['datasets']['tiny']
  assert info['seeds'][0]['round_sizes'] == [20, 40, 80]           # 140 stream queries
  # The seed-only learner is never updated: its test AIQ is the same after every round.
  aiq = info['methods']['seed_only'][0]['aiq_by_round']
  assert len(aiq) == 4 and len(set(aiq)) == 1
  md = (workdir / 'online.md').read_text()
  assert '| greedy |' in md and '| seed_only |' in md
  for png in ('regret.png', 'aiq_by_round.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG'


def test_online_cli_reports_dr_coverage_for_entrorouter(tmp_path):
  path, _ = _write_long(tmp_path / 'tiny.csv', num_train=300)
  workdir = tmp_path / 'online'
  cmd = [sys.executable, '-m', 'entrorouter_jax.online', f'--workdir={workdir}',
         f'--datasets=tiny=long:{path}', '--seeds=1', '--seed_labels=20',
         '--methods=entrorouter,greedy', '--config.anchor.space=tfidf', '--config.anchor.dim=24',
         '--config.model.hidden=32', f'--config.data.data_dir={tmp_path / "tfds"}']
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  entry = json.loads((workdir / 'online.json').read_text())['tiny']
  assert set(entry) == {'entrorouter', 'greedy', 'dr_coverage'}
  info = json.loads((workdir / 'online_info.json').read_text())['datasets']['tiny']
  checks = info['dr_rounds'][0]
  assert 1 <= len(checks) <= 3                             # rounds of 20, 40, 80, 140
  assert all(c['rows'] >= 10 for c in checks)
  assert 0.0 <= entry['dr_coverage'] <= 1.0
  assert entry['dr_coverage'] == pytest.approx(np.mean([c['covered'] for c in checks]))
  for c in checks:
    assert c['covered'] == (c['ci95'][0] <= c['true'] <= c['ci95'][1])
  assert 'dr_coverage' in (workdir / 'online.md').read_text()
