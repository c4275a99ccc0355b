"""The table readers' shared machinery: cells, files, costs and rows.

  cells   _number, _outcomes, _amounts, _texts: one column's cells parsed and checked,
          DataError naming the file, row, column, value and what was expected
  files   _paths, _read_table (CSV, strict JSONL, Parquet; UTF-8 checked), _pick_column
  costs   _model_costs: a file's costs, or list prices x (counted or estimated) tokens
  rows    _Rows, one file's block; _assemble joins blocks into a RoutingDataset (ids,
          splits, repeats merged), with every assumption in _Notes

`readers` builds each format (wide, long, RouterDC, RouteLLM, feedback) from these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import pathlib
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from entrorouter_jax import strict_json
from entrorouter_jax.data.dataset import DataError, ModelInfo, RoutingDataset
from entrorouter_jax.data.pool import check_utf8 as _check_utf8
from entrorouter_jax.data.splits import DEFAULT_FRACTIONS, split_by_id

TABLE_SUFFIXES = ('.csv', '.jsonl', '.parquet')
# Rough characters per token of English text; used only when a file has no counts.
CHARS_PER_TOKEN = 4


# --------------------------------------------------------------------------
# Cells: parsing with file/row/column in every error


def _is_missing(cell) -> bool:
  return cell is None or cell is pd.NA or (isinstance(cell, float) and math.isnan(cell))


def _number(cell) -> float:
  """One cell -> float; NaN for an empty cell. True/False (any case) -> 1/0.

  Raises TypeError/ValueError for anything else. Empty means '', 'nan' (what
  pandas and Python write for a missing number), None or NaN.
  """
  if _is_missing(cell):
    return math.nan
  if isinstance(cell, (bool, np.bool_)):
    return float(cell)
  if isinstance(cell, str):
    text = cell.strip().lower()
    if text in ('', 'nan'):
      return math.nan
    if text in ('true', 'false'):
      return float(text == 'true')
    return float(text)
  if isinstance(cell, numbers.Real):
    return float(cell)
  raise TypeError(f'{type(cell).__name__} is not a number')


def _numbers(cells, where: str, column: str, what: str, expected: str) -> np.ndarray:
  """A column of cells -> float64[n], NaN where empty; DataError at the first non-number."""
  if isinstance(cells, pd.Series) and (pd.api.types.is_numeric_dtype(cells)
                                      or pd.api.types.is_bool_dtype(cells)):
    return cells.to_numpy(dtype=np.float64, na_value=np.nan)
  cells = list(cells)
  out = np.empty(len(cells))
  for i, cell in enumerate(cells):
    try:
      out[i] = _number(cell)
    except (TypeError, ValueError):
      raise DataError(f'{where}: row {i + 1}, column {column!r}: {what} {cell!r} is not a '
                      f'number; expected {expected}') from None
  return out


def _outcomes(cells, where: str, column: str) -> np.ndarray:
  """Outcome cells -> float64[n] in [0, 1], NaN where empty (= not observed)."""
  expected = 'a score in [0, 1], True/False, or an empty cell for a missing outcome'
  values = _numbers(cells, where, column, 'outcome', expected)
  bad = np.flatnonzero(~np.isnan(values) & ~((values >= 0) & (values <= 1)))
  if bad.size:
    i = bad[0]
    raise DataError(f'{where}: row {i + 1}, column {column!r}: outcome {float(values[i])!r} '
                    f'is outside [0, 1]; expected {expected}')
  return values


def _amounts(cells, where: str, column: str, what: str) -> np.ndarray:
  """Cost or token-count cells -> float64[n] >= 0, NaN where empty."""
  expected = f'a {what} >= 0 (or an empty cell)'
  values = _numbers(cells, where, column, what, expected)
  bad = np.flatnonzero(~np.isnan(values) & ~((values >= 0) & np.isfinite(values)))
  if bad.size:
    i = bad[0]
    raise DataError(f'{where}: row {i + 1}, column {column!r}: {what} {float(values[i])!r} '
                    f'is negative or not finite; expected {expected}')
  return values


def _texts(cells, where: str, column: str, what: str, *, required: bool = True) -> list[str]:
  """Cells as strings; an empty (or blank) cell raises DataError when `required`."""
  out = []
  for i, cell in enumerate(cells):
    if isinstance(cell, np.ndarray):
      # Parquet gives list cells back as arrays; spell them as the Python list
      # they were (RouterBench prompts are lists of prompt parts).
      cell = cell.tolist()
    text = '' if _is_missing(cell) else str(cell)
    if required and not text.strip():
      raise DataError(f'{where}: row {i + 1}, column {column!r}: {what} is empty ({cell!r}); '
                      f'expected a non-empty {what}')
    out.append(text)
  return out


def _short(text: str, width: int = 60) -> str:
  return repr(text if len(text) <= width else text[:width] + '...')


def _sha1(text: str) -> str:
  return hashlib.sha1(text.encode('utf-8')).hexdigest()


def _estimated_tokens(texts: Sequence[str]) -> np.ndarray:
  """ceil(len(text) / 4) per text, float64[n]: a rough count where a file has none."""
  return np.ceil(np.array([len(t) for t in texts], dtype=np.float64) / CHARS_PER_TOKEN)


def _unique(items) -> list:
  return list(dict.fromkeys(items))


# --------------------------------------------------------------------------
# Files


def _paths(paths, *, dirs: bool = False) -> list[pathlib.Path]:
  """One path or a list of paths; DataError naming the first that does not exist
  (or is a directory, unless `dirs`)."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise DataError('no data files given; expected one or more paths')
  paths = [pathlib.Path(p) for p in paths]
  for p in paths:
    if not p.exists():
      raise DataError(f'{p}: no such file or directory')
    if p.is_dir() and not dirs:
      raise DataError(f'{p}: is a directory; expected a data file')
  return paths


def _source(paths) -> str:
  return ', '.join(str(p) for p in paths)


_JSON_TYPES = {dict: 'object', list: 'array', str: 'string', int: 'number', float: 'number',
               bool: 'true/false', type(None): 'null'}


def _read_jsonl(path: pathlib.Path) -> pd.DataFrame:
  """A JSON-lines file as a frame, one row per non-blank line (a JSON object).

  Strict JSON in UTF-8 (`strict_json`): bytes that are not UTF-8, NaN,
  Infinity, numbers out of float range and escapes decoding to a lone
  surrogate raise DataError naming the line and field. The frame is the one
  pd.read_json(lines=True, dtype=False) gives for valid files: columns in
  order of first appearance, missing cells (null or absent) NaN; but floats
  are parsed exactly (pandas' parser may be 1 ulp off) and integers of any size.
  """
  records = []
  try:
    for lineno, record in strict_json.iter_jsonl(path):
      if not isinstance(record, dict):
        raise DataError(f'{path}:{lineno}: a JSON {_JSON_TYPES.get(type(record), "value")}; '
                        'expected one JSON object ({"column": value, ...}) per line')
      records.append(record)
  except strict_json.JsonError as e:
    raise DataError(str(e)) from None
  frame = pd.DataFrame(records)
  for column in frame.columns:
    if frame[column].isna().any():
      frame[column] = frame[column].fillna(np.nan)
  return frame


try:   # a Parquet list-of-strings cell that is not UTF-8 raises a bare ArrowException
  from pyarrow.lib import ArrowException as _ArrowError
except ImportError:  # pragma: no cover - pandas reads Parquet with pyarrow
  _ArrowError = ValueError


def _check_parquet_text(path: pathlib.Path, frame: pd.DataFrame) -> None:
  """DataError naming the row and column of a Parquet string cell that is not UTF-8.

  pandas keeps Parquet strings in Arrow, unchecked, until a cell is read (a
  UnicodeDecodeError there); Arrow cannot hold a lone surrogate.
  """
  for column in frame.columns:
    cells = frame[column].array
    if not isinstance(cells, pd.arrays.ArrowStringArray):
      continue
    try:
      cells.__arrow_array__().validate(full=True)
    except ValueError as e:   # ArrowInvalid: "Invalid UTF8 sequence at string index i"
      for i in range(len(cells)):
        try:
          cells[i]
        except UnicodeDecodeError as bad:
          raise DataError(f'{path}: row {i + 1}, column {column!r}: byte {bad.start} of the '
                          f'text is not UTF-8 ({bad.object[bad.start:bad.start + 1]!r}); '
                          'expected UTF-8 text') from None
      raise DataError(f'{path}: column {column!r}: {e}; expected UTF-8 text') from None


def _read_table(path: pathlib.Path) -> pd.DataFrame:
  """A CSV, JSONL or Parquet file as a frame with at least one row.

  CSV cells are read as text, unconverted ('NA' stays a query, not a missing
  value); the cell parsers above decide what each column means. Text must be
  UTF-8 and JSON strict (see `_read_jsonl`); DataError names the line where not.
  """
  suffix = path.suffix.lower()
  if suffix not in TABLE_SUFFIXES:
    raise DataError(f'{path}: unsupported file type {suffix!r}; '
                    f'expected one of {list(TABLE_SUFFIXES)}')
  if path.stat().st_size == 0:
    raise DataError(f'{path}: the file is empty; expected a header and at least one data row')
  if suffix == '.csv':
    _check_utf8(path)
  try:
    if suffix == '.csv':
      frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    elif suffix == '.jsonl':
      frame = _read_jsonl(path)
    else:
      frame = pd.read_parquet(path)
  except (ValueError, pd.errors.ParserError, OSError, _ArrowError) as e:
    raise DataError(f'{path}: cannot read it as {suffix[1:].upper()}: {e}') from None
  if suffix == '.parquet':
    _check_parquet_text(path, frame)
  if len(frame) == 0:
    raise DataError(f'{path}: no data rows; expected at least one row after the header')
  frame.columns = [str(c) for c in frame.columns]
  return frame


def _pick_column(columns: Sequence[str], where: str, given: Optional[str],
                 candidates: Sequence[str], what: str, *, required: bool,
                 option: str = '') -> Optional[str]:
  """The `given` column (which must exist) or the first candidate present.

  `option` names the reader keyword that picks this column, for the message.
  """
  if given:
    if given not in columns:
      raise DataError(f'{where}: {what} column {given!r} not found; columns are {list(columns)}')
    return given
  for c in candidates:
    if c in columns:
      return c
  if required:
    hint = f' (or name it with {option}=)' if option else ''
    raise DataError(f'{where}: no {what} column; expected one of {list(candidates)}{hint}; '
                    f'columns are {list(columns)}')
  return None


# --------------------------------------------------------------------------
# Costs


class _Notes:
  """Assumptions made while reading: one sentence per kind; '{models}' in a
  sentence becomes the list of models it was added for."""

  def __init__(self):
    self._models: dict[str, list[str]] = {}   # sentence -> models

  def add(self, sentence: str, model: str = '') -> None:
    models = self._models.setdefault(sentence, [])
    if model and model not in models:
      models.append(model)

  def lines(self) -> list[str]:
    return [s.replace('{models}', ', '.join(m)) for s, m in self._models.items()]


def _model_costs(where: str, model: str, queries: Sequence[str], observed: np.ndarray,
                 prices: Mapping[str, ModelInfo], notes: _Notes, *,
                 assumed_output_tokens: int, cost: Optional[np.ndarray] = None,
                 cost_column: Optional[str] = None, tokens_in: Optional[np.ndarray] = None,
                 tokens_out: Optional[np.ndarray] = None,
                 rows: Optional[np.ndarray] = None) -> np.ndarray:
  """Dollar cost of one model's answers, float64[n].

  A given `cost` (float64[n], NaN = none) wins. Otherwise, where the outcome is
  observed, cost = (input x price_in + output x price_out) / 1e6 with the pool's
  prices (dollars per 1M tokens). Token counts come from `tokens_in` /
  `tokens_out` (NaN = none), else are estimated - input ceil(len(query) / 4),
  output `assumed_output_tokens` - and the estimate is noted. Unobserved rows
  without a given cost cost 0: they are masked anyway.

  `cost_column` names the file's cost column for messages (None: the format
  has none); `rows` are the rows' 1-based numbers in the file.
  """
  n = len(queries)
  rows = np.arange(1, n + 1) if rows is None else rows
  given = np.full(n, np.nan) if cost is None else cost
  need = observed & np.isnan(given)
  if not need.any():
    return np.nan_to_num(given, nan=0.0)

  price = prices.get(model)
  if price is None or price.price_in is None or price.price_out is None:
    if cost is not None:
      row = rows[np.flatnonzero(need)[0]]
      raise DataError(f'{where}: row {row}, column {cost_column!r}: model {model!r} has an '
                      'outcome but an empty cost, and no price in the pool file; expected a '
                      'cost >= 0 or a pool price')
    if cost_column is None:
      raise DataError(f'model {model!r} in {where} has outcomes but no price in the pool file, '
                      f'and this format carries no costs; expected the pool to list {model!r} '
                      'with price_in and price_out')
    raise DataError(f'model {model!r} in {where} has outcomes but no cost column '
                    f'`{cost_column}` and no price in the pool file; expected one of them')

  tin = np.full(n, np.nan) if tokens_in is None else tokens_in
  tout = np.full(n, np.nan) if tokens_out is None else tokens_out
  guessed_in, guessed_out = need & np.isnan(tin), need & np.isnan(tout)
  tin = np.where(np.isnan(tin), _estimated_tokens(queries), tin)
  tout = np.where(np.isnan(tout), float(assumed_output_tokens), tout)
  priced = (tin * price.price_in + tout * price.price_out) / 1e6

  sentence = ('cost of {models} = (input tokens x price_in + output tokens x price_out) / 1e6 '
              "with the pool's list prices (dollars per 1M tokens), where the data gives no cost")
  if guessed_in.any():
    sentence += (f'; input tokens estimated as ceil(len(query) / {CHARS_PER_TOKEN}) where the '
                 'data gives no count')
  if guessed_out.any():
    sentence += (f'; output tokens assumed to be {assumed_output_tokens} per query '
                 '(assumed_output_tokens) where the data gives no count')
  notes.add(sentence, model)
  return np.where(need, priced, np.nan_to_num(given, nan=0.0))


# --------------------------------------------------------------------------
# Assembly: rows from one or more files -> RoutingDataset


@dataclasses.dataclass
class _Rows:
  """Queries read from one file (n rows, k models), before repeated ids are merged.

  The long reader makes one from all its files, with ids already unique.
  """
  available: list[str]      # every model the file has (before models=)
  models: list[str]         # the k models kept, in the order of the columns below
  where: list[str]          # '<file>, row <r>' per row, for messages
  ids: list[str]
  queries: list[str]
  tasks: list[str]
  splits: list[str]         # '' = assign later by a seeded hash of the id
  outcomes: np.ndarray      # [n, k] float64, NaN = not observed
  costs: np.ndarray         # [n, k] float64 dollars


def _assemble(name: str, blocks: Sequence[_Rows], *, source: str, prices: Mapping[str, ModelInfo],
              models: Optional[Sequence[str]], notes: _Notes, split_seed: int = 0,
              split_fractions: Optional[Mapping[str, float]] = None,
              relabel_ids: bool = False) -> RoutingDataset:
  """Stacks the files' rows, merges repeated ids, assigns missing splits, validates.

  Models absent from a file are unobserved for its rows. `relabel_ids`: see
  `_merge_repeats`.
  """
  available = _unique(m for b in blocks for m in b.available)
  if models is not None:
    missing = [m for m in models if m not in available]
    if missing:
      raise DataError(f'{source}: model(s) {missing} named in models= are absent from the data; '
                      f'expected names among {available}')
    names = list(models)
  else:
    names = available
  column = {m: j for j, m in enumerate(names)}

  n = sum(len(b.ids) for b in blocks)
  outcomes = np.full((n, len(names)), np.nan)
  costs = np.zeros((n, len(names)))
  start = 0
  for b in blocks:
    rows = slice(start, start + len(b.ids))
    for j, m in enumerate(b.models):
      outcomes[rows, column[m]] = b.outcomes[:, j]
      costs[rows, column[m]] = b.costs[:, j]
    start += len(b.ids)
  ids, queries, tasks, splits, where = ([x for b in blocks for x in getattr(b, field)]
                                        for field in ('ids', 'queries', 'tasks', 'splits', 'where'))

  keep, ids = _merge_repeats(ids, queries, tasks, splits, outcomes, costs, where, names, notes,
                             relabel_ids=relabel_ids)
  queries, tasks, splits = ([x[i] for i in keep] for x in (queries, tasks, splits))
  outcomes, costs = outcomes[keep], costs[keep]

  unsplit = [i for i, s in enumerate(splits) if not s]
  if unsplit:
    fractions = DEFAULT_FRACTIONS if split_fractions is None else dict(split_fractions)
    for i, s in zip(unsplit, split_by_id([ids[i] for i in unsplit], split_seed, fractions)):
      splits[i] = s

  return RoutingDataset(
      name=name, models=[prices.get(m, ModelInfo(m)) for m in names],
      ids=np.array(ids), queries=np.array(queries), tasks=np.array(tasks),
      splits=np.array(splits), outcomes=np.nan_to_num(outcomes, nan=0.0).astype(np.float32),
      outcome_mask=~np.isnan(outcomes), costs=costs.astype(np.float32),
      source=source, notes=notes.lines()).validate()


def _merge_repeats(ids, queries, tasks, splits, outcomes, costs, where, names, notes, *,
                   relabel_ids: bool) -> tuple[list[int], list[str]]:
  """Rows to keep and their ids, after repeated ids are merged.

  A row repeating an earlier row's id, query, task, split, outcomes and costs
  is dropped (noted). Any difference raises DataError - except, with
  `relabel_ids`, a different query text: the id then labels several queries
  (RouterBench reuses some `sample_id`s for a question and its doubled prompt),
  so each such row becomes its own query `<id>#<sha1(query)[:8]>` (noted).
  """
  ids = list(ids)
  if relabel_ids:
    texts: dict[str, set] = {}
    for i, q in zip(ids, queries):
      texts.setdefault(i, set()).add(q)
    shared = {i for i, t in texts.items() if len(t) > 1}
    if shared:
      first = next(r for r, i in enumerate(ids) if i in shared)
      other = next(r for r, i in enumerate(ids) if ids[first] == i and queries[r] != queries[first])
      notes.add(f'{len(shared)} ids label more than one query text (e.g. {ids[first]!r} at '
                f'{where[first]} and {where[other]}); each such row is its own query, with id '
                '"<id>#<first 8 hex digits of sha1(query)>"')
      ids = [f'{i}#{_sha1(q)[:8]}' if i in shared else i for i, q in zip(ids, queries)]

  first_row: dict[str, int] = {}
  keep, dropped = [], []
  for r, i in enumerate(ids):
    a = first_row.setdefault(i, r)
    if a == r:
      keep.append(r)
      continue
    for what, va, vb in (('query text', queries[a], queries[r]), ('task', tasks[a], tasks[r]),
                         ('split', splits[a], splits[r])):
      if va != vb:
        raise DataError(f'{where[r]}: id {i!r} repeats {where[a]} with {what} {_short(vb)} '
                        f'instead of {_short(va)}; expected repeated ids to agree')
    for j, m in enumerate(names):
      for what, values in (('outcome', outcomes), ('cost', costs)):
        va, vb = values[a, j], values[r, j]
        if not (va == vb or (np.isnan(va) and np.isnan(vb))):
          raise DataError(f'{where[r]}: id {i!r} repeats {where[a]} with {what} {float(vb)!r} '
                          f'instead of {float(va)!r} in column {m!r}; expected repeated ids '
                          'to agree (or distinct ids)')
    dropped.append((r, a))
  if dropped:
    r, a = dropped[0]
    notes.add(f'{len(dropped)} repeated rows (same id, query text and values as an earlier '
              f'row) were kept once, e.g. {where[r]} repeats {where[a]}')
  return keep, [ids[r] for r in keep]
