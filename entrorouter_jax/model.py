"""Router policy network f_theta in flax NNX.

Maps a query to one output per candidate LLM in the pool, `float32[B, K]`, by
one of two networks (`build` / `RouterModel(model_cfg, ...)` picks by
model.backbone):
  EmbeddingsRouter  from the query's frozen embedding ('embeddings'): M member
                    MLPs, `float32[M, B, K]` before they are averaged;
  TokenRouter       from its tokens through a small pre-LN transformer encoder
                    ('scratch', built here from Attention / Mlp / Block) or a
                    pretrained backbone, and a K-way head, optionally
                    conditioned on the cost weight lambda.
Both derive from `Router` (settings, call convention, the utility head's
temperature). How the outputs become the policy (softmax head or utility head)
is entrorouter_jax/policy.py's business.

Sharding: every parameter carries logical axis names (stored by
`nnx.with_partitioning` as the Variable metadata key `out_sharding`, readable as
`param.out_sharding`; `nnx.get_partition_spec(nnx.state(model, nnx.Param))`
gives a PartitionSpec pytree in logical names, or in mesh axes when called
inside `flax.linen.logical_axis_rules(rules)`). Names used: 'vocab', 'embed',
'mlp', 'heads', 'kv' (per-head dim), 'position', 'models' (the K outputs),
'cond' (lambda features) and 'members' (the embeddings backbone's members);
'batch' / 'length' are left for activations.
flax 0.12 shards annotated Variables eagerly at creation, which needs a mesh;
the model therefore only does so when an (abstract) mesh is active and
otherwise just records the names, so it builds on a plain CPU as well.

Dropout rng convention: the model keeps no RNG state (its state is parameters
only, so checkpointing / sharding / plain `jax.jit` never silently reuse a
stale dropout key). With `deterministic=False` and dropout > 0 pass
`rngs=nnx.Rngs(dropout=key)` (or a bare `jax.random.key`, wrapped the same
way); every dropout site draws its own subkey from that stream.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from entrorouter_jax.layers import attention, param

SIZES = {
    'tiny': dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=256),
    'small': dict(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024),
    'base': dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072),
    'large': dict(num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096),
}

# Lambda features: 2 polynomial terms + sin/cos at _NUM_FREQS frequencies.
_NUM_FREQS = 8
COND_DIM = 2 + 2 * _NUM_FREQS
_LAMBDA_EPS = 1e-3  # log(lambda + eps): lambda == 0 stays finite.

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_dense_init = nnx.initializers.lecun_normal()
_embed_init = nnx.initializers.normal(stddev=0.02)


HEADS = ('utility', 'softmax')
DEFAULT_MEMBERS = 5


def num_members(model_cfg) -> int:
  """model.members, with 0 meaning 5 for the embeddings backbone and 1 otherwise."""
  from entrorouter_jax import backbones
  kind = backbones.kind_of(model_cfg)
  members = int(model_cfg.get('members', 0) or 0)
  if members < 0:
    raise ValueError(f'model.members={members}; expected >= 0 (0 = automatic)')
  if members == 0:
    return DEFAULT_MEMBERS if kind == 'embeddings' else 1
  if members > 1 and kind != 'embeddings':
    raise ValueError(f'model.members={members} needs model.backbone=embeddings (members are '
                     f'independent MLPs on frozen embeddings); model.backbone={kind!r} trains one')
  return members


def model_dims(model_cfg) -> dict:
  """SIZES[model_cfg.size], with any of its entries overridden where cfg > 0."""
  size = model_cfg.size
  if size not in SIZES:
    raise ValueError(f'unknown model size {size!r}; valid sizes: {sorted(SIZES)}')
  dims = dict(SIZES[size])
  for key in dims:
    value = int(model_cfg.get(key, 0) or 0)
    if value > 0:
      dims[key] = value
  if dims['d_model'] % dims['num_heads']:
    raise ValueError(f"d_model={dims['d_model']} is not divisible by "
                     f"num_heads={dims['num_heads']}")
  return dims


def _linear(din, dout, axes, dtype, rngs, use_bias=True):
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(_dense_init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[-1:]), rngs=rngs)


def _layer_norm(dim, dtype, rngs):
  # flax computes the statistics in float32 even for a bfloat16 dtype.
  return nnx.LayerNorm(
      dim, dtype=dtype, param_dtype=jnp.float32,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('embed',)), rngs=rngs)


def _rotary(x, positions):
  """Rotary embedding (half-split form) on x[B, L, H, D] at positions int[L]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [L, D/2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention, written out so every weight's axes are explicit."""

  def __init__(self, d_model, num_heads, *, rotary, dtype, rngs):
    head_dim = d_model // num_heads
    if rotary and head_dim % 2:
      raise ValueError(f'rotary positions need an even head dim, got {head_dim}')
    self.rotary, self.dtype = rotary, dtype
    qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    shape, axes = (d_model, num_heads, head_dim), ('embed', 'heads', 'kv')
    self.wq = param(rngs, qkv_init, shape, axes)
    self.wk = param(rngs, qkv_init, shape, axes)
    self.wv = param(rngs, qkv_init, shape, axes)
    zeros = nnx.initializers.zeros
    self.bq = param(rngs, zeros, shape[1:], axes[1:])
    self.bk = param(rngs, zeros, shape[1:], axes[1:])
    self.bv = param(rngs, zeros, shape[1:], axes[1:])
    out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.wo = param(rngs, out_init, (num_heads, head_dim, d_model), ('heads', 'kv', 'embed'))
    self.bo = param(rngs, zeros, (d_model,), ('embed',))

  def __call__(self, x, mask):
    """x[B, L, E] (compute dtype), mask bool[B, L] (True = real key) -> [B, L, E]."""
    dt = self.dtype
    (b, l, e), (_, h, d) = x.shape, self.wq.shape
    rows = x.reshape(b * l, e)     # 2-D matmuls, as in Mlp
    proj = lambda w, bias: ((rows @ w[...].astype(dt).reshape(e, h * d)).reshape(b, l, h, d)
                            + bias[...].astype(dt))
    q, k, v = proj(self.wq, self.bq), proj(self.wk, self.bk), proj(self.wv, self.bv)
    if self.rotary:
      positions = jnp.arange(x.shape[1])
      q, k = _rotary(q, positions), _rotary(k, positions)
    out = attention(q, k, v, mask, 1.0 / math.sqrt(d))
    out = out.reshape(b * l, h * d) @ self.wo[...].astype(dt).reshape(h * d, e)
    return out.reshape(b, l, e) + self.bo[...].astype(dt)


class Mlp(nnx.Module):
  """GELU MLP (with biases) or SwiGLU (bias-free, as in LLaMA-style blocks)."""

  def __init__(self, d_model, mlp_dim, *, kind, dtype, rngs):
    self.kind = kind
    swiglu = kind == 'swiglu'
    self.up = _linear(d_model, mlp_dim, ('embed', 'mlp'), dtype, rngs, use_bias=not swiglu)
    self.gate = (_linear(d_model, mlp_dim, ('embed', 'mlp'), dtype, rngs, use_bias=False)
                 if swiglu else None)
    self.down = _linear(mlp_dim, d_model, ('mlp', 'embed'), dtype, rngs, use_bias=not swiglu)

  def __call__(self, x):
    # As 2-D matmuls over rows = batch x positions: the kernels' gradients then
    # contract one axis; XLA's CPU backend runs the same dot contracting
    # (batch, position) far slower (benchmarks/RESULTS.md, train steps).
    rows = x.reshape(-1, x.shape[-1])
    if self.kind == 'swiglu':
      out = self.down(jax.nn.silu(self.gate(rows)) * self.up(rows))
    else:
      out = self.down(jax.nn.gelu(self.up(rows)))
    return out.reshape(x.shape[:-1] + out.shape[-1:])


class Block(nnx.Module):
  """Pre-LN encoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, dims, *, rotary, mlp, dropout, dtype, rngs):
    d = dims['d_model']
    self.ln1 = _layer_norm(d, dtype, rngs)
    self.attn = Attention(d, dims['num_heads'], rotary=rotary, dtype=dtype, rngs=rngs)
    self.ln2 = _layer_norm(d, dtype, rngs)
    self.mlp = Mlp(d, dims['mlp_dim'], kind=mlp, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, mask, deterministic, rngs):
    x = x + self.drop(self.attn(self.ln1(x), mask), deterministic=deterministic, rngs=rngs)
    return x + self.drop(self.mlp(self.ln2(x)), deterministic=deterministic, rngs=rngs)


# MemberMlp: batches of fewer rows than this multiply per member (see __call__).
_FEW_ROWS = 128


class MemberMlp(nnx.Module):
  """M independent one-hidden-layer GELU MLPs on one input: [B, D] -> [M, B, K].

  Initialised like the MLP baseline: first layer LeCun normal, second layer
  scaled down to std 0.1 / sqrt(hidden), output bias 0 (training sets it to
  each model's base-rate logit).
  """

  def __init__(self, din: int, hidden: int, dout: int, members: int, *, dropout: float,
               rngs: nnx.Rngs):
    first = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=1, out_axis=2,
                                              batch_axis=(0,))
    second = nnx.initializers.variance_scaling(0.01, 'fan_in', 'normal', in_axis=1, out_axis=2,
                                               batch_axis=(0,))
    zeros = nnx.initializers.zeros
    self.w1 = param(rngs, first, (members, din, hidden), ('members', 'embed', 'mlp'))
    self.b1 = param(rngs, zeros, (members, hidden), ('members', 'mlp'))
    self.w2 = param(rngs, second, (members, hidden, dout), ('members', 'mlp', 'models'))
    self.b2 = param(rngs, zeros, (members, dout), ('members', 'models'))
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, deterministic, rngs):
    w1 = self.w1[...]
    if x.shape[0] < _FEW_ROWS:
      # A batched product over the members with x repeated per member. For few
      # rows (routing) it reads w1 in place; the unbatched einsum below has XLA
      # copy w1 to [members * hidden, din] first, which costs more than the
      # product itself. For many rows that copy is the cheaper plan.
      h = jnp.einsum('mbd,mdh->mbh', jnp.broadcast_to(x, (w1.shape[0],) + x.shape), w1)
    else:
      h = jnp.einsum('bd,mdh->mbh', x, w1)
    h = jax.nn.gelu(h + self.b1[...][:, None])
    h = self.drop(h, deterministic=deterministic, rngs=rngs)
    return jnp.einsum('mbh,mhk->mbk', h, self.w2[...]) + self.b2[...][:, None]


class Router(nnx.Module):
  """What the two routers share: the head kind and its temperature, the members'
  count, the compute dtype, dropout / input noise and the call convention.

  `__call__` returns the outputs averaged over the members (or per member); a
  subclass computes them per member in `_outputs`.
  """

  def _setup(self, model_cfg, kind: str, rngs: nnx.Rngs) -> None:
    """Checks the settings both routers read and keeps them; the utility head's
    log-temperature is created here (call under the eager-sharding context)."""
    from entrorouter_jax import backbones
    self.kind = kind
    head = model_cfg.get('head', 'softmax')
    if head not in HEADS:
      raise ValueError(f'model.head={head!r}; expected one of {HEADS}')
    self.num_members = num_members(model_cfg)
    dtype_name = model_cfg.get('dtype', 'float32')
    positions = model_cfg.get('positions', 'learned')
    mlp = model_cfg.get('mlp', 'gelu')
    pooling = model_cfg.get('pooling', 'mean')
    for name, value, valid in [('dtype', dtype_name, tuple(_DTYPES)),
                               ('positions', positions, ('learned', 'rotary')),
                               ('mlp', mlp, ('gelu', 'swiglu')),
                               ('pooling', pooling, backbones.POOLINGS[kind])]:
      if value not in valid:
        raise ValueError(f'model.{name}={value!r}; valid: {valid}'
                         + (f' (model.backbone={kind!r})' if name == 'pooling' else ''))
    self.dtype = _DTYPES[dtype_name]
    self.positions, self.pooling = positions, pooling
    self.lambda_conditioned = bool(model_cfg.get('lambda_conditioned', False))
    self.freeze_backbone = (bool(model_cfg.get('freeze_backbone', False))
                            and kind in backbones.PRETRAINED)
    self.dropout_rate = float(model_cfg.get('dropout', 0.0))
    self.input_noise = float(model_cfg.get('input_noise', 0.0))
    if head == 'utility':
      # log T of pi = softmax((s - lambda c_bar) / T), learned (the entropy
      # controller acts on it in RL).
      t0 = float(model_cfg.get('temperature', 0.1))
      if not t0 > 0:
        raise ValueError(f'model.temperature={t0}; expected > 0')
      self.log_temperature = nnx.Param(
          nnx.with_partitioning(nnx.initializers.constant(math.log(t0)), ())(
              rngs.params(), (), jnp.float32))

  def __call__(self, tokens, token_mask, cost_weight=None, *, features=None,
               deterministic: bool = True, rngs=None, members: bool = False):
    """tokens int32[B, L], token_mask bool[B, L], cost_weight float32[B] | None;
    features float32[B, D] for the embeddings backbone (tokens are then unused).

    Returns the outputs f(x) float32[B, num_models], averaged over the members,
    or float32[M, B, num_models] per member with `members=True` (M = 1 for token
    backbones). With deterministic=False (and dropout or input noise > 0) `rngs`
    must be an nnx.Rngs with a 'dropout' (or default) stream, or a jax PRNG key.
    """
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)  # one stream -> a fresh subkey per dropout site
    elif rngs is not None and not isinstance(rngs, nnx.Rngs):
      raise TypeError(f'rngs must be an nnx.Rngs or a PRNG key, got {type(rngs)}')
    if not deterministic and rngs is None and (self.dropout_rate > 0 or self.input_noise > 0):
      raise ValueError('deterministic=False needs rngs=nnx.Rngs(dropout=key) for dropout '
                       '(and input noise)')
    out = self._outputs(tokens, token_mask, cost_weight, features, deterministic, rngs)
    return out if members else out.mean(axis=0)

  def _outputs(self, tokens, token_mask, cost_weight, features, deterministic, rngs):
    """-> float32[M, B, K]."""
    raise NotImplementedError

  def temperature(self):
    """T of the utility head (a float32 scalar)."""
    return jnp.exp(self.log_temperature[...])


def _eager_sharding() -> bool:
  """Eager sharding (flax default) needs a mesh; without one, only record names."""
  return nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty


class EmbeddingsRouter(Router):
  """model.backbone='embeddings': M member MLPs on Stage 0's frozen query
  embeddings (`features`), float32[M, B, K]; it reads no tokens."""

  def __init__(self, model_cfg, *, num_models: int, feature_dim: int | None, rngs: nnx.Rngs):
    with nnx.use_eager_sharding(_eager_sharding()):
      self._setup(model_cfg, 'embeddings', rngs)
      if feature_dim is None:
        raise ValueError('model.backbone=embeddings needs the feature dimension of '
                         'anchor.space (feature_dim)')
      if self.lambda_conditioned:
        raise ValueError('model.lambda_conditioned needs a token backbone; with '
                         'model.backbone=embeddings use model.head=utility, which takes '
                         'lambda exactly')
      self.backbone = None
      self.members = MemberMlp(int(feature_dim), int(model_cfg.get('hidden', 256)),
                               num_models, self.num_members, dropout=self.dropout_rate,
                               rngs=rngs)

  def _outputs(self, tokens, token_mask, cost_weight, features, deterministic, rngs):
    del tokens, token_mask, cost_weight   # lambda enters through the utility head
    if features is None or features.ndim != 2:
      raise ValueError('model.backbone=embeddings needs features float32[B, D]')
    x = features.astype(jnp.float32)
    if not deterministic and self.input_noise > 0:
      x = x + self.input_noise * jax.random.normal(rngs.dropout(), x.shape, x.dtype)
    return self.members(x, deterministic, rngs).astype(jnp.float32)


class TokenRouter(Router):
  """Encoder -> pooled query vector (+ lambda conditioning) -> K logits.

  The encoder is this module's own (model.backbone='scratch') or a pretrained
  one from entrorouter_jax.backbones ('hf_encoder', 'hf_decoder'), kept under
  `self.backbone` so that its parameters sit apart ('backbone/...') for
  loading, freezing and their own learning rate.
  """

  def __init__(self, model_cfg, *, vocab_size: int, max_len: int, num_models: int,
               rngs: nnx.Rngs):
    from entrorouter_jax import backbones
    kind = backbones.kind_of(model_cfg)
    if kind == 'embeddings':
      raise ValueError('model.backbone=embeddings reads no tokens: build an EmbeddingsRouter')
    self.max_len = max_len
    with nnx.use_eager_sharding(_eager_sharding()):
      self._setup(model_cfg, kind, rngs)
      if kind == 'scratch':
        self.backbone = None
        dims = model_dims(model_cfg)
        self._build_encoder(model_cfg, dims, vocab_size, max_len, self.dropout_rate, rngs)
        d = dims['d_model']
      else:
        self.backbone = backbones.build(model_cfg, dtype=self.dtype, dropout=self.dropout_rate,
                                        rngs=rngs)
        limit = backbones.backbone_config(model_cfg).max_positions
        if max_len > limit:
          raise ValueError(f'data.max_len={max_len} exceeds the backbone\'s {limit} positions '
                           f'({model_cfg.checkpoint})')
        d = self.backbone.hidden_size
      self._build_head(model_cfg, d, num_models, rngs)

  def _build_encoder(self, model_cfg, dims, vocab_size, max_len, dropout, rngs):
    """The scratch encoder: embeddings, pre-LN blocks, final LayerNorm."""
    positions, pooling, d = self.positions, self.pooling, dims['d_model']
    mlp = model_cfg.get('mlp', 'gelu')
    self.token_embed = param(rngs, _embed_init, (vocab_size, d), ('vocab', 'embed'))
    # CLS takes position 0, so the sequence the encoder sees is max_len + 1 long.
    num_positions = max_len + (pooling == 'cls')
    self.pos_embed = (param(rngs, _embed_init, (num_positions, d), ('position', 'embed'))
                      if positions == 'learned' else None)
    self.cls = param(rngs, _embed_init, (d,), ('embed',)) if pooling == 'cls' else None
    self.embed_drop = nnx.Dropout(dropout)
    self.blocks = nnx.List([
        Block(dims, rotary=positions == 'rotary', mlp=mlp,
              dropout=dropout, dtype=self.dtype, rngs=rngs)
        for _ in range(dims['num_layers'])])
    self.final_ln = _layer_norm(d, self.dtype, rngs)

  def _build_head(self, model_cfg, d, num_models, rngs):
    """Lambda conditioning (optional) and the K-way head on the pooled vector."""
    if self.lambda_conditioned:
      # Normalize log(lambda + eps) so [lambda_min, lambda_max] maps to [-1, 1].
      lo = math.log(float(model_cfg.get('lambda_min', 0.0)) + _LAMBDA_EPS)
      hi = math.log(float(model_cfg.get('lambda_max', 1.0)) + _LAMBDA_EPS)
      if not hi > lo:
        raise ValueError('model.lambda_max must exceed model.lambda_min')
      self.log_lambda_range = (lo, hi)
      # Two-layer projection: the features -> d_model offset can be nonlinear.
      self.cond_in = _linear(COND_DIM, d, ('cond', 'mlp'), jnp.float32, rngs)
      self.cond_out = _linear(d, d, ('mlp', 'embed'), jnp.float32, rngs)
    self.head_ln = _layer_norm(d, jnp.float32, rngs)
    self.head = _linear(d, num_models, ('embed', 'models'), jnp.float32, rngs)

  def lambda_features(self, cost_weight):
    """cost_weight float32[B] (>= 0) -> float32[B, COND_DIM].

    t = log(lambda + 1e-3) rescaled so lambda_min -> -1 and lambda_max -> 1 (the
    log makes costs spanning decades equally resolvable; the 1e-3 keeps lambda = 0
    finite). Features: [t, t^2] (a smooth trend that extrapolates sanely outside
    the range) plus sin/cos(k * pi/2 * t), k = 1..8 (resolution within the range;
    the lowest frequency is monotone over [-1, 1]).
    """
    lo, hi = self.log_lambda_range
    u = jnp.log(jnp.asarray(cost_weight, jnp.float32) + _LAMBDA_EPS)
    t = (2.0 * (u - lo) / (hi - lo) - 1.0)[:, None]
    freqs = (math.pi / 2) * jnp.arange(1, _NUM_FREQS + 1, dtype=jnp.float32)
    return jnp.concatenate([t, t * t, jnp.sin(t * freqs), jnp.cos(t * freqs)], axis=-1)

  def _encode(self, tokens, token_mask, deterministic, rngs):
    """-> pooled float32[B, d_model] (after the final LayerNorm)."""
    if tokens.ndim != 2 or tokens.shape != token_mask.shape:
      raise ValueError(f'tokens {tokens.shape} / token_mask {token_mask.shape} must be [B, L]')
    if tokens.shape[1] > self.max_len:
      raise ValueError(f'sequence length {tokens.shape[1]} > max_len {self.max_len}')
    mask = token_mask.astype(bool)
    if self.backbone is not None:
      from entrorouter_jax import backbones
      hidden = self.backbone(tokens, mask, deterministic=deterministic, rngs=rngs)
      pooled = backbones.pool(hidden, mask, self.pooling)
      # Frozen: no gradient flows into the backbone (XLA then skips its backward pass).
      return jax.lax.stop_gradient(pooled) if self.freeze_backbone else pooled
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)  # [B, L, E]
    if self.pooling == 'cls':
      cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)
      mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    if self.pos_embed is not None:
      x = x + self.pos_embed[:x.shape[1]].astype(self.dtype)
    x = self.embed_drop(x, deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x = block(x, mask, deterministic, rngs)
    x = self.final_ln(x).astype(jnp.float32)
    if self.pooling == 'cls':
      return x[:, 0]
    # Masked mean; an all-pad row pools to zeros rather than 0/0.
    weights = mask.astype(jnp.float32)[..., None]
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)

  def embed(self, tokens, token_mask):
    """tokens int32[B, L], token_mask bool[B, L] -> float32[B, d_model].

    The pooled query representation before lambda conditioning and the head
    (deterministic), e.g. for kNN over router embeddings.
    """
    return self._encode(tokens, token_mask, True, None)

  def _outputs(self, tokens, token_mask, cost_weight, features, deterministic, rngs):
    del features
    if self.lambda_conditioned and cost_weight is None:
      raise ValueError('this router is lambda-conditioned: pass cost_weight float32[B]')
    h = self._encode(tokens, token_mask, deterministic, rngs)
    if self.lambda_conditioned:
      cond = self.cond_out(jax.nn.gelu(self.cond_in(self.lambda_features(cost_weight))))
      h = h + cond
    return self.head(self.head_ln(h)).astype(jnp.float32)[None]


def build(model_cfg, *, vocab_size: int, max_len: int, num_models: int, rngs: nnx.Rngs,
          feature_dim: int | None = None) -> Router:
  """The router `model_cfg.backbone` names: an EmbeddingsRouter for 'embeddings'
  (which needs `feature_dim`, the width of anchor.space), else a TokenRouter."""
  from entrorouter_jax import backbones
  if backbones.kind_of(model_cfg) == 'embeddings':
    return EmbeddingsRouter(model_cfg, num_models=num_models, feature_dim=feature_dim,
                            rngs=rngs)
  return TokenRouter(model_cfg, vocab_size=vocab_size, max_len=max_len, num_models=num_models,
                     rngs=rngs)


# The constructor callers use: `RouterModel(model_cfg, ...)` builds whichever router fits.
RouterModel = build
