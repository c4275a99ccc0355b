"""BERT-family encoders (bert, MiniLM, ...) in flax NNX, from Hugging Face files.

A model directory holds `config.json`, `model.safetensors` (or a sharded
`model.safetensors.index.json`) and `tokenizer.json`, as saved by
`transformers` / `sentence-transformers`. Weights are read with safetensors'
NumPy loader; nothing here imports torch or contacts a hub.

    model, cfg = load_encoder(model_dir)
    tok = HFTokenizer.load(model_dir)
    ids, mask = tok.encode_batch(texts, max_len=128)
    emb = mean_pool(model(ids, mask), mask)   # = sentence-transformers' mean pooling

The encoder is the post-LN BERT stack with absolute learned positions and
token type 0 everywhere; it returns `last_hidden_state`. Every parameter is a
float32 `nnx.Param` naming its logical axes ('vocab', 'embed', 'mlp', 'heads',
'kv', 'position', or None for the token-type axis) like
entrorouter_jax.model, so the same sharding rules apply. `load_state` returns
a pure dict with exactly the structure of
`nnx.to_pure_dict(nnx.state(BertEncoder(cfg, ...), nnx.Param))`, for
`nnx.replace_by_pure_dict` on a (possibly abstract / sharded) state.

Compute runs in `dtype` (float32 or bfloat16); attention softmax and LayerNorm
statistics are always float32. Dropout follows entrorouter_jax.model: the
module keeps no RNG state; with `deterministic=False` and dropout > 0 pass
`rngs=nnx.Rngs(dropout=key)` (or a bare PRNG key).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from entrorouter_jax.backbones.weights import build_loaded, read_state, weight_files
from entrorouter_jax.data.tokenizer import pad
from entrorouter_jax.layers import erf_gelu, heads_major_attention, param, pool as _pool

# model_type values whose checkpoints use BERT's tensor names and layout.
SUPPORTED_MODEL_TYPES = ('bert',)
# hidden_act -> activation (HF's 'gelu' is the exact erf form).
_ACTIVATIONS = {
    'gelu': erf_gelu,
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
# HFTokenizer.encode_batch: batches this large use the tokenizer's thread pool.
PARALLEL_MIN = 256
_init = nnx.initializers.normal(stddev=0.02)
_zeros, _ones = nnx.initializers.zeros, nnx.initializers.ones


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The config.json fields the encoder uses (HF names in comments)."""
  vocab_size: int
  hidden_size: int
  num_layers: int          # num_hidden_layers
  num_heads: int           # num_attention_heads
  intermediate_size: int
  max_positions: int       # max_position_embeddings
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'hidden_act={self.hidden_act!r} is not supported; '
                       f'expected one of {sorted(_ACTIVATIONS)}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_heads={self.num_heads}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_dir(cls, model_dir) -> 'EncoderConfig':
    """Reads `model_dir/config.json`, rejecting architectures this module can't run."""
    path = pathlib.Path(model_dir) / 'config.json'
    if not path.is_file():
      raise FileNotFoundError(f'encoder config {path} does not exist; expected a Hugging '
                              'Face model directory with config.json')
    raw = json.loads(path.read_text())

    def check(key, value, expected, ok):
      if not ok:
        raise ValueError(f'{path}: {key}={value!r} is not supported; expected {expected}')

    model_type = raw.get('model_type')
    check('model_type', model_type, f'one of {SUPPORTED_MODEL_TYPES}',
          model_type in SUPPORTED_MODEL_TYPES)
    pos_type = raw.get('position_embedding_type', 'absolute')
    check('position_embedding_type', pos_type, "'absolute'", pos_type == 'absolute')
    act = raw.get('hidden_act', 'gelu')
    check('hidden_act', act, f'one of {sorted(_ACTIVATIONS)}', act in _ACTIVATIONS)
    if 'embedding_size' in raw:  # ALBERT / ELECTRA-style factorised embeddings
      check('embedding_size', raw['embedding_size'], f"hidden_size={raw.get('hidden_size')}",
            raw['embedding_size'] == raw.get('hidden_size'))

    def get(key, default=None):
      if key not in raw:
        if default is None:
          raise ValueError(f'{path} has no {key!r} entry')
        return default
      return raw[key]

    pad = raw.get('pad_token_id')
    return cls(
        vocab_size=int(get('vocab_size')), hidden_size=int(get('hidden_size')),
        num_layers=int(get('num_hidden_layers')), num_heads=int(get('num_attention_heads')),
        intermediate_size=int(get('intermediate_size')),
        max_positions=int(get('max_position_embeddings')),
        type_vocab_size=int(get('type_vocab_size', 2)),
        layer_norm_eps=float(get('layer_norm_eps', 1e-12)), hidden_act=act,
        pad_token_id=0 if pad is None else int(pad))


# ---------------------------------------------------------------------------
# Module


def _layer_norm(cfg, dtype, rngs):
  # Statistics in float32 (flax promotes); two-pass variance for parity with torch.
  return nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(_ones, ('embed',)),
      bias_init=nnx.with_partitioning(_zeros, ('embed',)), rngs=rngs)


class BertAttention(nnx.Module):
  """BERT self-attention (q/k/v/out projections with biases), weights per head."""

  def __init__(self, cfg: EncoderConfig, *, dtype, dropout, rngs):
    self.dtype = dtype
    shape, axes = (cfg.hidden_size, cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'kv')
    self.wq, self.bq = param(rngs, _init, shape, axes), param(rngs, _zeros, shape[1:], axes[1:])
    self.wk, self.bk = param(rngs, _init, shape, axes), param(rngs, _zeros, shape[1:], axes[1:])
    self.wv, self.bv = param(rngs, _init, shape, axes), param(rngs, _zeros, shape[1:], axes[1:])
    self.wo = param(rngs, _init, (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                     ('heads', 'kv', 'embed'))
    self.bo = param(rngs, _zeros, (cfg.hidden_size,), ('embed',))
    self.drop = nnx.Dropout(dropout)  # on the attention probabilities, as in BERT

  def __call__(self, x, mask, deterministic, rngs):
    """x[B, L, E] (compute dtype), mask bool[B, L] (True = real key) -> [B, L, E]."""
    dt = self.dtype
    (b, l, e), (_, h, d) = x.shape, self.wq.shape
    rows = x.reshape(b * l, e)     # 2-D matmuls and heads-major attention, as in model.py
    proj = lambda w, bias: ((rows @ w[...].astype(dt).reshape(e, h * d)).reshape(b, l, h, d)
                            + bias[...].astype(dt))
    q, k, v = proj(self.wq, self.bq), proj(self.wk, self.bk), proj(self.wv, self.bv)
    drop = lambda probs: self.drop(probs, deterministic=deterministic, rngs=rngs)
    out = heads_major_attention(q, k, v, mask, 1.0 / math.sqrt(d), on_probs=drop)
    out = out.reshape(b * l, h * d) @ self.wo[...].astype(dt).reshape(h * d, e)
    return out.reshape(b, l, e) + self.bo[...].astype(dt)


class BertLayer(nnx.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + Out(act(In(x))))."""

  def __init__(self, cfg: EncoderConfig, *, dtype, dropout, rngs):
    self.dtype, self.act = dtype, _ACTIVATIONS[cfg.hidden_act]
    e, m = cfg.hidden_size, cfg.intermediate_size
    self.attn = BertAttention(cfg, dtype=dtype, dropout=dropout, rngs=rngs)
    self.attn_ln = _layer_norm(cfg, dtype, rngs)
    self.w_in = param(rngs, _init, (e, m), ('embed', 'mlp'))
    self.b_in = param(rngs, _zeros, (m,), ('mlp',))
    self.w_out = param(rngs, _init, (m, e), ('mlp', 'embed'))
    self.b_out = param(rngs, _zeros, (e,), ('embed',))
    self.mlp_ln = _layer_norm(cfg, dtype, rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, mask, deterministic, rngs):
    dt = self.dtype
    drop = lambda y: self.drop(y, deterministic=deterministic, rngs=rngs)
    x = self.attn_ln(x + drop(self.attn(x, mask, deterministic, rngs)))
    h = self.act(x @ self.w_in[...].astype(dt) + self.b_in[...].astype(dt))
    return self.mlp_ln(x + drop(h @ self.w_out[...].astype(dt) + self.b_out[...].astype(dt)))


class BertEncoder(nnx.Module):
  """tokens int32[B, L], mask bool[B, L] -> last_hidden_state float32[B, L, hidden]."""

  def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, dropout: float = 0.0,
               rngs: nnx.Rngs):
    self.cfg, self.dtype, self.hidden_size = cfg, dtype, cfg.hidden_size
    e = cfg.hidden_size
    # Eager sharding (flax default) needs a mesh; without one, only record names.
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    with nnx.use_eager_sharding(eager):
      self.word_embed = param(rngs, _init, (cfg.vocab_size, e), ('vocab', 'embed'))
      self.pos_embed = param(rngs, _init, (cfg.max_positions, e), ('position', 'embed'))
      self.type_embed = param(rngs, _init, (cfg.type_vocab_size, e), (None, 'embed'))
      self.embed_ln = _layer_norm(cfg, dtype, rngs)
      self.embed_drop = nnx.Dropout(dropout)
      self.layers = nnx.List([BertLayer(cfg, dtype=dtype, dropout=dropout, rngs=rngs)
                              for _ in range(cfg.num_layers)])

  def __call__(self, tokens, mask, *, deterministic: bool = True, rngs=None) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
      raise ValueError(f'tokens {tokens.shape} / mask {mask.shape} must both be [B, L]')
    if tokens.shape[1] > self.cfg.max_positions:
      raise ValueError(f'sequence length {tokens.shape[1]} > max_positions '
                       f'{self.cfg.max_positions}')
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    elif rngs is not None and not isinstance(rngs, nnx.Rngs):
      raise TypeError(f'rngs must be an nnx.Rngs or a PRNG key, got {type(rngs)}')
    if not deterministic and rngs is None and self.embed_drop.rate > 0:
      raise ValueError('deterministic=False needs rngs=nnx.Rngs(dropout=key) for dropout')
    mask = mask.astype(bool)
    # Embeddings summed in float32: word + position (0..L-1) + token type 0.
    x = (jnp.take(self.word_embed[...], tokens, axis=0)
         + self.pos_embed[:tokens.shape[1]] + self.type_embed[0])
    x = self.embed_ln(x.astype(self.dtype))
    x = self.embed_drop(x, deterministic=deterministic, rngs=rngs)
    for layer in self.layers:
      x = layer(x, mask, deterministic, rngs)
    return x.astype(jnp.float32)


def mean_pool(hidden, mask) -> jax.Array:
  """Masked mean over positions -> float32[B, H]; all-pad rows pool to zeros."""
  return _pool(hidden, mask, 'mean')


# ---------------------------------------------------------------------------
# Weights


def _weight_map(cfg: EncoderConfig):
  """(module path, HF tensor name, HF shape, HF array -> module array) for every Param."""
  e, h, d, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  same = lambda a: a
  t = lambda a: a.T                                       # torch Linear [out, in] -> [in, out]
  qkv_w = lambda a: a.T.reshape(e, h, d)                  # [h*d, e] -> [e, h, d]
  qkv_b = lambda a: a.reshape(h, d)
  out_w = lambda a: a.T.reshape(h, d, e)                  # [e, h*d] -> [h, d, e]

  def ln(path, name):
    return [(path + ('scale',), f'{name}.weight', (e,), same),
            (path + ('bias',), f'{name}.bias', (e,), same)]

  entries = [
      (('word_embed',), 'embeddings.word_embeddings.weight', (cfg.vocab_size, e), same),
      (('pos_embed',), 'embeddings.position_embeddings.weight', (cfg.max_positions, e), same),
      (('type_embed',), 'embeddings.token_type_embeddings.weight',
       (cfg.type_vocab_size, e), same),
      *ln(('embed_ln',), 'embeddings.LayerNorm'),
  ]
  for i in range(cfg.num_layers):
    p, n = ('layers', i), f'encoder.layer.{i}'
    for ours, theirs in [('q', 'query'), ('k', 'key'), ('v', 'value')]:
      entries += [(p + ('attn', f'w{ours}'), f'{n}.attention.self.{theirs}.weight', (e, e), qkv_w),
                  (p + ('attn', f'b{ours}'), f'{n}.attention.self.{theirs}.bias', (e,), qkv_b)]
    entries += [
        (p + ('attn', 'wo'), f'{n}.attention.output.dense.weight', (e, e), out_w),
        (p + ('attn', 'bo'), f'{n}.attention.output.dense.bias', (e,), same),
        *ln(p + ('attn_ln',), f'{n}.attention.output.LayerNorm'),
        (p + ('w_in',), f'{n}.intermediate.dense.weight', (m, e), t),
        (p + ('b_in',), f'{n}.intermediate.dense.bias', (m,), same),
        (p + ('w_out',), f'{n}.output.dense.weight', (e, m), t),
        (p + ('b_out',), f'{n}.output.dense.bias', (e,), same),
        *ln(p + ('mlp_ln',), f'{n}.output.LayerNorm'),
    ]
  return entries


def load_state(model_dir, cfg: EncoderConfig) -> dict:
  """Reads the encoder weights into the pure-dict layout of BertEncoder's nnx.Param state.

  Accepts tensor names with or without the 'bert.' prefix (and old-style
  LayerNorm 'gamma' / 'beta'); the pooler and pretraining heads are ignored.
  Raises ValueError naming the file and tensor on a missing tensor or a shape
  mismatch.
  """
  files, listing = weight_files(model_dir)
  prefix = 'bert.' if 'bert.embeddings.word_embeddings.weight' in files else ''
  rows = []
  for path, name, shape, convert in _weight_map(cfg):
    candidates = [prefix + name]
    if name.endswith('LayerNorm.weight'):
      candidates.append(prefix + name[:-len('weight')] + 'gamma')
    elif name.endswith('LayerNorm.bias'):
      candidates.append(prefix + name[:-len('bias')] + 'beta')
    found = next((c for c in candidates if c in files), None)
    if found is None:
      raise ValueError(f'tensor {prefix + name!r} (shape {shape}) is missing from {listing}')
    rows.append((path, found, shape, convert))
  config = pathlib.Path(model_dir) / 'config.json'
  return read_state(files, rows, lambda name, file, found, shape: (
      f'tensor {name!r} in {file} has shape {found}, expected {shape} (from {config})'))


def load_encoder(model_dir, *, dtype=jnp.float32,
                 dropout: float = 0.0) -> tuple[BertEncoder, EncoderConfig]:
  """Builds a BertEncoder (eager sharding off) filled with the weights in model_dir."""
  cfg = EncoderConfig.from_dir(model_dir)
  pure = load_state(model_dir, cfg)
  model = build_loaded(lambda: BertEncoder(cfg, dtype=dtype, dropout=dropout, rngs=nnx.Rngs(0)),
                       pure, 'encoder')
  return model, cfg


# ---------------------------------------------------------------------------
# Tokenizer


class HFTokenizer:
  """A picklable `tokenizers.Tokenizer` with entrorouter_jax.data.tokenizer's interface.

  `encode` adds the post-processor's special tokens ([CLS] ... [SEP] for BERT)
  and truncates only the content between them: 'right' keeps the start of the
  text, 'left' its end. The file's own truncation / padding are disabled.
  """

  def __init__(self, json_str: str):
    self._json = json_str
    tok = tokenizers.Tokenizer.from_str(json_str)
    # Pad id: the padding config's, else the [PAD] / <pad> token's, else 0.
    if tok.padding is not None:
      self.pad_id = int(tok.padding['pad_id'])
    else:
      ids = [tok.token_to_id(t) for t in ('[PAD]', '<pad>')]
      self.pad_id = next((i for i in ids if i is not None), 0)
    tok.no_truncation()
    tok.no_padding()
    self._tok = tok
    self._num_special = tok.num_special_tokens_to_add(is_pair=False)

  @classmethod
  def load(cls, model_dir) -> 'HFTokenizer':
    path = pathlib.Path(model_dir)
    if path.is_dir():
      path = path / 'tokenizer.json'
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer file {path} does not exist; expected a Hugging Face '
                              'tokenizer.json (fast tokenizer) in the model directory')
    return cls(path.read_text(encoding='utf-8'))

  def __getstate__(self):
    return {'json': self._json}

  def __setstate__(self, state):
    self.__init__(state['json'])

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def tokenize(self, text: str) -> list[int]:
    """Content ids, without special tokens and untruncated."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, dropping special tokens (padding included)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def _budget(self, max_len: int, truncate: str) -> int:
    """How many content tokens fit beside the special tokens; validates the arguments."""
    if truncate not in ('right', 'left'):
      raise ValueError(f"truncate={truncate!r}; expected 'right' or 'left'")
    budget = max_len - self._num_special
    if budget < 1:
      raise ValueError(f'max_len={max_len} leaves no room for text beside the '
                       f'{self._num_special} special tokens; need max_len >= '
                       f'{self._num_special + 1}')
    return budget

  def _finish(self, enc, max_len: int, budget: int, truncate: str):
    if len(enc.ids) > budget:
      enc.truncate(budget, direction=truncate)
    return pad(self._tok.post_process(enc, add_special_tokens=True).ids, max_len, self.pad_id)

  def encode(self, text: str, max_len: int, truncate: str = 'right'):
    """Returns (ids int32[max_len], mask bool[max_len]); mask is True on real tokens."""
    budget = self._budget(max_len, truncate)
    enc = self._tok.encode(text, add_special_tokens=False)
    return self._finish(enc, max_len, budget, truncate)

  def encode_batch(self, texts: Sequence[str], max_len: int, truncate: str = 'right'):
    """Returns (ids int32[B, max_len], mask bool[B, max_len]).

    Batches of PARALLEL_MIN texts or more go through `tokenizers`' parallel
    encode_batch; smaller ones (what routing tokenizes) one text at a time on
    this thread: the parallel pool's threads keep spinning after each call,
    and on a 2-core machine the encoder forward that follows ran slower
    (seen with a script outside the repo; no figure is quoted). Both give the
    same ids."""
    budget = self._budget(max_len, truncate)
    texts = list(texts)
    if len(texts) >= PARALLEL_MIN:
      encs = self._tok.encode_batch(texts, add_special_tokens=False)
    else:
      encs = [self._tok.encode(text, add_special_tokens=False) for text in texts]
    pairs = [self._finish(enc, max_len, budget, truncate) for enc in encs]
    if not pairs:
      return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), bool)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
