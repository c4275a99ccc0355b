"""Metrics out: one JSON object per logged step in DIR/metrics.jsonl, and TensorBoard.

Only process 0 writes. On resume, records past the restored step of the
resumed stage are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np

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

  def __init__(self, workdir, enabled: bool = True):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.enabled = enabled
    self._tb = None
    self._tb_dir = pathlib.Path(workdir) / 'tensorboard'

  def truncate(self, stage: str, step: int) -> None:
    """Drops `stage` records after `step` (they are recomputed on resume)."""
    if not self.enabled or not self.path.exists():
      return
    keep = []
    for line in self.path.read_text().splitlines():
      if not line.strip():
        continue
      record = json.loads(line)
      if not (record.get('stage') == stage and record.get('step', 0) > step):
        keep.append(line)
    self.path.write_text(''.join(l + '\n' for l in keep))

  def write(self, stage: str, step: int, metrics: dict, model_names) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'stage': stage, **flatten(metrics, model_names)}
    with self.path.open('a') as f:
      f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in record.items()}) + '\n')
    collapsed = [k.split('/', 1)[1] for k, v in record.items()
                 if k.startswith('collapsed/') and v > 0]
    if collapsed:
      log.warning('%s step %d: possible trust-region collapse: the anchor prefers %s on '
                      'some queries but the policy gives them almost no mass there '
                      '(below rl.collapse_threshold)', stage, step, collapsed)
    self._tensorboard(stage, step, record)

  def _tensorboard(self, stage, step, record):
    if self._tb is None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:   # TensorBoard output is optional; metrics.jsonl is not
        self._tb = False
        return
      self._tb = SummaryWriter(str(self._tb_dir))
    if self._tb:
      for key, value in record.items():
        if key not in ('step', 'stage') and value is not None and math.isfinite(value):
          self._tb.add_scalar(f'{stage}/{key}', value, step)

  def close(self):
    if self._tb:
      self._tb.close()
    self._tb = None
