"""Off-policy evaluation: IPS, SNIPS and DR against NumPy loops, their bias, variance and
interval coverage in a simulated logging environment, and `evaluate --feedback` end to end
on the tiny default-recipe router (conftest's `serve_workdir`)."""

import copy
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from entrorouter_jax import offpolicy

ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def random_log(rng, n=40, k=4):
  """(pi, logged, propensity, reward, q_hat) of a random log with a stochastic pi."""
  pi = rng.dirichlet(np.ones(k), n)
  logged = rng.integers(0, k, n)
  propensity = rng.uniform(0.05, 1.0, n)
  reward = rng.random(n)
  q_hat = rng.random((n, k))
  return pi, logged, propensity, reward, q_hat


def loop_estimates(pi, logged, propensity, reward, q_hat) -> dict:
  """IPS, SNIPS and DR, one row at a time."""
  n, k = pi.shape
  weighted = ratio_sum = dr_sum = 0.0
  for i in range(n):
    rho = pi[i, logged[i]] / propensity[i]
    weighted += rho * reward[i]
    ratio_sum += rho
    direct = sum(pi[i, m] * q_hat[i, m] for m in range(k))
    dr_sum += direct + rho * (reward[i] - q_hat[i, logged[i]])
  return {'ips': weighted / n, 'snips': weighted / ratio_sum, 'dr': dr_sum / n}


def test_estimators_match_a_loop():
  rng = np.random.default_rng(0)
  log = random_log(rng)
  want = loop_estimates(*log)
  got = offpolicy.estimate(*log, bootstrap=50)
  for name in ('ips', 'snips', 'dr'):
    assert got[name]['value'] == pytest.approx(want[name], rel=1e-12)
  assert offpolicy.ips(*log[:4]) == pytest.approx(want['ips'], rel=1e-12)
  assert offpolicy.snips(*log[:4]) == pytest.approx(want['snips'], rel=1e-12)
  assert offpolicy.dr(*log) == pytest.approx(want['dr'], rel=1e-12)


def test_intervals_are_percentiles_of_one_shared_resampling():
  rng = np.random.default_rng(1)
  log = random_log(rng, n=30)
  got = offpolicy.estimate(*log, bootstrap=200, seed=7)
  rows = np.random.default_rng(7).integers(0, 30, (200, 30))
  reps = {'ips': [], 'snips': [], 'dr': []}
  for b in range(200):
    sample = loop_estimates(*(a[rows[b]] for a in log))
    for name in reps:
      reps[name].append(sample[name])
  for name in reps:
    lo, hi = np.percentile(reps[name], [2.5, 97.5])
    assert got[name]['ci95'] == pytest.approx([lo, hi], rel=1e-12)
    assert lo <= got[name]['value'] <= hi
  assert offpolicy.estimate(*log, bootstrap=200, seed=7) == got
  assert offpolicy.estimate(*log, bootstrap=200, seed=8)['dr']['ci95'] != got['dr']['ci95']


def test_dr_is_the_direct_method_when_q_hat_is_exact_and_ips_when_it_is_zero():
  rng = np.random.default_rng(2)
  pi, logged, propensity, reward, q_hat = random_log(rng)
  exact = q_hat.copy()
  exact[np.arange(len(logged)), logged] = reward
  direct = np.mean(np.sum(pi * exact, axis=1))
  assert offpolicy.dr(pi, logged, propensity, reward, exact) == pytest.approx(direct, rel=1e-12)
  zero = np.zeros_like(q_hat)
  assert offpolicy.dr(pi, logged, propensity, reward, zero) == pytest.approx(
      offpolicy.ips(pi, logged, propensity, reward), rel=1e-12)


def test_snips_is_zero_where_pi_never_picks_a_logged_model():
  pi = np.array([[0.0, 1.0], [0.0, 1.0]])
  logged, propensity, reward = np.array([0, 0]), np.array([0.5, 0.5]), np.array([1.0, 0.3])
  got = offpolicy.estimate(pi, logged, propensity, reward, np.zeros((2, 2)), bootstrap=20)
  assert got['snips'] == {'value': 0.0, 'ci95': [0.0, 0.0]}
  assert got['ips']['value'] == 0.0


class Environment:
  """M contexts drawn uniformly, K models with true mean rewards mu[M, K]; a logging policy
  and a different target policy over them; Bernoulli rewards."""

  def __init__(self, seed=0, m=50, k=3):
    rng = np.random.default_rng(seed)
    self.mu = rng.uniform(0.1, 0.9, (m, k))
    self.logging = rng.dirichlet(np.full(k, 2.0), m) * 0.8 + 0.2 / k
    self.target = np.exp(6 * self.mu) / np.exp(6 * self.mu).sum(axis=1, keepdims=True)
    self.value = float(np.mean(np.sum(self.target * self.mu, axis=1)))
    self.logging_value = float(np.mean(np.sum(self.logging * self.mu, axis=1)))

  def logs(self, rng, count, n):
    """`count` logs of n rows: contexts x[count, n], logged a, propensity p and reward r."""
    m, k = self.mu.shape
    x = rng.integers(0, m, (count, n))
    cum = np.cumsum(self.logging[x], axis=2)
    a = np.minimum((rng.random((count, n, 1)) > cum).sum(axis=2), k - 1)
    p = np.take_along_axis(self.logging[x], a[..., None], axis=2)[..., 0]
    r = (rng.random((count, n)) < np.take_along_axis(self.mu[x], a[..., None], axis=2)[..., 0])
    return x, a, p, r.astype(np.float64)


def test_ips_and_dr_are_unbiased_and_dr_has_less_variance_with_a_good_model():
  env = Environment(seed=3)
  rng = np.random.default_rng(4)
  x, a, p, r = env.logs(rng, 400, 200)
  q_good = np.clip(env.mu + rng.normal(0, 0.05, env.mu.shape), 0, 1)
  ips_values, dr_values = [], []
  for s in range(len(x)):
    pi = env.target[x[s]]
    ips_values.append(offpolicy.ips(pi, a[s], p[s], r[s]))
    dr_values.append(offpolicy.dr(pi, a[s], p[s], r[s], q_good[x[s]]))
  ips_values, dr_values = np.array(ips_values), np.array(dr_values)
  for values in (ips_values, dr_values):
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - env.value) < 3.5 * se, (values.mean(), env.value, se)
    # The target's value is far from the logging policy's, so the check has teeth.
    assert abs(values.mean() - env.logging_value) > 10 * se
  assert dr_values.var() < 0.7 * ips_values.var()


def test_intervals_cover_the_true_value_about_95_percent_of_the_time():
  env = Environment(seed=5)
  rng = np.random.default_rng(6)
  x, a, p, r = env.logs(rng, 200, 300)
  q_rough = np.clip(env.mu + rng.normal(0, 0.15, env.mu.shape), 0, 1)
  covered = {'ips': 0, 'snips': 0, 'dr': 0}
  for s in range(len(x)):
    got = offpolicy.estimate(env.target[x[s]], a[s], p[s], r[s], q_rough[x[s]],
                             bootstrap=1000, seed=s)
    for name in covered:
      lo, hi = got[name]['ci95']
      covered[name] += lo <= env.value <= hi
  for name, count in covered.items():
    assert 0.88 <= count / len(x) <= 0.99, (name, count)


@pytest.mark.parametrize('change, message', [
    (lambda v: v.update(pi=v['pi'][:, :, None]), 'pi has shape (5, 3, 1); expected [N, K]'),
    (lambda v: v['pi'].__setitem__((2, 1), -0.1), 'pi row 2, model 1 is -0.1'),
    (lambda v: v['pi'].__setitem__((3, 0), v['pi'][3, 0] + 0.01), 'pi row 3 sums to'),
    (lambda v: v.update(logged=v['logged'][:4]), 'logged has shape (4,); expected (5,)'),
    (lambda v: v.update(logged=v['logged'] + 0.5), 'logged has dtype float64'),
    (lambda v: v['logged'].__setitem__(1, 3), 'logged row 1 is 3; expected a model index in '
                                             '[0, 3)'),
    (lambda v: v['propensity'].__setitem__(4, 0.0), 'propensity row 4 is 0.0; expected a '
                                                    'probability in (0, 1]'),
    (lambda v: v['propensity'].__setitem__(0, 1.5), 'propensity row 0 is 1.5'),
    (lambda v: v['reward'].__setitem__(2, np.nan), 'reward row 2 is nan'),
    (lambda v: v.update(q_hat=v['q_hat'][:, :2]), 'q_hat has shape (5, 2); expected (5, 3)'),
    (lambda v: v['q_hat'].__setitem__((0, 2), np.inf), 'q_hat row 0, model 2 is inf'),
    (lambda v: v.update(bootstrap=0), 'bootstrap is 0; expected a whole number'),
])
def test_bad_inputs_name_the_argument_row_and_value(change, message):
  rng = np.random.default_rng(0)
  pi, logged, propensity, reward, q_hat = random_log(rng, n=5, k=3)
  values = dict(pi=pi, logged=logged, propensity=propensity, reward=reward, q_hat=q_hat,
                bootstrap=10)
  change(values)
  with pytest.raises(ValueError) as e:
    offpolicy.estimate(values.pop('pi'), values.pop('logged'), values.pop('propensity'),
                       values.pop('reward'), values.pop('q_hat'), **values)
  assert message in str(e.value), str(e.value)


# ------------------------------------------------------- evaluate --feedback ---
TOPICS = ['algebra', 'recursion', 'patent law', 'haiku writing', 'sql joins', 'tax forms',
          'protein folding', 'sorting lists', 'french grammar', 'black holes']
FORMS = ['Give a basic level explanation of {}.', 'I need help with an expert problem on {}.',
         'Write a short note about {}.', 'What is the hardest open question in {}?',
         'Summarise {} for a beginner.', 'Prove a subtle claim about {}.']
QUERIES = [form.format(topic) for topic in TOPICS for form in FORMS]


def own_policy_log(router, rng, queries=QUERIES):
  """A feedback log drawn from the router's own policy at its operating lambda: logged model,
  its probability, a Bernoulli score and a cost in dollars, per query."""
  pi = np.asarray(router.probs(queries), np.float64)
  pi /= pi.sum(axis=1, keepdims=True)
  k = pi.shape[1]
  logged = np.array([rng.choice(k, p=row) for row in pi])
  success = np.linspace(0.3, 0.9, k)
  score = (rng.random(len(queries)) < success[logged]).astype(np.float64)
  cost = router.model_costs[logged] * router.c_ref * rng.uniform(0.5, 1.5, len(queries))
  return logged, pi[np.arange(len(queries)), logged], score, cost


def feedback_dataset(names, queries, logged, propensity, score, cost, cost_weights=None):
  """The RoutingDataset a feedback reader returns for these rows."""
  from entrorouter_jax.data.dataset import ModelInfo, RoutingDataset
  n, k = len(queries), len(names)
  rows = np.arange(n)
  mask = np.zeros((n, k), bool)
  mask[rows, logged] = True
  outcomes, costs = np.zeros((n, k), np.float32), np.zeros((n, k), np.float32)
  outcomes[rows, logged], costs[rows, logged] = score, cost
  return RoutingDataset(
      name='feedback', models=[ModelInfo(m) for m in names], ids=[f'q{i}' for i in rows],
      queries=queries, tasks=[''] * n, splits=['feedback'] * n, outcomes=outcomes,
      outcome_mask=mask, costs=costs, propensities=np.asarray(propensity, np.float64),
      cost_weights=None if cost_weights is None else np.asarray(cost_weights, np.float64))


@pytest.fixture(scope='module')
def router(serve_workdir):
  from entrorouter_jax import router as router_lib
  return router_lib.load_router(serve_workdir)


def test_offpolicy_results_on_a_stand_in_log(router, serve_workdir):
  from entrorouter_jax import evaluate
  rng = np.random.default_rng(0)
  logged, propensity, score, cost = own_policy_log(router, rng)
  n = len(QUERIES)
  own = np.full(n, np.nan)
  own[::3] = 2.0 * router.default_cost_weight + 0.1
  data = feedback_dataset(router.model_names, QUERIES, logged, propensity, score, cost, own)
  got = evaluate.offpolicy_results(router, data, serve_workdir, bootstrap=200)

  lam = np.where(np.isnan(own), router.default_cost_weight, own)
  cost32 = cost.astype(np.float32).astype(np.float64)
  reward = score - lam * cost32 / router.c_ref
  assert got['rows'] == n and got['cost_weight'] is None
  assert got['logging'] == pytest.approx(
      {'utility': np.mean(reward), 'accuracy': np.mean(score), 'cost': np.mean(cost32)},
      rel=1e-9)
  pi = np.zeros((n, len(router.model_names)))
  for value in np.unique(lam):
    at = np.flatnonzero(lam == value)
    pi[at] = router.probs([QUERIES[i] for i in at], float(value))
  pi /= pi.sum(axis=1, keepdims=True)
  success, c_bar = (np.asarray(t, np.float64) for t in router.scores(QUERIES))
  want = loop_estimates(pi, logged, propensity, reward, success - lam[:, None] * c_bar)
  for name in ('ips', 'snips', 'dr'):
    assert got[name]['utility'] == pytest.approx(want[name], rel=1e-5, abs=1e-6)
  assert got['dr']['accuracy'] == pytest.approx(
      loop_estimates(pi, logged, propensity, score, success)['dr'], rel=1e-5, abs=1e-6)
  assert got['dr']['cost'] == pytest.approx(loop_estimates(
      pi, logged, propensity, cost32, c_bar * router.c_ref)['dr'], rel=1e-5, abs=1e-9)
  assert got['improves'] == (got['dr']['ci95'][0] > got['logging']['utility'])

  same = feedback_dataset(router.model_names, QUERIES, logged, propensity, score, cost)
  assert evaluate.offpolicy_results(router, same, serve_workdir, bootstrap=20)[
      'cost_weight'] == router.default_cost_weight


def test_offpolicy_results_reject_a_log_without_propensities_or_of_other_models(
    router, serve_workdir):
  import dataclasses
  from entrorouter_jax import evaluate, router as router_lib
  from entrorouter_jax.data.dataset import DataError, ModelInfo
  logged, propensity, score, cost = own_policy_log(router, np.random.default_rng(1))
  data = feedback_dataset(router.model_names, QUERIES, logged, propensity, score, cost)
  with pytest.raises(DataError, match='no propensity per row'):
    evaluate.offpolicy_results(router, dataclasses.replace(data, propensities=None),
                               serve_workdir)
  other = dataclasses.replace(data, models=[ModelInfo(f'x{i}') for i in range(data.num_models)])
  with pytest.raises(router_lib.RouterError, match=r"the feedback has models \['x0'"):
    evaluate.offpolicy_results(router, other, serve_workdir)


def test_feedback_tables_read_stage0_knn_for_a_router_without_the_utility_head(
    router, serve_workdir):
  """The utility head's success predictions; else Stage 0's kNN p_hat, loading Stage 0 where
  the router holds none. c_bar is Stage 0's either way."""
  import dataclasses
  from entrorouter_jax import evaluate
  queries = QUERIES[:12]
  p_hat, c_bar = router.anchor_tables(queries)
  success = router.scores(queries)[0]
  got = evaluate.feedback_tables(router, queries, serve_workdir)
  np.testing.assert_allclose(got[0], success, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got[1], c_bar, rtol=0, atol=1e-6)
  config = copy.deepcopy(router.config)
  config.model.head = 'softmax'
  plain = dataclasses.replace(router, config=config, stage0=None)
  got = evaluate.feedback_tables(plain, queries, serve_workdir)
  np.testing.assert_allclose(got[0], p_hat, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got[1], c_bar, rtol=0, atol=1e-6)
  assert not np.allclose(p_hat, success, atol=1e-3)


def run_evaluate(*args):
  return subprocess.run([sys.executable, '-m', 'entrorouter_jax.evaluate', *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)


def test_evaluate_feedback_cli_on_the_routers_own_log(router, serve_workdir, tmp_path):
  logged, propensity, score, cost = own_policy_log(router, np.random.default_rng(2))
  path = tmp_path / 'feedback.csv'
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'query', 'model', 'score', 'cost', 'propensity'])
    for i, q in enumerate(QUERIES):
      writer.writerow([f'q{i}', q, router.model_names[logged[i]], repr(float(score[i])),
                       repr(float(cost[i])), repr(float(propensity[i]))])
  out = run_evaluate(f'--workdir={serve_workdir}', f'--feedback={path}')
  assert out.returncode == 0, out.stderr
  got = json.loads((serve_workdir / 'eval' / 'offpolicy.json').read_text())
  assert set(got) == {'ips', 'snips', 'dr', 'logging', 'improves', 'rows', 'cost_weight'}
  assert set(got['ips']) == set(got['snips']) == {'utility', 'ci95'}
  assert set(got['dr']) == {'utility', 'ci95', 'accuracy', 'cost'}
  lam = router.default_cost_weight
  assert got['rows'] == len(QUERIES) and got['cost_weight'] == pytest.approx(lam)
  reward = score - lam * cost / router.c_ref
  assert got['logging'] == pytest.approx(
      {'utility': np.mean(reward), 'accuracy': np.mean(score), 'cost': np.mean(cost)},
      rel=1e-6)
  # Logged by the policy evaluated: every ratio is 1, so IPS and SNIPS are the realised mean.
  for name in ('ips', 'snips'):
    assert got[name]['utility'] == pytest.approx(got['logging']['utility'], abs=1e-4)
  lo, hi = got['dr']['ci95']
  assert lo <= got['logging']['utility'] <= hi and hi - lo < 0.5
  assert abs(got['dr']['utility'] - got['logging']['utility']) < 0.1
  assert abs(got['dr']['accuracy'] - np.mean(score)) < 0.1
  assert got['improves'] is False
  assert 'off-policy evaluation on 60 judged feedback rows' in out.stdout
  assert 'offpolicy.json' in out.stdout


@pytest.mark.parametrize('feedback, message', [
    (' , ', '--feedback names no file'),
    ('{tmp}/absent.csv', 'absent.csv'),
])
def test_evaluate_feedback_cli_bad_input(serve_workdir, tmp_path, feedback, message):
  out = run_evaluate(f'--workdir={serve_workdir}', '--feedback=' + feedback.format(tmp=tmp_path))
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
  assert message in out.stderr


def test_dr_gain_is_the_paired_difference_of_dr_with_a_bootstrap_lower_bound():
  rng = np.random.default_rng(7)
  n, k = 400, 3
  pi_old = rng.dirichlet(np.ones(k), n)
  pi_new = rng.dirichlet(np.ones(k), n)
  logged = rng.integers(0, k, n)
  propensity = rng.uniform(0.2, 1.0, n)
  reward = rng.random(n)
  q_hat = rng.random((n, k))
  gain = offpolicy.dr_gain(pi_new, pi_old, logged, propensity, reward, q_hat, bootstrap=500,
                           seed=3)
  assert gain['value'] == pytest.approx(
      offpolicy.dr(pi_new, logged, propensity, reward, q_hat)
      - offpolicy.dr(pi_old, logged, propensity, reward, q_hat), abs=1e-12)
  d = (offpolicy.dr_terms(pi_new, logged, propensity, reward, q_hat)
       - offpolicy.dr_terms(pi_old, logged, propensity, reward, q_hat))
  boot = np.random.default_rng(3).integers(0, n, (500, n))
  assert gain['lower'] == pytest.approx(np.percentile(d[boot].mean(axis=1), 5), abs=1e-12)
  assert gain['lower'] < gain['value']
  same = offpolicy.dr_gain(pi_old, pi_old, logged, propensity, reward, q_hat)
  assert same == {'value': 0.0, 'lower': 0.0}
  with pytest.raises(ValueError, match='level'):
    offpolicy.dr_gain(pi_new, pi_old, logged, propensity, reward, q_hat, level=1.0)


def test_the_gain_over_a_baseline_router_is_the_paired_dr_difference(router, serve_workdir):
  """offpolicy_results(baseline=): 'vs_init' is DR(pi) - DR(pi0) on the same rows and q_hat;
  against itself the gain is 0 and not an improvement."""
  from entrorouter_jax import evaluate, offpolicy
  logged, propensity, score, cost = own_policy_log(router, np.random.default_rng(4))
  data = feedback_dataset(router.model_names, QUERIES, logged, propensity, score, cost)
  same = evaluate.offpolicy_results(router, data, serve_workdir, bootstrap=200,
                                    baseline=(router, serve_workdir))
  assert same['vs_init'] == {'gain': 0.0, 'lower': 0.0, 'improves': False}
  class Flattened:
    """Another policy: the router's probabilities, square-rooted and renormalised."""

    def __getattr__(self, name):
      return getattr(router, name)

    def probs(self, *args, **kwargs):
      p = np.sqrt(np.asarray(router.probs(*args, **kwargs), np.float64))
      return p / p.sum(axis=1, keepdims=True)

  other = Flattened()
  got = evaluate.offpolicy_results(router, data, serve_workdir, bootstrap=200,
                                   baseline=(other, serve_workdir))
  lam = np.full(len(QUERIES), router.default_cost_weight)
  pi, success, c_bar = evaluate.policy_on_log(router, QUERIES, lam, serve_workdir)
  pi0 = evaluate.policy_on_log(other, QUERIES, lam, serve_workdir)[0]
  reward = score - lam * cost / router.c_ref
  q_hat = success - lam[:, None] * c_bar
  want = (offpolicy.dr(pi, logged, propensity, reward, q_hat)
          - offpolicy.dr(pi0, logged, propensity, reward, q_hat))
  assert want != 0.0
  assert got['vs_init']['gain'] == pytest.approx(want, abs=1e-9)
  assert got['vs_init']['lower'] < got['vs_init']['gain']
  assert got['vs_init']['improves'] == (got['vs_init']['lower'] > 0)
  assert 'improves on the router it started from' in evaluate.feedback_summary(got)
