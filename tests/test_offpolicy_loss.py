"""Learning from feedback (METHOD.md): the propensity-weighted success loss, the doubly robust
off-policy surrogate and its gradient, its clipping, and the entropy floor of the controller,
each against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entrorouter_jax import objectives, offpolicy, schedules
from test_objectives import numerical_grad

B, K = 7, 4
SEEDS = (0, 1, 2)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def make_feedback(seed, unobserved_row=True):
  """A random feedback batch: one logged model per row, observed there only (NaN elsewhere),
  logged by a behaviour policy near the current one, so the ratios spread around 1, some
  within the clipping range, some beyond."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, K)).astype(np.float32)
  success_logits = rng.normal(size=(B, K)).astype(np.float32)
  log_behaviour = np_log_softmax(logits + rng.normal(scale=0.6, size=(B, K))).astype(np.float32)
  logged = rng.integers(0, K, B).astype(np.int32)
  propensity = np.exp(log_behaviour[np.arange(B), logged]).astype(np.float32)
  outcomes = np.full((B, K), np.nan, np.float32)
  outcomes[np.arange(B), logged] = rng.uniform(size=B)
  mask = np.zeros((B, K), bool)
  mask[np.arange(B), logged] = True
  if unobserved_row:
    mask[1] = False                              # the logged cell not judged: direct term only
  batch = {
      'logged': logged, 'propensity': propensity, 'outcomes': outcomes, 'outcome_mask': mask,
      'cost_hat': rng.uniform(0.01, 1.5, size=(B, K)).astype(np.float32),
      'c_bar': rng.uniform(0.01, 1.5, size=(B, K)).astype(np.float32),
  }
  lam = rng.uniform(0.1, 0.6, size=B).astype(np.float32)
  log_anchor = np_log_softmax(rng.normal(size=(B, K))).astype(np.float32)
  return batch, logits, success_logits, lam, log_behaviour, log_anchor


def np_offpolicy(logits, success_logits, batch, lam, log_behaviour, *, beta, alpha, clip_eps,
                 weights=None, log_anchor=None, beta_anchor=0.0):
  """The loss and its terms, one row at a time in float64."""
  rows = {name: np.zeros(B) for name in
          ('direct', 'correction', 'kl_b', 'kl_a', 'h', 'rho', 'clipped', 'binding', 'r', 'adv')}
  for i in range(B):
    logp = np_log_softmax(logits[i])
    p = np.exp(logp)
    s = np_sigmoid(success_logits[i])
    a = batch['logged'][i]
    rows['direct'][i] = sum(p[m] * (s[m] - lam[i] * batch['c_bar'][i, m]) for m in range(K))
    rho = p[a] / batch['propensity'][i]
    rows['rho'][i] = rho
    rows['clipped'][i] = abs(rho - 1) > clip_eps
    if batch['outcome_mask'][i, a]:
      r = batch['outcomes'][i, a] - lam[i] * batch['cost_hat'][i, a]
      adv = r - (s[a] - lam[i] * batch['cost_hat'][i, a])
      plain, cut = rho * adv, min(max(rho, 1 - clip_eps), 1 + clip_eps) * adv
      rows['correction'][i] = min(plain, cut)
      rows['binding'][i] = cut < plain
      rows['r'][i], rows['adv'][i] = r, adv
    rows['kl_b'][i] = np.sum(p * (logp - log_behaviour[i]))
    if log_anchor is not None:
      rows['kl_a'][i] = np.sum(p * (logp - log_anchor[i]))
    rows['h'][i] = -np.sum(p * logp)
  w = np.ones(B) if weights is None else np.asarray(weights, np.float64)
  mean = lambda v: np.sum(w * v) / np.sum(w)
  observed = batch['outcome_mask'][np.arange(B), batch['logged']] * w
  over_observed = lambda v: np.sum(observed * v) / np.sum(observed)
  value = mean(rows['direct'] + rows['correction'])
  loss = -value + beta * mean(rows['kl_b']) + beta_anchor * mean(rows['kl_a']) \
      - alpha * mean(rows['h'])
  terms = {
      'loss': loss, 'value': value, 'direct': mean(rows['direct']),
      'correction': mean(rows['correction']), 'kl_behaviour': mean(rows['kl_b']),
      'kl_anchor': mean(rows['kl_a']), 'entropy': mean(rows['h']),
      'rho': over_observed(rows['rho']), 'clip_fraction': over_observed(rows['clipped']),
      'clip_binding': over_observed(rows['binding']), 'reward': over_observed(rows['r']),
      'advantage': over_observed(rows['adv']),
  }
  return loss, terms


def jax_offpolicy(batch, lam, log_behaviour, **kw):
  """offpolicy_loss as a function of (logits, success_logits)."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return lambda z, f: objectives.offpolicy_loss(
      z, f, batch, jnp.asarray(lam), log_behaviour=jnp.asarray(log_behaviour), **kw)


# ------------------------------------------------------ the off-policy loss ---
@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('beta,alpha,beta_anchor,weighted',
                         [(0.0, 0.0, 0.0, False), (0.4, 0.1, 0.0, False),
                          (0.3, 0.2, 0.5, True)])
def test_offpolicy_loss_and_metrics_match_numpy(seed, beta, alpha, beta_anchor, weighted):
  batch, logits, success_logits, lam, log_b, log_a = make_feedback(seed)
  weights = None
  if weighted:
    weights = np.random.default_rng(seed + 10).uniform(0.5, 2.0, B).astype(np.float32)
    weights[3] = 0.0
  anchor = log_a if beta_anchor else None
  kw = dict(beta=beta, alpha=alpha, clip_eps=0.2, weights=weights, log_anchor=anchor,
            beta_anchor=beta_anchor)
  loss, metrics = jax_offpolicy(batch, lam, log_b, **kw)(jnp.asarray(logits),
                                                         jnp.asarray(success_logits))
  want, terms = np_offpolicy(logits, success_logits, batch, lam, log_b, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics['pg_loss'], -terms['value'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['behaviour_loss'], beta * terms['kl_behaviour'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['anchor_loss'], beta_anchor * terms['kl_anchor'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['entropy_loss'], -alpha * terms['entropy'], rtol=1e-5)
  # The data exercise both sides of the clipping range, and rows where it binds.
  assert 0 < float(metrics['clip_fraction']) < 1 and float(metrics['clip_binding']) > 0


def test_offpolicy_loss_ignores_zero_weight_rows_and_unobserved_outcomes():
  batch, logits, success_logits, lam, log_b, _ = make_feedback(0)
  weights = np.ones(B, np.float32)
  weights[2] = 0.0
  kw = dict(beta=0.3, alpha=0.1, clip_eps=0.2, weights=weights)
  base = jax_offpolicy(batch, lam, log_b, **kw)(jnp.asarray(logits), jnp.asarray(success_logits))
  moved = {k: v.copy() for k, v in batch.items()}
  moved['outcomes'][2] = 1.0 - np.nan_to_num(moved['outcomes'][2])
  moved['cost_hat'][2] += 1.0
  moved_logits = logits.copy()
  moved_logits[2] += np.arange(K, dtype=np.float32)
  again = jax_offpolicy(moved, lam, log_b, **kw)(jnp.asarray(moved_logits),
                                                 jnp.asarray(success_logits))
  np.testing.assert_allclose(again[0], base[0], rtol=1e-6)
  # Row 1's logged cell is not observed: its outcome does not enter, and the NaNs of the
  # unlogged cells reach neither the loss nor the gradient.
  moved = {k: v.copy() for k, v in batch.items()}
  moved['outcomes'][1, batch['logged'][1]] = 0.123
  f = jax_offpolicy(moved, lam, log_b, **kw)
  np.testing.assert_allclose(f(jnp.asarray(logits), jnp.asarray(success_logits))[0], base[0],
                             rtol=1e-6)
  grad = jax.grad(lambda z: f(z, jnp.asarray(success_logits))[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[2], 0.0, atol=1e-8)


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('beta,alpha,beta_anchor', [(0.0, 0.0, 0.0), (0.5, 0.2, 0.3)])
def test_offpolicy_gradient_matches_finite_differences(seed, beta, alpha, beta_anchor):
  batch, logits, success_logits, lam, log_b, log_a = make_feedback(seed)
  weights = np.random.default_rng(seed + 20).uniform(0.5, 2.0, B).astype(np.float32)
  kw = dict(beta=beta, alpha=alpha, clip_eps=0.2, weights=weights,
            log_anchor=log_a if beta_anchor else None, beta_anchor=beta_anchor)
  f = jax_offpolicy(batch, lam, log_b, **kw)
  grad = jax.grad(lambda z: f(z, jnp.asarray(success_logits))[0])(jnp.asarray(logits))
  ref = lambda z: np_offpolicy(z, success_logits, batch, lam, log_b, **kw)[0]
  np.testing.assert_allclose(grad, numerical_grad(ref, logits), atol=3e-5)


def test_success_estimate_gets_no_gradient_from_the_policy_terms():
  batch, logits, success_logits, lam, log_b, log_a = make_feedback(1)
  f = jax_offpolicy(batch, lam, log_b, beta=0.5, alpha=0.2, clip_eps=0.2, log_anchor=log_a,
                    beta_anchor=0.3)
  z, s = jnp.asarray(logits), jnp.asarray(success_logits)
  np.testing.assert_array_equal(jax.grad(lambda s: f(z, s)[0])(s), 0.0)
  # ... although s enters the value: the gradient is stopped, not absent.
  assert abs(float(f(z, s + 1.0)[0]) - float(f(z, s)[0])) > 1e-3


def clip_case(rho, outcome, clip_eps=0.2):
  """One row whose ratio is exactly `rho`, with a direct term that is constant in the logits
  (s - lambda c_bar equal across models), so only the correction moves the policy."""
  logits = np.array([[0.5, -0.2, 0.1, -0.4]], np.float32)
  success_logits = np.array([[0.3, -0.5, 0.8, 0.0]], np.float32)
  lam = np.array([0.4], np.float32)
  pi = np.exp(np_log_softmax(logits))[0]
  a = 1
  s = np_sigmoid(success_logits)[0]
  cost_hat = np.array([[0.2, 0.6, 0.4, 0.9]], np.float32)
  batch = {
      'logged': np.array([a], np.int32), 'propensity': np.array([pi[a] / rho], np.float32),
      'outcomes': np.array([[0.0, outcome, 0.0, 0.0]], np.float32),
      'outcome_mask': np.array([[False, True, False, False]]), 'cost_hat': cost_hat,
      'c_bar': ((s - 0.3) / lam[0])[None].astype(np.float32),
  }
  adv = outcome - s[a]
  f = jax_offpolicy(batch, lam, np_log_softmax(logits), beta=0.0, alpha=0.0, clip_eps=clip_eps)
  loss, metrics = f(jnp.asarray(logits), jnp.asarray(success_logits))
  grad = jax.grad(lambda z: f(z, jnp.asarray(success_logits))[0])(jnp.asarray(logits))
  return float(loss), metrics, np.asarray(grad)[0], adv, pi, a


@pytest.mark.parametrize('rho,outcome,binds', [
    (1.5, 1.0, True),      # A > 0, rho above 1 + eps: (1 + eps) A, no push further up
    (1.5, 0.0, False),     # A < 0, rho above 1 + eps: rho A, the worse, still pushes down
    (0.5, 1.0, False),     # A > 0, rho below 1 - eps: rho A, the worse, still pushes up
    (0.5, 0.0, True),      # A < 0, rho below 1 - eps: (1 - eps) A, no push further down
])
def test_clipping_keeps_the_pessimistic_term(rho, outcome, binds):
  eps = 0.2
  loss, metrics, grad, adv, pi, a = clip_case(rho, outcome, eps)
  assert (adv > 0) == (outcome == 1.0)
  cut = min(max(rho, 1 - eps), 1 + eps)
  correction = min(rho * adv, cut * adv)
  assert correction == pytest.approx((cut if binds else rho) * adv)
  # J = 0.3 (the constant direct term) + the correction.
  assert -loss == pytest.approx(0.3 + correction, rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(metrics['correction'], correction, rtol=1e-5, atol=1e-6)
  assert float(metrics['clip_fraction']) == 1.0
  assert float(metrics['clip_binding']) == float(binds)
  if binds:
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  else:
    # d(-rho A)/dz = -rho A (e_a - pi).
    np.testing.assert_allclose(grad, -rho * adv * (np.eye(K)[a] - pi), rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('beta', [0.0, 0.7])
def test_correction_gradient_at_the_logging_policy_is_the_ips_gradient(seed, beta):
  """With pi = pi_b every ratio is 1, so the clipped correction's gradient is the IPS policy
  gradient of the advantage, mean_i A_i grad log pi(a_i|x_i); the KL to pi_b is at its
  minimum there and adds nothing."""
  batch, logits, success_logits, lam, _, _ = make_feedback(seed, unobserved_row=False)
  log_pi = np_log_softmax(logits)
  batch['propensity'] = np.exp(log_pi[np.arange(B), batch['logged']]).astype(np.float32)
  f = jax_offpolicy(batch, lam, log_pi.astype(np.float32), beta=beta, alpha=0.0, clip_eps=0.2)
  z, s = jnp.asarray(logits), jnp.asarray(success_logits)
  _, metrics = f(z, s)
  np.testing.assert_allclose(metrics['rho'], 1.0, rtol=1e-5)
  assert float(metrics['clip_fraction']) == 0.0
  grad = np.asarray(jax.grad(lambda z: f(z, s)[0])(z), np.float64)

  pi = np.exp(log_pi)
  sig = np_sigmoid(success_logits)
  q = sig - lam[:, None] * batch['c_bar']
  direct_grad = pi * (q - np.sum(pi * q, axis=1, keepdims=True)) / B
  rows, a = np.arange(B), batch['logged']
  adv = batch['outcomes'][rows, a] - sig[rows, a]        # r - (s - lambda c_hat): c_hat cancels
  one_hot = np.eye(K)[a]
  ips_grad = adv[:, None] * (one_hot - pi) / B
  np.testing.assert_allclose(-grad - direct_grad, ips_grad, atol=2e-6)
  # The same as the gradient of the evaluator's IPS estimate with A as the reward.
  p_fixed = batch['propensity'].astype(np.float64)
  ips = lambda z: offpolicy.ips(np.exp(np_log_softmax(z)), a, p_fixed, adv)
  np.testing.assert_allclose(-grad - direct_grad, numerical_grad(ips, logits), atol=2e-5)


@pytest.mark.parametrize('seed', SEEDS)
def test_unclipped_value_is_the_evaluators_doubly_robust_estimate(seed):
  batch, logits, success_logits, lam, log_b, _ = make_feedback(seed, unobserved_row=False)
  rows, a = np.arange(B), batch['logged']
  batch['c_bar'][rows, a] = batch['cost_hat'][rows, a]   # DR's q_hat at the logged cell
  _, metrics = jax_offpolicy(batch, lam, log_b, beta=0.0, alpha=0.0, clip_eps=1e9)(
      jnp.asarray(logits), jnp.asarray(success_logits))
  pi = np.exp(np_log_softmax(logits))
  q_hat = np_sigmoid(success_logits) - lam[:, None] * batch['c_bar']
  reward = batch['outcomes'][rows, a] - lam * batch['cost_hat'][rows, a]
  want = offpolicy.dr(pi, a, batch['propensity'], reward, q_hat)
  np.testing.assert_allclose(metrics['value'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['reward'], np.mean(reward), rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the weighted success loss ---
def np_weighted_success(success_logits, outcomes, mask, propensity, w_max, weights=None):
  """Loss, mean weight and clipped share over the observed cells, one cell at a time."""
  total = norm = ipw_sum = clipped = count = 0.0
  for i in range(success_logits.shape[0]):
    row_w = 1.0 if weights is None else float(weights[i])
    ipw = min(1.0 / float(propensity[i]), w_max)
    for m in range(success_logits.shape[1]):
      if not mask[i, m]:
        continue
      s, y = np_sigmoid(success_logits[i, m]), float(outcomes[i, m])
      total += row_w * ipw * -(y * np.log(s) + (1 - y) * np.log(1 - s))
      norm += row_w * ipw
      ipw_sum += row_w * ipw
      clipped += row_w * (1.0 / float(propensity[i]) > w_max)
      count += row_w
  return total / norm, ipw_sum / count, clipped / count


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('w_max', [np.inf, 5.0, 2.0])
@pytest.mark.parametrize('weighted', [False, True])
def test_weighted_success_loss_matches_numpy(seed, w_max, weighted):
  batch, _, success_logits, _, _, _ = make_feedback(seed)
  rng = np.random.default_rng(seed + 30)
  batch['propensity'] = rng.uniform(0.05, 1.0, B).astype(np.float32)
  batch['outcome_mask'][4, :] = True                 # a fully labelled row among logged ones
  batch['outcomes'][4, :] = rng.uniform(size=K)
  weights = rng.uniform(0.5, 2.0, B).astype(np.float32) if weighted else None
  loss, metrics = objectives.weighted_success_loss(
      jnp.asarray(success_logits), jnp.asarray(batch['outcomes']),
      jnp.asarray(batch['outcome_mask']), jnp.asarray(batch['propensity']), w_max,
      None if weights is None else jnp.asarray(weights))
  want, mean_ipw, clip_share = np_weighted_success(
      success_logits, batch['outcomes'], batch['outcome_mask'], batch['propensity'], w_max,
      weights)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['success_loss'], want, rtol=1e-5)
  np.testing.assert_allclose(metrics['mean_ipw'], mean_ipw, rtol=1e-5)
  np.testing.assert_allclose(metrics['ipw_clip_fraction'], clip_share, rtol=1e-5, atol=1e-7)


def test_weighted_success_loss_weights_rare_choices_up_to_the_cap():
  success_logits = jnp.asarray([[0.4, -1.0], [1.2, 0.3]])
  outcomes = jnp.asarray([[1.0, np.nan], [np.nan, 0.0]])
  mask = jnp.asarray([[True, False], [False, True]])
  propensity = jnp.asarray([0.1, 0.5])
  bce = lambda f, y: float(-(y * np.log(np_sigmoid(f)) + (1 - y) * np.log(1 - np_sigmoid(f))))
  l0, l1 = bce(0.4, 1.0), bce(0.3, 0.0)
  loss = lambda w_max: float(objectives.weighted_success_loss(
      success_logits, outcomes, mask, propensity, w_max)[0])
  assert loss(np.inf) == pytest.approx((10 * l0 + 2 * l1) / 12, rel=1e-5)
  assert loss(4.0) == pytest.approx((4 * l0 + 2 * l1) / 6, rel=1e-5)
  # A cap of 1 weighs every cell alike: the plain success loss.
  plain = objectives.success_loss(success_logits, jnp.nan_to_num(outcomes), mask)
  assert loss(1.0) == pytest.approx(float(plain), rel=1e-6)
  grad = jax.grad(lambda f: objectives.weighted_success_loss(
      f, outcomes, mask, propensity, 4.0)[0])(success_logits)
  # d BCE / d f = sigmoid(f) - y on the observed cells, weighted; nothing elsewhere.
  want = np.array([[4 * (np_sigmoid(0.4) - 1.0), 0.0], [0.0, 2 * np_sigmoid(0.3)]]) / 6
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_weighted_success_loss_rejects_a_cap_that_is_not_positive():
  args = (jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2), bool), jnp.ones(1))
  with pytest.raises(ValueError, match=r'w_max=0\.0; expected a weight cap > 0'):
    objectives.weighted_success_loss(*args, 0.0)


# -------------------------------------------------------- the entropy floor ---
@pytest.mark.parametrize('shape', ['linear', 'cosine'])
@pytest.mark.parametrize('h0', [1.5, 0.25, 0.05])
@pytest.mark.parametrize('h_floor', [0.0, 0.3])
def test_entropy_target_with_floor_matches_numpy(shape, h0, h_floor):
  steps = np.arange(0, 120)
  got = np.array([schedules.entropy_target_with_floor(s, 100, h0, 0.2, h_floor, shape)
                  for s in steps])
  t = np.clip(steps / 100, 0, 1)
  frac = 1 - t if shape == 'linear' else 0.5 * (1 + np.cos(np.pi * t))
  end = min(0.2, h0)
  np.testing.assert_allclose(got, np.maximum(end + (h0 - end) * frac, h_floor), rtol=1e-6)
  assert np.all(got >= h_floor)
  if h_floor == 0.0:
    same = [schedules.entropy_target(s, 100, h0, 0.2, shape) for s in steps]
    np.testing.assert_array_equal(got, np.array(same))


def test_entropy_floor_makes_the_controller_raise_alpha_on_a_peaked_policy():
  # The policy starts at 0.05 nats: without a floor the target stays there and alpha holds;
  # with a floor of 0.3 the dual ascent raises alpha by eta (0.3 - 0.05).
  step = jnp.asarray(40)
  plain = schedules.entropy_target(step, 100, 0.05, 0.2)
  floored = jax.jit(lambda s: schedules.entropy_target_with_floor(s, 100, 0.05, 0.2, 0.3))(step)
  assert float(schedules.dual_ascent(0.1, plain, 0.05, lr=0.5)) == pytest.approx(0.1)
  assert float(schedules.dual_ascent(0.1, floored, 0.05, lr=0.5)) == pytest.approx(0.225)


def test_entropy_floor_must_not_be_negative():
  with pytest.raises(ValueError, match=r'h_floor=-0\.1; expected a number of nats >= 0'):
    schedules.entropy_target_with_floor(0, 100, 1.0, 0.2, -0.1)
