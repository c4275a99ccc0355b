"""SentencePiece tokenizer: trained on the training split's queries, or loaded.

Ids: 0 = padding, 1 = unknown, 2 = BOS, 3 = EOS; the router uses neither BOS
nor EOS. `encode` truncates to `max_len` (keeping the start, or the end with
`truncate='left'`, which suits prompts whose question comes after few-shot
examples) and pads with 0, returning the attention mask beside the ids.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID = 0


def pad(ids: Sequence[int], max_len: int, pad_id: int = PAD_ID):
  """(ids int32[max_len] padded on the right with pad_id, mask bool[max_len])."""
  out = np.full(max_len, pad_id, np.int32)
  out[:len(ids)] = ids
  mask = np.zeros(max_len, bool)
  mask[:len(ids)] = True
  return out, mask


class Tokenizer:
  """A picklable SentencePiece processor (grain workers may copy it).

  `prefix` ids (none here; BOS for a decoder backbone's tokenizer, a subclass)
  start every encoded query and survive truncation.
  """

  pad_id = PAD_ID
  prefix: list[int] = []

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    path = epath.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer model {path} does not exist; expected a '
                              'SentencePiece .model file')
    return cls(path.read_bytes())

  def save(self, path: str | os.PathLike) -> None:
    from entrorouter_jax import paths
    paths.write_atomic(path, self._proto)

  def __getstate__(self):
    return {'proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['proto'])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def tokenize(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

  def encode(self, text: str, max_len: int, truncate: str = 'right'):
    """Returns (ids int32[max_len], mask bool[max_len]); mask is True on real tokens."""
    if truncate not in ('right', 'left'):
      raise ValueError(f"truncate={truncate!r}; expected 'right' or 'left'")
    room = max_len - len(self.prefix)
    if self.prefix and room < 1:
      raise ValueError(f'max_len={max_len} leaves no room for content after BOS')
    ids = self._sp.encode(text)
    if len(ids) > room:
      ids = ids[:room] if truncate == 'right' else ids[len(ids) - room:]
    return pad(self.prefix + ids, max_len, self.pad_id)

  def encode_batch(self, texts: Sequence[str], max_len: int, truncate: str = 'right'):
    """Returns (ids int32[B, max_len], mask bool[B, max_len])."""
    pairs = [self.encode(t, max_len, truncate) for t in texts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a unigram SentencePiece model on `texts`.

  The vocabulary may come out smaller than `vocab_size` on small, repetitive
  corpora (hard_vocab_limit=False) rather than failing. The same texts give
  the same model; input_sentence_size caps the sample on large corpora.
  """
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError('cannot train a tokenizer on an empty corpus')
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf,
      vocab_size=vocab_size, model_type='unigram', hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=1, bos_id=2, eos_id=3,
      character_coverage=0.9995, max_sentence_length=1 << 16,
      input_sentence_size=200_000, shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  return Tokenizer(buf.getvalue())


def load_or_train(path: str | os.PathLike, texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Loads `path` if it exists, else trains on `texts` and caches it at `path`."""
  path = epath.Path(path)
  if path.is_file():
    return Tokenizer.load(path)
  tok = train_tokenizer(texts, vocab_size)
  tok.save(path)
  return tok
