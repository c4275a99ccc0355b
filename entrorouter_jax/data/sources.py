"""From `config.data` to prepared TFDS builders and in-memory splits.

`config.data.name` picks the builder:
  synthetic_routing  the embedded default (seeded, no download)
  routerbench        RouterBench; `data.manual_dir` holds the local file
  routing_files      `data.files` (comma-separated) in `data.format`
                     (wide | long | routerdc | routellm | feedback), prices from
                     `data.pool`; a feedback log's splits carry `propensities`
                     and `cost_weights`
Prepared data is cached under `data.data_dir` (TFDS's default when empty).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from entrorouter_jax.data.dataset import DataError, RoutingDataset
from entrorouter_jax.data.tfds_base import read_split

log = logging.getLogger(__name__)

DATA_NAMES = ('synthetic_routing', 'routerbench', 'routing_files')
FORMATS = ('wide', 'long', 'routerdc', 'routellm', 'feedback')


def _as_list(value) -> list[str]:
  if not value:
    return []
  if isinstance(value, str):
    return [v.strip() for v in value.split(',') if v.strip()]
  return [str(v) for v in value]


def make_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The (not yet prepared) TFDS builder that `data_cfg` names."""
  data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else None
  kwargs = dict(data_dir=data_dir, file_format='array_record')
  if data_cfg.name == 'synthetic_routing':
    from entrorouter_jax.datasets.synthetic_routing import SyntheticRouting
    s = data_cfg.synthetic
    config = SyntheticRouting.config_for(s.seed, s.num_train, s.num_validation, s.num_test)
    return SyntheticRouting(config=config, **kwargs)
  if data_cfg.name == 'routerbench':
    from entrorouter_jax.datasets.routerbench import Routerbench
    return Routerbench(**kwargs)
  if data_cfg.name == 'routing_files':
    from entrorouter_jax.datasets.routing_files import RoutingFiles, RoutingFilesConfig
    if data_cfg.format not in FORMATS:
      raise DataError(f'data.format={data_cfg.format!r}; expected one of {list(FORMATS)}')
    config = RoutingFilesConfig.make(_as_list(data_cfg.files), data_cfg.format,
                                     pool=data_cfg.pool, options=dict(data_cfg.read_options))
    return RoutingFiles(config=config, **kwargs)
  raise DataError(f'data.name={data_cfg.name!r}; expected one of {list(DATA_NAMES)}')


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """Builds the array_record files once (a no-op when they exist) and returns the builder.

  In a multi-process run process 0 prepares first while the others wait, so
  workers sharing one data_dir never write the same files at once; the others
  then find the data ready (or, with a data_dir of their own, prepare it too).
  """
  import jax
  manual_dir = os.path.expanduser(data_cfg.manual_dir) if data_cfg.manual_dir else None
  if manual_dir and not os.path.isdir(manual_dir):
    raise DataError(f'data.manual_dir={manual_dir!r} is not a directory')
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      make_builder(data_cfg).download_and_prepare(download_config=download_config)
    multihost_utils.sync_global_devices('entrorouter_jax: data prepared by process 0')
  builder = make_builder(data_cfg)
  builder.download_and_prepare(download_config=download_config)
  for note in builder.info.metadata.get('notes', []):
    log.warning('%s: %s', builder.name, note)
  return builder


def load_splits(data_cfg, splits=('train', 'test')
                ) -> tuple[tfds.core.DatasetBuilder, dict[str, RoutingDataset]]:
  """Prepares the data and reads the named splits, restricted to `data.models` if set
  (a feedback log's splits keep their `propensities` and `cost_weights`), the training
  split to `data.train_queries` of its queries where that is > 0 (`train_sample`)."""
  builder = prepare(data_cfg)
  models = _as_list(data_cfg.models)
  out = {}
  for split in splits:
    data = read_split(builder, split)
    data = data.select_models(models) if models else data
    if split == 'train':
      data = train_sample(data, data_cfg.get('train_queries', 0),
                          data_cfg.get('train_sample_seed', 0))
    out[split] = data
  return builder, out


def train_sample(train: RoutingDataset, size: int, seed: int) -> RoutingDataset:
  """`size` training queries drawn without replacement by `seed` (kept in their order;
  every method trained on this config sees the same ones), or `train` itself where `size`
  is 0 or at least its number of queries. DataError naming data.train_queries for a
  negative size or fewer than 2 queries (no fold to check a fit on)."""
  if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size == 1:
    raise DataError(f'data.train_queries={size!r}; expected 0 (all the training queries) or '
                    'a number of queries >= 2')
  if size == 0 or size >= train.num_queries:
    return train
  rows = np.sort(np.random.default_rng(seed).choice(train.num_queries, size, replace=False))
  return train.subset(rows)
