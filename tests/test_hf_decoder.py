"""Tests for the Llama / Gemma decoder backbone (entrorouter_jax.backbones.hf_decoder).

Parity references are tiny randomly initialised transformers models saved to
disk here (torch and transformers are test-only dependencies).
"""

import dataclasses
import io
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
spm = pytest.importorskip('sentencepiece')
safetensors_torch = pytest.importorskip('safetensors.torch')

from entrorouter_jax.backbones.hf_decoder import (  # noqa: E402
    DecoderBackbone, DecoderConfig, SentencePieceTokenizer, load_decoder, load_state, pool)

VOCAB, LENGTH = 256, 12
LOGICAL_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv', None}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              use_cache=False, attn_implementation='eager')


def llama_config(**overrides):
  return transformers.LlamaConfig(**{**COMMON, 'num_attention_heads': 4,
                                     'num_key_value_heads': 2, 'rope_theta': 10000.0,
                                     **overrides})


def gemma_config():
  return transformers.GemmaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=16, hidden_activation='gelu_pytorch_tanh')


def make_hf(config, cls_name):
  """A seeded random transformers model, norms perturbed (their init is trivial)."""
  torch.manual_seed(0)
  model = getattr(transformers, cls_name)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save(model, path, **kwargs):
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  return path


def make_batch(seed=0):
  """Random ids with right padding; one row full, one a single token, one all-pad."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(4, LENGTH)).astype(np.int32)
  mask = np.arange(LENGTH)[None, :] < np.array([LENGTH, 7, 1, 4])[:, None]
  return ids, mask


def hf_hidden(model, ids, mask):
  base = getattr(model, 'model', model)   # ...ForCausalLM wraps the ...Model
  with torch.no_grad():
    out = base(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask.astype(np.int64)), use_cache=False)
  return out.last_hidden_state.float().numpy()


def relative_error(ours, ref, mask):
  """Max abs difference on real positions over the reference's scale there."""
  return float(np.abs(np.asarray(ours) - ref)[mask].max() / np.abs(ref[mask]).max())


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """name -> (model directory, the transformers model that wrote it)."""
  root = tmp_path_factory.mktemp('hf_decoder')
  models = {
      'llama': make_hf(llama_config(), 'LlamaModel'),
      'gemma': make_hf(gemma_config(), 'GemmaModel'),
      'llama_lm': make_hf(llama_config(), 'LlamaForCausalLM'),
      'llama3_rope': make_hf(llama_config(rope_scaling=dict(
          rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=64)), 'LlamaModel'),
      'mistral': make_hf(transformers.MistralConfig(
          **COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
          'MistralModel'),
  }
  out = {name: (save(m, root / name), m) for name, m in models.items()}
  # Sharded files (+ model.safetensors.index.json) and bfloat16 weights.
  out['gemma_sharded'] = (save(models['gemma'], root / 'sharded', max_shard_size='40KB'),
                          models['gemma'])
  bf16 = make_hf(gemma_config(), 'GemmaForCausalLM').to(torch.bfloat16)
  out['gemma_bf16'] = (save(bf16, root / 'bf16'), bf16)
  return out


def build(cfg, **kwargs):
  with nnx.use_eager_sharding(False):
    return DecoderBackbone(cfg, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize('name', ['llama', 'gemma', 'llama_lm', 'llama3_rope', 'mistral',
                                  'gemma_sharded'])
def test_parity_with_transformers(saved, name):
  path, hf_model = saved[name]
  model, cfg = load_decoder(path)
  ids, mask = make_batch()
  hidden = model(jnp.asarray(ids), jnp.asarray(mask))
  assert hidden.dtype == jnp.float32 and hidden.shape == (4, LENGTH, 64)
  assert np.isfinite(np.asarray(hidden)).all()   # all-pad rows too
  err = relative_error(hidden, hf_hidden(hf_model, ids, mask), mask)
  print(f'{name}: max relative difference {err:.2e}')
  assert err <= 1e-4, (name, err)
  if name == 'llama3_rope':
    assert dict(cfg.rope_scaling)['rope_type'] == 'llama3'
  if name == 'gemma_sharded':
    assert (path / 'model.safetensors.index.json').is_file()


def test_state_structure_and_axes(saved):
  for name in ('llama', 'gemma', 'llama_lm'):
    cfg = DecoderConfig.from_dir(saved[name][0])
    module = build(cfg)
    expected = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    pure = load_state(saved[name][0], cfg)
    assert jax.tree.structure(pure) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(pure), jax.tree.leaves(expected)):
      assert got.dtype == np.float32 and got.shape == want.shape
  # Every parameter names logical axes (for sharding.py's rules), also after loading.
  model, _ = load_decoder(saved['llama'][0])
  params = jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(params) == 2 + 9 * 2
  for p in params:
    assert p[...].dtype == jnp.float32
    assert len(p.out_sharding) == p[...].ndim and set(p.out_sharding) <= LOGICAL_AXES
  specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  assert all(isinstance(s, PartitionSpec) for s in specs) and len(specs) == len(params)
  assert model.hidden_size == 64


def test_bfloat16_weights_load_exactly(saved):
  path, hf_model = saved['gemma_bf16']
  cfg = DecoderConfig.from_dir(path)
  pure = load_state(path, cfg)
  sd = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
  np.testing.assert_array_equal(pure['embed'], sd['model.embed_tokens.weight'])
  np.testing.assert_array_equal(pure['layers'][1]['mlp_norm']['scale'],
                                sd['model.layers.1.post_attention_layernorm.weight'])
  # q_proj [heads * head_dim, embed] -> ours [embed, heads, head_dim].
  q = sd['model.layers.0.self_attn.q_proj.weight']
  np.testing.assert_array_equal(pure['layers'][0]['attn']['wq'], q.T.reshape(64, 4, 16))
  np.testing.assert_array_equal(pure['layers'][0]['mlp']['down'],
                                sd['model.layers.0.mlp.down_proj.weight'].T)


def test_bfloat16_compute_close_to_float32(saved):
  path, _ = saved['llama']
  ids, mask = make_batch(1)
  ref = np.asarray(load_decoder(path)[0](jnp.asarray(ids), jnp.asarray(mask)))
  model, _ = load_decoder(path, dtype=jnp.bfloat16)
  out = model(jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.float32
  assert relative_error(out, ref, mask) < 5e-2
  # Parameters stay float32 (mixed precision).
  assert model.embed[...].dtype == jnp.float32


def test_jit_and_dropout(saved):
  path, _ = saved['llama']
  model, _ = load_decoder(path, dropout=0.5)
  ids, mask = (jnp.asarray(a) for a in make_batch())
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask, key):
    return nnx.merge(graphdef, state)(ids, mask, deterministic=False, rngs=key)

  a = forward(state, ids, mask, jax.random.key(0))
  b = forward(state, ids, mask, jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_allclose(a, forward(state, ids, mask, jax.random.key(0)))
  c = model(ids, mask)   # deterministic by default: no rngs needed
  np.testing.assert_allclose(c, model(ids, mask))
  with pytest.raises(ValueError, match='rngs'):
    model(ids, mask, deterministic=False)


def test_pool():
  hidden = jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2) - 5.0
  hidden = jnp.concatenate([hidden, hidden[:1]], axis=0)
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
  last = pool(hidden, mask, 'last')
  np.testing.assert_array_equal(last, hidden[jnp.arange(5), jnp.array([2, 1, 0, 0, 1])])
  mean = pool(hidden, mask, 'mean')
  np.testing.assert_allclose(mean[0], hidden[0].mean(0))
  np.testing.assert_allclose(mean[1], hidden[1, :2].mean(0))
  np.testing.assert_allclose(mean[2], hidden[2, 0])
  np.testing.assert_array_equal(mean[3], 0.0)
  assert last.dtype == mean.dtype == jnp.float32
  with pytest.raises(ValueError, match='last'):
    pool(hidden, mask, 'max')


def test_config_formats(saved, tmp_path):
  """Old-style config.json (top-level rope_theta / rope_scaling) reads the same."""
  new = json.loads((saved['llama3_rope'][0] / 'config.json').read_text())
  old = {k: v for k, v in new.items() if k != 'rope_parameters'}
  params = dict(new['rope_parameters'])
  old['rope_theta'] = params.pop('rope_theta')
  old['rope_scaling'] = {**params, 'type': params.pop('rope_type')}
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert DecoderConfig.from_dir(tmp_path) == DecoderConfig.from_dir(saved['llama3_rope'][0])
  # Gemma v1's original 'gelu' means the tanh form.
  gemma = json.loads((saved['gemma'][0] / 'config.json').read_text())
  gemma.pop('hidden_activation')
  gemma['hidden_act'] = 'gelu'
  (tmp_path / 'config.json').write_text(json.dumps(gemma))
  assert DecoderConfig.from_dir(tmp_path).hidden_act == 'gelu_pytorch_tanh'


def test_config_errors(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    DecoderConfig.from_dir(tmp_path)
  base = json.loads((saved['llama'][0] / 'config.json').read_text())
  for change, match in [({'model_type': 'bert'}, "model_type='bert'"),
                        ({'attention_bias': True}, 'attention_bias'),
                        ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4,
                                              'factor': 4.0}}, 'yarn'),
                        ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0},
                          'rope_parameters': None}, 'dynamic'),
                        ({'num_key_value_heads': 3}, 'multiple')]:
    (tmp_path / 'config.json').write_text(json.dumps({**base, **change}))
    with pytest.raises(ValueError, match=match) as info:
      DecoderConfig.from_dir(tmp_path)
    assert str(tmp_path / 'config.json') in str(info.value)


def test_weight_errors(saved, tmp_path):
  path, _ = saved['llama']
  cfg = DecoderConfig.from_dir(path)
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    load_state(tmp_path, cfg)
  tensors = safetensors_torch.load_file(str(path / 'model.safetensors'))
  # A missing tensor.
  missing = 'layers.1.mlp.up_proj.weight'
  safetensors_torch.save_file({k: v for k, v in tensors.items() if k != missing},
                              str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=f"missing tensor '{missing}'"):
    load_state(tmp_path, cfg)
  # A shape that disagrees with config.json.
  safetensors_torch.save_file(tensors, str(tmp_path / 'model.safetensors'))
  smaller = dataclasses.replace(cfg, intermediate_size=96)
  with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(128, 64\); "
                                       r'expected \(96, 64\)'):
    load_state(tmp_path, smaller)
  # Weights the module would silently drop (a bias) are an error too.
  safetensors_torch.save_file({**tensors, 'layers.0.self_attn.q_proj.bias': torch.zeros(64)},
                              str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match='q_proj.bias'):
    load_state(tmp_path, cfg)


def test_a_variable_left_unloaded_is_an_error(saved, monkeypatch):
  """load_decoder checks that the checkpoint filled every variable of the module."""
  from entrorouter_jax.backbones import hf_decoder
  path, _ = saved['llama']

  def without_up(model_dir, cfg):
    pure = load_state(model_dir, cfg)
    del pure['layers'][1]['mlp']['up']
    return pure

  monkeypatch.setattr(hf_decoder, 'load_state', without_up)
  with pytest.raises(ValueError, match=r"1 decoder variables were not loaded from the "
                                       r"checkpoint: \['layers/1/mlp/up"):
    load_decoder(path)


@pytest.mark.parametrize('ids', [dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),    # Llama
                                 dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)])    # Gemma
def test_sentencepiece_tokenizer(tmp_path, ids):
  lines = ['the quick brown fox jumps over the lazy dog',
           'what is the capital of france', 'route this query to the cheapest model',
           'a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9'] * 5
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                 vocab_size=100, hard_vocab_limit=False, minloglevel=2, **ids)
  with pytest.raises(FileNotFoundError, match='tokenizer.model'):
    SentencePieceTokenizer.load(tmp_path)
  (tmp_path / 'tokenizer.model').write_bytes(buf.getvalue())
  tok = SentencePieceTokenizer.load(tmp_path)
  bos, pad = ids['bos_id'], max(ids['pad_id'], 0)
  content = tok.tokenize('what is the capital of france')
  assert len(content) > 4 and 0 < tok.vocab_size <= 100

  out, mask = tok.encode('what is the capital of france', 32)
  assert out.dtype == np.int32 and mask.dtype == bool and out.shape == mask.shape == (32,)
  n = len(content) + 1
  assert out[0] == bos and list(out[1:n]) == content
  assert mask[:n].all() and not mask[n:].any() and (out[n:] == pad).all()
  assert tok.decode(out) == 'what is the capital of france'
  # Truncation cuts the content and keeps BOS: 'right' keeps its start, 'left' its end.
  right, rmask = tok.encode('what is the capital of france', 4)
  left, _ = tok.encode('what is the capital of france', 4, truncate='left')
  assert list(right) == [bos] + content[:3] and rmask.all()
  assert list(left) == [bos] + content[-3:]
  with pytest.raises(ValueError, match='truncate'):
    tok.encode('x', 4, truncate='middle')

  batch, bmask = tok.encode_batch(['the lazy dog', 'what is the capital of france'], 8)
  assert batch.shape == bmask.shape == (2, 8) and (batch[:, 0] == bos).all()
  copy = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(copy.encode_batch(['the lazy dog'], 8)[0], batch[:1])
  # The file (or its directory) loads the same; save writes the same bytes.
  assert SentencePieceTokenizer.load(tmp_path / 'tokenizer.model').vocab_size == tok.vocab_size
  tok.save(tmp_path / 'copy' / 'tokenizer.model')
  assert (tmp_path / 'copy' / 'tokenizer.model').read_bytes() == buf.getvalue()


def test_module_builds_from_config_alone(saved):
  """Random init (no checkpoint): runs, and Gemma's norms start at the identity."""
  cfg = DecoderConfig.from_dir(saved['gemma'][0])
  module = build(cfg)
  np.testing.assert_array_equal(module.final_norm.scale[...], 0.0)
  ids, mask = make_batch()
  assert module(jnp.asarray(ids), jnp.asarray(mask)).shape == (4, LENGTH, 64)
