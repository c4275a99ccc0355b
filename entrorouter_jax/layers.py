"""Pieces shared by every network of the package (model.py and the pretrained
backbones): parameters named by logical axes, the attention mask value and
softmax attention, pooling, and the row and width buckets of inference batches.
Nothing here imports the rest of the package."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

MASK_VALUE = -1e9   # attention scores of masked positions


def bucket(n: int) -> int:
  """The smallest power of two >= n (>= 1): padded shapes stay few, so few compiles."""
  return 1 << max(0, int(n) - 1).bit_length()


def width_bucket(n: int, cap: int) -> int:
  """The padded width of n tokens: the smallest of 8, 16, 24, 32, 48, 64, 96,
  128, 192... (8, then powers of two and 1.5x powers of two) >= n, at most `cap`.
  At most a third of a row past 16 tokens is padding, in two widths per octave."""
  width = 8
  while width < n:
    width = 16 if width == 8 else width + (width // 2 if width & (width - 1) == 0 else width // 3)
  return min(int(cap), width)


def width_buckets(cap: int) -> list[int]:
  """Every width `width_bucket` gives up to `cap` tokens (ascending)."""
  return sorted({width_bucket(n, cap) for n in range(1, int(cap) + 1)})


def erf_gelu(x):
  """The exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt 2)), as PyTorch and
  Hugging Face compute it. jax.nn.gelu(approximate=False) goes through erfc,
  which XLA:CPU evaluates much more slowly than erf; the two agree to float32
  rounding in absolute terms."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def param(rngs, init, shape, axes):
  """A float32 nnx.Param whose metadata names its logical axes (sharding.RULES)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, jnp.float32))


def attention(q, k, v, mask, scale: float) -> jax.Array:
  """Softmax attention: q, k, v [B, L, H, D], mask bool[B, L] (True = a real key)
  -> [B, L, H, D]; scores and softmax in float32 whatever the inputs' dtype.

  jax.nn.dot_product_attention (cuDNN's fused kernel on GPUs where it applies),
  except on the CPU: there its XLA path is slower, forward and backward, than
  the same math written heads-major as two batched matmuls
  (benchmarks/RESULTS.md, train steps).
  """
  if jax.default_backend() != 'cpu':
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=scale)
  return heads_major_attention(q, k, v, mask, scale)


def heads_major_attention(q, k, v, mask, scale: float, on_probs=None) -> jax.Array:
  """`attention` as two batched matmuls over [B, H, L, D] (its CPU path);
  `on_probs` (e.g. BERT's dropout) is applied to the attention probabilities."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))        # [B, H, L, D]
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  scores = scores + jnp.where(mask, 0.0, MASK_VALUE)[:, None, None, :]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if on_probs is not None:
    probs = on_probs(probs)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', probs, v), 1, 2)


def pool(hidden, mask, how: str) -> jax.Array:
  """hidden [B, L, H], mask bool[B, L] -> float32[B, H] by 'mean', 'cls' (position 0) or
  'last' (the last real token; padding is on the right)."""
  hidden = jnp.asarray(hidden, jnp.float32)
  if how == 'cls':
    return hidden[:, 0]
  weights = jnp.asarray(mask).astype(jnp.float32)
  if how == 'mean':
    return (hidden * weights[..., None]).sum(1) / jnp.maximum(weights.sum(1), 1.0)[:, None]
  if how == 'last':
    last = jnp.maximum(weights.sum(1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"pooling={how!r}; expected 'mean', 'cls' or 'last'")
