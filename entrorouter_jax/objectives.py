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
