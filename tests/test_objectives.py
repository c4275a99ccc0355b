"""Every loss term and its gradient against NumPy references (METHOD.md, line by line)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entrorouter_jax import objectives, schedules

B, K, G = 6, 4, 5


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def make_batch(seed=0, missing=True):
  rng = np.random.default_rng(seed)
  outcomes = (rng.uniform(size=(B, K)) < 0.5).astype(np.float32)
  outcomes[0] = 0.0                                  # a query no model solves
  mask = np.ones((B, K), bool)
  if missing:
    mask[1, 2] = False                               # a missing outcome
    outcomes[1, 2] = 0.0
    outcomes[1, 0] = 1.0                             # ... on a query that some model solves
  batch = {
      'outcomes': outcomes, 'outcome_mask': mask,
      'cost_hat': rng.uniform(0.01, 1.5, size=(B, K)).astype(np.float32),
      'p_hat': rng.uniform(size=(B, K)).astype(np.float32),
      'c_bar': rng.uniform(0.01, 1.5, size=(B, K)).astype(np.float32),
  }
  logits = rng.normal(size=(B, K)).astype(np.float32)
  lam = np.full((B,), 0.3, np.float32)
  return batch, logits, lam


# ------------------------------------------------------- NumPy references ---
def np_anchor(batch, lam, tau):
  return np.exp(np_log_softmax((batch['p_hat'] - lam[:, None] * batch['c_bar']) / tau))


def np_soft_targets(batch, lam, tau, mix, anchor):
  q = np.zeros((B, K))
  for i in range(B):
    obs = batch['outcome_mask'][i]
    u = batch['outcomes'][i] - lam[i] * batch['cost_hat'][i]
    w = np.where(obs, np.exp((u - u[obs].max()) / tau), 0.0)
    qi = (1 - mix) * w / w.sum() + mix * anchor[i]
    solved = (obs & (batch['outcomes'][i] > 0)).any()
    q[i] = qi if solved else anchor[i]
  return q


def np_sft_loss(logits, batch, lam, tau_a, tau, mix):
  q = np_soft_targets(batch, lam, tau, mix, np_anchor(batch, lam, tau_a))
  return np.mean(-(q * np_log_softmax(logits)).sum(-1))


def np_rl_exact(logits, batch, lam, tau_a, beta, alpha):
  logp = np_log_softmax(logits.astype(np.float64))
  p = np.exp(logp)
  u = np.where(batch['outcome_mask'], batch['outcomes'] - lam[:, None] * batch['cost_hat'], 0.0)
  log_a = np.log(np_anchor(batch, lam, tau_a))
  kl = (p * (logp - log_a)).sum(-1).mean()
  h = -(p * logp).sum(-1).mean()
  return -(p * u).sum(-1).mean() + beta * kl - alpha * h


def np_advantages(rewards, valid, normalize):
  adv = np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    v = valid[i] > 0
    if not v.any():
      continue
    centred = rewards[i, v] - rewards[i, v].mean()
    if normalize:
      centred = centred / (np.sqrt((centred**2).mean()) + 1e-6)
    adv[i, v] = centred
  return adv


def np_rl_reinforce(logits, batch, lam, actions, tau_a, beta, alpha, normalize):
  logp = np_log_softmax(logits.astype(np.float64))
  u = batch['outcomes'] - lam[:, None] * batch['cost_hat']
  rewards = np.take_along_axis(u, actions, 1)
  valid = np.take_along_axis(batch['outcome_mask'], actions, 1).astype(np.float64)
  adv = np_advantages(rewards, valid, normalize)
  pg = -np.mean((adv * np.take_along_axis(logp, actions, 1) * valid).sum(-1) / actions.shape[1])
  p = np.exp(logp)
  log_a = np.log(np_anchor(batch, lam, tau_a))
  kl = (p * (logp - log_a)).sum(-1).mean()
  h = -(p * logp).sum(-1).mean()
  return pg + beta * kl - alpha * h


def numerical_grad(f, x, eps=1e-5):
  """Central differences of the scalar f at x (float64), entry by entry."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


# ------------------------------------------------------------------ tests ---
def test_entropy_and_kl():
  rng = np.random.default_rng(0)
  lp, lq = np_log_softmax(rng.normal(size=(3, K))), np_log_softmax(rng.normal(size=(3, K)))
  np.testing.assert_allclose(objectives.entropy(jnp.asarray(lp)), -(np.exp(lp) * lp).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(objectives.kl_divergence(jnp.asarray(lp), jnp.asarray(lq)),
                             (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-5, atol=1e-7)


def test_anchor_and_soft_targets_match_numpy():
  batch, _, lam = make_batch()
  anchor = np.exp(objectives.anchor_log_probs(batch['p_hat'], batch['c_bar'], lam, 0.1))
  np.testing.assert_allclose(anchor, np_anchor(batch, lam, 0.1), rtol=1e-5, atol=1e-7)
  q = objectives.soft_targets(batch['outcomes'], batch['outcome_mask'], batch['cost_hat'], lam,
                              anchor, tau=0.1, mix=0.1)
  want = np_soft_targets(batch, lam, 0.1, 0.1, np_anchor(batch, lam, 0.1))
  np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(q, -1), 1.0, rtol=1e-6)
  # No model solves query 0: its target is the anchor itself.
  np.testing.assert_allclose(q[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(q[0], anchor[0], rtol=1e-6)
  # A missing outcome receives only the anchor's share.
  np.testing.assert_allclose(q[1, 2], 0.1 * anchor[1, 2], rtol=1e-5)


def test_sft_loss_and_gradient():
  batch, logits, lam = make_batch()
  kw = dict(tau_anchor=0.1, tau=0.2, mix=0.1, strongest=1)
  f = lambda z: objectives.sft_loss(z, batch, lam, **kw)[0]
  loss = f(jnp.asarray(logits))
  np.testing.assert_allclose(loss, np_sft_loss(logits, batch, lam, 0.1, 0.2, 0.1), rtol=1e-5)
  grad = jax.grad(f)(jnp.asarray(logits))
  # d/dz of -sum q log softmax(z) is softmax(z) - q (per row, over the batch size).
  q = np_soft_targets(batch, lam, 0.2, 0.1, np_anchor(batch, lam, 0.1))
  np.testing.assert_allclose(grad, (np.exp(np_log_softmax(logits)) - q) / B, atol=1e-6)


@pytest.mark.parametrize('beta,alpha', [(0.0, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_rl_exact_loss_and_gradient(beta, alpha):
  batch, logits, lam = make_batch()
  kw = dict(rng=jax.random.key(0), beta=beta, alpha=alpha, tau_anchor=0.1, strongest=1,
            estimator='exact')
  f = lambda z: objectives.rl_loss(z, batch, lam, **kw)[0]
  ref = lambda z: np_rl_exact(z, batch, lam, 0.1, beta, alpha)
  np.testing.assert_allclose(f(jnp.asarray(logits)), ref(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logits)), numerical_grad(ref, logits),
                             atol=2e-5)


@pytest.mark.parametrize('normalize', [False, True])
def test_rl_reinforce_loss_and_gradient_with_given_actions(normalize):
  batch, logits, lam = make_batch()
  actions = np.random.default_rng(1).integers(0, K, size=(B, G))
  actions[1, :2] = 2       # samples whose outcome is missing carry no weight
  beta, alpha = 0.4, 0.1
  kw = dict(rng=jax.random.key(0), beta=beta, alpha=alpha, tau_anchor=0.1, strongest=1,
            estimator='reinforce', normalize_advantage=normalize, actions=jnp.asarray(actions))
  f = lambda z: objectives.rl_loss(z, batch, lam, **kw)[0]
  ref = lambda z: np_rl_reinforce(z, batch, lam, actions, 0.1, beta, alpha, normalize)
  np.testing.assert_allclose(f(jnp.asarray(logits)), ref(logits), rtol=1e-5, atol=1e-6)
  # At pi = pi_old the PPO ratio is 1, so its gradient is REINFORCE's (advantages held fixed).
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logits)), numerical_grad(ref, logits),
                             atol=5e-5)


def test_group_advantages_match_numpy():
  rng = np.random.default_rng(2)
  rewards = rng.normal(size=(B, G)).astype(np.float32)
  valid = (rng.uniform(size=(B, G)) < 0.7).astype(np.float32)
  valid[0] = 0.0
  for normalize in (False, True):
    got = objectives.group_advantages(jnp.asarray(rewards), jnp.asarray(valid), normalize)
    np.testing.assert_allclose(got, np_advantages(rewards, valid, normalize), rtol=1e-4, atol=1e-5)


def test_reinforce_gradient_is_unbiased_up_to_the_group_baseline_factor():
  """Mean of the sampled gradient = (G - 1) / G x the exact gradient.

  The group-mean baseline includes each sample's own reward, which scales the
  expected gradient by (1 - 1/G); the direction is the exact one.
  """
  batch, logits, lam = make_batch(seed=3, missing=False)
  z = jnp.asarray(logits)
  kw = dict(beta=0.0, alpha=0.0, tau_anchor=0.1, strongest=1)
  exact = jax.grad(lambda z: objectives.rl_loss(z, batch, lam, rng=None, estimator='exact', **kw)[0])(z)

  def sampled(key):
    return jax.grad(lambda z: objectives.rl_loss(
        z, batch, lam, rng=key, estimator='reinforce', group_size=G,
        normalize_advantage=False, **kw)[0])(z)

  n = 20_000
  grads = jax.jit(jax.vmap(sampled))(jax.random.split(jax.random.key(0), n))
  mean, se = np.mean(grads, 0), np.std(grads, 0) / np.sqrt(n)
  want = (G - 1) / G * np.asarray(exact)
  assert np.all(np.abs(mean - want) < 5 * se + 1e-6), (mean, want, se)


def test_ppo_clip_stops_gradient_outside_the_trust_region():
  batch, logits, lam = make_batch(missing=False)
  actions = jnp.zeros((B, G), jnp.int32)
  old = jax.nn.log_softmax(jnp.asarray(logits))
  moved = jnp.asarray(logits).at[:, 0].add(2.0)     # ratio for action 0 far above 1 + eps
  f = lambda z: objectives.rl_loss(z, batch, lam, rng=None, beta=0.0, alpha=0.0, tau_anchor=0.1,
                                   strongest=1, actions=actions, old_log_probs=old,
                                   normalize_advantage=False, ppo_clip=0.2)
  # All samples take the same action, so every advantage is 0: no gradient at all.
  np.testing.assert_allclose(jax.grad(lambda z: f(z)[0])(moved), 0.0, atol=1e-7)
  actions = jnp.tile(jnp.arange(G) % K, (B, 1))
  f2 = lambda z: objectives.rl_loss(z, batch, lam, rng=None, beta=0.0, alpha=0.0, tau_anchor=0.1,
                                    strongest=1, actions=actions, old_log_probs=old,
                                    normalize_advantage=False, ppo_clip=0.2)
  _, m = f2(moved)
  assert float(m['clip_fraction']) > 0
  assert float(m['kl_old']) > 0


def test_diagnostics_match_numpy():
  batch, logits, lam = make_batch(missing=False)
  batch['outcomes'][2] = [0, 1, 0, 0]            # only model 1 (the strongest) solves
  batch['outcomes'][3] = [0, 1, 0, 0]
  lp = np_log_softmax(logits)
  la = np_log_softmax(np.random.default_rng(5).normal(size=(B, K)))
  d = objectives.diagnostics(jnp.asarray(lp), jnp.asarray(la), batch['outcomes'],
                             batch['outcome_mask'], strongest=1, collapse_threshold=0.5)
  p = np.exp(lp)
  np.testing.assert_allclose(d['share'], p.mean(0), rtol=1e-5)
  np.testing.assert_allclose(d['batch_entropy'], -(p.mean(0) * np.log(p.mean(0))).sum(), rtol=1e-5)
  only = [i for i in range(B) if batch['outcomes'][i, 1] == 1 and batch['outcomes'][i].sum() == 1]
  np.testing.assert_allclose(d['strongest_only_share'], p[only, 1].mean(), rtol=1e-5)
  pref = la.argmax(1)
  for m in range(K):
    rows = pref == m
    assert d['needed_count'][m] == rows.sum()
    if rows.any():
      np.testing.assert_allclose(d['needed_share'][m], p[rows, m].mean(), rtol=1e-5)
      assert d['collapsed'][m] == float(rows.sum() >= 2 and p[rows, m].mean() < 0.5)


# -------------------------------------------------------------- schedules ---
@pytest.mark.parametrize('shape', ['linear', 'cosine'])
def test_schedules_match_numpy(shape):
  steps = np.arange(0, 120)
  got = np.array([schedules.interpolate(0.5, 0.05, s, 100, shape) for s in steps])
  t = np.clip(steps / 100, 0, 1)
  frac = 1 - t if shape == 'linear' else 0.5 * (1 + np.cos(np.pi * t))
  np.testing.assert_allclose(got, 0.05 + 0.45 * frac, rtol=1e-6)
  target = np.array([schedules.entropy_target(s, 100, 1.5, 0.2, shape) for s in steps])
  np.testing.assert_allclose(target, 0.2 + 1.3 * frac, rtol=1e-6)
  assert target[0] == pytest.approx(1.5) and target[-1] == pytest.approx(0.2)
  with pytest.raises(ValueError, match='schedule shape'):
    schedules.decay_fraction(0, 10, 'step')


def test_entropy_target_never_rises_above_the_start():
  assert float(schedules.entropy_target(50, 100, 0.05, 0.2)) == pytest.approx(0.05)


def test_dual_ascent_moves_alpha_the_right_way():
  # Entropy below target: alpha rises (pushing entropy up).
  assert float(schedules.dual_ascent(0.1, 1.0, 0.6, lr=0.5)) == pytest.approx(0.3)
  # Entropy above target: alpha falls, but never below 0.
  assert float(schedules.dual_ascent(0.1, 0.5, 0.9, lr=0.5)) == pytest.approx(0.0)
  assert float(schedules.dual_ascent(0.5, 0.5, 0.7, lr=0.5)) == pytest.approx(0.4)
