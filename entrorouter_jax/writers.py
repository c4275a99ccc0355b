"""Metrics out: one JSON object per logged step in DIR/metrics.jsonl, and TensorBoard.

Only process 0 writes. On resume, records past the restored step of the
resumed stage are dropped first, so the file never holds a step twice.

A local workdir is appended to line by line. An object store (gs://) cannot
append, so there the writer keeps the records and rewrites metrics.jsonl at
most every `remote_flush_seconds` and on close; TensorBoard events go to a
local temporary folder and are copied up at the same times.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

from entrorouter_jax import paths

log = logging.getLogger(__name__)


def flatten(metrics: dict, model_names) -> dict:
  """Scalars as floats; per-model vectors [K] as 'name/model' keys."""
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = float(value)
    else:
      for name, v in zip(model_names, value.tolist()):
        out[f'{key}/{name}'] = float(v)
  return out


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard under the workdir."""

  def __init__(self, workdir, enabled: bool = True, remote_flush_seconds: float = 60.0):
    self.path = paths.as_path(workdir) / 'metrics.jsonl'
    self.enabled = enabled
    self.remote = paths.is_remote(self.path)
    self.remote_flush_seconds = remote_flush_seconds
    self._lines = None          # remote: every record, rewritten as one object
    self._last_flush = time.monotonic()
    self._tb = None
    self._tb_dir = paths.as_path(workdir) / 'tensorboard'
    self._tb_local = None       # remote: the local folder TensorBoard writes to

  def _read_lines(self) -> list[str]:
    if not self.path.exists():
      return []
    return [l for l in self.path.read_text().splitlines() if l.strip()]

  def truncate(self, stage: str, step: int) -> None:
    """Drops `stage` records after `step` (they are recomputed on resume)."""
    if not self.enabled:
      return
    lines = self._lines if self._lines is not None else self._read_lines()
    keep = [l for l in lines
            if not (json.loads(l).get('stage') == stage and json.loads(l).get('step', 0) > step)]
    if self.remote:
      self._lines = keep
    if keep != lines:
      paths.write_atomic(self.path, ''.join(l + '\n' for l in keep))

  def write(self, stage: str, step: int, metrics: dict, model_names) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'stage': stage, **flatten(metrics, model_names)}
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in record.items()})
    if self.remote:
      if self._lines is None:
        self._lines = self._read_lines()
      self._lines.append(line)
    else:
      with self.path.open('a') as f:
        f.write(line + '\n')
    collapsed = [k.split('/', 1)[1] for k, v in record.items()
                 if k.startswith('collapsed/') and v > 0]
    if collapsed:
      log.warning('%s step %d: possible trust-region collapse: the anchor prefers %s on '
                      'some queries but the policy gives them almost no mass there '
                      '(below rl.collapse_threshold)', stage, step, collapsed)
    self._tensorboard(stage, step, record)
    if self.remote and time.monotonic() - self._last_flush >= self.remote_flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Remote workdirs: uploads metrics.jsonl and the TensorBoard events now."""
    if not (self.enabled and self.remote):
      return
    if self._lines is not None:
      paths.write_atomic(self.path, ''.join(l + '\n' for l in self._lines))
    if self._tb:
      self._tb.flush()
      for local in _local_files(self._tb_local):
        paths.write_atomic(self._tb_dir / local.name, local.read_bytes())
    self._last_flush = time.monotonic()

  def _tensorboard(self, stage, step, record):
    if self._tb is None:
      summary_writer = _summary_writer_class()
      if summary_writer is None:   # TensorBoard output is optional; metrics.jsonl is not
        self._tb = False
        return
      if self.remote:
        self._tb_local = tempfile.mkdtemp(prefix='entrorouter_tb_')
      self._tb = summary_writer(self._tb_local or str(self._tb_dir))
    if self._tb:
      for key, value in record.items():
        if key not in ('step', 'stage') and value is not None and math.isfinite(value):
          self._tb.add_scalar(f'{stage}/{key}', value, step)

  def close(self):
    self.flush()
    if self._tb:
      self._tb.close()
    if self._tb_local:
      shutil.rmtree(self._tb_local, ignore_errors=True)
    self._tb, self._tb_local = None, None


def _summary_writer_class():
  """tensorboardX's SummaryWriter (None when it is not installed), imported
  without torch where torch is installed but not yet imported: tensorboardX
  imports it only to accept torch tensors, which are never logged here, and
  that import costs seconds at the start of every run."""
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None   # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter


def _local_files(folder):
  return sorted(p for p in pathlib.Path(folder).iterdir() if p.is_file())
