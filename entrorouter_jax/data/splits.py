"""Seeded train/validation/test assignment by query id.

A query's split depends only on (seed, id), never on row order, so
reordering or appending rows leaves every existing query where it was.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

DEFAULT_FRACTIONS = {'train': 0.8, 'validation': 0.1, 'test': 0.1}


def unit_hash(seed: int, key: str) -> float:
  """A deterministic number in [0, 1) from (seed, key)."""
  digest = hashlib.blake2b(f'{seed}:{key}'.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0**64


def split_by_id(ids, seed: int = 0,
                fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> np.ndarray:
  """Assigns each id to a split with probabilities `fractions` (summing to 1)."""
  names = list(fractions)
  probs = np.array([fractions[n] for n in names], dtype=np.float64)
  if (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
    raise ValueError(f'split fractions {dict(fractions)} must be >= 0 and sum to 1')
  edges = np.cumsum(probs)
  u = np.array([unit_hash(seed, str(i)) for i in ids])
  which = np.minimum(np.searchsorted(edges, u, side='right'), len(names) - 1)
  return np.array(names, dtype=object)[which].astype(str)
