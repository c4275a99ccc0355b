"""Llama / Gemma decoders in flax NNX as the router's policy backbone.

Reads Hugging Face-format model directories without torch:
  config.json                      -> DecoderConfig.from_dir
  model.safetensors, or sharded model-0000i-of-0000n.safetensors with
  model.safetensors.index.json     -> load_state (NumPy arrays, float32)
  tokenizer.model (SentencePiece)  -> SentencePieceTokenizer.load

Supported: model_type 'llama' (also 'mistral' without a sliding window) and
'gemma' (v1), grouped-query attention, rope_type default / linear / llama3.
Not supported (a clear error at config time): attention or MLP biases
(Qwen2-style), sliding windows, bidirectional Gemma, other rope types.

`DecoderBackbone(tokens, mask)` returns the final-norm hidden states
float32[B, L, hidden] (transformers' `last_hidden_state`); `pool` turns them
into one vector per row. No LM head: the router puts its own head on top.

Parameters are float32 nnx.Params named by logical axes ('vocab', 'embed',
'mlp', 'heads', 'kv', or None for the kv-head axis, which need not divide the
tensor mesh axis); computation runs in `dtype` with softmax and RMSNorm
statistics in float32. Dropout (on each residual branch) follows model.py's
convention: no RNG state in the module, pass `rngs=nnx.Rngs(dropout=key)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entrorouter_jax.backbones.weights import build_loaded, read_state, weight_files
from entrorouter_jax.data import tokenizer as tokenizer_lib
from entrorouter_jax.layers import MASK_VALUE, erf_gelu, param, pool as _pool

_SUPPORTED_TYPES = ('llama', 'mistral', 'gemma')
_ROPE_TYPES = ('default', 'linear', 'llama3')
# config.json activation name -> ours ('gelu' in Gemma configs means the tanh form).
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_pytorch_tanh',
                'gelu_new': 'gelu_pytorch_tanh', 'gelu': 'gelu'}
_embed_init = nnx.initializers.normal(stddev=0.02)


# ---------------------------------------------------------------------------
# Config


def _rope_settings(raw: dict, path, bad) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from a config.json dict `raw`; `bad(key, expected)`
  makes the error for an unsupported value."""
  # RoPE: transformers >= 5 writes `rope_parameters` (with rope_theta inside);
  # older files have top-level `rope_theta` and `rope_scaling` (type or rope_type).
  if not isinstance(raw.get('rope_scaling') or {}, dict):
    raise bad('rope_scaling', 'null or a dict')
  rope = dict(raw.get('rope_scaling') or {})
  rope_params = raw.get('rope_parameters') or {}
  if not isinstance(rope_params, dict) or any(isinstance(v, dict) for v in rope_params.values()):
    raise bad('rope_parameters', 'one flat dict (per-layer-type RoPE is not supported)')
  rope.update(rope_params)
  rope_theta = float(rope.pop('rope_theta', None) or raw.get('rope_theta') or 10000.0)
  rope_type = rope.pop('rope_type', None) or rope.pop('type', None) or 'default'
  rope.pop('type', None)
  if rope_type not in _ROPE_TYPES:
    key = 'rope_parameters' if raw.get('rope_parameters') else 'rope_scaling'
    raise bad(key, f'null or a rope_type in {_ROPE_TYPES}')
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    raise bad('rope_parameters', 'partial_rotary_factor 1.0')
  rope.pop('partial_rotary_factor', None)
  rope_scaling = None
  if rope_type != 'default':
    rope.setdefault('original_max_position_embeddings',
                    raw.get('max_position_embeddings'))
    required = {'linear': ('factor',),
                'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                           'original_max_position_embeddings')}[rope_type]
    missing = [k for k in required if rope.get(k) is None]
    if missing:
      raise ValueError(f'{path}: rope_type {rope_type!r} needs {missing} in its rope parameters')
    rope_scaling = tuple(sorted({k: rope[k] for k in required}.items())) + (
        ('rope_type', rope_type),)
  return rope_theta, rope_scaling


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The architecture of a Llama / Gemma decoder, as read from config.json."""

  model_type: str          # 'llama' | 'mistral' | 'gemma'
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float
  rope_theta: float
  hidden_act: str          # 'silu' | 'gelu_pytorch_tanh' | 'gelu'
  tie_word_embeddings: bool
  max_positions: int
  # RoPE frequency scaling as sorted (key, value) pairs (hashable), e.g.
  # (('factor', 8.0), ..., ('rope_type', 'llama3')); None = plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None

  @property
  def is_gemma(self) -> bool:
    return self.model_type == 'gemma'

  @classmethod
  def from_dir(cls, model_dir: str | os.PathLike) -> 'DecoderConfig':
    """Reads model_dir/config.json; raises on anything this module cannot run."""
    path = pathlib.Path(model_dir) / 'config.json'
    if not path.is_file():
      raise FileNotFoundError(f'{path} does not exist; expected a Hugging Face model '
                              'directory (config.json + model.safetensors)')
    raw = json.loads(path.read_text())

    def bad(key, expected):
      return ValueError(f'{path}: {key}={raw.get(key)!r} is not supported; expected {expected}')

    def need(key):
      if raw.get(key) is None:
        raise ValueError(f'{path}: required key {key!r} is missing')
      return raw[key]

    model_type = raw.get('model_type')
    if model_type not in _SUPPORTED_TYPES:
      raise bad('model_type', f'one of {_SUPPORTED_TYPES} (Llama-family or Gemma v1)')
    for key in ('attention_bias', 'mlp_bias'):
      if raw.get(key):
        raise bad(key, 'false (bias-free projections)')
    if model_type == 'mistral' and raw.get('sliding_window') is not None:
      raise bad('sliding_window', 'null (sliding-window attention is not implemented)')
    if raw.get('use_bidirectional_attention'):
      raise bad('use_bidirectional_attention', 'null/false (causal attention)')

    rope_theta, rope_scaling = _rope_settings(raw, path, bad)

    hidden, heads = int(need('hidden_size')), int(need('num_attention_heads'))
    kv_heads = int(raw.get('num_key_value_heads') or heads)
    head_dim = int(raw.get('head_dim') or hidden // heads)
    if heads % kv_heads:
      raise ValueError(f'{path}: num_attention_heads={heads} is not a multiple of '
                       f'num_key_value_heads={kv_heads}')
    if head_dim % 2:
      raise ValueError(f'{path}: head_dim={head_dim} must be even for rotary embeddings')

    act_key = 'hidden_activation' if raw.get('hidden_activation') else 'hidden_act'
    act = raw.get(act_key) or ('gelu_pytorch_tanh' if model_type == 'gemma' else 'silu')
    if model_type == 'gemma' and act == 'gelu':
      # Gemma v1 shipped hidden_act='gelu' but was trained with the tanh form,
      # which transformers runs instead (`hidden_activation`, when set, wins).
      act = 'gelu_pytorch_tanh'
    if act not in _ACTIVATIONS:
      raise bad(act_key, f'one of {sorted(_ACTIVATIONS)}')

    return cls(
        model_type=model_type,
        vocab_size=int(need('vocab_size')),
        hidden_size=hidden,
        num_layers=int(need('num_hidden_layers')),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(need('intermediate_size')),
        rms_norm_eps=float(raw.get('rms_norm_eps') or 1e-6),
        rope_theta=rope_theta,
        hidden_act=_ACTIVATIONS[act],
        tie_word_embeddings=bool(raw.get('tie_word_embeddings', model_type == 'gemma')),
        max_positions=int(raw.get('max_position_embeddings')
                          or (8192 if model_type == 'gemma' else 2048)),
        rope_scaling=rope_scaling)


def _inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """RoPE inverse frequencies float32[head_dim / 2], as transformers computes them."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = dict(cfg.rope_scaling or ())
  if scaling.get('rope_type') == 'linear':
    inv_freq = inv_freq / scaling['factor']
  elif scaling.get('rope_type') == 'llama3':
    factor, old_len = scaling['factor'], scaling['original_max_position_embeddings']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


# ---------------------------------------------------------------------------
# Model


def _rope(x, inv_freq):
  """Rotary embedding on x[B, L, H, D] at positions 0..L-1 (rotate_half form)."""
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq  # [L, D/2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _activation(name):
  if name == 'silu':
    return jax.nn.silu
  if name == 'gelu_pytorch_tanh':
    return lambda x: jax.nn.gelu(x, approximate=True)
  return erf_gelu


class RMSNorm(nnx.Module):
  """RMSNorm with float32 statistics: Llama x * w, Gemma x * (1 + w) (as HF)."""

  def __init__(self, dim, eps, *, gemma, rngs):
    self.eps, self.gemma = eps, gemma
    init = nnx.initializers.zeros if gemma else nnx.initializers.ones
    self.scale = param(rngs, init, (dim,), ('embed',))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.gemma:  # Gemma scales in float32, then casts (HF PR 29402)
      return (xf * (1.0 + self.scale[...])).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class DecoderAttention(nnx.Module):
  """Causal grouped-query self-attention with rotary positions, no biases."""

  def __init__(self, cfg: DecoderConfig, *, dtype, rngs):
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg, self.dtype = cfg, dtype
    qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.wq = param(rngs, qkv_init, (e, h, d), ('embed', 'heads', 'kv'))
    # The kv-head axis stays unsharded: kv heads rarely divide the tensor axis.
    self.wk = param(rngs, qkv_init, (e, kv, d), ('embed', None, 'kv'))
    self.wv = param(rngs, qkv_init, (e, kv, d), ('embed', None, 'kv'))
    out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.wo = param(rngs, out_init, (h, d, e), ('heads', 'kv', 'embed'))

  def __call__(self, x, mask):
    """x[B, L, E] (compute dtype), mask bool[B, L] (True = real key) -> [B, L, E]."""
    dt, cfg = self.dtype, self.cfg
    q = jnp.einsum('ble,ehd->blhd', x, self.wq[...].astype(dt))
    k = jnp.einsum('ble,ekd->blkd', x, self.wk[...].astype(dt))
    v = jnp.einsum('ble,ekd->blkd', x, self.wv[...].astype(dt))
    inv_freq = jnp.asarray(_inv_freq(cfg))
    q, k = _rope(q, inv_freq), _rope(k, inv_freq)
    groups = cfg.num_heads // cfg.num_kv_heads
    if groups > 1:  # query head h reads kv head h // groups (HF's repeat_kv)
      k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    # Scores and softmax in float32.
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim ** -0.5)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & mask[:, None, None, :]
    scores = jnp.where(allowed, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return jnp.einsum('blhd,hde->ble', out, self.wo[...].astype(dt))


class GatedMlp(nnx.Module):
  """down(act(x @ gate) * (x @ up)), no biases."""

  def __init__(self, cfg: DecoderConfig, *, dtype, rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    self.act, self.dtype = cfg.hidden_act, dtype
    init = nnx.initializers.lecun_normal()
    self.gate = param(rngs, init, (e, m), ('embed', 'mlp'))
    self.up = param(rngs, init, (e, m), ('embed', 'mlp'))
    self.down = param(rngs, init, (m, e), ('mlp', 'embed'))

  def __call__(self, x):
    dt = self.dtype
    hidden = _activation(self.act)(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return hidden @ self.down[...].astype(dt)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, dropout, dtype, rngs):
    gemma = cfg.is_gemma
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=gemma, rngs=rngs)
    self.attn = DecoderAttention(cfg, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=gemma, rngs=rngs)
    self.mlp = GatedMlp(cfg, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, mask, deterministic, rngs):
    x = x + self.drop(self.attn(self.attn_norm(x), mask), deterministic=deterministic, rngs=rngs)
    return x + self.drop(self.mlp(self.mlp_norm(x)), deterministic=deterministic, rngs=rngs)


class DecoderBackbone(nnx.Module):
  """Token embeddings -> decoder layers -> final RMSNorm (no LM head)."""

  def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, dropout: float = 0.0,
               rngs: nnx.Rngs):
    self.cfg, self.dtype, self.dropout = cfg, dtype, float(dropout)
    self.hidden_size = cfg.hidden_size
    # Eager sharding (flax default) needs a mesh; without one, only record names.
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    with nnx.use_eager_sharding(eager):
      self.embed = param(rngs, _embed_init, (cfg.vocab_size, cfg.hidden_size),
                          ('vocab', 'embed'))
      self.layers = nnx.List([DecoderLayer(cfg, dropout=dropout, dtype=dtype, rngs=rngs)
                              for _ in range(cfg.num_layers)])
      self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=cfg.is_gemma,
                                rngs=rngs)

  def __call__(self, tokens, mask, *, deterministic: bool = True, rngs=None) -> jax.Array:
    """tokens int32[B, L], mask bool[B, L] (True = real; padding on the right).

    Returns float32[B, L, hidden]: the final-norm hidden states. With
    deterministic=False and dropout > 0 pass rngs=nnx.Rngs(dropout=key) (or a key).
    """
    if tokens.ndim != 2 or tokens.shape != mask.shape:
      raise ValueError(f'tokens {tokens.shape} / mask {mask.shape} must both be [B, L]')
    if tokens.shape[1] > self.cfg.max_positions:
      raise ValueError(f'sequence length {tokens.shape[1]} > max_position_embeddings '
                       f'{self.cfg.max_positions}')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    elif rngs is not None and not isinstance(rngs, nnx.Rngs):
      raise TypeError(f'rngs must be an nnx.Rngs or a PRNG key, got {type(rngs)}')
    if not deterministic and self.dropout > 0 and rngs is None:
      raise ValueError('deterministic=False needs rngs=nnx.Rngs(dropout=key) for dropout')
    mask = mask.astype(bool)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)  # [B, L, E]
    if self.cfg.is_gemma:  # the normalizer is rounded to the compute dtype, as in HF
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    for layer in self.layers:
      x = layer(x, mask, deterministic, rngs)
    return self.final_norm(x).astype(jnp.float32)


def pool(hidden, mask, how: str) -> jax.Array:
  """hidden[B, L, H], mask bool[B, L] -> float32[B, H] by 'last' (the last real
  token; padding on the right) or 'mean' (see entrorouter_jax.layers.pool)."""
  if how not in ('last', 'mean'):
    raise ValueError(f"pool how={how!r}; expected 'last' or 'mean'")
  return _pool(hidden, mask, how)


# ---------------------------------------------------------------------------
# Weights


def _layout(cfg: DecoderConfig):
  """(HF name without prefix, our pure-dict path, HF shape, HF -> ours) per tensor."""
  e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  m = cfg.intermediate_size
  same = lambda w: w
  # torch Linear weights are [out, in]; ours are [in, ...out].
  in_heads = lambda n: (lambda w: np.ascontiguousarray(w.T).reshape(e, n, d))
  out_proj = lambda w: np.ascontiguousarray(w.T).reshape(h, d, e)
  transpose = lambda w: np.ascontiguousarray(w.T)
  rows = [('embed_tokens.weight', ('embed',), (cfg.vocab_size, e), same),
          ('norm.weight', ('final_norm', 'scale'), (e,), same)]
  for i in range(cfg.num_layers):
    hf = f'layers.{i}.'
    rows += [
        (hf + 'input_layernorm.weight', ('layers', i, 'attn_norm', 'scale'), (e,), same),
        (hf + 'self_attn.q_proj.weight', ('layers', i, 'attn', 'wq'), (h * d, e), in_heads(h)),
        (hf + 'self_attn.k_proj.weight', ('layers', i, 'attn', 'wk'), (kv * d, e), in_heads(kv)),
        (hf + 'self_attn.v_proj.weight', ('layers', i, 'attn', 'wv'), (kv * d, e), in_heads(kv)),
        (hf + 'self_attn.o_proj.weight', ('layers', i, 'attn', 'wo'), (e, h * d), out_proj),
        (hf + 'post_attention_layernorm.weight', ('layers', i, 'mlp_norm', 'scale'), (e,), same),
        (hf + 'mlp.gate_proj.weight', ('layers', i, 'mlp', 'gate'), (m, e), transpose),
        (hf + 'mlp.up_proj.weight', ('layers', i, 'mlp', 'up'), (m, e), transpose),
        (hf + 'mlp.down_proj.weight', ('layers', i, 'mlp', 'down'), (e, m), transpose),
    ]
  return rows


def load_state(model_dir: str | os.PathLike, cfg: DecoderConfig) -> dict:
  """The checkpoint as a nested dict of float32 NumPy arrays.

  Exactly the structure of nnx.to_pure_dict(nnx.state(DecoderBackbone(cfg), nnx.Param)),
  for nnx.replace_by_pure_dict. Accepts 'model.'-prefixed (…ForCausalLM) and
  bare (…Model) names; ignores lm_head.* and anything outside the backbone.
  """
  model_dir = pathlib.Path(model_dir)
  files, listing = weight_files(model_dir)
  # The backbone's prefix: whatever precedes its (unique) embed_tokens.weight.
  embeds = sorted(n for n in files if n == 'embed_tokens.weight' or
                  n.endswith('.embed_tokens.weight'))
  if len(embeds) != 1:
    raise ValueError(f'{listing}: expected exactly one tensor named [prefix.]'
                     f'embed_tokens.weight, found {embeds or "none"}')
  prefix = embeds[0][:-len('embed_tokens.weight')]

  rows = _layout(cfg)
  for row in rows:
    if prefix + row[0] not in files:
      raise ValueError(f'{listing}: missing tensor {prefix + row[0]!r} (needed by the '
                       f'{cfg.model_type} decoder with {cfg.num_layers} layers)')

  # Anything else under the prefix would be silently dropped weights (e.g. biases).
  expected = {prefix + row[0] for row in rows}
  unexpected = sorted(n for n in files if n.startswith(prefix) and n not in expected
                      and not n.endswith('rotary_emb.inv_freq') and not n.startswith('lm_head.'))
  if unexpected:
    raise ValueError(f'{listing}: unexpected tensors {unexpected[:5]}'
                     f'{" ..." if len(unexpected) > 5 else ""} for a {cfg.model_type} decoder '
                     f'with {cfg.num_layers} layers (biases or extra layers are not supported)')
  mismatch = lambda name, file, found, shape: (
      f'{file}: tensor {name!r} has shape {found}; expected {shape} from config.json')
  return read_state(files, [(ours, prefix + name, shape, convert)
                            for name, ours, shape, convert in rows], mismatch)


def load_decoder(model_dir: str | os.PathLike, *, dtype=jnp.float32,
                 dropout: float = 0.0) -> tuple[DecoderBackbone, DecoderConfig]:
  """(DecoderBackbone with the checkpoint's weights, its config) from a HF directory."""
  cfg = DecoderConfig.from_dir(model_dir)
  pure = load_state(model_dir, cfg)
  model = build_loaded(
      lambda: DecoderBackbone(cfg, dtype=dtype, dropout=dropout, rngs=nnx.Rngs(0)),
      pure, 'decoder')
  return model, cfg


# ---------------------------------------------------------------------------
# Tokenizer


class SentencePieceTokenizer(tokenizer_lib.Tokenizer):
  """The model's own SentencePiece tokenizer, with data/tokenizer.Tokenizer's interface.

  Prepends BOS (as Llama / Gemma expect); truncation keeps BOS and cuts the
  content ('right' keeps the start, 'left' the end). Pads on the right with
  the model's pad id (0 when it has none); picklable (keeps the proto bytes).
  """

  def __init__(self, model_proto: bytes):
    super().__init__(model_proto)
    self.bos_id = self._sp.bos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
    self.prefix = [self.bos_id] if self.bos_id >= 0 else []

  @classmethod
  def load(cls, model_dir: str | os.PathLike) -> 'SentencePieceTokenizer':
    """Reads model_dir/tokenizer.model (or `model_dir` itself if it is a file)."""
    path = pathlib.Path(model_dir)
    if not path.is_file():
      path = path / 'tokenizer.model'
    if not path.is_file():
      raise FileNotFoundError(f'{path} does not exist; expected the SentencePiece '
                              'tokenizer.model of a Llama / Gemma model directory')
    return cls(path.read_bytes())
