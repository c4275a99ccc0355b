"""The routing dataset: queries, a model pool, outcomes, costs and splits.

Every reader (`readers.py`) and the synthetic generator (`synthetic.py`) return a
`RoutingDataset`; the TFDS builders write one to array_record files and the
training code reads it back. One validated structure, one place for the checks.

Shapes (N queries, K models):
  ids[N] str, queries[N] str, tasks[N] str (may be ''), splits[N] str,
  outcomes[N, K] float32 in [0, 1] (0 where missing), outcome_mask[N, K] bool
  (True = observed), costs[N, K] float32 >= 0.

A feedback log (`readers.read_feedback`) observes one cell per row, the model
the deployed policy chose, and adds per row:
  propensities[N] float64 in (0, 1]: pi_b(logged model | query),
  cost_weights[N] float64 >= 0, NaN where the log gives none.
Both are None for fully labelled data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


class DataError(ValueError):
  """Bad routing data. The message names the file, row/column, value and what was expected."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """One model of the pool. Prices are dollars per 1M tokens (None = unknown)."""
  name: str
  price_in: Optional[float] = None
  price_out: Optional[float] = None
  context_limit: Optional[int] = None


@dataclasses.dataclass
class RoutingDataset:
  """An offline routing table (see module docstring for shapes)."""
  name: str
  models: list[ModelInfo]
  ids: np.ndarray
  queries: np.ndarray
  tasks: np.ndarray
  splits: np.ndarray
  outcomes: np.ndarray
  outcome_mask: np.ndarray
  costs: np.ndarray
  # Optional per-(query, model) truth, kept by the synthetic generator so the
  # Bayes-optimal expected utility is known exactly.
  true_prob: Optional[np.ndarray] = None
  # Feedback logs only (see module docstring); rows, not models, so
  # `select_models` keeps them as they are.
  propensities: Optional[np.ndarray] = None
  cost_weights: Optional[np.ndarray] = None
  source: str = ''          # file(s) the data came from, for error messages
  notes: list[str] = dataclasses.field(default_factory=list)  # assumptions made

  def __post_init__(self):
    # Text as object arrays: fixed-width numpy strings would pad every query to
    # the longest one (hundreds of MB on long prompts).
    for field in ('ids', 'queries', 'tasks', 'splits'):
      setattr(self, field, np.asarray(
          [str(x) for x in getattr(self, field)], dtype=object).reshape(-1))
    for field in ('propensities', 'cost_weights'):
      if getattr(self, field) is not None:
        setattr(self, field, np.asarray(getattr(self, field), dtype=np.float64))

  @property
  def model_names(self) -> list[str]:
    return [m.name for m in self.models]

  @property
  def num_queries(self) -> int:
    return len(self.ids)

  @property
  def num_models(self) -> int:
    return len(self.models)

  def split_names(self) -> list[str]:
    return sorted(set(self.splits.tolist()))

  def subset(self, rows: np.ndarray) -> 'RoutingDataset':
    """The dataset restricted to `rows` (bool mask or integer indices)."""
    take = lambda a: None if a is None else a[rows]
    return dataclasses.replace(
        self, ids=self.ids[rows], queries=self.queries[rows],
        tasks=self.tasks[rows], splits=self.splits[rows],
        outcomes=self.outcomes[rows], outcome_mask=self.outcome_mask[rows],
        costs=self.costs[rows], true_prob=take(self.true_prob),
        propensities=take(self.propensities), cost_weights=take(self.cost_weights))

  def split(self, name: str) -> 'RoutingDataset':
    rows = self.splits == name
    if not rows.any():
      raise DataError(
          f'{self.source or self.name}: split {name!r} is empty; '
          f'expected one of {self.split_names()}')
    return self.subset(rows)

  def select_models(self, names: Sequence[str]) -> 'RoutingDataset':
    """Keeps only the named models, in the given order.

    Every row stays, with its propensity and cost weight: a feedback row whose
    logged model is dropped keeps them and has no observed cell left.
    """
    known = self.model_names
    missing = [n for n in names if n not in known]
    if missing:
      raise DataError(
          f'{self.source or self.name}: model(s) {missing} named in the config are '
          f'absent from the data; expected names among {known}')
    cols = np.array([known.index(n) for n in names])
    take = lambda a: None if a is None else a[:, cols]
    return dataclasses.replace(
        self, models=[self.models[i] for i in cols],
        outcomes=self.outcomes[:, cols], outcome_mask=self.outcome_mask[:, cols],
        costs=self.costs[:, cols], true_prob=take(self.true_prob))

  def logged_models(self) -> np.ndarray:
    """int64[N]: the column of each row's one observed cell (the model a feedback log chose).

    DataError naming the first query with no observed cell, or with several.
    """
    counts = self.outcome_mask.sum(axis=1)
    bad = np.flatnonzero(counts != 1)
    if bad.size:
      i = bad[0]
      observed = [self.model_names[j] for j in np.flatnonzero(self.outcome_mask[i])]
      raise DataError(f'{self.source or self.name}: query {self.ids[i]!r} has {int(counts[i])} '
                      f'observed outcomes {observed}; expected exactly one (the logged model) '
                      f'on every row ({bad.size} rows differ)')
    return np.argmax(self.outcome_mask, axis=1).astype(np.int64)

  def validate(self) -> 'RoutingDataset':
    """Checks shapes, ranges and emptiness; raises DataError naming the culprit."""
    where = self.source or self.name
    n, k = self.num_queries, self.num_models
    if n == 0:
      raise DataError(f'{where}: no queries; expected at least one row')
    if k == 0:
      raise DataError(f'{where}: no models; expected at least one outcome column')
    names = self.model_names
    if len(set(names)) != k:
      dup = sorted({x for x in names if names.count(x) > 1})
      raise DataError(f'{where}: model names {dup} appear more than once')
    for field in ('queries', 'tasks', 'splits'):
      if getattr(self, field).shape != (n,):
        raise DataError(f'{where}: {field} has shape {getattr(self, field).shape}, '
                        f'expected ({n},)')
    for field in ('outcomes', 'outcome_mask', 'costs'):
      if getattr(self, field).shape != (n, k):
        raise DataError(f'{where}: {field} has shape {getattr(self, field).shape}, '
                        f'expected ({n}, {k})')
    if len(set(self.ids.tolist())) != n:
      raise DataError(f'{where}: query ids are not unique')
    empty = [i for i, q in enumerate(self.queries) if not q.strip()]
    if empty:
      raise DataError(f'{where}: query {self.ids[empty[0]]!r} has empty text; '
                      'expected a non-empty query')
    out_of_range = ~np.isfinite(self.outcomes) | (self.outcomes < 0) | (self.outcomes > 1)
    bad = self.outcome_mask & out_of_range
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise DataError(f'{where}: query {self.ids[i]!r}, model {names[j]!r}: outcome '
                      f'{self.outcomes[i, j]!r} is outside [0, 1]')
    bad = ~np.isfinite(self.costs) | (self.costs < 0)
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise DataError(f'{where}: query {self.ids[i]!r}, model {names[j]!r}: cost '
                      f'{self.costs[i, j]!r} is negative or not a number; expected a cost >= 0')
    self._validate_rows(where)
    for s in self.split_names():
      if not (self.splits == s).any():  # pragma: no cover - split_names comes from splits
        raise DataError(f'{where}: split {s!r} is empty')
    return self

  def _validate_rows(self, where: str) -> None:
    """The per-row fields of feedback logs: shape (N,), propensities in (0, 1],
    cost weights >= 0 or NaN."""
    n = self.num_queries
    for field, what, ok, expected in (
        ('propensities', 'propensity', lambda p: (p > 0) & (p <= 1),
         "the logging policy's probability of the logged model, in (0, 1]"),
        ('cost_weights', 'cost weight', lambda w: np.isnan(w) | ((w >= 0) & np.isfinite(w)),
         'a cost weight >= 0, or NaN where the log gives none')):
      values = getattr(self, field)
      if values is None:
        continue
      if values.shape != (n,):
        raise DataError(f'{where}: {field} has shape {values.shape}, expected ({n},)')
      with np.errstate(invalid='ignore'):
        bad = np.flatnonzero(~ok(values))
      if bad.size:
        i = bad[0]
        raise DataError(f'{where}: query {self.ids[i]!r}: {what} {float(values[i])!r} is out of '
                        f'range; expected {expected}')
