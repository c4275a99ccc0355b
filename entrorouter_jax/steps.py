"""The jitted optimisation step of each stage: Soft Supervision (`sft_update`) and
RL with the Soft Anchor (`rl_update`; learning from feedback logs, `offpolicy_update`),
around what they read (`step_inputs`).

`make_train_step` builds `(state, batch[, soft_weight]) -> (state, metrics)`
for a stage; the state is `state.py`'s dict.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entrorouter_jax import objectives, schedules
from entrorouter_jax.model import num_members
from entrorouter_jax.policy import is_utility, logits_from_outputs, member_outputs
from entrorouter_jax.problem import OFFPOLICY, Problem, behaviour_lambdas, holds_out

# A feedback log's per-row batch entries the off-policy update reads.
FEEDBACK_ROWS = ('logged', 'propensity', 'log_behaviour')


def sample_cost_weight(config, stage_cfg, rng, batch_size, lambdas=None):
  """lambda per query: drawn from the lambda set (utility head), from
  [lambda_min, lambda_max] (lambda-conditioned), else the stage's cost_weight."""
  if is_utility(config) and lambdas is not None:
    lambdas = jnp.asarray(lambdas, jnp.float32)
    return lambdas[jax.random.randint(rng, (batch_size,), 0, lambdas.shape[0])]
  if config.model.lambda_conditioned:
    return jax.random.uniform(rng, (batch_size,), minval=config.model.lambda_min,
                              maxval=config.model.lambda_max)
  return jnp.full((batch_size,), stage_cfg.cost_weight, jnp.float32)


def behaviour_at(log_behaviour, cost_weight, own, lambdas):
  """log pi_b at each row's lambda, float32[B, K], from the table float32[B, L + 1, K]:
  slot L (the log's own lambda) where `own`, else the slot of the drawn `cost_weight`
  among `lambdas` float[L]."""
  lambdas = jnp.asarray(lambdas, jnp.float32)
  slot = jnp.argmin(jnp.abs(cost_weight[:, None] - lambdas[None, :]), axis=-1)
  slot = jnp.where(own, lambdas.shape[0], slot)
  return jnp.take_along_axis(log_behaviour, slot[:, None, None], axis=1)[:, 0]


def member_weights(fold, members: int, hold_out: bool):
  """float32[M, B]: 1 where member j trains on the row (its fold is not j), or
  None (one member trained on every row)."""
  if members == 1 and not hold_out:
    return None
  return (fold[None, :] != jnp.arange(members)[:, None]).astype(jnp.float32)


@dataclasses.dataclass
class StepInputs:
  """One batch as both stages' losses read it, its M x B rows member-major."""
  forward: Callable        # model -> (success outputs f, policy logits), float32[M * B, K]
  rows: dict               # outcomes, outcome_mask, cost_hat, p_hat, c_bar (and a feedback
                           # log's logged, propensity, log_behaviour), tiled per member
  cost_weight: jax.Array   # lambda per row, float32[M * B]
  weights: Optional[jax.Array]   # whether the row's member trains on it, or None (all do)
  dense_weight: float      # the stage's dense_weight
  common: dict             # the anchor and collapse settings both losses take

  def dense_term(self, f):
    """The dense success loss on f (zero where the stage does not weigh it)."""
    if self.dense_weight == 0.0:
      return jnp.zeros(())
    return objectives.success_loss(f, self.rows['outcomes'], self.rows['outcome_mask'],
                                   self.weights)


def step_inputs(config, stage: str, problem: Problem, batch, lam_rng, drop_rng) -> StepInputs:
  """The batch's rows stacked once per member, with their cost weights and member
  weights, and the forward pass of the model on them. A feedback log's rows keep
  the log's cost weight where it has one (the drawn lambda elsewhere)."""
  stage_cfg = config[stage]
  members = num_members(config.model)
  deterministic = config.model.dropout == 0.0 and config.model.get('input_noise', 0.0) == 0.0
  batch = dict(batch, cost_hat=batch['costs'] / problem.c_ref)
  cost_weight = sample_cost_weight(config, stage_cfg, lam_rng, batch['outcomes'].shape[0],
                                   problem.lambda_set)
  if 'cost_weight' in batch:
    own = ~jnp.isnan(batch['cost_weight'])
    if 'log_behaviour' in batch:
      batch['log_behaviour'] = behaviour_at(batch['log_behaviour'], cost_weight, own,
                                            behaviour_lambdas(config, problem))
    cost_weight = jnp.where(own, batch['cost_weight'], cost_weight)
  weights = member_weights(batch.get('fold'), members, holds_out(config))
  if weights is not None:
    weights = weights.reshape(-1)
  tile = lambda x: jnp.tile(x, (members,) + (1,) * (x.ndim - 1))

  def forward(m):
    f = member_outputs(m, batch, cost_weight, config, deterministic=deterministic,
                       rngs=nnx.Rngs(dropout=drop_rng))
    logits = logits_from_outputs(m, f, batch, cost_weight, config)
    k = f.shape[-1]
    return f.reshape(-1, k), logits.reshape(-1, k)

  return StepInputs(
      forward=forward,
      rows={k: tile(batch[k]) for k in ('outcomes', 'outcome_mask', 'cost_hat', 'p_hat',
                                        'c_bar', *FEEDBACK_ROWS) if k in batch},
      cost_weight=tile(cost_weight), weights=weights,
      dense_weight=float(stage_cfg.get('dense_weight', 0.0)),
      common=dict(tau_anchor=config.anchor.tau, strongest=problem.strongest,
                  collapse_threshold=config.rl.collapse_threshold))


def sft_update(config, inputs: StepInputs, model, optimizer, state, act_rng, soft_weight):
  """Soft Supervision's update: soft-target cross-entropy (weighed by `soft_weight`,
  default `sft.soft_weight`) plus the dense loss. Returns (metrics, grads, {})."""
  del state, act_rng
  sft = config.sft
  weight = sft.get('soft_weight', 1.0) if soft_weight is None else soft_weight

  def loss_fn(m):
    f, logits = inputs.forward(m)
    soft, metrics = objectives.sft_loss(
        logits, inputs.rows, inputs.cost_weight, tau=sft.tau, mix=sft.anchor_mix,
        weights=inputs.weights, **inputs.common)
    dense = inputs.dense_term(f)
    loss = weight * soft + inputs.dense_weight * dense
    metrics.update(loss=loss, soft_loss=soft, dense_loss=dense)
    return loss, metrics

  (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return metrics, grads, {}


def rl_update(config, inputs: StepInputs, model, optimizer, state, act_rng, soft_weight):
  """RL with the Soft Anchor: `rl.ppo_epochs` updates on the batch (pi_old and
  the actions fixed across them), then a dual-ascent step of the entropy
  coefficient toward the scheduled target. Returns (metrics, grads, {'alpha'})."""
  del soft_weight
  rl = config.rl
  if rl.estimator == OFFPOLICY:
    return offpolicy_update(config, inputs, model, optimizer, state, act_rng)
  beta = schedules.interpolate(rl.beta_start, rl.beta_end, state['step'], rl.num_steps,
                               rl.entropy_schedule)
  target = schedules.entropy_target(state['step'], rl.num_steps, state['h0'],
                                    rl.entropy_min, rl.entropy_schedule)
  kwargs = dict(rng=act_rng, beta=beta, alpha=state['alpha'], estimator=rl.estimator,
                group_size=rl.group_size, normalize_advantage=rl.normalize_advantage,
                ppo_clip=rl.ppo_clip, weights=inputs.weights, **inputs.common)
  if rl.ppo_epochs > 1:
    old = jax.nn.log_softmax(jax.lax.stop_gradient(inputs.forward(model)[1]), -1)
    actions = jax.random.categorical(act_rng, old, axis=-1,
                                     shape=(rl.group_size, old.shape[0])).T
    kwargs.update(old_log_probs=old, actions=actions)

  def loss_fn(m):
    f, logits = inputs.forward(m)
    loss, metrics = objectives.rl_loss(logits, inputs.rows, inputs.cost_weight, **kwargs)
    dense = inputs.dense_term(f)
    loss = loss + inputs.dense_weight * dense
    metrics.update(loss=loss, dense_loss=dense)
    return loss, metrics

  for _ in range(rl.ppo_epochs):
    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
  alpha = schedules.dual_ascent(state['alpha'], target, metrics['entropy'], rl.entropy_lr)
  metrics['entropy_target'] = target
  return metrics, grads, {'alpha': alpha}


def offpolicy_update(config, inputs: StepInputs, model, optimizer, state, act_rng):
  """RL on a feedback log (rl.estimator='offpolicy', METHOD.md "Learning from feedback").

  Policy: `objectives.offpolicy_loss`, the doubly robust surrogate with the ratio
  rho = pi(a|x) / p on the logged propensities p, clipped to 1 +- rl.clip_eps, and
  KL(pi || pi_b) weighted by the beta schedule, pi_b the logging router's full
  policy on the row at the row's lambda (`log_behaviour`, fixed). Success head: the logged cells'
  cross-entropy weighted by min(1 / p, rl.w_max) (`objectives.weighted_success_loss`,
  weighed by rl.dense_weight). Entropy: dual ascent toward the scheduled target,
  never below rl.entropy_floor. Returns (metrics, grads, {'alpha'})."""
  del act_rng
  rl, rows = config.rl, inputs.rows
  beta = schedules.interpolate(rl.beta_start, rl.beta_end, state['step'], rl.num_steps,
                               rl.entropy_schedule)
  target = schedules.entropy_target_with_floor(state['step'], rl.num_steps, state['h0'],
                                               rl.entropy_min, rl.entropy_floor,
                                               rl.entropy_schedule)

  def loss_fn(m):
    f, logits = inputs.forward(m)
    loss, metrics = objectives.offpolicy_loss(
        logits, f, rows, inputs.cost_weight, log_behaviour=rows['log_behaviour'], beta=beta,
        alpha=state['alpha'], clip_eps=rl.clip_eps, weights=inputs.weights)
    success, success_metrics = objectives.weighted_success_loss(
        f, rows['outcomes'], rows['outcome_mask'], rows['propensity'], rl.w_max,
        inputs.weights)
    loss = loss + inputs.dense_weight * success
    metrics.update(success_metrics, loss=loss, dense_loss=success)
    return loss, metrics

  (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  alpha = schedules.dual_ascent(state['alpha'], target, metrics['entropy'], rl.entropy_lr)
  metrics['entropy_target'] = target
  return metrics, grads, {'alpha': alpha}


UPDATES = {'sft': sft_update, 'rl': rl_update}


def make_train_step(config, stage: str, graphdef, problem: Problem, schedule):
  """One jitted optimisation step of `stage` (state, batch) -> (state, metrics).

  The members' rows are stacked into one batch of M x B rows (member-major),
  each weighted by whether that member trains on the query. SFT's soft-target
  weight may come as a third argument `soft_weight` (a float32 scalar; default:
  `sft.soft_weight`), so the Stage-1 candidates share one compiled step.
  """
  update = UPDATES[stage]

  def step_fn(state, batch, soft_weight=None):
    model, optimizer = nnx.merge(graphdef, state['nnx'])
    rng, lam_rng, drop_rng, act_rng = jax.random.split(jax.random.wrap_key_data(state['rng']), 4)
    inputs = step_inputs(config, stage, problem, batch, lam_rng, drop_rng)
    metrics, grads, updated = update(config, inputs, model, optimizer, state, act_rng,
                                     soft_weight)
    if is_utility(config):
      metrics['temperature'] = model.temperature()
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = schedule(state['step'])
    new_state = dict(state, **updated)
    new_state.update(nnx=nnx.state((model, optimizer)), step=state['step'] + 1,
                     rng=jax.random.key_data(rng))
    return new_state, metrics

  return step_fn
