"""add_model: a model added to a trained router from a few labels, or removed from it.

The math (the success model's MAP fit and Laplace evidence, its prior scales, the cost
level) against NumPy and SciPy; end to end on the serving tests' tiny router, from which
math-specialist is removed (the command line) and added back from 100 of its synthetic
labels; and the command line's bad input."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

from conftest import REPO_ROOT
from entrorouter_jax import add_model, added_models, calibrate, evaluate, route
from entrorouter_jax import router as router_lib, workdir as workdir_lib
from entrorouter_jax.data import synthetic

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
NAME = 'math-specialist'


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'entrorouter_jax.add_model', *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)


# ================================================================== the math ===
def _problem(n, d, seed=0):
  rng = np.random.default_rng(seed)
  u = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, d - 1))], axis=1)
  y = np.round(rng.uniform(size=n), 1)            # fractional scores
  mean = rng.normal(size=d) * 0.3
  prec = rng.uniform(0.5, 4.0, size=d)
  return u, y, mean, prec


@pytest.mark.parametrize('n,d', [(30, 8), (6, 20)])   # more rows than parameters, and fewer
def test_map_fit_matches_scipy_and_its_evidence_numpy(n, d):
  u, y, mean, prec = _problem(n, d)

  def objective(t):
    f = u @ t
    return np.sum(np.logaddexp(0, f) - y * f) + 0.5 * np.sum(prec * (t - mean) ** 2)

  def gradient(t):
    return u.T @ (1 / (1 + np.exp(-(u @ t))) - y) + prec * (t - mean)

  def hessian(t):
    p = 1 / (1 + np.exp(-(u @ t)))
    return (u.T * (p * (1 - p))) @ u + np.diag(prec)

  ref = optimize.minimize(objective, mean, jac=gradient, hess=hessian, method='trust-exact',
                          options={'gtol': 1e-12}).x
  evidence = -objective(ref) - 0.5 * (np.linalg.slogdet(hessian(ref))[1] - np.sum(np.log(prec)))
  for dual in (False, True):   # d-dimensional Newton, and N-dimensional
    theta, obj, logdet = added_models.fit_logistic_map(u, y, mean, prec, dual=dual)
    np.testing.assert_allclose(theta, ref, atol=1e-8)
    assert obj == pytest.approx(objective(ref), abs=1e-9)
    assert added_models.log_evidence(obj, logdet) == pytest.approx(evidence, abs=1e-6)


def test_cost_level_and_the_prior_alone():
  # Cost profile g(x) = sum_m c(x, m) / sum_m a_m, level = sum c / sum g.
  c = np.array([[1.0, 3.0], [3.0, 9.0]])
  g = added_models.cost_profile(c, [2.0, 6.0])
  np.testing.assert_allclose(g, [0.5, 1.5])
  assert added_models.cost_level([0.2, 0.4], g) == pytest.approx(0.3)
  # With a prior that does not move (sigma -> 0), s = sigmoid(sum_m w_m logit s_m).
  rng = np.random.default_rng(1)
  s, feats = rng.uniform(0.1, 0.9, size=(12, 3)), rng.normal(size=(12, 5))
  w = np.full(3, 1 / 3)
  fit = added_models.fit_success(s, feats, rng.uniform(size=12), w, grid=[(1e-6, 1e-6, 1e-6)])
  model = added_models.SuccessModel('new', 3, [0, 1, 2], fit['intercept'],
                                    list(fit['pool_weights']), list(fit['feature_weights']))
  logit = np.log(s) - np.log1p(-s)
  np.testing.assert_allclose(model.predict(s, feats), 1 / (1 + np.exp(-(logit @ w))), atol=1e-6)


def test_fit_success_keeps_the_tightest_prior_near_the_largest_evidence():
  rng = np.random.default_rng(2)
  s, feats = rng.uniform(0.1, 0.9, size=(25, 4)), rng.normal(size=(25, 6)) / np.sqrt(6)
  y = (rng.uniform(size=25) < s[:, 2]).astype(float)
  fit = added_models.fit_success(s, feats, y, [0, 0, 1, 0])
  grid = np.array(fit['evidence_grid'])
  logit = np.log(s) - np.log1p(-s)
  spread = grid[:, 0] ** 2 + grid[:, 1] ** 2 * np.mean(np.sum(logit ** 2, 1)) + (
      grid[:, 2] ** 2 * np.mean(np.sum(feats ** 2, 1)))
  near = grid[:, 3] >= grid[:, 3].max() - np.log(3)
  kept = np.flatnonzero(near)[np.argmin(spread[near])]
  assert tuple(grid[kept, :3]) == fit['sigma'] and grid[kept, 3] == fit['log_evidence']
  u = added_models.design_matrix(s, feats)
  prec = np.concatenate([[fit['sigma'][0] ** -2], np.full(4, fit['sigma'][1] ** -2),
                         np.full(6, fit['sigma'][2] ** -2)])
  theta = added_models.fit_logistic_map(u, y, np.r_[0, 0, 0, 1, 0, np.zeros(6)], prec)[0]
  np.testing.assert_allclose(np.r_[fit['intercept'], fit['pool_weights'], fit['feature_weights']],
                             theta)


# ============================================================= end to end ===
@pytest.fixture(scope='module')
def routers(serve_workdir, tmp_path_factory):
  """(DIR, DIR without math-specialist, that plus math-specialist from 100 labels, the
  add summary, the labels file)."""
  tmp = tmp_path_factory.mktemp('add_model')
  out = run_cli(f'--workdir={serve_workdir}', f'--remove={NAME}', f'--out={tmp / "without"}')
  assert out.returncode == 0, out.stderr
  # The tiny router's data (tests/serving.py): 600 training queries of synthetic seed 0.
  data = synthetic.generate(0, 600, 50, 200)
  j = data.model_names.index(NAME)
  rows = np.random.default_rng(0).choice(600, 100, replace=False)
  labels = tmp / 'labels.csv'
  with labels.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['query', 'score', 'cost'])
    for i in rows:
      writer.writerow([data.queries[i], data.outcomes[i, j], data.costs[i, j]])
  summary = add_model.add_model(tmp / 'without', tmp / 'added', NAME,
                                add_model.read_labels(labels), 0.2, 0.4)
  return serve_workdir, tmp / 'without', tmp / 'added', summary, labels


def test_removing_a_model_renormalises_pi_over_the_rest(routers):
  base, without = (router_lib.load_router(w) for w in routers[:2])
  keep = [n != NAME for n in base.model_names]
  assert without.model_names == [n for n in base.model_names if n != NAME]
  queries = ['Please answer this advanced question about algebra.',
             'Write a haiku about the sea.', 'Explain tenant rights in a basic way.']
  for lam in (0.0, 0.1, 3.0):
    p = base.probs(queries, lam)[:, keep]
    np.testing.assert_allclose(without.probs(queries, lam), p / p.sum(1, keepdims=True),
                               atol=2e-6)
  info = json.loads((routers[1] / 'router.json').read_text())
  assert info['model_names'] == without.model_names and len(info['model_costs']) == 6
  assert workdir_lib.read_config(routers[1]).data.models == ','.join(without.model_names)


def test_an_added_model_routes_calibrates_and_evaluates_as_any(routers):
  base_dir, without_dir, added_dir, summary, _ = routers
  assert summary['labels'] == 100 and summary['appended_rows'] == 0   # training queries
  added = router_lib.load_router(added_dir)
  assert added.model_names == [n for n in router_lib.load_router(without_dir).model_names] + [NAME]
  # Stage 0's table gained the column, observed on the 100 labelled rows only.
  stage0 = workdir_lib.read_stage0(added_dir)
  assert stage0.train_mask.shape == (600, 8) and stage0.train_mask[:, 7].sum() == 100
  assert stage0.tables['test']['c_bar'].shape == (200, 8)
  # Math queries go to it somewhere along the cost/quality curve.
  data = synthetic.generate(0, 600, 50, 200)
  math = [q for q, t, s in zip(data.queries, data.tasks, data.splits)
          if t == 'math' and s == 'test']
  success, c_bar = added.scores(math)
  lambdas = (0.03, 0.1, 0.3, 1.0)
  picks = [np.argmax(success - lam * c_bar, 1) == 6 for lam in lambdas]
  best = int(np.argmax([p.mean() for p in picks]))
  assert picks[best].mean() > 0.2, [p.mean() for p in picks]
  query = math[int(np.argmax(picks[best]))]
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.route', f'--workdir={added_dir}',
                        f'--cost_weight={lambdas[best]}', query],
                       cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
  assert out.returncode == 0 and json.loads(out.stdout)['model'] == NAME, out.stderr[-2000:]
  records = route.route_records(added, math[:5], cost_weight=0.3)
  assert set(records[0]['distribution']) == set(added.model_names)
  cal = calibrate.calibrate(added_dir, math, target_cost=1e-3, store=False)
  assert NAME in cal['expected']['shares']
  results = evaluate.evaluate_workdir(added_dir)
  assert results['models'] == added.model_names and NAME in results['router']['share']
  assert 0.0 < results['aiq'] <= 1.0 and any(p['shares'][6] > 0 for p in results['curve'])
  # Removing the added model again routes as the router without it.
  out = run_cli(f'--workdir={added_dir}', f'--remove={NAME}', f'--out={added_dir}_again')
  assert out.returncode == 0, out.stderr
  again = router_lib.load_router(f'{added_dir}_again')
  np.testing.assert_allclose(again.probs(math[:20], 0.1),
                             router_lib.load_router(without_dir).probs(math[:20], 0.1), atol=2e-6)


# =========================================================== bad input ===
def test_bad_requests_exit_2_with_one_error_line(routers, tmp_path):
  base_dir, labels = routers[0], routers[4]
  bad = tmp_path / 'bad.csv'
  bad.write_text('query,score\nWhat is 2 + 2?,1\nName a prime.,1.5\n')
  cases = [
      ([f'--remove=gpt-9'], "--remove='gpt-9' is not routed"),
      ([f'--model=nano', f'--labels={labels}', '--price_in=1', '--price_out=1'],
       "--model='nano' is already routed"),
      ([f'--model=new', f'--labels={bad}', '--price_in=1', '--price_out=1'],
       f'{bad}:3: field score is \'1.5\'; expected a number in [0, 1]'),
      ([f'--model=new', f'--labels={labels}', '--price_out=1'], '--price_in is missing'),
  ]
  for args, message in cases:
    out = run_cli(f'--workdir={base_dir}', f'--out={tmp_path / "new"}', *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith('error: ') and message in lines[0], lines[0]
    assert not (tmp_path / 'new').exists()
