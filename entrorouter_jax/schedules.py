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


def dual_ascent(alpha, target_entropy, mean_entropy, lr: float):
  """alpha <- max(0, alpha + eta (H*_t - H_mean)).

  Entropy below target raises alpha (the -alpha H term then pushes entropy up);
  entropy above target lowers alpha, never below zero.
  """
  return jnp.maximum(0.0, alpha + lr * (target_entropy - mean_entropy))
