"""The training input pipeline: TFDS data source -> grain -> global jax.Array.

  tfds data_source -> seeded shuffle (fresh each epoch) -> repeat
  -> this process's rows of each global batch -> tokenize (+ per-query Stage-0
  tables) -> batch -> global array

Every process shuffles the same way and reads (decodes, tokenizes) only its own
slice of each global batch, so the global batches, and hence training, are the
same whatever the number of processes, and over one epoch every query is seen
exactly once across processes. The iterator is a grain `DatasetIterator`: its
state is saved in the checkpoint beside the model, and the same seed gives the
same batches.
"""

from __future__ import annotations

from typing import Mapping, Optional

import grain
import jax
import numpy as np

from entrorouter_jax.data.dataset import RoutingDataset
from entrorouter_jax.data.tokenizer import Tokenizer

PREFETCH = 8       # batches prepared ahead of the train step (data.prefetch)
READ_THREADS = 2   # threads preparing them (data.read_threads)
# A feedback log's per-row batch entries (float32[b]): RoutingDataset field -> key.
FEEDBACK_KEYS = {'propensities': 'propensity', 'cost_weights': 'cost_weight'}


def read_options(prefetch: int = PREFETCH, threads: int = READ_THREADS) -> grain.ReadOptions:
  """How far ahead, and with how many threads, the iterator prepares batches.

  grain's defaults (16 threads, 500 elements ahead) suit reading small records
  from remote disks; here every element is a whole batch, tokenized in Python
  under the GIL, so they would prepare hundreds of batches at the start of
  every stage, on the cores that compile and run the step.
  """
  if prefetch < 1 or threads < 1:
    raise ValueError(f'data.prefetch={prefetch} and data.read_threads={threads}: both must be '
                     '>= 1')
  return grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(prefetch))


class Featurize(grain.transforms.Map):
  """A TFDS record -> the arrays the train step needs (text dropped).

  Output per example: index int32, tokens int32[L], token_mask bool[L] (none
  when `tokenizer` is None: the embeddings backbone reads `extras['features']`),
  outcomes float32[K], outcome_mask bool[K], costs float32[K], for a feedback
  log's records also propensity float32 and cost_weight float32 (NaN = none;
  `FEEDBACK_KEYS`), plus extras[name][index] for every per-query table in
  `extras` (e.g. the anchor).
  """

  def __init__(self, tokenizer: Optional[Tokenizer], max_len: int, truncate: str = 'right',
               extras: Optional[Mapping[str, np.ndarray]] = None):
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.truncate = truncate
    self.extras = dict(extras or {})

  def map(self, record):
    index = int(record['index'])
    out = {
        'index': np.int32(index),
        'outcomes': np.asarray(record['outcomes'], np.float32),
        'outcome_mask': np.asarray(record['outcome_mask'], bool),
        'costs': np.asarray(record['costs'], np.float32),
    }
    for key in FEEDBACK_KEYS.values():
      if key in record:
        out[key] = np.float32(record[key])
    if self.tokenizer is not None:
      query = record['query']
      query = query.decode('utf-8') if isinstance(query, bytes) else query
      out['tokens'], out['token_mask'] = self.tokenizer.encode(query, self.max_len, self.truncate)
    for name, table in self.extras.items():
      out[name] = table[index]
    return out


def make_dataset(source, featurize: Featurize, *, global_batch_size: int, seed: int,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 prefetch: int = PREFETCH, read_threads: int = READ_THREADS) -> grain.IterDataset:
  """The repeated, shuffled, batched per-process dataset (process-local batches),
  `prefetch` batches prepared ahead by `read_threads` threads (`read_options`)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'process count {process_count}')
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(source)
  if len(ds) < global_batch_size:
    raise ValueError(f'{len(ds)} training queries are fewer than the global batch of '
                     f'{global_batch_size}; lower the batch size')
  ds = _ProcessRows(ds.seed(seed).shuffle().repeat(), global_batch_size, local_batch,
                    process_index)
  return ds.map(featurize).batch(local_batch, drop_remainder=True).to_iter_dataset(
      read_options(prefetch, read_threads))


def feedback_tables(data: RoutingDataset) -> dict[str, np.ndarray]:
  """{'propensity', 'cost_weight'}: float32[N] each, for a feedback log's
  `make_table_dataset` tables (the entries `Featurize` reads from its records);
  {} for fully labelled data."""
  return {key: np.asarray(getattr(data, field), np.float32)
          for field, key in FEEDBACK_KEYS.items() if getattr(data, field) is not None}


class GatherRows(grain.transforms.Map):
  """A batch of row indices int[b] -> {name: table[rows]} for every in-memory table."""

  def __init__(self, tables: Mapping[str, np.ndarray]):
    self.tables = dict(tables)

  def map(self, rows):
    rows = np.asarray(rows)
    return {'index': rows.astype(np.int32), **{k: v[rows] for k, v in self.tables.items()}}


def make_table_dataset(tables: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None, prefetch: int = PREFETCH,
                       read_threads: int = READ_THREADS) -> grain.IterDataset:
  """As `make_dataset`, for queries whose inputs are all in memory (the
  embeddings backbone reads no text): the same seeded shuffle of row indices,
  the same per-process rows of each global batch, gathered a batch at a time.

  tables: {name: array[N, ...]} (outcomes, outcome_mask, costs, features, and
  for a feedback log `feedback_tables`, ...).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'process count {process_count}')
  n = len(next(iter(tables.values())))
  if n < global_batch_size:
    raise ValueError(f'{n} training queries are fewer than the global batch of '
                     f'{global_batch_size}; lower the batch size')
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat()
  ds = _ProcessRows(ds, global_batch_size, local_batch, process_index)
  return ds.batch(local_batch, drop_remainder=True).map(GatherRows(tables)).to_iter_dataset(
      read_options(prefetch, read_threads))


class _ProcessRows(grain.MapDataset):
  """Rows [p * local, (p + 1) * local) of each consecutive global batch of `parent`."""

  def __init__(self, parent, global_batch: int, local_batch: int, process_index: int):
    super().__init__(parent)
    self._global, self._local, self._offset = global_batch, local_batch, process_index * local_batch

  def __len__(self):
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + row]

  def __str__(self):
    return f'ProcessRows(global={self._global}, local={self._local}, offset={self._offset})'



def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Process-local numpy batches -> global jax.Arrays sharded along the batch axis.
  In one process the local batch is the global one, and one device_put
  places every array (cheaper per step than one call per array)."""
  if jax.process_count() == 1:
    return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
