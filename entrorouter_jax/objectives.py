"""The EntroRouter objectives, term by term as in ../shared/METHOD.md.

Shapes: B queries, K models, G sampled actions per query.
  logits        float32[B, K]   f_theta(x) (already divided by the temperature)
  outcomes      float32[B, K]   y(x, m) in [0, 1]; outcome_mask bool[B, K]
  cost_hat      float32[B, K]   c(x, m) / c_ref
  p_hat, c_bar  float32[B, K]   Stage-0 capability estimates (capability.py)
  cost_weight   float32[B]      lambda, per query (constant unless lambda-conditioned)

Every loss returns (scalar loss, metrics dict); metrics hold every term and the
Trust-Region-Collapse diagnostics, all means over the batch except the
per-model vectors (shape [K]). `weights` float32[B] (optional) weighs each
row's loss (the members of the embeddings backbone stack their rows into one
batch, each weighted 1 where the member trains on that query, 0 where the
query is in its held-out fold); the loss is then sum(w * l) / sum(w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NEG_INF = -1e9


# ---------------------------------------------------------------- basics ---
def entropy(log_probs):
  """H(p) = -sum_m p log p, per row: float32[B]."""
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def kl_divergence(log_p, log_q):
  """KL(p || q) = sum_m p (log p - log q), per row: float32[B]."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def weighted_mean(values, weights=None):
  """mean(values) or sum(w * values) / sum(w) over the rows (float32[B] -> scalar)."""
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def success_loss(success_logits, outcomes, outcome_mask, weights=None):
  """Dense supervision: binary cross-entropy of sigmoid(f(x, m)) against every
  observed outcome y(x, m) (graded outcomes in [0, 1] are soft labels),
  averaged over the observed cells (rows weighted by `weights`)."""
  cell = optax.sigmoid_binary_cross_entropy(success_logits, outcomes)
  w = outcome_mask.astype(jnp.float32)
  if weights is not None:
    w = w * weights[:, None]
  return jnp.sum(jnp.where(outcome_mask, cell, 0.0) * w) / jnp.maximum(jnp.sum(w), 1e-9)


def utility(outcomes, cost_hat, cost_weight):
  """u(x, m) = y(x, m) - lambda c_hat(x, m): float32[B, K]."""
  return outcomes - cost_weight[:, None] * cost_hat


def anchor_log_probs(p_hat, c_bar, cost_weight, tau):
  """log A(m|x), A proportional to exp((p_hat - lambda c_bar) / tau_A)."""
  return jax.nn.log_softmax((p_hat - cost_weight[:, None] * c_bar) / tau, axis=-1)


def soft_targets(outcomes, outcome_mask, cost_hat, cost_weight, anchor_probs, tau, mix):
  """Stage-1 targets q(m|x) proportional to exp(u(x, m) / tau_S), mixed with the anchor.

  Models with a missing outcome get no mass from u; q <- (1 - eps) q + eps A;
  q = A where no model succeeds (nothing in the table says whom to trust).
  """
  u = utility(outcomes, cost_hat, cost_weight)
  q = jax.nn.softmax(jnp.where(outcome_mask, u / tau, NEG_INF), axis=-1)
  q = (1.0 - mix) * q + mix * anchor_probs
  any_success = jnp.any(outcome_mask & (outcomes > 0), axis=-1, keepdims=True)
  return jnp.where(any_success, q, anchor_probs)


# ------------------------------------------------------------ diagnostics ---
def diagnostics(log_probs, log_anchor, outcomes, outcome_mask, strongest: int,
                collapse_threshold: float):
  """Trust-Region-Collapse diagnostics (METHOD.md), no gradients needed.

  - entropy: mean per-query entropy; batch_entropy: entropy of the batch-mean policy.
  - kl_anchor: mean KL(pi || A).
  - share [K]: mean probability mass per model; top_share [K]: argmax share.
  - strongest_only_share: mass on the strongest model over queries only it solves.
  - needed_share [K]: mean pi(m|x) over queries whose anchor prefers m;
    needed_count [K]: how many such queries; collapsed [K]: 1 where the anchor
    says m is needed (on at least 2% of the batch, and 2 queries) but the policy
    gives it < collapse_threshold there.
  """
  probs = jnp.exp(log_probs)
  k = probs.shape[-1]
  mean_policy = jnp.mean(probs, axis=0)
  solved = outcome_mask & (outcomes >= 1.0)
  others_fail = jnp.all(jnp.where(outcome_mask, outcomes <= 0.0, True)
                        | (jnp.arange(k) == strongest)[None, :], axis=-1)
  only_strongest = solved[:, strongest] & others_fail
  n_only = jnp.sum(only_strongest)
  strongest_only = jnp.where(
      n_only > 0, jnp.sum(probs[:, strongest] * only_strongest) / jnp.maximum(n_only, 1), jnp.nan)
  needed = jax.nn.one_hot(jnp.argmax(log_anchor, axis=-1), k)               # [B, K]
  needed_count = jnp.sum(needed, axis=0)
  needed_share = jnp.sum(probs * needed, axis=0) / jnp.maximum(needed_count, 1.0)
  return {
      'entropy': jnp.mean(entropy(log_probs)),
      'batch_entropy': entropy(jnp.log(jnp.maximum(mean_policy, 1e-30))),
      'kl_anchor': jnp.mean(kl_divergence(log_probs, log_anchor)),
      'share': mean_policy,
      'top_share': jnp.mean(jax.nn.one_hot(jnp.argmax(log_probs, -1), k), axis=0),
      'strongest_only_share': strongest_only,
      'needed_share': needed_share,
      'needed_count': needed_count,
      'collapsed': ((needed_count >= jnp.maximum(2.0, 0.02 * probs.shape[0]))
                    & (needed_share < collapse_threshold)).astype(jnp.float32),
  }


# ------------------------------------------------------- Stage 1 loss ---
def sft_loss(logits, batch, cost_weight, *, tau_anchor, tau, mix, strongest,
             collapse_threshold=0.02, weights=None):
  """L_SS = -sum_m q(m|x) log pi_theta(m|x), averaged over the batch."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  log_anchor = anchor_log_probs(batch['p_hat'], batch['c_bar'], cost_weight, tau_anchor)
  q = soft_targets(batch['outcomes'], batch['outcome_mask'], batch['cost_hat'],
                   cost_weight, jnp.exp(log_anchor), tau, mix)
  loss = weighted_mean(-jnp.sum(q * log_probs, axis=-1), weights)
  metrics = diagnostics(log_probs, log_anchor, batch['outcomes'], batch['outcome_mask'],
                        strongest, collapse_threshold)
  metrics.update(loss=loss, target_entropy=jnp.mean(entropy(jnp.log(jnp.maximum(q, 1e-30)))))
  return loss, metrics


# ------------------------------------------------------- Stage 2 loss ---
def group_advantages(rewards, valid, normalize: bool):
  """A_i = r_i - mean_j r_j over the valid samples of each query's group.

  rewards, valid: [B, G]. With `normalize`, divide by the group std + 1e-6 (GRPO).
  Invalid samples (missing outcome) get advantage 0.
  """
  n = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
  mean = jnp.sum(rewards * valid, axis=-1, keepdims=True) / n
  adv = (rewards - mean) * valid
  if normalize:
    std = jnp.sqrt(jnp.sum(adv**2, axis=-1, keepdims=True) / n)
    adv = adv / (std + 1e-6)
  return adv


def rl_loss(logits, batch, cost_weight, *, rng, beta, alpha, tau_anchor, strongest,
            estimator='reinforce', group_size=8, normalize_advantage=True,
            ppo_clip=0.2, old_log_probs=None, actions=None, collapse_threshold=0.02,
            weights=None):
  """L = L_PG + beta_t KL(pi_theta || A) - alpha_t H(pi_theta), from one forward pass.

  estimator='reinforce': G actions per query from pi_old, the policy at the
  start of the step (`rng` draws them unless `actions` [B, G] are given);
  reward r = y - lambda c_hat, group-relative advantage A. Without
  `old_log_probs`, pi_old is this forward pass (held constant) and
  L_PG = -(1/G) sum_i A_i log pi(a_i|x), plain REINFORCE. With `old_log_probs`
  (several PPO epochs on one batch), L_PG = -(1/G) sum_i min(rho_i A_i,
  clip(rho_i, 1 - eps, 1 + eps) A_i), rho_i = pi(a_i|x) / pi_old(a_i|x); at
  rho = 1 its gradient is REINFORCE's. Samples whose outcome is missing carry
  no weight.
  estimator='exact': L_PG = -sum_m pi(m|x) u(x, m) over the observed models.
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  outcomes, mask = batch['outcomes'], batch['outcome_mask']
  u = utility(outcomes, batch['cost_hat'], cost_weight)
  log_anchor = anchor_log_probs(batch['p_hat'], batch['c_bar'], cost_weight, tau_anchor)
  ppo = old_log_probs is not None
  if not ppo:
    old_log_probs = jax.lax.stop_gradient(log_probs)

  if estimator == 'exact':
    pg = -weighted_mean(jnp.sum(jnp.exp(log_probs) * jnp.where(mask, u, 0.0), axis=-1), weights)
    reward = weighted_mean(jnp.sum(jnp.exp(old_log_probs) * jnp.where(mask, u, 0.0), axis=-1),
                           weights)
    pg_metrics = {'clip_fraction': jnp.zeros(())}
  elif estimator == 'reinforce':
    if actions is None:
      actions = jax.random.categorical(rng, old_log_probs, axis=-1,
                                       shape=(group_size,) + old_log_probs.shape[:1]).T
    take = lambda table: jnp.take_along_axis(table, actions, axis=-1)       # [B, G]
    valid = take(mask).astype(jnp.float32)
    if weights is not None:
      valid = valid * (weights[:, None] > 0)
    rewards = take(u)
    adv = jax.lax.stop_gradient(group_advantages(rewards, valid, normalize_advantage))
    ratio = jnp.exp(take(log_probs) - take(old_log_probs))
    if ppo:
      clipped = jnp.clip(ratio, 1.0 - ppo_clip, 1.0 + ppo_clip)
      per_sample = jnp.minimum(ratio * adv, clipped * adv)
    else:
      per_sample = adv * take(log_probs)
    pg = -weighted_mean(jnp.sum(per_sample * valid, axis=-1) / actions.shape[-1], weights)
    reward = jnp.sum(rewards * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    pg_metrics = {'clip_fraction': jnp.sum((jnp.abs(ratio - 1.0) > ppo_clip) * valid)
                                   / jnp.maximum(jnp.sum(valid), 1.0)}
  else:
    raise ValueError(f"rl.estimator={estimator!r}; expected 'reinforce' or 'exact'")

  kl_anchor = weighted_mean(kl_divergence(log_probs, log_anchor), weights)
  mean_entropy = weighted_mean(entropy(log_probs), weights)
  loss = pg + beta * kl_anchor - alpha * mean_entropy
  metrics = diagnostics(log_probs, log_anchor, outcomes, mask, strongest, collapse_threshold)
  metrics.update(pg_metrics)
  metrics.update(entropy=mean_entropy, kl_anchor=kl_anchor)
  metrics.update(loss=loss, pg_loss=pg, anchor_loss=beta * kl_anchor,
                 entropy_loss=-alpha * mean_entropy, reward=reward,
                 kl_old=jnp.mean(kl_divergence(old_log_probs, log_probs)),
                 beta=jnp.asarray(beta, jnp.float32), alpha=jnp.asarray(alpha, jnp.float32))
  return loss, metrics


# ------------------------------------------------- learning from feedback ---
# A feedback batch holds one logged row per query: the deployed policy pi_b chose
# `logged` int[B] with probability `propensity` float[B] in (0, 1], and only that
# cell of `outcomes` / `outcome_mask` is observed.
def take_logged(table, logged):
  """table[i, logged[i]] per row: [B, K] -> [B]."""
  return jnp.take_along_axis(table, logged[:, None], axis=-1)[:, 0]


def inverse_propensity_weights(propensity, w_max):
  """min(1 / p, w_max) per row: float32[B] (clipped importance weights)."""
  return jnp.minimum(1.0 / propensity, w_max)


def weighted_success_loss(success_logits, outcomes, outcome_mask, propensity, w_max,
                          weights=None):
  """The success head's binary cross-entropy on the observed (logged) cells only,
  each cell weighted by min(1 / p, w_max), p its row's propensity, so the models
  the logging policy seldom chose are not under-represented; normalised by the
  sum of the weights (rows further weighted by `weights`).

  Returns (loss, metrics): `success_loss`, the mean weight over the observed
  cells (`mean_ipw`) and the share of them whose 1 / p was cut at w_max
  (`ipw_clip_fraction`).
  """
  if isinstance(w_max, (int, float)) and not w_max > 0:
    raise ValueError(f'w_max={w_max!r}; expected a weight cap > 0 (inf for none)')
  labels = jnp.where(outcome_mask, outcomes, 0.0)
  cell = optax.sigmoid_binary_cross_entropy(success_logits, labels)
  observed = outcome_mask.astype(jnp.float32)
  if weights is not None:
    observed = observed * weights[:, None]
  ipw = inverse_propensity_weights(propensity, w_max)
  w = observed * ipw[:, None]
  loss = jnp.sum(jnp.where(outcome_mask, cell, 0.0) * w) / jnp.maximum(jnp.sum(w), 1e-9)
  n_observed = jnp.maximum(jnp.sum(observed), 1e-9)
  clipped = (1.0 / propensity > w_max).astype(jnp.float32)
  metrics = {
      'success_loss': loss,
      'mean_ipw': jnp.sum(observed * ipw[:, None]) / n_observed,
      'ipw_clip_fraction': jnp.sum(observed * clipped[:, None]) / n_observed,
  }
  return loss, metrics


def offpolicy_loss(logits, success_logits, batch, cost_weight, *, log_behaviour, beta, alpha,
                   clip_eps, weights=None, log_anchor=None, beta_anchor=0.0):
  """L = -J + beta KL(pi || pi_b) + beta_anchor KL(pi || anchor) - alpha H(pi), on logged rows.

  J is METHOD.md's doubly robust surrogate, maximised, per row; the success
  estimate s = sigmoid(success_logits) is held fixed inside it (no gradient):
    J = sum_m pi(m|x) (s(x, m) - lambda c_bar(x, m)) + min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    rho = pi(a|x) / p,  r = y(x, a) - lambda c_hat(x, a),  A = r - (s(x, a) - lambda c_hat(x, a))
  with a = batch['logged'] int[B], p = batch['propensity'] float[B],
  y = batch['outcomes'] at the logged cell (batch['outcome_mask'] says it is
  observed; a row whose logged cell is not observed keeps the first term only),
  c_hat = batch['cost_hat'] float[B, K] (the logged cell's realised cost / c_ref)
  and c_bar = batch['c_bar'] float[B, K]. The first term is the exact value of pi
  under the model's own predictions; the second corrects it with the observed
  residual, the ratio clipped to the trust region around the logging policy
  (the min keeps the pessimistic of the two). `log_behaviour` float[B, K] is
  log pi_b (finite: the deployed policy explores every model), `log_anchor`
  float[B, K] an optional second anchor (Stage 0's kNN anchor) weighted by
  `beta_anchor`.

  Metrics: every term (`direct`, `correction`, `value` = mean J, `pg_loss` = -value,
  `behaviour_loss`, `anchor_loss`, `entropy_loss`), `kl_behaviour`, `kl_anchor`,
  `entropy`, `rho` (mean ratio), `clip_fraction` (share of ratios outside
  [1 - eps, 1 + eps]), `clip_binding` (share of rows where the min takes the
  clipped term strictly), `reward` (mean r: the logging policy's realised
  utility) and `advantage` (mean A), over the rows whose logged cell is observed
  where a row statistic.
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  s = jax.lax.stop_gradient(jax.nn.sigmoid(success_logits))
  lam = cost_weight[:, None]
  logged, propensity = batch['logged'], batch['propensity']
  observed = take_logged(batch['outcome_mask'], logged)
  y = jnp.where(observed, take_logged(batch['outcomes'], logged), 0.0)
  c_logged = take_logged(batch['cost_hat'], logged)
  reward = y - cost_weight * c_logged
  adv = jnp.where(observed, reward - (take_logged(s, logged) - cost_weight * c_logged), 0.0)

  direct = jnp.sum(probs * (s - lam * batch['c_bar']), axis=-1)
  rho = jnp.exp(take_logged(log_probs, logged) - jnp.log(propensity))
  clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps)
  correction = jnp.minimum(rho * adv, clipped * adv)
  per_row = direct + correction

  value = weighted_mean(per_row, weights)
  kl_behaviour = weighted_mean(kl_divergence(log_probs, log_behaviour), weights)
  mean_entropy = weighted_mean(entropy(log_probs), weights)
  loss = -value + beta * kl_behaviour - alpha * mean_entropy
  kl_anchor = jnp.zeros(())
  if log_anchor is not None:
    kl_anchor = weighted_mean(kl_divergence(log_probs, log_anchor), weights)
    loss = loss + beta_anchor * kl_anchor

  row_w = observed.astype(jnp.float32)
  if weights is not None:
    row_w = row_w * weights
  over_observed = lambda v: jnp.sum(jax.lax.stop_gradient(v) * row_w) / jnp.maximum(
      jnp.sum(row_w), 1e-9)
  metrics = {
      'loss': loss, 'value': value, 'pg_loss': -value,
      'direct': weighted_mean(direct, weights), 'correction': weighted_mean(correction, weights),
      'kl_behaviour': kl_behaviour, 'behaviour_loss': beta * kl_behaviour,
      'kl_anchor': kl_anchor,
      'anchor_loss': beta_anchor * kl_anchor,
      'entropy': mean_entropy, 'entropy_loss': -alpha * mean_entropy,
      'rho': over_observed(rho),
      'clip_fraction': over_observed((jnp.abs(rho - 1.0) > clip_eps).astype(jnp.float32)),
      'clip_binding': over_observed((clipped * adv < rho * adv).astype(jnp.float32)),
      'reward': over_observed(reward), 'advantage': over_observed(adv),
      'beta': jnp.asarray(beta, jnp.float32), 'alpha': jnp.asarray(alpha, jnp.float32),
  }
  return loss, metrics
