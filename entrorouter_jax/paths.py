"""Workdir paths: local folders or object stores (gs://, s3://) alike.

Every file the project writes under a workdir goes through `etils.epath`
(which orbax, grain and TFDS use too), so `--workdir=gs://bucket/run` works on
a Cloud TPU VM as a local folder does. Object stores cannot append to or
rename a file; the two helpers here hide that difference:

  write_atomic(path, data)   local: write a temp file, then rename over;
                             remote: one object write (already all-or-nothing).
  is_remote(path)            True for gs://, s3://, az:// paths.
"""

from __future__ import annotations

import os

from etils import epath

_REMOTE = ('gs://', 's3://', 'az://')


def as_path(path) -> epath.Path:
  """An epath.Path; local paths made absolute (orbax wants absolute paths)."""
  text = os.fspath(path)
  if text.startswith(_REMOTE):
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def is_remote(path) -> bool:
  return os.fspath(path).startswith(_REMOTE)


def write_atomic(path, data: bytes | str) -> None:
  """Writes `data` to `path` so that readers never see half a file."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(raw)
    return
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')  # processes may write one file at once
  tmp.write_bytes(raw)
  os.replace(tmp, path)
