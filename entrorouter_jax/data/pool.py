"""Model-pool files: each model's list prices and, for `serve`, where its requests go.

A pool file (YAML or JSON) lists the models a router chooses among, with their
prices in dollars per 1M tokens (`read_pool` -> `ModelInfo`), and optionally the
serving keys of each model (`read_endpoints` -> `Endpoint`). Bad files raise
`DataError` naming the file, the entry and the field. This module reads no
routing tables and imports neither pandas nor the table readers, so that serving
can read a pool without them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Optional, Sequence, Union

import yaml

from entrorouter_jax import strict_json
from entrorouter_jax.data.dataset import DataError, ModelInfo

PathLike = Union[str, os.PathLike]
Pool = Union[None, PathLike, Sequence[ModelInfo]]

POOL_FIELDS = ('name', 'price_in', 'price_out', 'context_limit')
# Where `serve` sends a model's requests: an OpenAI-compatible endpoint
# (base_url, ending in /v1), the model name sent there (default: the pool name),
# the environment variable holding its key (none: no Authorization header) and
# whether it takes tool calls (tools: true; requests with "tools" go only to such
# models where the pool marks any).
ENDPOINT_FIELDS = ('base_url', 'upstream_model', 'api_key_env', 'tools')
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """Where one pool model is served (the pool file's serving keys)."""
  name: str
  base_url: Optional[str] = None
  upstream_model: Optional[str] = None
  api_key_env: Optional[str] = None
  tools: bool = False


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
  an environment variable; tools a boolean (default false). The prices are checked as by
  `read_pool`.
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
    tools = body.get('tools', False)
    if not isinstance(tools, bool):
      raise DataError(f'{path}: {label}: field tools is {tools!r}; expected true (the model '
                      'takes tool calls) or false')
    out[name] = Endpoint(name, url.rstrip('/') if url else None, upstream, env, tools)
  return out


def tool_models(endpoints: dict[str, Endpoint]) -> list[str]:
  """The names of `endpoints` (read_endpoints' result) marked tools: true."""
  return [name for name, e in endpoints.items() if e.tools]


def _pool_entries(path: pathlib.Path) -> list[tuple[str, dict]]:
  """[(label for errors, entry mapping)] of a pool file, names unique."""
  try:
    text = path.read_text(encoding='utf-8')
  except OSError as e:
    raise DataError(f'{path}: cannot read the model-pool file ({e.strerror})') from None
  except UnicodeDecodeError:
    check_utf8(path)
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


def prices(pool: Pool) -> dict[str, ModelInfo]:
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


def check_utf8(path: pathlib.Path) -> None:
  """DataError naming the line and column of the first byte of `path` that is not UTF-8."""
  try:
    strict_json.check_utf8_file(path)
  except strict_json.JsonError as e:
    raise DataError(str(e)) from None
