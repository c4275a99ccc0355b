"""The policy pi_theta(m|x) from the network's outputs f(x): both heads in one place.

  softmax head  pi = softmax(f(x) / T), plus log A(m|x) when model.anchor_in_logits
  utility head  s(x, m) = sigmoid(f(x, m)) the predicted success (plus logit p_hat(m|x)
                inside the sigmoid when model.anchor_in_logits), and
                pi = softmax((s(x, m) - lambda c_bar(x, m)) / T), T learned.
                lambda enters exactly: argmax pi = argmax s - lambda c_bar, so one
                checkpoint routes at any cost weight.
With several members (the embeddings backbone) each has its own policy in
training; routing averages their s (utility head) or their logits (softmax).

A batch is a dict of arrays with a leading batch axis B: 'tokens' int32[B, L] and
'token_mask' bool[B, L] (token backbones) or 'features' float32[B, D]
(embeddings), and Stage 0's 'p_hat', 'c_bar' float32[B, K].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entrorouter_jax import objectives, sharding
from entrorouter_jax.layers import bucket
from entrorouter_jax.model import RouterModel

_P_CLIP = 1e-4


def build_model(config, vocab_size: int, num_models: int, seed: int,
                feature_dim: int | None = None) -> RouterModel:
  return RouterModel(config.model, vocab_size=vocab_size, max_len=config.data.max_len,
                     num_models=num_models, rngs=nnx.Rngs(params=seed), feature_dim=feature_dim)


def is_utility(config) -> bool:
  return config.model.get('head', 'softmax') == 'utility'


def member_outputs(model, batch, cost_weight, config, *, deterministic=True, rngs=None):
  """f(x) per member, float32[M, B, K]; for the utility head these are the
  success logits (the anchor's logit added when it sits inside the policy)."""
  cond = cost_weight if config.model.lambda_conditioned else None
  f = model(batch.get('tokens'), batch.get('token_mask'), cond, features=batch.get('features'),
            deterministic=deterministic, rngs=rngs, members=True)
  if is_utility(config) and config.model.anchor_in_logits:
    p = jnp.clip(batch['p_hat'], _P_CLIP, 1.0 - _P_CLIP)
    f = f + (jnp.log(p) - jnp.log1p(-p))[None]
  return f


def logits_from_outputs(model, f, batch, cost_weight, config):
  """Policy logits with the shape of f ([M, B, K] or [B, K])."""
  lam = cost_weight[:, None]
  if is_utility(config):
    return (jax.nn.sigmoid(f) - lam * batch['c_bar']) / model.temperature()
  logits = f / config.model.temperature
  if config.model.anchor_in_logits:
    logits = logits + objectives.anchor_log_probs(batch['p_hat'], batch['c_bar'], cost_weight,
                                                  config.anchor.tau)
  return logits


def policy_logits(model, batch, cost_weight, config, *, deterministic=True, rngs=None):
  """The routed policy's logits float32[B, K] (members combined)."""
  f = member_outputs(model, batch, cost_weight, config, deterministic=deterministic, rngs=rngs)
  if is_utility(config):
    s = jnp.mean(jax.nn.sigmoid(f), axis=0)
    lam = cost_weight[:, None]
    return (s - lam * batch['c_bar']) / model.temperature()
  return logits_from_outputs(model, jnp.mean(f, axis=0), batch, cost_weight, config)


def make_forward(config, model_graphdef, mesh):
  """A jitted (params, batch) -> {'probs': pi(m|x), 'success': s(x, m)} (utility
  head; the softmax head gives no 'success'), the batch sharded over the mesh."""
  batch_sh = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(None, batch_sh), out_shardings=batch_sh,
                     compiler_options=sharding.compiler_options())
  def forward(params, batch):
    model = nnx.merge(model_graphdef, params)
    out = {'probs': jax.nn.softmax(policy_logits(model, batch, batch['cost_weight'], config), -1)}
    if is_utility(config):
      f = member_outputs(model, batch, batch['cost_weight'], config)
      out['success'] = jnp.mean(jax.nn.sigmoid(f), axis=0)
    return out

  return forward


def make_member_forward(config, model_graphdef, mesh):
  """A jitted (params, batch) -> f(x) per member, float32[B, M, K] (batch first)."""
  batch_sh = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(None, batch_sh), out_shardings=batch_sh,
                     compiler_options=sharding.compiler_options())
  def forward(params, batch):
    model = nnx.merge(model_graphdef, params)
    f = member_outputs(model, batch, batch['cost_weight'], config)
    return {'members': jnp.swapaxes(f, 0, 1)}

  return forward


def batched(forward, params, mesh, batch_size: int, arrays: dict) -> dict:
  """Runs `forward` over every row of `arrays` ({name: array[N, ...]}) in batches
  of `batch_size` (rounded to the mesh's batch divisor; the last one padded);
  N below that is padded only to its power-of-two bucket (a multiple of the
  divisor). Returns {name: np.ndarray[N, ...]} of its outputs."""
  n = len(next(iter(arrays.values())))
  unit = sharding.batch_divisor(mesh)
  bs = max(unit, (batch_size // unit) * unit)
  if n < bs:  # fewer rows: the next power-of-two bucket, so one query costs one row
    bs = min(bs, -(-bucket(n) // unit) * unit)
  pad = (-n) % bs
  arrays = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in arrays.items()}
  batch_sh = sharding.batch_sharding(mesh)
  # In one process `forward` (jitted with the batch sharding as in_shardings)
  # places host arrays itself, for less than a device_put per array costs
  # (most of a one-query call's policy time); several processes must put them.
  place = ((lambda v: jax.device_put(v, batch_sh)) if jax.process_count() > 1
           else np.ascontiguousarray)
  out = {}
  with jax.set_mesh(mesh):
    for start in range(0, n + pad, bs):
      chunk = {k: place(v[start:start + bs]) for k, v in arrays.items()}
      for k, v in jax.device_get(forward(params, chunk)).items():
        out.setdefault(k, []).append(np.asarray(v))
  return {k: np.concatenate(v)[:n] for k, v in out.items()}


def policy_arrays(inputs: dict, p_hat, c_bar, cost_weight) -> dict:
  """The forward's input arrays for N queries: `inputs` ({'tokens', 'token_mask'}
  or {'features'}), Stage 0's tables float[N, K], lambda (scalar or float[N])."""
  n = len(p_hat)
  return {**inputs, 'p_hat': np.asarray(p_hat, np.float32), 'c_bar': np.asarray(c_bar, np.float32),
          'cost_weight': np.broadcast_to(np.asarray(cost_weight, np.float32), (n,)).copy()}
