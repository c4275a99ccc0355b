"""The replay simulator's scenarios (--scenario): parsing, a model that joins mid-stream (no
learner routes to it before, its labelled queries at the join), a price change from F, a
stream ordered by task, the settle rule and the online.json contract."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from entrorouter_jax import bandits, online
from test_online import ENV, _write_long


def _stream(seed=0, n_train=120, n_test=30, d=5, k=4, seed_labels=10):
  """A tiny full-information stream; m1 is cheap and good (what a new model should be)."""
  rng = np.random.default_rng(seed)

  def table(n):
    y = (rng.random((n, k)) < np.array([0.3, 0.9, 0.6, 0.9])[:k]).astype(np.float64)
    mask = rng.random((n, k)) > 0.05
    return online.Table(rng.normal(size=(n, d)).astype(np.float32), np.where(mask, y, 0.0),
                        mask, rng.random((n, k)) * 0.1 + np.linspace(0.1, 1.0, k),
                        np.array([('a', 'b', 'c')[i % 3] for i in range(n)], object))

  names = [f'm{j}' for j in range(k)]
  return online.make_stream(table(n_train), table(n_test), names, seed, seed_labels)


def _scenario(stream, text, labels=0, seed=0):
  sc = online.parse_scenario(text, labels)
  model = -1 if sc.kind == 'task_shift' else stream.model_names.index(sc.model)
  return online.apply_scenario(stream, sc, model, seed)


class Spy(bandits.Learner):
  """Routes by a fixed softmax of its features (over the available models unless `blind`)
  and records every Logs it is given."""

  name = 'spy'
  blind = False

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.given, self.shadows = [], []
    self.w = np.random.default_rng(0).normal(size=(5, self.num_models))

  def __deepcopy__(self, memo):
    twin = type(self)(self.num_models, self.cost_weight, seed=self.seed)
    twin.available = self.available.copy()
    self.shadows.append(twin)
    return twin

  def update(self, logs):
    self.given.append(logs)

  def estimates(self, feats):
    s = np.asarray(feats, np.float64) @ self.w
    return s, np.zeros_like(s)

  def policy(self, feats):
    z = np.exp(np.asarray(feats, np.float64) @ self.w)
    if not self.blind:
      z = z * self.available
    return z / z.sum(axis=1, keepdims=True)


class FullSpy(Spy):
  name = 'full_spy'
  full_information = True


class BlindSpy(Spy):
  name = 'blind_spy'
  blind = True


@pytest.mark.parametrize('text, labels, match', [
    ('bogus', 0, "unknown scenario 'bogus'"),
    ('new_model=m1', 0, 'needs NAME@F'),
    ('new_model=m1@1.5', 0, r'outside \[0, 1\)'),
    ('new_model=m1@half', 0, "F='half' is not a number"),
    ('price_change=m1@0.5', 0, 'needs NAME\\*X@F'),
    ('price_change=m1*0@0.5', 0, 'X=0 is not a cost factor'),
    ('price_change=m1*cheap@0.5', 0, "X='cheap' is not a number"),
    ('task_shift=1', 0, 'takes no value'),
    ('task_shift', 3, '--new_model_labels=3 with'),
    ('new_model=m1@0.5', -1, '--new_model_labels=-1'),
])
def test_parse_scenario_errors_name_the_flag(text, labels, match):
  with pytest.raises(ValueError, match=match) as e:
    online.parse_scenario(text, labels)
  assert '--scenario' in str(e.value) or '--new_model_labels' in str(e.value)


def test_parse_scenario_forms():
  assert online.parse_scenario('') is None
  sc = online.parse_scenario('new_model=auto@0.5', 7)
  assert (sc.kind, sc.model, sc.fraction, sc.labels, sc.has_event) == (
      'new_model', 'auto', 0.5, 7, True)
  sc = online.parse_scenario('price_change=gpt-4*0.25@0.3')
  assert (sc.kind, sc.model, sc.factor, sc.fraction) == ('price_change', 'gpt-4', 0.25, 0.3)
  assert not online.parse_scenario('task_shift').has_event


def test_resolve_scenario_errors_and_strongest():
  s = _stream()
  with pytest.raises(ValueError, match=r"--scenario=new_model=zz@0.5 on data set 'd': model "
                                       "'zz' is not in the pool"):
    online.resolve_scenario(online.parse_scenario('new_model=zz@0.5'), None, s.train, s.test,
                            s.model_names, 10, 'd')
  model, chosen = online.resolve_scenario(online.parse_scenario('price_change=strongest*2@0.5'),
                                          None, s.train, s.test, s.model_names, 10)
  accuracy = np.where(s.train.mask, s.train.outcomes, 0).sum(0) / s.train.mask.sum(0)
  assert model == int(np.argmax(accuracy)) and chosen['model'] == s.model_names[model]
  one_task = online.Table(s.train.feats, s.train.outcomes, s.train.mask, s.train.costs,
                          np.array(['a'] * len(s.train.feats), object))
  with pytest.raises(ValueError, match='--scenario=task_shift: the training split has task '
                                       r"labels \['a'\]"):
    online.resolve_scenario(online.parse_scenario('task_shift'), None, one_task, s.test,
                            s.model_names, 10)
  with pytest.raises(ValueError, match='--new_model_labels=500; expected at most the 65'):
    _scenario(s, 'new_model=m1@0.5', labels=500)


def test_cli_rejects_a_bad_scenario_with_exit_2(tmp_path):
  cmd = [sys.executable, '-m', 'entrorouter_jax.online', f'--workdir={tmp_path}',
         '--scenario=new_model=m1@2']
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and '--scenario=' in lines[0] and 'outside [0, 1)' in lines[0]


@pytest.mark.parametrize('name', sorted(bandits.LEARNERS))
def test_every_learner_holds_back_an_unavailable_model(name):
  """Before the join no policy gives the new model mass and no draw picks it; after it the
  policy is a distribution over every model (entrorouter also trains across the join)."""
  s = _stream(n_train=70)
  train, k = s.train, 4
  learner = bandits.make_learner(name, k, s.cost_weight, seed=0)
  hidden = np.arange(k) != 1
  learner.set_available(hidden)
  seed = s.seed_rows
  mask = train.mask[seed] & hidden
  logs = bandits.labelled_logs(train.feats[seed], train.outcomes[seed], mask,
                               np.where(hidden, s.cost_hat[seed], np.nan))
  learner.update(logs)
  for start, stop, available in ((0, 30, hidden), (30, 60, np.ones(k, bool))):
    learner.set_available(available)
    rows = s.stream_rows[start:stop]
    pi = learner.policy(train.feats[rows])
    np.testing.assert_allclose(pi.sum(axis=1), 1.0, atol=1e-6)
    choice, p = learner.deploy(train.feats[rows])
    if not available[1]:
      assert np.all(pi[:, 1] == 0) and not np.any(choice == 1)
    outcomes, cell, c_hat = online.revealed(s, rows, choice, learner.full_information,
                                            hidden=None if available[1] else 1)
    logs = bandits.append(logs, train.feats[rows], outcomes, cell, c_hat, choice, p)
    learner.update(logs)
  if isinstance(learner, bandits.EntroRouterLearner):
    assert learner.row_available[:40, 1].sum() == 0 and learner.row_available[40:].all()
    assert all(np.isfinite(v) for v in learner.history[-1].values() if isinstance(v, float))
  with pytest.raises(ValueError, match='set_available'):
    learner.set_available(np.zeros(k, bool))


def test_new_model_joins_at_f_with_its_labelled_queries():
  s = _scenario(_stream(), 'new_model=m1@0.5', labels=4)
  n, event = len(s.stream_rows), s.event
  assert (n, event) == (110, 55) and s.rounds() == [20, 35, 20, 35]
  assert len(s.join_rows) == 4 and set(s.join_rows) <= set(s.seed_rows) | set(
      s.stream_rows[:event])
  spy = Spy(4, s.cost_weight, seed=3)
  run = online.simulate(spy, s, dr=True)
  assert not np.any(run['choice'][:event] == 1) and np.any(run['choice'][event:] == 1)
  assert len(spy.given) == 1 + 2 + 1 + 2                 # seed labels, 2 rounds, join, 2 rounds
  first = spy.given[0]
  assert not first.mask[:, 1].any() and np.isnan(first.cost_hat[:, 1]).all()
  logs, train = spy.given[-1], s.train
  join = slice(10 + event, 10 + event + 4)                # appended after the rounds before F
  np.testing.assert_array_equal(logs.feats[join], train.feats[s.join_rows])
  np.testing.assert_array_equal(logs.logged[join], -1)
  np.testing.assert_array_equal(logs.mask[join], train.mask[s.join_rows] & (np.arange(4) == 1))
  np.testing.assert_allclose(logs.cost_hat[join][:, 1], s.cost_hat[s.join_rows, 1])
  assert np.isnan(logs.cost_hat[join][:, [0, 2, 3]]).all()
  np.testing.assert_array_equal(logs.logged[10 + event + 4:], run['choice'][event:])
  # The DR shadow is told the seed labels and the fit fold's queries only (logged, or
  # labelled at the join).
  shadow = spy.shadows[0]
  fit = online.fit_fold(s.stream_rows, 3)
  assert len(shadow.given) == len(spy.given)
  told = shadow.given[-1]
  fit_rows = set(s.seed_rows) | set(s.stream_rows[fit])
  labelled = sum(r in fit_rows for r in s.join_rows)
  assert 0 < labelled < 4                     # one held-out query among them at least
  assert told.num_rows == 10 + labelled + int(fit.sum())
  held = train.feats[s.stream_rows[~fit]]
  assert not (told.feats[:, None, :] == held[None, :, :]).all(axis=2).any()
  assert shadow.available.all() and spy.available.all()
  # A full-information learner is told the new model's cell of every query seen before F.
  full = FullSpy(4, s.cost_weight, seed=3)
  online.simulate(full, s)
  logs = full.given[-1]
  assert not logs.mask[:10 + event, 1].any()
  seen = np.concatenate([s.seed_rows, s.stream_rows[:event]])
  added = slice(10 + event, 10 + 2 * event + 10)
  np.testing.assert_array_equal(logs.feats[added], train.feats[seen])
  np.testing.assert_array_equal(logs.mask[added][:, 1], train.mask[seen, 1])
  np.testing.assert_array_equal(logs.mask[10 + 2 * event + 10:],
                                train.mask[s.stream_rows[event:]])


def test_a_learner_routing_to_an_absent_model_is_refused():
  s = _scenario(_stream(), 'new_model=m1@0.5')
  with pytest.raises(ValueError, match="blind_spy: deploy routed to 'm1' in the round from "
                                       'stream position 0, a model not available then'):
    online.simulate(BlindSpy(4, s.cost_weight), s)


def test_price_change_applies_from_f():
  base = _stream(seed=1)
  s = _scenario(base, 'price_change=m3*0.25@0.5')
  event, lam = s.event, s.cost_weight
  spy = Spy(4, s.cost_weight, seed=1)
  run = online.simulate(spy, s, dr=True)
  assert run['round_sizes'] == bandits.round_sizes(55) + bandits.round_sizes(55)
  rows, choice = s.stream_rows, run['choice']
  factor = np.where((np.arange(len(rows)) >= event) & (choice == 3), 0.25, 1.0)
  c_hat = s.cost_hat[rows, choice] * factor
  assert np.any(factor < 1) and np.any((choice == 3) & (factor == 1))
  np.testing.assert_allclose(run['utility'], s.train.outcomes[rows, choice] - lam * c_hat)
  assert len(run['test_shares']) == 4                     # the deployed policy, each round
  np.testing.assert_allclose(run['test_shares'][-1], spy.policy(s.test.feats).mean(axis=0))
  logs = spy.given[-1]
  np.testing.assert_allclose(logs.cost_hat[10 + np.arange(len(rows)), choice], c_hat)
  costs, _ = s.test_costs(event, np.ones(4, bool))
  np.testing.assert_allclose(costs[:, 3], s.test.costs[:, 3] * 0.25)
  np.testing.assert_allclose(costs[:, :3], s.test.costs[:, :3])
  assert s.test_costs(event - 1, np.ones(4, bool))[0] is s.test.costs
  # Without the scenario nothing changes: the same seed's stream, the usual rounds.
  assert base.rounds() == bandits.round_sizes(110)
  np.testing.assert_allclose(base.cost_hat_at(np.arange(110)), base.cost_hat[base.stream_rows])


def test_task_shift_orders_the_stream_by_task():
  base = _stream(seed=2)
  s = _scenario(base, 'task_shift', seed=2)
  assert sorted(s.stream_rows) == sorted(base.stream_rows)
  np.testing.assert_array_equal(s.seed_rows, base.seed_rows)
  tasks = s.train.tasks[s.stream_rows].tolist()
  blocks = [t for i, t in enumerate(tasks) if i == 0 or tasks[i - 1] != t]
  assert blocks == s.task_order and sorted(blocks) == ['a', 'b', 'c']
  for t in blocks:                                        # each task keeps the seed's order
    mine = [r for r in s.stream_rows if s.train.tasks[r] == t]
    assert mine == [r for r in base.stream_rows if base.train.tasks[r] == t]
  assert s.rounds() == bandits.round_sizes(len(tasks))
  assert _scenario(base, 'task_shift', seed=2).task_order == s.task_order


def test_task_shift_report_gives_the_utility_by_task():
  s0 = _scenario(_stream(seed=2), 'task_shift', seed=2)
  s1 = _scenario(_stream(seed=2), 'task_shift', seed=5)
  tasks = [s.train.tasks[s.stream_rows] for s in (s0, s1)]
  run = lambda t: {'utility': np.where(t == 'a', 1.0, 0.0), 'round_utility': [0.5]}
  entry, info = online.scenario_report(s0.scenario, {}, [s0, s1],
                                       {'greedy': [run(tasks[0]), run(tasks[1])]})
  assert entry == {'utility_by_task': {'greedy': {'a': 1.0, 'b': 0.0, 'c': 0.0}}}
  assert info['task_order'] == [s0.task_order, s1.task_order]
  assert '| greedy |' in '\n'.join(online.render_scenario(info))


def test_settle_round():
  assert online.settle_round([0.0, 0.3, 0.5, 0.52]) == 3
  assert online.settle_round([0.2, 0.22, 0.21]) == 1
  assert online.settle_round([0.5, 0.0]) == 2
  assert online.settle_round([]) is None


def test_scenario_report_shares_and_targets():
  s = _scenario(_stream(), 'new_model=m1@0.5')
  ends = np.cumsum(s.rounds())                             # 20, 55 | 75, 110
  choice = np.zeros(110, np.int64)
  choice[55:75] = 1                                       # the first round after the join
  run = lambda c, u: {'choice': c, 'utility': np.full(110, u), 'round_utility': [u] * 4,
                      'test_shares': [np.full(4, 0.25)] * 4}
  full = np.where(np.arange(110) >= 55, 1, 0)
  runs = {'greedy': [run(np.zeros(110, np.int64), 0.5)] * 2,
          'entrorouter': [run(choice, 0.6)] * 2, 'full_info': [run(full, 0.7)] * 2}
  entry, info = online.scenario_report(s.scenario, {'model': 'm1'}, [s, s], runs)
  assert entry == {'name': 'm1', 'full_info_share': 1.0,
                   'share': {'greedy': 0.0, 'entrorouter': pytest.approx(20 / 55),
                             'full_info': 1.0}}
  me = info['methods']['entrorouter']
  assert info['round_ends'] == ends.tolist() and info['rounds_before'] == 2
  assert me['share_by_round'][0] == [0.0, 0.0, 1.0, 0.0]
  assert me['test_share_by_round'][0] == [0.25] * 4
  assert me['settle'] == [2, 2] and me['settle_queries'] == [20, 20]
  t = info['targets']
  assert t['half_share'] == {'value': 0.0, 'share_last': 0.0, 'full_info_share_last': 1.0,
                             'per_seed': [0.0, 0.0], 'seeds_met': 0, 'met': False}
  assert 'last-round share of the new model 0.000' in '\n'.join(online.render_scenario(info))
  assert t['beats_greedy']['value'] == pytest.approx(0.1) and t['beats_greedy']['met']


def test_price_change_report_measures_the_effect_against_x_1():
  s = _scenario(_stream(), 'price_change=m3*0.25@0.5')    # rounds 20, 35 | 20, 35
  shares = lambda *p3: [np.array([0.0, 0.0, 1 - x, x]) for x in p3]
  run = lambda p3: {'choice': np.full(110, 3), 'utility': np.zeros(110),
                    'round_utility': [0.0] * 4, 'test_shares': shares(*p3)}
  runs = {'entrorouter': [run((0.1, 0.2, 0.2, 0.5)), run((0.1, 0.4, 0.4, 0.3))],
          'full_info': [run((0.5, 0.5, 0.5, 0.5))] * 2}
  unchanged = {'entrorouter': [run((0.1, 0.2, 0.2, 0.2)), run((0.1, 0.4, 0.4, 0.3))],
               'full_info': [run((0.5, 0.5, 0.5, 0.4))] * 2}
  entry, info = online.scenario_report(s.scenario, {'model': 'm3'}, [s, s], runs, unchanged)
  assert entry == {'name': 'm3', 'factor': 0.25, 'full_info_share': 1.0,
                   'share': {'entrorouter': 1.0, 'full_info': 1.0}}
  assert info['methods']['entrorouter']['test_share_unchanged'][0] == [0.1, 0.2, 0.2, 0.2]
  t = info['targets']['moves']                            # round 4: the second after the change
  assert t['per_seed'] == pytest.approx([0.3, 0.0]) and t['seeds_met'] == 1
  assert t['value'] == pytest.approx(0.15) and t['met'] and t['effect_last'] == t['value']
  assert t['full_info'] == pytest.approx(0.1)
  assert t['before_after'] == pytest.approx(0.1)          # 0.5 - 0.2 and 0.3 - 0.4
  flat = online.scenario_targets(online.parse_scenario('price_change=m3*1@0.5'), info)
  assert not flat['moves']['met'] and flat['moves']['seeds_met'] == 0
  assert 'the same stream at X = 1' in '\n'.join(online.render_scenario(info))
  _, info = online.scenario_report(s.scenario, {'model': 'm3'}, [s, s], runs)
  assert info['targets'] == {}                            # no counterfactual: no verdict


def test_scenario_cli_writes_the_new_model_contract(tmp_path):
  path, names = _write_long(tmp_path / 'tiny.csv')
  workdir = tmp_path / 'online'
  cmd = [sys.executable, '-m', 'entrorouter_jax.online', f'--workdir={workdir}',
         f'--datasets=tiny=long:{path}', '--seeds=1', '--seed_labels=20', '--methods=greedy',
         '--scenario=new_model=auto@0.5', '--config.anchor.space=tfidf',
         '--config.anchor.dim=24', f'--config.data.data_dir={tmp_path / "tfds"}']
  out = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  entry = json.loads((workdir / 'online.json').read_text())['tiny']
  assert set(entry) == {'greedy', 'dr_coverage', 'new_model'}
  new = entry['new_model']
  assert set(new) == {'name', 'full_info_share', 'share'} and new['name'] in names
  assert set(new['share']) == {'greedy', 'full_info'}
  assert new['share']['full_info'] == new['full_info_share']
  assert all(0.0 <= x <= 1.0 for x in new['share'].values())
  info = json.loads((workdir / 'online_info.json').read_text())['datasets']['tiny']
  sc = info['scenario']
  assert sc['model'] == new['name'] and sc['event'] == 70 and sc['labels'] == 0
  full = info['scenario']['full_info_shares']                  # auto: the largest share among
  strongest = sc['strongest']                                  # the models cheaper than the
  assert new['name'] in sc['cheaper_than_strongest'] and strongest not in sc[   # strongest
      'cheaper_than_strongest']
  assert full[new['name']] == max(full[n] for n in sc['cheaper_than_strongest'])
  greedy = sc['methods']['greedy']
  assert all(x == 0.0 for x in greedy['share_by_round'][0][:sc['rounds_before']])
  assert greedy['share_after'][0] == pytest.approx(new['share']['greedy'])
  assert info['seeds'][0]['round_sizes'] == [20, 40, 10, 20, 40, 10]
  assert '### Scenario `new_model=auto@0.5`' in (workdir / 'online.md').read_text()
  assert (workdir / 'share.png').read_bytes()[:4] == b'\x89PNG'
