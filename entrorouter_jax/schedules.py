"""Schedules of Stage 2 and the entropy controller (METHOD.md, "Entropy contraction").

All pure functions of the step, usable inside jit; checked against NumPy in
tests/test_schedules.py.
"""

from __future__ import annotations

import jax.numpy as jnp

SHAPES = ('linear', 'cosine')


def decay_fraction(step, num_steps: int, shape: str = 'linear'):
  """1 at step 0, falling to 0 at `num_steps` (and after): linear or cosine."""
  if shape not in SHAPES:
    raise ValueError(f'schedule shape {shape!r}; expected one of {SHAPES}')
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  if shape == 'linear':
    return 1.0 - t
  return 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def interpolate(start, end, step, num_steps: int, shape: str = 'linear'):
  """start at step 0, end at `num_steps`, following `shape`."""
  return end + (start - end) * decay_fraction(step, num_steps, shape)


def entropy_target(step, num_steps: int, h0, h_min: float, shape: str = 'linear'):
  """H*_t: decays from H_0 (the policy's entropy after Stage 1) toward H_min.

  If the policy already starts below H_min the target stays at H_0: the
  controller never pushes entropy up past where Stage 1 left it.
  """
  h_min = jnp.minimum(h_min, h0)
  return interpolate(h0, h_min, step, num_steps, shape)


def entropy_target_with_floor(step, num_steps: int, h0, h_min: float, h_floor=0.0,
                              shape: str = 'linear'):
  """max(H*_t, H_floor): `entropy_target`, never below the floor `h_floor` (nats, >= 0).

  The floor overrides the rule that the target stays at H_0 when the policy
  starts low: with a floor > 0 (learning from feedback) the controller raises
  alpha until the policy is at least that stochastic, so the next deployment
  still explores. h_floor = 0 gives `entropy_target` unchanged wherever
  h_min >= 0 (H_0, an entropy, is >= 0).
  """
  if isinstance(h_floor, (int, float)) and not h_floor >= 0:
    raise ValueError(f'entropy floor h_floor={h_floor!r}; expected a number of nats >= 0')
  return jnp.maximum(entropy_target(step, num_steps, h0, h_min, shape), h_floor)


def dual_ascent(alpha, target_entropy, mean_entropy, lr: float):
  """alpha <- max(0, alpha + eta (H*_t - H_mean)).

  Entropy below target raises alpha (the -alpha H term then pushes entropy up);
  entropy above target lowers alpha, never below zero.
  """
  return jnp.maximum(0.0, alpha + lr * (target_entropy - mean_entropy))
