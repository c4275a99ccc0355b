"""`routing_files`: a user's own routing tables (wide, long, RouterDC or RouteLLM) or
feedback logs (format 'feedback': one observed cell per query, plus its propensity and
cost weight as per-example features).

The config name is a digest of the files' contents and the reading options,
so editing a file prepares a fresh copy instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import tensorflow_datasets as tfds

from entrorouter_jax.data import readers
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.data.tfds_base import RoutingBuilder


def _digest(paths, extra) -> str:
  h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
  for path in paths:
    path = pathlib.Path(path)
    files = sorted(path.rglob('*')) if path.is_dir() else [path]
    for f in files:
      if f.is_file():
        h.update(str(f.name).encode())
        h.update(f.read_bytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class RoutingFilesConfig(tfds.core.BuilderConfig):
  files: tuple = ()
  format: str = 'wide'
  pool: str = ''
  options: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def make(cls, files, format='wide', pool='', options=None):
    """A config for these files; missing files raise DataError naming them."""
    files = tuple(str(f) for f in files)
    if not files:
      raise DataError('data.files is empty; expected one or more comma-separated paths')
    for f in files:
      if not pathlib.Path(f).exists():
        raise DataError(f'{f}: no such file or directory (from data.files)')
    if pool and not pathlib.Path(pool).is_file():
      raise DataError(f'{pool}: no such model-pool file (from data.pool)')
    options = dict(options or {})
    digest = _digest(files + ((pool,) if pool else ()), [format, options])
    return cls(name=f'{format}_{digest}', files=files, format=format, pool=pool,
               options=options)


class RoutingFiles(RoutingBuilder):
  """Routing tables read from local files."""

  VERSION = tfds.core.Version('1.0.0')

  def _feedback_rows(self) -> bool:
    """Feedback logs carry a propensity and a cost weight per query (format 'feedback')."""
    return self.builder_config.format == 'feedback'

  def _load(self, dl_manager):
    c = self.builder_config
    return readers.load_routing_files(list(c.files), c.format, pool=c.pool or None,
                                      **c.options)
