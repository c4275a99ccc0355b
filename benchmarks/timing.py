"""Timing helpers shared by the benchmarks (no torch, no JAX).

The machines these figures come from are shared, and their speed drifts by
tens of percent within minutes. A ratio against a reference (jax_over_torch)
is only worth reading when both sides were timed under the same conditions,
so `alternate` interleaves their repeats: round r runs every side once, in
the order A B ... then ... B A on the next round, so that neither side always
runs first, right after the other, or last.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np


def alternate(runs: Mapping[str, Callable[[], object]], rounds: int,
              pause: float = 0.0) -> dict[str, list]:
  """{name: [runs[name]() of each round]}: every run once per round, the order
  reversed on every other round (A B, B A, A B, ...), with `pause` seconds of
  sleep before each run (PAUSE in the benchmarks): the worker threads of one
  side's runtime (XLA's, OpenMP's, OpenBLAS's) spin for a while after it
  returns, and would otherwise slow the other side's run that follows."""
  if rounds < 1:
    raise ValueError(f'rounds={rounds}; expected >= 1')
  names = list(runs)
  out = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      if pause > 0:
        time.sleep(pause)
      out[name].append(runs[name]())
  return out


def call_figures(times, batch: int) -> dict:
  """{'latency_p50_ms', 'latency_p99_ms', 'queries_per_s' (batch / median call),
  'batch'} from the seconds of single calls."""
  times = np.asarray(list(times), np.float64).ravel()
  if times.size == 0:
    raise ValueError('no timed calls')
  return {'latency_p50_ms': float(np.percentile(times, 50) * 1e3),
          'latency_p99_ms': float(np.percentile(times, 99) * 1e3),
          'queries_per_s': float(batch / np.median(times)), 'batch': int(batch)}
