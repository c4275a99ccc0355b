"""Tests for the router policy network (entrorouter_jax.model)."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from entrorouter_jax import layers, model as model_lib
from entrorouter_jax.model import RouterModel, model_dims

VOCAB, MAX_LEN, K = 97, 16, 5
LOGICAL_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'position', 'models', 'cond'}


def make_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      size='tiny', num_layers=0, d_model=0, num_heads=0, mlp_dim=0, dtype='float32',
      positions='learned', mlp='gelu', pooling='mean', dropout=0.0,
      lambda_conditioned=False, lambda_min=0.0, lambda_max=10.0))
  cfg.update(overrides)
  return cfg


def make_model(seed=0, **overrides):
  return RouterModel(make_cfg(**overrides), vocab_size=VOCAB, max_len=MAX_LEN, num_models=K,
                     rngs=nnx.Rngs(seed))


def make_batch(batch=4, length=10, seed=0):
  """Random tokens with per-row lengths (one row of full length); pads are id 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
  lengths = np.concatenate([[length], rng.integers(1, length, size=batch - 1)])
  mask = np.arange(length)[None, :] < lengths[:, None]
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def params_of(model):
  state = nnx.state(model, nnx.Param)
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _np_attention(q, k, v, mask, scale):
  """NumPy reference: softmax over each query's real keys, [B, L, H, D] in and out."""
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) * scale
  scores = np.where(mask[:, None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, v)


def test_attention_matches_numpy_and_jax_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(3, 6, 2, 4)).astype(np.float32) for _ in range(3))
  mask = np.arange(6)[None, :] < np.array([[6], [3], [1]])
  want = _np_attention(q, k, v, mask, 0.5)
  for fn in (layers.attention, layers.heads_major_attention):
    np.testing.assert_allclose(fn(q, k, v, jnp.asarray(mask), 0.5), want, rtol=1e-5, atol=1e-6)
  # The CPU path's gradients are jax.nn.dot_product_attention's.
  weights = rng.normal(size=q.shape).astype(np.float32)
  loss = lambda fn: lambda *qkv: (fn(*qkv) * weights).sum()
  ours = jax.grad(loss(lambda *a: layers.heads_major_attention(*a, jnp.asarray(mask), 0.5)),
                  argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(
      *a, mask=jnp.asarray(mask)[:, None, None, :], scale=0.5)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_block_matches_numpy_reference():
  """One encoder block (attention and GELU MLP, written as 2-D matmuls over
  rows) against NumPy einsums on its own weights."""
  with nnx.use_eager_sharding(False):
    block = model_lib.Block(dict(d_model=8, num_heads=2, mlp_dim=16), rotary=False,
                            mlp='gelu', dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(1)
  for name in ('bq', 'bk', 'bv', 'bo'):   # non-zero biases, so their placement is checked
    getattr(block.attn, name)[...] = rng.normal(size=getattr(block.attn, name).shape)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.arange(5)[None, :] < np.array([[5], [2]])
  w = {n: np.asarray(getattr(block.attn, n)[...]) for n in
       ('wq', 'wk', 'wv', 'wo', 'bq', 'bk', 'bv', 'bo')}

  def ln(y, mod):
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + mod.epsilon) * np.asarray(mod.scale[...]) + np.asarray(
        mod.bias[...])

  h = ln(x, block.ln1)
  q, k, v = (np.einsum('ble,ehd->blhd', h, w['w' + n]) + w['b' + n] for n in 'qkv')
  att = np.einsum('blhd,hde->ble', _np_attention(q, k, v, mask, 1 / np.sqrt(4)), w['wo'])
  x1 = x + att + w['bo']
  up = ln(x1, block.ln2) @ np.asarray(block.mlp.up.kernel[...]) + np.asarray(
      block.mlp.up.bias[...])
  gelu = np.asarray(jax.nn.gelu(up))
  want = x1 + gelu @ np.asarray(block.mlp.down.kernel[...]) + np.asarray(block.mlp.down.bias[...])
  got = block(jnp.asarray(x), jnp.asarray(mask), True, None)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_model_dims_overrides_and_errors():
  assert model_dims(make_cfg()) == model_lib.SIZES['tiny']
  dims = model_dims(make_cfg(size='base', num_layers=2, mlp_dim=128))
  assert dims == dict(num_layers=2, d_model=768, num_heads=12, mlp_dim=128)
  with pytest.raises(ValueError, match='valid sizes'):
    model_dims(make_cfg(size='huge'))
  with pytest.raises(ValueError, match='divisible'):
    model_dims(make_cfg(d_model=60, num_heads=8))


@pytest.mark.parametrize('pooling,positions,mlp', list(itertools.product(
    ['mean', 'cls'], ['learned', 'rotary'], ['gelu', 'swiglu'])))
def test_output_shapes(pooling, positions, mlp):
  model = make_model(pooling=pooling, positions=positions, mlp=mlp)
  tokens, mask = make_batch(batch=3, length=MAX_LEN)  # full max_len (+1 for CLS)
  logits = model(tokens, mask)
  assert logits.shape == (3, K) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  emb = model.embed(tokens, mask)
  assert emb.shape == (3, 64) and emb.dtype == jnp.float32


def test_too_long_input_is_rejected():
  tokens, mask = make_batch(length=MAX_LEN + 1)
  with pytest.raises(ValueError, match='max_len'):
    make_model()(tokens, mask)


@pytest.mark.parametrize('pooling,positions', [
    ('mean', 'learned'), ('cls', 'learned'), ('mean', 'rotary'), ('cls', 'rotary')])
def test_padding_invariance(pooling, positions):
  model = make_model(pooling=pooling, positions=positions)
  tokens, mask = make_batch(length=10)
  ref = model(tokens, mask)
  # Extra pad columns at the end.
  padded = jnp.pad(tokens, ((0, 0), (0, 5)))
  padded_mask = jnp.pad(mask, ((0, 0), (0, 5)))
  np.testing.assert_allclose(model(padded, padded_mask), ref, atol=1e-5, rtol=1e-5)
  # Garbage ids under the mask.
  garbage = jnp.where(mask, tokens, (tokens * 7 + 3) % VOCAB)
  np.testing.assert_allclose(model(garbage, mask), ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(model.embed(garbage, mask), model.embed(tokens, mask),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('pooling', ['mean', 'cls'])
def test_all_pad_row_is_finite(pooling):
  model = make_model(pooling=pooling)
  tokens, mask = make_batch()
  mask = mask.at[1].set(False)
  assert np.all(np.isfinite(model(tokens, mask)))


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  tokens, mask = make_batch()
  m32 = make_model(seed=3, positions='rotary', mlp='swiglu')
  m16 = make_model(seed=3, positions='rotary', mlp='swiglu', dtype='bfloat16')
  for p32, p16 in zip(params_of(m32), params_of(m16)):  # same init, float32 params
    assert p16[...].dtype == jnp.float32
    np.testing.assert_array_equal(p32[...], p16[...])
  l32, l16 = m32(tokens, mask), m16(tokens, mask)
  assert l16.dtype == jnp.float32
  scale = float(jnp.abs(l32).max())
  np.testing.assert_allclose(l16, l32, atol=0.05 * scale + 0.02)
  assert not np.array_equal(l16, l32)  # really computed in bfloat16


def test_lambda_conditioning():
  model = make_model(lambda_conditioned=True, lambda_max=5.0)
  tokens, mask = make_batch()
  with pytest.raises(ValueError, match='cost_weight'):
    model(tokens, mask)
  lam = lambda v: jnp.full((tokens.shape[0],), v, jnp.float32)
  outs = [model(tokens, mask, lam(v)) for v in (0.0, 0.01, 1.0, 5.0)]
  for out in outs:
    assert out.shape == (tokens.shape[0], K) and np.all(np.isfinite(out))
  for a, b in itertools.combinations(outs, 2):
    assert float(jnp.abs(a - b).max()) > 1e-4
  # Per-row lambdas are applied per row.
  mixed = model(tokens, mask, jnp.array([0.0, 1.0, 0.0, 1.0]))
  np.testing.assert_allclose(mixed[0], outs[0][0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], outs[2][1], atol=1e-5)
  # The embedding is lambda-free.
  assert model.embed(tokens, mask).shape == (tokens.shape[0], 64)


def test_unconditioned_model_has_no_lambda_params():
  model = make_model()
  assert not hasattr(model, 'cond_in')


@pytest.mark.parametrize('overrides', [
    dict(), dict(pooling='cls', positions='rotary', mlp='swiglu', lambda_conditioned=True)])
def test_every_param_has_logical_axes(overrides):
  model = make_model(**overrides)
  params = params_of(model)
  assert params
  used = set()
  for p in params:
    axes = p.out_sharding  # stored by nnx.with_partitioning
    assert isinstance(axes, tuple) and len(axes) == p[...].ndim, (axes, p[...].shape)
    assert set(axes) <= LOGICAL_AXES, axes
    used.update(axes)
  assert {'vocab', 'embed', 'mlp', 'heads', 'kv', 'models'} <= used
  if overrides.get('lambda_conditioned'):
    assert 'cond' in used
  else:
    assert 'position' in used
  specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  assert len(specs) == len(params)
  for spec, p in zip(specs, params):
    assert isinstance(spec, PartitionSpec) and tuple(spec) == p.out_sharding


def test_base_param_count_matches_formula():
  vocab, max_len, num_models = 30522, 512, 11
  cfg = make_cfg(size='base')
  abstract = nnx.eval_shape(lambda: RouterModel(
      cfg, vocab_size=vocab, max_len=max_len, num_models=num_models, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  n, d, m = 12, 768, 3072
  per_layer = (4 * d * d + 4 * d) + (2 * d * m + m + d) + 2 * 2 * d
  expected = vocab * d + max_len * d + n * per_layer + 2 * d + 2 * d + d * num_models + num_models
  assert count == expected
  # The usual "12 d^2 per layer + embeddings" estimate (BERT-base ~ 110M).
  rough = n * 12 * d * d + (vocab + max_len) * d
  assert abs(count - rough) / rough < 0.02
  assert 105e6 < count < 115e6


@pytest.mark.parametrize('overrides', [
    dict(), dict(pooling='cls', positions='rotary', mlp='swiglu', lambda_conditioned=True,
                 dropout=0.1)])
def test_jitted_grads_are_finite(overrides):
  model = make_model(**overrides)
  tokens, mask = make_batch()
  mask = mask.at[2].set(False)  # an all-pad row must not poison the gradients
  labels = jnp.array([0, 1, 2, 4])
  lam = jnp.array([0.0, 0.5, 2.0, 10.0])

  @nnx.jit
  def step(model, tokens, mask, labels, lam, key):
    def loss_fn(model):
      logits = model(tokens, mask, lam, deterministic=False, rngs=nnx.Rngs(dropout=key))
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = step(model, tokens, mask, labels, lam, jax.random.key(0))
  assert np.isfinite(loss)
  grad_leaves = jax.tree.leaves(grads)
  assert len(grad_leaves) == len(params_of(model))
  for g in grad_leaves:
    assert np.all(np.isfinite(g))
  assert sum(float(jnp.abs(g).sum()) > 0 for g in grad_leaves) > 0.9 * len(grad_leaves)


def test_dropout_only_when_not_deterministic():
  model = make_model(dropout=0.3)
  tokens, mask = make_batch()
  ref = model(tokens, mask)
  np.testing.assert_array_equal(model(tokens, mask, deterministic=True), ref)
  # deterministic=True ignores rngs entirely.
  np.testing.assert_array_equal(
      model(tokens, mask, deterministic=True, rngs=nnx.Rngs(dropout=1)), ref)
  key = jax.random.key(7)
  a = model(tokens, mask, deterministic=False, rngs=key)
  b = model(tokens, mask, deterministic=False, rngs=nnx.Rngs(dropout=key))
  c = model(tokens, mask, deterministic=False, rngs=jax.random.key(8))
  assert float(jnp.abs(a - ref).max()) > 1e-4
  np.testing.assert_array_equal(a, b)  # a bare key == Rngs(dropout=key): reproducible
  assert float(jnp.abs(a - c).max()) > 1e-4
  with pytest.raises(ValueError, match='rngs'):
    model(tokens, mask, deterministic=False)
  # No dropout configured: deterministic=False is a no-op and needs no rngs.
  plain = make_model()
  np.testing.assert_array_equal(plain(tokens, mask, deterministic=False), plain(tokens, mask))


def test_erf_gelu_is_the_exact_gelu():
  import math
  import jax.numpy as jnp
  from entrorouter_jax.layers import erf_gelu
  x = np.linspace(-10, 10, 4001).astype(np.float32)
  ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
  got = np.asarray(erf_gelu(jnp.asarray(x)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_width_buckets_waste_at_most_a_third_and_stop_at_the_cap():
  from entrorouter_jax.layers import width_bucket, width_buckets
  assert width_buckets(128) == [8, 16, 24, 32, 48, 64, 96, 128]
  assert width_buckets(100)[-1] == 100 and width_buckets(512)[-3:] == [256, 384, 512]
  for n in range(1, 513):
    w = width_bucket(n, 512)
    assert n <= w <= 512 and (n <= 16 or w <= 1.5 * n), (n, w)
  assert width_bucket(600, 512) == 512


def test_batched_pads_few_rows_to_their_power_of_two_bucket():
  import jax.numpy as jnp
  import ml_collections
  from entrorouter_jax import policy, sharding
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  unit = sharding.batch_divisor(mesh)
  shapes = []

  def forward(params, chunk):
    shapes.append(chunk['x'].shape[0])
    return {'y': chunk['x'] * params}

  assert [policy.bucket(n) for n in (1, 2, 3, 5, 256, 257)] == [1, 2, 4, 8, 256, 512]
  for n, want in ((1, [max(unit, 1)]), (3, [max(unit, 4)]), (600, [512, 512])):
    shapes.clear()
    x = np.arange(n, dtype=np.float32)[:, None]
    out = policy.batched(forward, jnp.float32(2.0), mesh, 512, {'x': x})
    assert shapes == want
    np.testing.assert_array_equal(out['y'], 2 * x)


def test_cpu_compiler_options_are_taken_and_change_no_output():
  """sharding.compiler_options(): XLA:CPU's YNNPACK fusions for dots only. This
  jaxlib takes them, and the token router computes the same outputs with them
  (forward and gradients) as with XLA's defaults."""
  from entrorouter_jax import sharding
  assert jax.default_backend() == 'cpu'
  assert sharding.compiler_options() == sharding.CPU_COMPILER_OPTIONS
  model = make_model(mlp_dim=64)
  graphdef, params = nnx.split(model)
  tokens, mask = make_batch(batch=64, length=16)

  def loss(p):
    out = nnx.merge(graphdef, p)(tokens, mask)
    return jnp.sum(jax.nn.log_softmax(out) ** 2), out

  run = jax.value_and_grad(loss, has_aux=True)
  (l0, out0), g0 = jax.jit(run)(params)
  (l1, out1), g1 = jax.jit(run, compiler_options=sharding.compiler_options())(params)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):   # sums in another order
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_cpu_compiler_options_fall_back_to_xla_defaults(monkeypatch):
  """An option this XLA does not know, or an XLA_FLAGS that sets it, gives {}."""
  from entrorouter_jax import sharding
  try:
    sharding.compiler_options.cache_clear()
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=-reduce')
    assert sharding.compiler_options() == {}
    sharding.compiler_options.cache_clear()
    monkeypatch.delenv('XLA_FLAGS')
    monkeypatch.setattr(sharding, 'CPU_COMPILER_OPTIONS', {'xla_cpu_no_such_option': 'x'})
    assert sharding.compiler_options() == {}
  finally:
    sharding.compiler_options.cache_clear()


def test_router_model_builds_the_router_the_backbone_names():
  """RouterModel(...) gives an EmbeddingsRouter for frozen embeddings (parameters
  'members/...', no tokens read) and a TokenRouter otherwise."""
  emb = RouterModel(make_cfg(backbone='embeddings', members=3, head='utility'),
                    vocab_size=VOCAB, max_len=MAX_LEN, num_models=K, rngs=nnx.Rngs(0),
                    feature_dim=8)
  assert isinstance(emb, model_lib.EmbeddingsRouter) and isinstance(emb, model_lib.Router)
  assert sorted(nnx.to_pure_dict(nnx.state(emb, nnx.Param))) == ['log_temperature', 'members']
  features = jnp.ones((2, 8), jnp.float32)
  assert emb(None, None, features=features, members=True).shape == (3, 2, K)
  assert isinstance(make_model(), model_lib.TokenRouter)
  with pytest.raises(ValueError, match='feature_dim'):
    RouterModel(make_cfg(backbone='embeddings'), vocab_size=VOCAB, max_len=MAX_LEN,
                num_models=K, rngs=nnx.Rngs(0))
