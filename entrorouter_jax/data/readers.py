"""Readers: routing tables on disk -> a validated `RoutingDataset`.

Formats (N queries, K models; costs are dollars per answered query):
  wide      one row per query: the query text, one outcome column per model and
            `<model>|total_cost` columns (the RouterBench layout) or token columns.
  long      one row per (query, model): id, query, model, score[, cost, tokens].
  routerdc  RouterDC JSON lists of {"question", "scores": {model: score}}.
  routellm  RouteLLM eval CSVs: the prompt and one True/False column per model.
  feedback  a deployed router's log, one row per routed query: id, query, the
            model it chose, the propensity of that choice, its cost and score;
            only that one cell of the row is observed.

Where a file gives no cost, it is computed from the model pool's list prices
(dollars per 1M tokens) x token counts, and the counts are estimated from the
text length when the file has none; every such assumption is written to
`dataset.notes`.

The cells, files, costs and rows they share are in `tables.py`.

Bad input raises `DataError` naming the file, the row (1-based, header
excluded) or column, the value and what was expected. The checks run here,
while the file and row are still known; `RoutingDataset.validate()` runs last
as a backstop that only knows ids.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from entrorouter_jax import strict_json
from entrorouter_jax.data.dataset import DataError, ModelInfo, RoutingDataset  # noqa: F401
from entrorouter_jax.data.pool import Pool, check_utf8 as _check_utf8, prices as _prices
from entrorouter_jax.data import pool as pool_lib
from entrorouter_jax.data.feedback import read_feedback
from entrorouter_jax.data.tables import (  # noqa: F401 -- _read_table: tests read a file alone
    CHARS_PER_TOKEN, _amounts, _assemble, _estimated_tokens, _model_costs, _Notes, _number,
    _outcomes, _paths, _pick_column, _read_table, _Rows, _sha1, _short, _source, _texts,
    _unique)

# Model-pool files are read by pool.py; these names stay importable from here.
Endpoint, read_pool, read_endpoints = pool_lib.Endpoint, pool_lib.read_pool, pool_lib.read_endpoints

FORMATS = ('wide', 'long', 'routerdc', 'routellm', 'feedback')
# Columns of a wide table that are never model outcomes, even when numeric
# ('Unnamed: 0' is the index pandas writes with to_csv).
WIDE_KNOWN_COLUMNS = ('id', 'sample_id', 'prompt', 'query', 'task', 'eval_name', 'split',
                      'routerdc_split', 'routerbench_row_index', 'oracle_model_to_route_to',
                      'Unnamed: 0')
# A RouterDC file stem ends in its split, e.g. gsm8k-train, arc_challenge_test.
ROUTERDC_STEM = re.compile(r'^(?P<task>.+?)[-_](?P<split>train|test)$')


# --------------------------------------------------------------------------
# wide


def read_wide(paths, *, pool: Pool = None, models: Optional[Sequence[str]] = None,
              query_column: Optional[str] = None, id_column: Optional[str] = None,
              task_column: Optional[str] = None, split_column: Optional[str] = None,
              cost_suffix: str = '|total_cost', input_tokens_suffix: str = '|input_tokens',
              output_tokens_suffix: str = '|output_tokens', split_seed: int = 0,
              split_fractions: Optional[Mapping[str, float]] = None,
              assumed_output_tokens: int = 256) -> RoutingDataset:
  """One row per query (CSV, JSONL or Parquet; several files are stacked).

  Columns:
    query   `prompt` or `query` (or `query_column`), required.
    id      `id` or `sample_id` (or `id_column`); else the first 16 hex digits
            of sha1(query), so splits survive reordering. An id that labels
            several query texts gets one query per text (see `_merge_repeats`).
    task    `task` or `eval_name`, else ''.
    split   `split` or `routerdc_split`, else seeded `split_by_id(ids)`.
    models  every column X with a cost column `X<cost_suffix>`; if the file has
            no cost column, every numeric/bool column that is not one of the
            above, a token column or WIDE_KNOWN_COLUMNS. `models` keeps and
            orders a subset.
  Outcomes are numbers in [0, 1] or True/False; an empty cell is unobserved.
  Costs: the cost column, else tokens (`X<input_tokens_suffix>`,
  `X<output_tokens_suffix>`) x the pool's price, else estimated tokens x price
  (see `_model_costs`).
  """
  paths = _paths(paths)
  notes, prices = _Notes(), _prices(pool)
  options = dict(query_column=query_column, id_column=id_column, task_column=task_column,
                 split_column=split_column, cost_suffix=cost_suffix,
                 token_suffixes=(input_tokens_suffix, output_tokens_suffix),
                 assumed_output_tokens=assumed_output_tokens)
  blocks = [_read_wide_file(p, prices, models, notes, **options) for p in paths]
  return _assemble('wide', blocks, source=_source(paths), prices=prices, models=models,
                   notes=notes, split_seed=split_seed, split_fractions=split_fractions,
                   relabel_ids=True)


def _read_wide_file(path, prices, models, notes, *, query_column, id_column, task_column,
                    split_column, cost_suffix, token_suffixes, assumed_output_tokens) -> _Rows:
  frame = _read_table(path)
  where, columns = str(path), list(frame.columns)
  qcol = _pick_column(columns, where, query_column, ('prompt', 'query'), 'query', required=True,
                      option='query_column')
  idcol = _pick_column(columns, where, id_column, ('id', 'sample_id'), 'id', required=False)
  tcol = _pick_column(columns, where, task_column, ('task', 'eval_name'), 'task', required=False)
  scol = _pick_column(columns, where, split_column, ('split', 'routerdc_split'), 'split',
                      required=False)

  queries = _texts(frame[qcol], where, qcol, 'query')
  ids = (_texts(frame[idcol], where, idcol, 'id') if idcol
         else [_sha1(q)[:16] for q in queries])
  tasks = _texts(frame[tcol], where, tcol, 'task', required=False) if tcol else [''] * len(frame)
  splits = _texts(frame[scol], where, scol, 'split') if scol else [''] * len(frame)

  cost_of = {c[:-len(cost_suffix)]: c for c in columns if cost_suffix and c.endswith(cost_suffix)}
  orphans = [c for m, c in cost_of.items() if m not in columns]
  if orphans:
    raise DataError(f'{where}: cost column {orphans[0]!r} has no outcome column '
                    f'{orphans[0][:-len(cost_suffix)]!r}; expected both')
  if cost_of:
    available = [c for c in columns if c in cost_of]
  else:
    skip = set(WIDE_KNOWN_COLUMNS) | {qcol, idcol, tcol, scol}
    suffixes = tuple(s for s in token_suffixes if s) + ('|model_response',)
    available = [c for c in columns
                 if c not in skip and not c.endswith(suffixes) and _looks_numeric(frame[c])]
  kept = [m for m in available if models is None or m in models]

  outcomes = np.empty((len(frame), len(kept)))
  costs = np.empty_like(outcomes)
  for j, m in enumerate(kept):
    outcomes[:, j] = _outcomes(frame[m], where, m)
    cost = _amounts(frame[cost_of[m]], where, cost_of[m], 'cost') if m in cost_of else None
    tokens = [_amounts(frame[m + s], where, m + s, 'token count') if m + s in columns else None
              for s in token_suffixes]
    costs[:, j] = _model_costs(where, m, queries, ~np.isnan(outcomes[:, j]), prices, notes,
                               assumed_output_tokens=assumed_output_tokens, cost=cost,
                               cost_column=m + cost_suffix, tokens_in=tokens[0],
                               tokens_out=tokens[1])
  return _Rows(available=available, models=kept,
               where=[f'{where}, row {r}' for r in range(1, len(frame) + 1)], ids=ids,
               queries=queries, tasks=tasks, splits=splits, outcomes=outcomes, costs=costs)


def _looks_numeric(cells: pd.Series) -> bool:
  """Whether any cell is a number or True/False (a model column may have empty cells)."""
  for cell in cells:
    try:
      if not math.isnan(_number(cell)):
        return True
    except (TypeError, ValueError):
      pass
  return False


# --------------------------------------------------------------------------
# long


def read_long(paths, *, pool: Pool = None, models: Optional[Sequence[str]] = None,
              split_column: Optional[str] = None, split_seed: int = 0,
              split_fractions: Optional[Mapping[str, float]] = None,
              assumed_output_tokens: int = 256) -> RoutingDataset:
  """One row per (query, model) (CSV, JSONL or Parquet; several files are stacked).

  Columns: `query` (or `prompt`), `model`, `score` required; `id` (else
  sha1(query)[:16]), `cost`, `task`, `input_tokens`, `output_tokens`, `split`
  (or `split_column`; else seeded by id) optional. An empty score is
  unobserved, as is every (id, model) pair without a row. The same (id, model)
  twice: kept once if identical (noted), else DataError; an id with two query
  texts (or tasks, or splits) is a DataError.
  """
  paths = _paths(paths)
  notes, prices = _Notes(), _prices(pool)
  read = [_read_long_file(p, prices, models, notes, split_column=split_column,
                          assumed_output_tokens=assumed_output_tokens) for p in paths]
  records = pd.concat([r for r, _ in read], ignore_index=True)
  available = _unique(m for _, a in read for m in a)

  for column in ('query', 'task', 'split'):
    first = records.groupby('id', sort=False)[column].transform('first')
    bad = np.flatnonzero((records[column] != first).to_numpy())
    if bad.size:
      b = records.iloc[bad[0]]
      a = records.iloc[np.flatnonzero((records['id'] == b['id']).to_numpy())[0]]
      raise DataError(f'{b["where"]}: id {b["id"]!r} has {column} {_short(b[column])}, but '
                      f'{a["where"]} gives it {_short(a[column])}; expected one {column} per id')

  pair = records.duplicated(['id', 'model'], keep='first').to_numpy()
  if pair.any():
    firsts = records[~pair].set_index(['id', 'model'])
    for r in np.flatnonzero(pair):
      b = records.iloc[r]
      a = firsts.loc[(b['id'], b['model'])]
      for column in ('score', 'cost'):
        if not (a[column] == b[column] or (np.isnan(a[column]) and np.isnan(b[column]))):
          raise DataError(f'{b["where"]}, column {column!r}: id {b["id"]!r}, model '
                          f'{b["model"]!r} repeats {a["where"]} with {column} '
                          f'{float(b[column])!r} instead of {float(a[column])!r}; expected '
                          'one row per (id, model) pair')
    notes.add(f'{int(pair.sum())} repeated (id, model) rows with the same score and cost were '
              f'kept once, e.g. {records["where"].iloc[np.flatnonzero(pair)[0]]}')
    records = records[~pair]

  ids = _unique(records['id'])
  index = {i: r for r, i in enumerate(ids)}
  kept = _unique(records['model'])
  col = {m: j for j, m in enumerate(kept)}
  rows = records['id'].map(index).to_numpy()
  cols = records['model'].map(col).to_numpy()
  outcomes = np.full((len(ids), len(kept)), np.nan)
  costs = np.zeros_like(outcomes)
  outcomes[rows, cols] = records['score'].to_numpy()
  costs[rows, cols] = records['cost'].to_numpy()
  first = records.drop_duplicates('id')
  block = _Rows(available=available, models=kept, where=first['where'].tolist(),
                ids=ids, queries=first['query'].tolist(), tasks=first['task'].tolist(),
                splits=first['split'].tolist(), outcomes=outcomes, costs=costs)
  return _assemble('long', [block], source=_source(paths), prices=prices, models=models,
                   notes=notes, split_seed=split_seed, split_fractions=split_fractions)


def _read_long_file(path, prices, models, notes, *, split_column,
                    assumed_output_tokens) -> tuple[pd.DataFrame, list[str]]:
  """The file's rows as records (where, id, query, model, score, cost, task, split)
  with costs resolved, and every model name in it."""
  frame = _read_table(path)
  where, columns = str(path), list(frame.columns)
  qcol = _pick_column(columns, where, None, ('query', 'prompt'), 'query', required=True)
  for column in ('model', 'score'):
    _pick_column(columns, where, None, (column,), column, required=True)
  scol = _pick_column(columns, where, split_column, ('split',), 'split', required=False)

  queries = _texts(frame[qcol], where, qcol, 'query')
  ids = (_texts(frame['id'], where, 'id', 'id') if 'id' in columns
         else [_sha1(q)[:16] for q in queries])
  names = _texts(frame['model'], where, 'model', 'model name')
  scores = _outcomes(frame['score'], where, 'score')
  cost = _amounts(frame['cost'], where, 'cost', 'cost') if 'cost' in columns else None
  tokens = [_amounts(frame[c], where, c, 'token count') if c in columns else None
            for c in ('input_tokens', 'output_tokens')]
  tasks = _texts(frame['task'], where, 'task', 'task', required=False) if 'task' in columns else ''
  splits = _texts(frame[scol], where, scol, 'split') if scol else ''

  costs = np.zeros(len(frame))
  available = _unique(names)
  for m in available:
    if models is not None and m not in models:
      continue
    rows = np.flatnonzero(np.array(names) == m)
    pick = lambda a: None if a is None else a[rows]
    costs[rows] = _model_costs(where, m, [queries[r] for r in rows], ~np.isnan(scores[rows]),
                               prices, notes, assumed_output_tokens=assumed_output_tokens,
                               cost=pick(cost), cost_column='cost', tokens_in=pick(tokens[0]),
                               tokens_out=pick(tokens[1]), rows=rows + 1)
  records = pd.DataFrame({
      'where': [f'{where}, row {r}' for r in range(1, len(frame) + 1)],
      'id': ids, 'query': queries, 'model': names, 'score': scores, 'cost': costs,
      'task': tasks, 'split': splits})
  if models is not None:
    records = records[records['model'].isin(models)]
  return records, available


# --------------------------------------------------------------------------
# RouterDC


def read_routerdc(paths, *, pool: Pool = None, models: Optional[Sequence[str]] = None,
                  assumed_output_tokens: int = 256) -> RoutingDataset:
  """RouterDC JSON files: lists of {"question": str, "scores": {model: score}}.

  Task = the file stem without its train/test suffix (`gsm8k-train.json` ->
  gsm8k, `arc_challenge_test.json` -> arc_challenge); split = that suffix, or
  `ood` for files without one (mbpp.json, ceval.json). Id = `<file stem>/<i>`
  with i the 0-based position in the list (the files keep a fixed order). A
  model missing from an entry's scores is unobserved there. The files carry no
  costs, so `pool` is required: costs are estimated tokens x list prices (noted).
  """
  paths = _paths(paths)
  prices = _prices(pool)
  if not prices:
    raise DataError(f'{_source(paths)}: RouterDC files carry no costs; expected pool= a YAML/JSON '
                    'model-pool file (e.g. configs/pools/<name>.yaml) giving price_in and '
                    'price_out in dollars per 1M tokens for their models')
  notes = _Notes()
  blocks = [_read_routerdc_file(p, prices, models, notes, assumed_output_tokens) for p in paths]
  return _assemble('routerdc', blocks, source=_source(paths), prices=prices, models=models,
                   notes=notes)


def _read_routerdc_file(path, prices, models, notes, assumed_output_tokens) -> _Rows:
  where = str(path)
  _check_utf8(path)
  try:
    entries = strict_json.loads(path.read_bytes())
  except strict_json.JsonError as e:
    # Syntax errors name their line and column; NaN, Infinity and lone
    # surrogates the entry and field ([12].question), 0-based like the ids.
    expected = ('; expected a RouterDC list of {"question", "scores"}'
                if e.message.startswith('not valid JSON') else '')
    raise DataError(f'{where}: {e.message}{expected}') from None
  if not isinstance(entries, list) or not entries:
    raise DataError(f'{where}: holds {_short(str(entries))}; expected a non-empty JSON list of '
                    '{"question", "scores": {model: score}}')
  for i, entry in enumerate(entries, 1):
    if not isinstance(entry, dict) or not isinstance(entry.get('scores'), dict):
      raise DataError(f'{where}: row {i}: {_short(str(entry))} is not '
                      '{"question": ..., "scores": {model: score}}; expected that shape')

  match = ROUTERDC_STEM.match(path.stem)
  task, split = (match['task'], match['split']) if match else (path.stem, 'ood')
  queries = _texts([e.get('question') for e in entries], where, 'question', 'question')
  available = _unique(m for e in entries for m in e['scores'])
  kept = [m for m in available if models is None or m in models]
  outcomes = np.empty((len(entries), len(kept)))
  costs = np.empty_like(outcomes)
  for j, m in enumerate(kept):
    outcomes[:, j] = _outcomes([e['scores'].get(m) for e in entries], where, f'scores.{m}')
    costs[:, j] = _model_costs(where, m, queries, ~np.isnan(outcomes[:, j]), prices, notes,
                               assumed_output_tokens=assumed_output_tokens)
  n = len(entries)
  return _Rows(available=available, models=kept,
               where=[f'{where}, row {r}' for r in range(1, n + 1)],
               ids=[f'{path.stem}/{i}' for i in range(n)], queries=queries, tasks=[task] * n,
               splits=[split] * n, outcomes=outcomes, costs=costs)


# --------------------------------------------------------------------------
# RouteLLM


def read_routellm(paths, *, pool: Pool, models: Optional[Sequence[str]] = None,
                  split_seed: int = 0, split_fractions: Optional[Mapping[str, float]] = None,
                  assumed_output_tokens: int = 256) -> RoutingDataset:
  """RouteLLM eval CSVs: `prompt` and one True/False column per model.

  Paths may be directories (their *.csv files, sorted). Task = the file stem
  without a `_responses` suffix (`mmlu_nutrition.csv` -> mmlu_nutrition,
  `gsm8k_responses.csv` -> gsm8k). Id = `<task>/<sha1(prompt)[:16]>`; split
  seeded by id. Costs = tokens x the pool's list prices (`pool` required):
  input ceil(len(prompt) / 4), output ceil(len(<model>_response) / 4) where a
  response column exists (gsm8k), else `assumed_output_tokens` (all noted).

  Repeated prompts: the MMLU files (RouteLLM commit 0b64fda) repeat 27 prompts
  within their subject, always with the same outcomes; each is kept once
  (14,042 rows -> 14,015 queries, noted). A repeated prompt with different
  outcomes would raise DataError; those files have none.
  """
  paths = _paths(paths, dirs=True)
  files = []
  for p in paths:
    inside = sorted(p.glob('*.csv')) if p.is_dir() else [p]
    if not inside:
      raise DataError(f'{p}: no *.csv files in this directory; expected RouteLLM response CSVs')
    files += inside
  prices = _prices(pool)
  if not prices:
    raise DataError(f'{_source(paths)}: RouteLLM files carry no costs; expected pool= a model-pool '
                    'file with price_in/price_out per 1M tokens, e.g. configs/pools/routellm.yaml')
  notes = _Notes()
  blocks = [_read_routellm_file(f, prices, models, notes, assumed_output_tokens) for f in files]
  return _assemble('routellm', blocks, source=_source(paths), prices=prices, models=models,
                   notes=notes, split_seed=split_seed, split_fractions=split_fractions)


def _read_routellm_file(path, prices, models, notes, assumed_output_tokens) -> _Rows:
  frame = _read_table(path)
  where, columns = str(path), list(frame.columns)
  _pick_column(columns, where, None, ('prompt',), 'prompt', required=True)
  task = path.stem.removesuffix('_responses')
  queries = _texts(frame['prompt'], where, 'prompt', 'prompt')
  available = [c for c in columns if c != 'prompt' and not c.endswith('_response')]
  if not available:
    raise DataError(f'{where}: no model columns besides prompt; expected one True/False column '
                    'per model')
  kept = [m for m in available if models is None or m in models]
  outcomes = np.empty((len(frame), len(kept)))
  costs = np.empty_like(outcomes)
  for j, m in enumerate(kept):
    outcomes[:, j] = _outcomes(frame[m], where, m)
    response = m + '_response'
    tokens_out = None
    if response in columns:
      tokens_out = _estimated_tokens(_texts(frame[response], where, response, 'response',
                                            required=False))
      notes.add(f'output tokens of {{models}} counted as ceil(len(<model>_response) / '
                f'{CHARS_PER_TOKEN}) from the response text ({task})', m)
    costs[:, j] = _model_costs(where, m, queries, ~np.isnan(outcomes[:, j]), prices, notes,
                               assumed_output_tokens=assumed_output_tokens, tokens_out=tokens_out)
  n = len(frame)
  return _Rows(available=available, models=kept,
               where=[f'{where}, row {r}' for r in range(1, n + 1)],
               ids=[f'{task}/{_sha1(q)[:16]}' for q in queries], queries=queries,
               tasks=[task] * n, splits=[''] * n, outcomes=outcomes, costs=costs)


# --------------------------------------------------------------------------
# Dispatch


READERS = {'wide': read_wide, 'long': read_long, 'routerdc': read_routerdc,
           'routellm': read_routellm, 'feedback': read_feedback}


def load_routing_files(files, format: str, *, pool: Pool = None, **options) -> RoutingDataset:
  """Reads `files` (a list of paths or one comma-separated string) in `format`.

  `format` is one of FORMATS; `pool` a pool file path or a list of ModelInfo;
  `options` are the reader's keywords (e.g. models=, split_seed=).
  """
  if isinstance(files, str):
    files = [f.strip() for f in files.split(',') if f.strip()]
  if format not in READERS:
    raise DataError(f'unknown data format {format!r}; expected one of {list(FORMATS)}')
  reader = READERS[format]
  paths = _paths(files, dirs=format == 'routellm')
  accepted = [p for p in inspect.signature(reader).parameters if p not in ('paths', 'pool')]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise DataError(f'reader option(s) {unknown} do not apply to format {format!r}; '
                    f'expected some of {accepted}')
  return reader(paths, pool=pool or None, **options)
