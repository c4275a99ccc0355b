"""Baseline routers on a small synthetic routing world."""

import numpy as np
import pytest

from entrorouter_jax import baselines, capability, metrics
from entrorouter_jax.data import synthetic

FAST = baselines.FitConfig(hidden=256, max_epochs=3)


@pytest.fixture(scope='module')
def world():
  data = synthetic.generate(seed=0, num_train=3000, num_validation=10, num_test=500)
  train, test = data.split('train'), data.split('test')
  est = capability.capability_estimates(train.queries, train.outcomes, train.outcome_mask,
                                        train.costs, train.tasks,
                                        {'test': (test.queries, test.tasks)})
  space = est['space']
  return dict(train=train, test=test, est=est,
              train_feats=space.transform(train.queries),
              test_feats=space.transform(test.queries),
              c_hat=train.costs / est['c_ref'])


@pytest.fixture(scope='module')
def results(world):
  p_hat, c_bar = world['est']['test']
  return baselines.evaluate_baselines(
      world['train'], world['test'], world['train_feats'], world['test_feats'], p_hat, c_bar,
      world['est']['c_ref'], 0.0, 1e-4, seed=0)


def _cheapest(results):
  singles = {k: v for k, v in results.items() if k.startswith('single:')}
  return min(singles.values(), key=lambda v: v['cost'])


def test_entries(results, world):
  names = world['test'].model_names
  assert set(results) == ({'knn', 'linear', 'mlp', 'ensemble', 'task_best', 'random', 'oracle'}
                          | {f'single:{n}' for n in names})
  for entry in results.values():
    assert 0.0 <= entry['aiq'] <= 1.0
    assert 0.0 <= entry['accuracy'] <= 1.0
  # Costs are in dollars (the single models' mean dollar costs).
  singles = metrics.single_models(world['test'].outcomes, world['test'].outcome_mask,
                                  world['test'].costs, names)
  for n in names:
    assert results[f'single:{n}']['cost'] == pytest.approx(singles[n]['cost'])
  assert results['oracle']['accuracy'] >= max(results[k]['accuracy']
                                              for k in ('knn', 'linear', 'mlp'))


def test_baselines_beat_cheapest_model_at_lambda_zero(results):
  cheapest = _cheapest(results)
  for name in ('knn', 'linear', 'mlp'):
    assert results[name]['accuracy'] > cheapest['accuracy'] + 0.1, name
    assert results[name]['curve'][0]['lambda'] == 0.0
    assert results[name]['curve'][0]['accuracy'] == results[name]['accuracy']
    assert results[name]['aiq'] > results['random']['aiq'] - 0.05, name


def test_curves_sorted_and_complete(results, world):
  cheapest = _cheapest(results)
  for name in ('knn', 'linear', 'mlp'):
    curve = results[name]['curve']
    lams = [p['lambda'] for p in curve]
    assert lams == sorted(lams) and len(set(lams)) == len(lams)
    assert set(baselines.LAMBDA_GRID) <= set(lams)
    # The largest lambda sends everything to the cheapest model.
    assert curve[-1]['cost'] == cheapest['cost']
    assert curve[-1]['accuracy'] == cheapest['accuracy']
    for p in curve:
      assert len(p['shares']) == len(world['test'].model_names)
      assert sum(p['shares']) == pytest.approx(1.0)
    assert max(curve[-1]['shares']) == 1.0
  hull = results['random']['curve']
  assert [p['cost'] for p in hull] == sorted(p['cost'] for p in hull)
  assert hull[0]['cost'] == cheapest['cost']


def test_huge_lambda_routes_to_cheapest(world):
  p_hat, c_bar = world['est']['test']
  cheap = int(np.argmin(world['train'].costs.mean(axis=0)))
  routers = [baselines.knn_router(p_hat, c_bar),
             baselines.linear_router(world['train_feats'], world['train'].outcomes,
                                     world['train'].outcome_mask, world['c_hat'],
                                     world['test_feats'])]
  for r in routers:
    assert (r.choice(1e6) == cheap).all(), r.name
    assert (r.choice(0.0) != cheap).any(), r.name


def test_route_and_lambda_grid_by_hand():
  scores = np.array([[0.9, 0.5], [0.2, 0.2]])
  c_pred = np.array([[0.002, 0.001], [0.003, 0.003]])
  # Row 0: utility equal at lambda = .4 / .001 = 400; row 1: exact tie -> lower index.
  np.testing.assert_array_equal(baselines.route(scores, c_pred, 0.0), [0, 0])
  np.testing.assert_array_equal(baselines.route(scores, c_pred, 401.0), [1, 0])
  assert baselines.all_cheapest_lambda(scores, c_pred) == pytest.approx(400.0)
  grid = baselines.lambda_grid(scores, c_pred)
  assert grid[0] == 0.0 and grid[-1] == pytest.approx(800.0) and grid == sorted(grid)
  np.testing.assert_array_equal(baselines.route(scores, c_pred, grid[-1]), [1, 0])
  # Ties in utility go to the cheaper model.
  np.testing.assert_array_equal(baselines.route([[0.5, 0.5]], [[0.2, 0.1]], 0.0), [1])
  # Nothing to gain from dearer models: the base grid is enough.
  assert baselines.lambda_grid([[0.1, 0.9]], [[1.0, 0.5]]) == sorted(baselines.LAMBDA_GRID)


def test_deterministic(world):
  args = (world['train_feats'], world['train'].outcomes, world['train'].outcome_mask,
          world['c_hat'], world['test_feats'])
  a = baselines.mlp_router(*args, seed=3, config=FAST)
  b = baselines.mlp_router(*args, seed=3, config=FAST)
  np.testing.assert_array_equal(a.scores, b.scores)
  assert a.fit == b.fit
  c = baselines.mlp_router(*args, seed=4, config=FAST)
  assert not np.array_equal(a.scores, c.scores)


@pytest.mark.parametrize('config', [baselines.LINEAR, FAST], ids=['linear', 'mlp'])
def test_missing_outcomes_are_masked(world, config):
  rng = np.random.default_rng(0)
  y = world['train'].outcomes.copy()
  mask = rng.random(y.shape) > 0.3
  feats = world['train_feats']
  # Whatever sits in an unobserved cell must not matter.
  p1, info1 = baselines.fit_success_model(feats, np.where(mask, y, 0.0), mask, config=config)
  p2, info2 = baselines.fit_success_model(feats, np.where(mask, y, 1.0 - y), mask,
                                          config=config)
  np.testing.assert_array_equal(baselines.predict_success(p1, world['test_feats']),
                                baselines.predict_success(p2, world['test_feats']))
  assert info1 == info2
  # ... while the observed cells do.
  p3, _ = baselines.fit_success_model(feats, np.where(mask, 1.0 - y, 0.0), mask, config=config)
  assert not np.array_equal(baselines.predict_success(p1, world['test_feats']),
                            baselines.predict_success(p3, world['test_feats']))


def test_fractional_outcomes(world):
  y = world['train'].outcomes * 0.5 + 0.25  # soft labels in [.25, .75]
  params, info = baselines.fit_success_model(world['train_feats'], y,
                                             world['train'].outcome_mask, config=FAST)
  p = baselines.predict_success(params, world['test_feats'])
  assert np.isfinite(info['heldout_bce']) and p.min() > 0.1 and p.max() < 0.9


def test_ensemble_and_task_best_by_hand(results):
  knn = baselines.ScoreRouter('knn', np.array([[0.2, 0.8]]), np.array([[0.1, 0.9]]))
  mlp = baselines.ScoreRouter('mlp', np.array([[0.6, 0.4]]), np.array([[0.5, 0.5]]))
  ens = baselines.ensemble_router(knn, mlp)
  assert ens.name == 'ensemble'
  np.testing.assert_allclose(ens.scores, [[0.4, 0.6]])
  np.testing.assert_array_equal(ens.c_pred, knn.c_pred)      # the neighbours' per-query cost

  from entrorouter_jax.data.dataset import ModelInfo, RoutingDataset
  pool = [ModelInfo('a', 1.0, 1.0), ModelInfo('b', 2.0, 2.0)]

  def data(tasks, y, mask, costs):
    n = len(tasks)
    return RoutingDataset(name='hand', ids=np.array([f'q{i}' for i in range(n)], object),
                          queries=np.array([f'text {i}' for i in range(n)], object),
                          tasks=np.array(tasks, object), splits=np.array(['train'] * n, object),
                          models=pool, outcomes=np.array(y, np.float32),
                          outcome_mask=np.array(mask, bool), costs=np.array(costs, np.float32))

  train = data(['x', 'x', 'y', 'y'], [[1, 0], [0, 1], [0, 1], [1, 1]],
               [[1, 1], [1, 0], [1, 1], [1, 1]], [[1, 2], [3, 4], [1, 2], [1, 6]])
  test = data(['y', 'x', 'z'], np.zeros((3, 2)), np.ones((3, 2)), np.ones((3, 2)))
  ref = baselines.task_best_router(train, test, c_ref=2.0)
  # Task y: a succeeds 1/2, b 2/2; x: a 1/2, b 0/1 (its second cell is unobserved);
  # z is unseen: the global rates (a 2/4, b 2/3). Costs: task means / c_ref.
  np.testing.assert_allclose(ref.scores, [[0.5, 1.0], [0.5, 0.0], [0.5, 2 / 3]])
  np.testing.assert_allclose(ref.c_pred, [[0.5, 2.0], [1.0, 1.5], [0.75, 1.75]])
  assert baselines.task_best_router(data(['', ''], [[1, 0]] * 2, [[1, 1]] * 2, [[1, 1]] * 2),
                                    test, 1.0) is None
  # In the table: a reference scored like the others.
  assert 0.0 < results['task_best']['aiq'] <= 1.0 and results['ensemble']['curve']


def test_oracle_curve_starts_at_the_oracle_and_dominates(results, world):
  test = world['test']
  oracle = baselines.oracle_router(test, world['est']['c_ref'])
  np.testing.assert_array_equal(oracle.choice(0.0), metrics.oracle_choice(
      test.outcomes, test.outcome_mask, test.costs))
  entry = results['oracle']
  point = metrics.route_accuracy_cost(oracle.choice(0.0), test.outcomes, test.outcome_mask,
                                      test.costs)
  assert entry['accuracy'] == point['accuracy'] and entry['cost'] == point['cost']
  assert entry['curve'][-1]['cost'] == _cheapest(results)['cost']      # down to all-cheapest
  for name in ('knn', 'linear', 'mlp', 'ensemble', 'task_best', 'random'):
    assert entry['aiq'] >= results[name]['aiq'], name


def test_weighted_bce_matches_numpy_and_integer_weights_repeat_cells():
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = (rng.random((6, 2)) < 0.5).astype(np.float32)
  w = np.where(rng.random((6, 2)) < 0.7, rng.integers(1, 4, (6, 2)), 0).astype(np.float32)
  params = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            'b': jnp.asarray([0.1, -0.2], jnp.float32)}
  z = x @ np.asarray(params['w']) + np.asarray(params['b'])
  cell = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
  expected = float((cell * w).sum() / w.sum())
  assert float(baselines._bce(params, x, y, w)) == pytest.approx(expected, rel=1e-5)
  # a cell of weight n counts as n copies of that cell with weight 1
  rows = np.repeat(np.arange(6), 3)
  copies = np.concatenate([(w >= k) for k in (1, 2, 3)]).reshape(3, 6, 2).transpose(1, 0, 2)
  ones = copies.reshape(18, 2).astype(np.float32)
  assert float(baselines._bce(params, x[rows], y[rows], ones)) == pytest.approx(expected, rel=1e-5)


def test_fit_success_model_checks_cell_weights():
  x = np.zeros((4, 2), np.float32)
  y = np.ones((4, 2))
  mask = np.ones((4, 2), bool)
  with pytest.raises(ValueError, match='cell_weights'):
    baselines.fit_success_model(x, y, mask, config=FAST, cell_weights=np.zeros((4, 2)))
  with pytest.raises(ValueError, match='cell_weights'):
    baselines.fit_success_model(x, y, mask, config=FAST, cell_weights=np.ones((4, 3)))
