"""Feedback logs -> a `RoutingDataset` where only the logged cell of each row is observed.

A deployed router's log has one row per routed query: `id, query, model, score,
cost, propensity` (the probability with which the deployed policy chose that
model, in (0, 1]) and optionally `cost_weight, task, time, policy, split`. An
empty score is a query not judged yet: the row is left out and counted in a
note. The dataset's `outcome_mask` holds only the logged cell; its
`propensities` and `cost_weights` carry the log's; the costs of the cells no
one logged are estimates (list prices x tokens, or logged means), said in the
notes. Registered in `readers.READERS` as the format 'feedback'.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from entrorouter_jax.data.dataset import DataError, ModelInfo, RoutingDataset
from entrorouter_jax.data.pool import Pool, prices as _prices
from entrorouter_jax.data.tables import (_amounts, _assemble, _estimated_tokens, _model_costs,
                                         _Notes, _numbers, _outcomes, _paths, _pick_column,
                                         _read_table, _Rows, _source, _texts, _unique)

FEEDBACK_COLUMNS = ('id', 'query', 'model', 'score', 'cost', 'propensity')
PROPENSITY_EXPECTED = ('pi_b(logged model | query), the probability with which the logging '
                       'policy chose that model, in (0, 1]')
LOGGED_COST_EXPECTED = "the logged answer's cost in dollars, >= 0"


def read_feedback(paths, *, pool: Pool = None, models: Optional[Sequence[str]] = None,
                  split_seed: int = 0,
                  split_fractions: Optional[Mapping[str, float]] = None) -> RoutingDataset:
  """A deployed router's feedback log (CSV, JSONL or Parquet; several files are stacked).

  One row per routed query. Required columns: `id` (unique over all files),
  `query`, `model` (the one model the logging policy chose), `score` (that
  answer's score in [0, 1] or True/False; empty = not judged yet), `cost` (its
  dollars, >= 0) and `propensity` (pi_b(model | query), in (0, 1]). Optional:
  `cost_weight` (the lambda the query was routed at, >= 0; empty = none),
  `task`, `split` (else seeded `split_by_id(ids)`), `time` and `policy` (not
  kept; the policies are named in a note).

  The models (columns) are `models` in its order, else the pool's models in
  its order, else every model of the log, sorted; a row logging any other
  model is a DataError. Rows with an empty score are dropped (noted); no
  judged row at all is a DataError.

  The dataset: outcome_mask[i] is True at the logged model's column only,
  where outcomes and costs hold the score and the logged cost; propensities
  float64[N], cost_weights float64[N] (NaN where empty). The other cells are
  never observed; their costs are estimates (`_unlogged_costs`, noted).
  """
  paths = _paths(paths)
  notes, prices = _Notes(), _prices(pool)
  if models is not None:
    names, allowed = list(models), 'models='
  elif prices:
    names, allowed = list(prices), 'the pool'
  else:
    names, allowed = None, ''
  records = pd.concat([_read_feedback_file(p, names, allowed) for p in paths],
                      ignore_index=True)
  repeat = records.duplicated('id', keep='first').to_numpy()
  if repeat.any():
    b = records.iloc[np.flatnonzero(repeat)[0]]
    a = records.iloc[np.flatnonzero((records['id'] == b['id']).to_numpy())[0]]
    raise DataError(f"{b['file']}: row {b['row']}, column 'id': id {b['id']!r} repeats "
                    f"{a['file']}, row {a['row']}; expected one row per routed query "
                    '(unique ids)')
  if names is None:
    names = sorted(_unique(records['model']))

  judged = ~np.isnan(records['score'].to_numpy())
  source = _source(paths)
  if not judged.any():
    raise DataError(f'{source}: none of the {len(records)} rows has a score; expected at least '
                    'one judged row (an empty score means not judged yet)')
  if not judged.all():
    first = records.iloc[np.flatnonzero(~judged)[0]]
    notes.add(f'{int((~judged).sum())} of {len(records)} rows have an empty score (not judged '
              f"yet) and were dropped, e.g. {first['file']}, row {first['row']}")
  records = records[judged]
  policies = records['policy'][records['policy'] != ''].value_counts(sort=False)
  if len(policies):
    notes.add("logging policies (column 'policy') and their judged rows: "
              + ', '.join(f'{p!r}: {c}' for p, c in policies.items())
              + "; each row's propensity is its own policy's")

  n, column = len(records), {m: j for j, m in enumerate(names)}
  logged = records['model'].map(column).to_numpy()
  cost = records['cost'].to_numpy()
  outcomes = np.full((n, len(names)), np.nan)
  outcomes[np.arange(n), logged] = records['score'].to_numpy()
  queries = records['query'].tolist()
  costs = _unlogged_costs(source, queries, logged, cost, names, prices, notes)
  block = _Rows(available=names, models=names,
                where=[f'{f}, row {r}' for f, r in zip(records['file'], records['row'])],
                ids=records['id'].tolist(), queries=queries, tasks=records['task'].tolist(),
                splits=records['split'].tolist(), outcomes=outcomes, costs=costs)
  data = _assemble('feedback', [block], source=source, prices=prices, models=None, notes=notes,
                   split_seed=split_seed, split_fractions=split_fractions)
  return dataclasses.replace(data, propensities=records['propensity'].to_numpy(),
                             cost_weights=records['cost_weight'].to_numpy()).validate()


def _read_feedback_file(path, names: Optional[Sequence[str]], allowed: str) -> pd.DataFrame:
  """One log file's rows as records (file, row, id, query, model, score, cost, propensity,
  cost_weight, task, split, policy), every cell checked; score NaN = not judged yet."""
  frame = _read_table(path)
  where, columns = str(path), list(frame.columns)
  for c in FEEDBACK_COLUMNS:
    _pick_column(columns, where, None, (c,), c, required=True)
  n = len(frame)
  text = lambda c, what: (_texts(frame[c], where, c, what, required=c == 'split')
                          if c in columns else [''] * n)

  chosen = _texts(frame['model'], where, 'model', 'model name')
  if names is not None:
    known = set(names)
    bad = [i for i, m in enumerate(chosen) if m not in known]
    if bad:
      raise DataError(f"{where}: row {bad[0] + 1}, column 'model': model {chosen[bad[0]]!r} is "
                      f'not in {allowed}; expected one of {list(names)}')
  cost = _required_numbers(frame, where, 'cost', lambda v: np.isfinite(v) & (v >= 0),
                           'is negative or not finite', LOGGED_COST_EXPECTED)
  propensity = _required_numbers(frame, where, 'propensity', lambda v: (v > 0) & (v <= 1),
                                 'is outside (0, 1]', PROPENSITY_EXPECTED)
  return pd.DataFrame({
      'file': [where] * n, 'row': np.arange(1, n + 1),
      'id': _texts(frame['id'], where, 'id', 'id'),
      'query': _texts(frame['query'], where, 'query', 'query'),
      'model': chosen, 'score': _outcomes(frame['score'], where, 'score'),
      'cost': cost, 'propensity': propensity,
      'cost_weight': (_amounts(frame['cost_weight'], where, 'cost_weight', 'cost weight')
                      if 'cost_weight' in columns else np.full(n, np.nan)),
      'task': text('task', 'task'), 'split': text('split', 'split'),
      'policy': text('policy', 'policy')})


def _required_numbers(frame: pd.DataFrame, where: str, column: str, ok, outside: str,
                      expected: str) -> np.ndarray:
  """The column's cells as float64[N]; DataError naming the first row that is empty or for
  which `ok(values)` is False (its value `outside`)."""
  values = _numbers(frame[column], where, column, column, expected)
  bad = np.flatnonzero(~ok(values))
  if bad.size:
    i = bad[0]
    problem = 'is empty' if np.isnan(values[i]) else f'{float(values[i])!r} {outside}'
    raise DataError(f"{where}: row {i + 1}, column '{column}': {column} {problem}; expected "
                    f'{expected}')
  return values


def _unlogged_costs(where: str, queries: Sequence[str], logged: np.ndarray, cost: np.ndarray,
                    names: Sequence[str], prices: Mapping[str, ModelInfo],
                    notes: _Notes) -> np.ndarray:
  """float64[n, k]: each row's logged cost at its logged model, estimates in the other cells.

  Those cells are never observed. A model with list prices costs
  (ceil(len(query) / 4) x price_in + answer x price_out) / 1e6 (`_model_costs`),
  `answer` being the output tokens its logged costs imply,
  (cost x 1e6 - input tokens x price_in) / price_out, averaged over its logged
  rows (over every priced model's logged rows when it has none) and at least 0.
  A model without prices (or with no answer to average over) costs its mean
  logged cost, or the mean of all logged costs when it was never logged.
  Every estimate is noted.
  """
  n, k = len(queries), len(names)
  priced = lambda m: (m in prices and prices[m].price_in is not None
                      and prices[m].price_out is not None)
  tokens_in = _estimated_tokens(queries)
  implied = np.full(n, np.nan)
  for j, m in enumerate(names):
    rows = logged == j
    if priced(m) and prices[m].price_out > 0:
      implied[rows] = ((cost[rows] * 1e6 - tokens_in[rows] * prices[m].price_in)
                       / prices[m].price_out)
  costs = np.empty((n, k))
  for j, m in enumerate(names):
    rows = logged == j
    answer, sentence = None, ''
    if priced(m) and prices[m].price_out == 0:
      answer = 0.0
    elif priced(m) and rows.any():
      answer = max(0.0, float(implied[rows].mean()))
      sentence = ('output tokens of {models} where a query was not routed to them = the mean '
                  'their logged costs imply, (cost x 1e6 - input tokens x price_in) / '
                  'price_out, at least 0')
    elif priced(m) and not np.isnan(implied).all():
      answer = max(0.0, float(np.nanmean(implied)))
      sentence = ('output tokens of {models}, never logged, = the mean that the logged costs of '
                  'the priced models imply, (cost x 1e6 - input tokens x price_in) / price_out, '
                  'at least 0')
    if answer is not None:
      costs[:, j] = _model_costs(where, m, queries, np.ones(n, bool), prices, notes,
                                 assumed_output_tokens=0, tokens_out=np.full(n, answer))
      if sentence:
        notes.add(sentence, m)
    elif rows.any():
      costs[:, j] = cost[rows].mean()
      notes.add('cost of {models} where a query was not routed to them = their mean logged '
                'cost (no list prices)', m)
    else:
      costs[:, j] = cost.mean()
      notes.add('cost of {models}, never logged, = the mean of all logged costs (no list '
                'prices, or no logged cost of a priced model to estimate answer lengths from)', m)
  costs[np.arange(n), logged] = cost
  return costs
