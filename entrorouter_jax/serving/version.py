"""The router's version: a short digest of the workdir it was loaded from, named in
/healthz, /metrics (entrorouter_router_info) and every decision log line."""

from __future__ import annotations

import hashlib
import pathlib


def router_version(workdir) -> str:
  """A short digest naming the router a workdir holds: the first 12 hex digits of sha256
  over its config.json, its added_models.json where it has one (add_model), and the
  relative path, size and mtime of every file under its checkpoints/ (a retrained or
  resumed run gets a new one). FileNotFoundError if config.json is missing."""
  workdir = pathlib.Path(workdir)
  digest = hashlib.sha256((workdir / 'config.json').read_bytes())
  added = workdir / 'added_models.json'
  if added.is_file():
    digest.update(b'\0added_models.json\0' + added.read_bytes())
  checkpoints = workdir / 'checkpoints'
  files = sorted(p for p in checkpoints.rglob('*') if p.is_file()) if checkpoints.is_dir() else []
  for path in files:
    stat = path.stat()
    digest.update(f'\0{path.relative_to(workdir).as_posix()}\0{stat.st_size}\0'
                  f'{stat.st_mtime_ns}'.encode('utf-8', 'surrogateescape'))
  return digest.hexdigest()[:12]
