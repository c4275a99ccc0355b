"""The bandit learners' math against NumPy references: LinUCB's scores, Thompson's posterior and
policy, epsilon-greedy's propensities, the round schedule and the operating lambda rule."""

import math

import numpy as np
import pytest

from entrorouter_jax import bandits


def _logs(seed=0, n_seed=6, n_stream=15, d=3, k=3):
  """Seed labels (every cell) followed by logged rows (one cell each), random but fixed."""
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n_seed + n_stream, d)).astype(np.float32)
  y = (rng.random((n_seed + n_stream, k)) < 0.5).astype(np.float64)
  c = rng.random((n_seed + n_stream, k)) + np.arange(k)
  logs = bandits.labelled_logs(feats[:n_seed], y[:n_seed], np.ones((n_seed, k), bool),
                               c[:n_seed])
  chosen = rng.integers(0, k, n_stream)
  mask = np.zeros((n_stream, k), bool)
  mask[np.arange(n_stream), chosen] = True
  logs = bandits.append(logs, feats[n_seed:], np.where(mask, y[n_seed:], 0.0), mask,
                        np.where(mask, c[n_seed:], np.nan), chosen, rng.uniform(0.2, 1, n_stream))
  return logs, feats, y, c


def _reference_ridge(logs, k):
  """A_m = I + sum x x^T, b_m = sum x y over the revealed cells of m, x = [feats, 1]."""
  x = np.concatenate([logs.feats.astype(np.float64), np.ones((logs.num_rows, 1))], axis=1)
  d = x.shape[1]
  a, b = [], []
  for m in range(k):
    am, bm = np.eye(d), np.zeros(d)
    for i in range(logs.num_rows):
      if logs.mask[i, m]:
        am += np.outer(x[i], x[i])
        bm += x[i] * logs.outcomes[i, m]
    a.append(am)
    b.append(bm)
  return x, a, b


@pytest.mark.parametrize('n', [0, 1, 20, 21, 59, 60, 100, 300])
def test_round_sizes_double_and_end_with_what_is_left(n):
  sizes = bandits.round_sizes(n)
  assert sum(sizes) == n
  expected, size, left = [], 20, n
  while left:
    expected.append(min(size, left))
    left -= expected[-1]
    size *= 2
  assert sizes == expected
  assert bandits.round_sizes(300) == [20, 40, 80, 160]
  assert bandits.round_sizes(100) == [20, 40, 40]
  with pytest.raises(ValueError, match='first >= 1'):
    bandits.round_sizes(10, first=0)


def test_logs_keep_one_cell_per_logged_row_and_mean_costs():
  logs, feats, y, c = _logs()
  f, chosen, outcome, cost, prop = logs.stream()
  assert len(chosen) == 15 and np.array_equal(f, feats[6:])
  np.testing.assert_allclose(outcome, y[6 + np.arange(15), chosen])
  np.testing.assert_allclose(cost, c[6 + np.arange(15), chosen])
  assert np.all((prop > 0) & (prop <= 1))
  assert np.isnan(logs.propensity[:6]).all() and (logs.logged[:6] == -1).all()
  observed = ~np.isnan(logs.cost_hat)
  expected = [c[observed[:, m], m].mean() for m in range(3)]
  np.testing.assert_allclose(logs.mean_costs(), expected)


def test_linucb_scores_and_choice_match_numpy():
  logs, _, _, c = _logs()
  lam = 0.3
  learner = bandits.LinUCB(3, lam, seed=0)
  half = bandits.Logs(*(getattr(logs, f)[:10] for f in
                        ('feats', 'outcomes', 'mask', 'cost_hat', 'logged', 'propensity')))
  learner.update(half)            # warm start: the rest is added on the next update
  learner.update(logs)
  x, a, b = _reference_ridge(logs, 3)
  q = np.random.default_rng(5).normal(size=(7, 3)).astype(np.float32)
  xq = np.concatenate([q.astype(np.float64), np.ones((7, 1))], axis=1)
  ucb = np.stack([xq @ np.linalg.solve(a[m], b[m])
                  + learner.alpha * np.sqrt(np.einsum('nd,de,ne->n', xq, np.linalg.inv(a[m]),
                                                      xq))
                  for m in range(3)], axis=1)
  np.testing.assert_allclose(learner.ucb(q), ucb, rtol=1e-9, atol=1e-9)
  costs = logs.mean_costs()
  pick = np.argmax(ucb - lam * costs[None], axis=1)
  policy = learner.policy(q)
  np.testing.assert_array_equal(policy, np.eye(3)[pick])
  choice, prop = learner.deploy(q)
  np.testing.assert_array_equal(choice, pick)
  np.testing.assert_array_equal(prop, np.ones(7))


def test_thompson_posterior_and_policy_match_numpy():
  logs, _, _, _ = _logs(seed=1, k=2)
  lam = 0.1
  learner = bandits.Thompson(2, lam, seed=3)
  learner.update(logs)
  _, a, b = _reference_ridge(logs, 2)
  q = np.random.default_rng(2).normal(size=(40, 3)).astype(np.float32) * 0.3
  xq = np.concatenate([q.astype(np.float64), np.ones((40, 1))], axis=1)
  mean = np.stack([xq @ np.linalg.solve(a[m], b[m]) for m in range(2)], axis=1)
  v = learner.v
  var = np.stack([v ** 2 * np.einsum('nd,de,ne->n', xq, np.linalg.inv(a[m]), xq)
                  for m in range(2)], axis=1)
  got_mean, got_width = learner.mean_and_width(q)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose((v * got_width) ** 2, var, rtol=1e-9, atol=1e-12)
  # P(model 0 best) = Phi((u0 - u1) / sqrt(var0 + var1)) for two independent Gaussians.
  u = mean - lam * logs.mean_costs()[None]
  z = (u[:, 0] - u[:, 1]) / np.sqrt(var.sum(axis=1))
  exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
  policy = learner.policy(q)
  np.testing.assert_allclose(policy.sum(axis=1), 1.0)
  assert np.max(np.abs(policy[:, 0] - exact)) < 4 * 0.5 / math.sqrt(bandits.THOMPSON_DRAWS)
  np.testing.assert_array_equal(learner.policy(q), policy)     # a function of the state
  choice, prop = learner.deploy(q)
  np.testing.assert_array_equal(prop, policy[np.arange(40), choice])
  assert np.all((prop > 0) & (prop <= 1))


class _FixedScores(bandits.EpsilonGreedy):
  """Epsilon-greedy on given success estimates (no fitting)."""

  def update(self, logs):
    self.costs = logs.mean_costs()

  def estimates(self, feats):
    s = np.asarray(feats, np.float64)[:, :self.num_models]
    return s, np.broadcast_to(self.costs, s.shape).copy()


def test_epsilon_greedy_propensities_exactly():
  k, lam = 4, 0.2
  learner = _FixedScores(k, lam, seed=7)
  learner.update(bandits.labelled_logs(np.zeros((2, k)), np.zeros((2, k)), np.ones((2, k), bool),
                                       np.tile([0.1, 0.4, 0.2, 1.0], (2, 1))))
  s = np.random.default_rng(0).random((500, k))
  best = np.argmax(s - lam * np.array([0.1, 0.4, 0.2, 1.0])[None], axis=1)
  expected = np.full((500, k), 0.05 / k)
  expected[np.arange(500), best] += 0.95
  np.testing.assert_allclose(learner.policy(s), expected, rtol=0, atol=1e-15)
  choice, prop = learner.deploy(s)
  np.testing.assert_allclose(prop, np.where(choice == best, 0.95 + 0.05 / k, 0.05 / k),
                             rtol=0, atol=1e-15)
  assert 0.01 < np.mean(choice != best) < 0.1       # explores at about 0.05 (1 - 1 / K)


def test_operating_cost_weight_is_the_hull_slope_at_the_middle_cost():
  y = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], float)   # means 0.5, 0.75, 0.75
  y[3, 2] = 1.0                                                       # model 2: 1.0
  c = np.tile([0.1, 0.5, 1.0], (4, 1))
  # Hull (0.1, 0.5), (0.5, 0.75), (1.0, 1.0); middle cost 0.55 lies on the last segment.
  assert bandits.operating_cost_weight(y, np.ones_like(y, bool), c) == pytest.approx(0.25 / 0.5)
  cheap_best = np.tile([1.0, 0.5, 0.2], (4, 1))
  assert bandits.operating_cost_weight(cheap_best, np.ones_like(y, bool), c) == 0.0
  mask = np.ones_like(y, bool)
  mask[:, 2] = False                          # unobserved outcomes count 0: model 2 is useless
  assert bandits.operating_cost_weight(y, mask, c) == 0.0


def test_make_learner_names_the_known_learners():
  assert set(bandits.LEARNERS) == {'greedy', 'epsilon_greedy', 'linucb', 'thompson',
                                   'seed_only', 'full_info', 'entrorouter',
                                   'entrorouter_no_anchor', 'entrorouter_no_entropy'}
  with pytest.raises(ValueError, match="'nope' is unknown"):
    bandits.make_learner('nope', 3, 0.1)
  with pytest.raises(ValueError, match='cost_weight'):
    bandits.make_learner('greedy', 3, -1.0)


# ------------------------------------------------------------- entrorouter ---
def _entro_problem(seed=0, n_seed=40, n_stream=80, d=4, k=4):
  """A learnable synthetic problem: success of m rises with feats . w_m; costs rise with m."""
  rng = np.random.default_rng(seed)
  n = n_seed + n_stream
  feats = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, k)) * 2.0
  y = (rng.random((n, k)) < 1.0 / (1.0 + np.exp(-feats @ w))).astype(np.float64)
  c = np.broadcast_to(0.2 + 0.2 * np.arange(k), (n, k)).copy()
  seed_logs = bandits.labelled_logs(feats[:n_seed], y[:n_seed], np.ones((n_seed, k), bool),
                                    c[:n_seed])
  return seed_logs, feats[n_seed:], y[n_seed:], c[n_seed:]


def _log_round(logs, feats, y, c, choice, propensity):
  k = y.shape[1]
  mask = np.eye(k, dtype=bool)[choice]
  return bandits.append(logs, feats, np.where(mask, y, 0.0), mask, np.where(mask, c, np.nan),
                        choice, propensity)


def _entro_config(**rl):
  import ml_collections
  return ml_collections.ConfigDict({'model': {'hidden': 32, 'temperature': 0.1}, 'rl': rl})


def test_entrorouter_policy_steps_lower_its_objective():
  seed_logs, feats, y, c = _entro_problem()
  learner = bandits.make_learner('entrorouter', 4, 0.3, seed=0, config=_entro_config())
  learner.update(seed_logs)
  choice, propensity = learner.deploy(feats)
  logs = _log_round(seed_logs, feats, y, c, choice, propensity)
  bandits.Greedy.update(learner, logs)          # the success head, as update() fits it
  learner._prepare(logs)
  before = learner.loss(logs, beta=0.1)
  learner.train_policy(logs, 200, beta=0.1)
  after = learner.loss(logs, beta=0.1)
  assert np.isfinite(before) and after < before - 1e-3, (before, after)
  assert learner.num_steps(logs) == 50 + 80 // 4
  assert learner.behaviour.shape == (120, 4)


def test_entrorouter_success_head_is_greedys_predictor():
  seed_logs, feats, y, c = _entro_problem(seed=4)
  learners = [bandits.make_learner(name, 4, 0.3, seed=1, config=_entro_config())
              for name in ('greedy', 'entrorouter')]
  for learner in learners:
    learner.update(seed_logs)
  np.testing.assert_allclose(learners[1].estimates(feats)[0], learners[0].estimates(feats)[0])


@pytest.mark.parametrize('name, eps', [('entrorouter', 0.02), ('entrorouter_no_anchor', 0.02),
                                       ('entrorouter_no_entropy', 0.0)])
def test_entrorouter_propensities_are_exact_and_explore(name, eps):
  seed_logs, feats, y, c = _entro_problem(seed=1)
  learner = bandits.make_learner(name, 4, 0.3, seed=2, config=_entro_config())
  learner.update(seed_logs)
  dist = learner.policy(feats)
  s, c_hat = learner.estimates(feats)
  np.testing.assert_allclose(c_hat, np.broadcast_to(seed_logs.cost_hat.mean(axis=0), s.shape))
  assert learner.temperature() == pytest.approx(bandits.ENTRO_TEMPERATURE, rel=1e-9)
  z = (np.clip(s, 1e-6, 1 - 1e-6) - 0.3 * c_hat) / learner.temperature()   # g = 0 at first
  pi = np.exp(z - z.max(axis=1, keepdims=True))
  pi /= pi.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(dist, (1 - eps) * pi + eps / 4, rtol=1e-4, atol=1e-9)
  if eps > 0:
    assert np.all(dist >= eps / 4 - 1e-15)
  choice, propensity = learner.deploy(feats)
  assert np.all((propensity > 0) & (propensity <= 1))
  np.testing.assert_array_equal(propensity, dist[np.arange(len(choice)), choice])
  np.testing.assert_array_equal(learner.pending, dist)
  learner.update(_log_round(seed_logs, feats, y, c, choice, propensity))
  np.testing.assert_allclose(learner.behaviour[40:], np.log(np.maximum(dist, 1e-30)))
  np.testing.assert_allclose(learner.behaviour[:40], np.log(0.25))


def test_entrorouter_controller_sets_the_entropy_target_on_the_logged_queries():
  seed_logs, feats, y, c = _entro_problem(seed=5)
  learner = bandits.make_learner('entrorouter', 4, 0.3, seed=0,
                                 config=_entro_config(entropy_floor=0.5, num_steps=100))
  learner.update(seed_logs)
  choice, propensity = learner.deploy(feats)
  logs = _log_round(seed_logs, feats, y, c, choice, propensity)
  for _ in range(3):
    learner.update(logs)
    h0 = learner.h0
    pi = learner.greedy_policy(logs.feats[logs.logged >= 0])
    entropy = float(np.mean(-np.sum(pi * np.log(pi), axis=1)))
    # linear from H_0 to entropy_min (0.1) over 100 steps, never below the floor
    target = max(h0 + (0.1 - h0) * min(learner.step, 100) / 100, 0.5)
    assert learner.entropy_target() == pytest.approx(target, abs=1e-6)
    assert entropy == pytest.approx(target, abs=1e-3), (learner.step, entropy, target)
    choice, propensity = learner.deploy(feats)
    logs = _log_round(logs, feats, y, c, choice, propensity)
  assert learner.step > 100 and learner.entropy_target() == pytest.approx(0.5)


def test_entrorouter_ipw_weights_the_logged_cells():
  logs, _, _, _ = _logs(seed=3)
  learner = bandits.make_learner('entrorouter', 3, 0.1, config=_entro_config(w_max=2.0))
  assert learner.cell_weights(logs) is None          # the default: unweighted, as greedy
  learner.ipw = True
  w = learner.cell_weights(logs)
  p = np.where(logs.logged >= 0, logs.propensity, 1.0)
  np.testing.assert_allclose(w, np.broadcast_to(np.minimum(1 / p, 2.0)[:, None], (21, 3)))
  assert np.all(w[logs.logged < 0] == 1.0)


def test_entrorouter_without_entropy_control_deploys_a_greedier_policy():
  seed_logs, feats, y, c = _entro_problem(seed=3)
  config = _entro_config(entropy_floor=1.2)
  learners = [bandits.make_learner(name, 4, 0.3, seed=0, config=config)
              for name in ('entrorouter', 'entrorouter_no_entropy')]
  logs = None
  for learner in learners:
    learner.update(seed_logs)
    choice, propensity = learner.deploy(feats)
    if logs is None:                      # both learn from the same logged rows
      logs = _log_round(seed_logs, feats, y, c, choice, propensity)
  for learner in learners:
    learner.update(logs)
  entropy = [float(np.mean(-np.sum(p * np.log(p), axis=1)))
             for p in (learner.policy(feats) for learner in learners)]
  assert entropy[0] >= 1.2 - 1e-3, entropy
  assert entropy[1] < entropy[0] - 0.05, entropy


def _correction_norm(learner):
  from flax import nnx
  head, _ = nnx.merge(learner.graphdef, learner.state)
  return float(np.abs(head.correction.kernel.value).sum()
               + np.abs(head.correction.bias.value).sum())


def test_entrorouter_conservative_update_keeps_g_only_on_a_held_out_dr_gain(monkeypatch):
  from entrorouter_jax import offpolicy
  seed_logs, feats, y, c = _entro_problem(seed=6, n_stream=200)
  learners = {}
  for conservative, gain in ((False, None), (True, -0.01), (True, 0.01)):
    learner = bandits.make_learner('entrorouter', 4, 0.3, seed=0, config=_entro_config())
    learner.conservative = conservative
    learner.update(seed_logs)
    choice, propensity = learner.deploy(feats)
    logs = _log_round(seed_logs, feats, y, c, choice, propensity)
    seen = {}
    if gain is not None:
      def fake_gain(pi_new, pi_old, logged, *args, lower=gain, **kwargs):
        seen['rows'] = len(logged)
        return {'value': lower, 'lower': lower}
      monkeypatch.setattr(offpolicy, 'dr_gain', fake_gain)
    learner.update(logs)
    learners[(conservative, gain)] = (learner, seen)
  assert _correction_norm(learners[(False, None)][0]) > 0          # g trained on every row
  rejected, seen = learners[(True, -0.01)]
  assert _correction_norm(rejected) == 0.0 and not rejected.gate['kept']
  assert seen['rows'] == rejected.gate['held'] == 40               # every 5th of 200 rows
  kept, _ = learners[(True, 0.01)]
  assert _correction_norm(kept) > 0 and kept.gate['kept']
