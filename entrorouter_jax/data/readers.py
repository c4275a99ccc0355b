"""Readers: routing tables on disk -> a validated `RoutingDataset`.

Formats (N queries, K models; costs are dollars per answered query):
  wide      one row per query: the query text, one outcome column per model and
            `<model>|total_cost` columns (the RouterBench layout) or token columns.
  long      one row per (query, model): id, query, model, score[, cost, tokens].
  routerdc  RouterDC JSON lists of {"question", "scores": {model: score}}.
  routellm  RouteLLM eval CSVs: the prompt and one True/False column per model.

Where a file gives no cost, it is computed from the model pool's list prices
(dollars per 1M tokens) x token counts, and the counts are estimated from the
text length when the file has none; every such assumption is written to
`dataset.notes`.

Bad input raises `DataError` naming the file, the row (1-based, header
excluded) or column, the value and what was expected. The checks run here,
while the file and row are still known; `RoutingDataset.validate()` runs last
as a backstop that only knows ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import numbers
import os
import pathlib
import re
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import yaml

from entrorouter_jax import strict_json
from entrorouter_jax.data.dataset import DataError, ModelInfo, RoutingDataset
from entrorouter_jax.data.splits import DEFAULT_FRACTIONS, split_by_id

PathLike = Union[str, os.PathLike]
Pool = Union[None, PathLike, Sequence[ModelInfo]]

FORMATS = ('wide', 'long', 'routerdc', 'routellm')
TABLE_SUFFIXES = ('.csv', '.jsonl', '.parquet')
# Rough characters per token of English text; used only when a file has no counts.
CHARS_PER_TOKEN = 4
# Columns of a wide table that are never model outcomes, even when numeric
# ('Unnamed: 0' is the index pandas writes with to_csv).
WIDE_KNOWN_COLUMNS = ('id', 'sample_id', 'prompt', 'query', 'task', 'eval_name', 'split',
                      'routerdc_split', 'routerbench_row_index', 'oracle_model_to_route_to',
                      'Unnamed: 0')
# A RouterDC file stem ends in its split, e.g. gsm8k-train, arc_challenge_test.
ROUTERDC_STEM = re.compile(r'^(?P<task>.+?)[-_](?P<split>train|test)$')
POOL_FIELDS = ('name', 'price_in', 'price_out', 'context_limit')
# Where `serve` sends a model's requests: an OpenAI-compatible endpoint
# (base_url, ending in /v1), the model name sent there (default: the pool name)
# and the environment variable holding its key (none: no Authorization header).
ENDPOINT_FIELDS = ('base_url', 'upstream_model', 'api_key_env')
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where one pool model is served (the pool file's serving keys)."""
  name: str
  base_url: Optional[str] = None
  upstream_model: Optional[str] = None
  api_key_env: Optional[str] = None


# --------------------------------------------------------------------------
# Model pool


def read_pool(path: PathLike) -> list[ModelInfo]:
  """The model pool in a YAML (.yaml/.yml) or JSON file.

  Prices are dollars per 1M tokens. Accepted layouts:
    - a list: [{name, price_in, price_out, context_limit?}, ...]
    - a mapping {models: [<the list above>]}
    - a mapping {<name>: {price_in, price_out, context_limit?}, ...}
  Each entry may also carry the serving keys of ENDPOINT_FIELDS (`read_endpoints`).
  """
  path = pathlib.Path(path)
  return [_pool_entry(path, label, body) for label, body in _pool_entries(path)]


def read_endpoints(path: PathLike) -> dict[str, Endpoint]:
  """{name: Endpoint} of the pool file: where `serve` forwards each model's requests.

  base_url must be an http(s) URL (an OpenAI-compatible endpoint, usually
  ending in /v1); upstream_model a non-empty string; api_key_env the name of
  an environment variable. The prices are checked as by `read_pool`.
  """
  path = pathlib.Path(path)
  out = {}
  for label, body in _pool_entries(path):
    name = _pool_entry(path, label, body).name
    url = body.get('base_url')
    if url is not None and (not isinstance(url, str)
                            or not re.match(r'^https?://[^/\s]+', url)):
      raise DataError(f'{path}: {label}: field base_url is {url!r}; expected an http(s) URL '
                      'of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1')
    upstream = body.get('upstream_model')
    if upstream is not None and (not isinstance(upstream, str) or not upstream.strip()):
      raise DataError(f'{path}: {label}: field upstream_model is {upstream!r}; expected the '
                      'non-empty model name the endpoint knows')
    env = body.get('api_key_env')
    if env is not None and (not isinstance(env, str) or not ENV_NAME.match(env)):
      raise DataError(f'{path}: {label}: field api_key_env is {env!r}; expected the name of '
                      'an environment variable (letters, digits, _)')
    out[name] = Endpoint(name, url.rstrip('/') if url else None, upstream, env)
  return out


def _pool_entries(path: pathlib.Path) -> list[tuple[str, dict]]:
  """[(label for errors, entry mapping)] of a pool file, names unique."""
  try:
    text = path.read_text(encoding='utf-8')
  except OSError as e:
    raise DataError(f'{path}: cannot read the model-pool file ({e.strerror})') from None
  except UnicodeDecodeError:
    _check_utf8(path)
    raise
  suffix = path.suffix.lower()
  try:
    if suffix in ('.yaml', '.yml'):
      data = yaml.safe_load(text)
    elif suffix == '.json':
      data = strict_json.loads(text)
    else:
      raise DataError(f'{path}: model-pool file has suffix {suffix!r}; '
                      'expected .yaml, .yml or .json')
  except yaml.YAMLError as e:
    raise DataError(f'{path}: not a valid {suffix[1:].upper()} model-pool file: {e}') from None
  except strict_json.JsonError as e:
    raise DataError(f'{path}: not a valid JSON model-pool file: {e.message}') from None

  if isinstance(data, dict) and set(data) == {'models'}:
    data = data['models']
  if isinstance(data, dict):
    entries = []
    for name, body in data.items():
      if not isinstance(body, dict):
        raise DataError(f'{path}: entry {name!r} is {body!r}; expected a mapping with '
                        'price_in, price_out[, context_limit]')
      entries.append((f'entry {name!r}', {'name': name, **body}))
  elif isinstance(data, list):
    entries = []
    for i, body in enumerate(data, 1):
      named = isinstance(body, dict) and 'name' in body
      entries.append((f'entry {i} ({body["name"]!r})' if named else f'entry {i}', body))
  else:
    raise DataError(f'{path}: the model pool is {type(data).__name__}; expected a list of '
                    'models, {models: [...]} or {name: {price_in, price_out}}')
  if not entries:
    raise DataError(f'{path}: the model pool is empty; expected at least one model')
  for label, body in entries:
    bad = strict_json.invalid_text(body)   # YAML's "\ud800" escapes decode to lone surrogates
    if bad is not None:
      raise DataError(f'{path}: {label}: field {bad[0]} holds an invalid Unicode character (a '
                      f'lone surrogate at position {bad[1]}); expected valid UTF-8 text')
  names = [body.get('name') if isinstance(body, dict) else None for _, body in entries]
  dup = sorted({n for n in names if n is not None and names.count(n) > 1}, key=str)
  if dup:
    raise DataError(f'{path}: model(s) {dup} are listed more than once; expected each once')
  return entries


def _pool_entry(path, label: str, entry) -> ModelInfo:
  """One pool entry -> ModelInfo; DataError naming the file, entry and field."""
  if not isinstance(entry, dict):
    raise DataError(f'{path}: {label} is {entry!r}; expected a mapping with name, '
                    'price_in, price_out[, context_limit]')
  unknown = sorted(set(entry) - set(POOL_FIELDS) - set(ENDPOINT_FIELDS), key=str)
  if unknown:
    raise DataError(f'{path}: {label}: unknown field(s) {unknown}; '
                    f'expected only {list(POOL_FIELDS + ENDPOINT_FIELDS)}')
  name = entry.get('name')
  if not isinstance(name, str) or not name.strip():
    raise DataError(f'{path}: {label}: field name is {name!r}; expected a non-empty model name')

  def price(field):
    value = entry.get(field)
    try:
      number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
      number = math.nan
    if not math.isfinite(number) or number < 0:
      raise DataError(f'{path}: {label}: field {field} is {value!r}; '
                      'expected a price >= 0 in dollars per 1M tokens')
    return number

  limit = entry.get('context_limit')
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
    raise DataError(f'{path}: {label}: field context_limit is {limit!r}; '
                    'expected a whole number of tokens >= 1')
  return ModelInfo(name=name, price_in=price('price_in'), price_out=price('price_out'),
                   context_limit=limit)


def _prices(pool: Pool) -> dict[str, ModelInfo]:
  """The pool (a file path, a list of ModelInfo or None) as {name: ModelInfo}."""
  if pool is None or pool == '':
    return {}
  if isinstance(pool, (str, os.PathLike)):
    pool = read_pool(pool)
  bad = [m for m in pool if not isinstance(m, ModelInfo)]
  if bad:
    raise DataError(f'pool entry {bad[0]!r} is not a ModelInfo; expected a pool file path '
                    'or a list of ModelInfo')
  return {m.name: m for m in pool}


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


def _check_utf8(path: pathlib.Path) -> None:
  """DataError naming the line and column of the first byte of `path` that is not UTF-8."""
  try:
    strict_json.check_utf8_file(path)
  except strict_json.JsonError as e:
    raise DataError(str(e)) from None


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
           'routellm': read_routellm}


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
