"""`routerbench`: RouterBench (Hu et al., 2024) routing outcomes and dollar costs.

Offline (the usual case here), `manual_dir` holds either
  - `routerbench_subset_scores_costs.csv`: RouterDC's 3,178-query subset
    (ARC-Challenge, MBPP, Winogrande x 11 models) with its own train/test split
    in the `routerdc_split` column; or
  - `routerbench_0shot.pkl`: the full public RouterBench 0-shot table, split by
    a seeded hash of `sample_id`.
Online, with neither file present, the public 0-shot pickle is downloaded.
"""

from __future__ import annotations

import pathlib
import tempfile

import pandas as pd
import tensorflow_datasets as tfds

from entrorouter_jax.data import readers
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.data.tfds_base import RoutingBuilder

SUBSET_FILE = 'routerbench_subset_scores_costs.csv'
FULL_FILE = 'routerbench_0shot.pkl'
FULL_URL = ('https://huggingface.co/datasets/withmartian/routerbench/resolve/main/'
            + FULL_FILE)


class Routerbench(RoutingBuilder):
  """RouterBench: 11 LLMs' 0/1 outcomes and per-query dollar costs."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Place {SUBSET_FILE} (RouterDC subset) or {FULL_FILE} (RouterBench 0-shot, '
      'from the withmartian/routerbench dataset) in manual_dir.')

  def _load(self, dl_manager):
    manual = dl_manager._manual_dir  # pylint: disable=protected-access
    manual = pathlib.Path(manual) if manual else None
    if manual is not None and (manual / SUBSET_FILE).is_file():
      return readers.read_wide([manual / SUBSET_FILE])
    if manual is not None and (manual / FULL_FILE).is_file():
      pickle_path = manual / FULL_FILE
    elif manual is not None:
      raise DataError(f'{manual}: neither {SUBSET_FILE} nor {FULL_FILE} found in '
                      'data.manual_dir; expected one of them')
    else:
      pickle_path = pathlib.Path(dl_manager.download(FULL_URL))
    return self._read_full(pickle_path)

  def _read_full(self, pickle_path: pathlib.Path):
    """The full table carries response texts; drop them and read it as a wide table."""
    frame = pd.read_pickle(pickle_path)
    frame = frame[[c for c in frame.columns if not str(c).endswith('|model_response')]]
    with tempfile.TemporaryDirectory() as tmp:
      parquet = pathlib.Path(tmp) / 'routerbench_0shot.parquet'
      frame.to_parquet(parquet)
      data = readers.read_wide([parquet])
    data.source = str(pickle_path)
    return data
