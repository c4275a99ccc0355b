"""Strict JSON and text: RFC 8259 JSON and valid Unicode only, with errors that say where.

Python's `json` accepts what is not JSON: the words NaN, Infinity and -Infinity,
and numbers such as 1e400 that overflow to infinity; and it decodes the escape
"\\ud800" to a lone UTF-16 surrogate, a string that no UTF-8 encoder, tokenizer
or upstream API accepts. Everything that reads JSON from outside (the server's
request bodies, `route --input`, `calibrate --queries`, the data readers) goes
through `loads` or `read_jsonl`, so such input gets a clear error naming the
field (and the file's line) before it is routed, forwarded or trained on.

  loads(text)            -> the value, or JsonError(message, field)
  invalid_text(value)    -> (field, position) of the first lone surrogate, or None
  read_jsonl(path)       -> [(line number, value)], errors as "path:line: ..."
  check_utf8_file(path)  -> raises JsonError "path:line: ..." for bytes that are not UTF-8
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterator, Optional, Union


class JsonError(ValueError):
  """Input that is not strict JSON or not valid Unicode; `field` names where (or None)."""

  def __init__(self, message: str, field: Optional[str] = None):
    super().__init__(message)
    self.message, self.field = message, field


class _NotJson:
  """Stands where the parser met a value JSON does not have, until the field is named."""

  __slots__ = ('text',)

  def __init__(self, text: str):
    self.text = text


def _parse_float(text: str):
  value = float(text)
  return value if math.isfinite(value) else _NotJson(text)


_DECODER = json.JSONDecoder(parse_constant=_NotJson, parse_float=_parse_float)


def _join(where: str, key) -> str:
  if isinstance(key, int):
    return f'{where}[{key}]'
  return f'{where}.{key}' if where else str(key)


def _surrogate_at(s: str) -> Optional[int]:
  if s.isascii():
    return None
  try:
    s.encode('utf-8')
  except UnicodeEncodeError as e:
    return e.start
  return None


def _walk(value, where: str = ''):
  """(field, item, is_key) for every item of a parsed value and every dict key, depth
  first in document order (a dict's keys before its values)."""
  stack = [(value, where)]
  while stack:
    value, where = stack.pop()
    yield where, value, False
    if isinstance(value, dict):
      for key in value:
        yield where, key, True
      stack.extend((item, _join(where, key)) for key, item in reversed(list(value.items())))
    elif isinstance(value, (list, tuple)):
      stack.extend((item, _join(where, i)) for i, item in reversed(list(enumerate(value))))


def _first_bad(value, where: str) -> Optional[tuple[str, str]]:
  """(field, what is wrong there) for the first non-JSON number, invalid string or key."""
  for field, item, is_key in _walk(value, where):
    if isinstance(item, _NotJson):
      return field, (f'is {item.text}, which is not a JSON number; expected a finite number '
                     '(JSON has no NaN or Infinity)')
    at = _surrogate_at(item) if isinstance(item, str) else None
    if at is None:
      continue
    if is_key:
      return field, (f'has a key holding an invalid Unicode character (a lone surrogate at '
                     f'position {at}); expected valid UTF-8 text')
    return field, (f'holds an invalid Unicode character (a lone surrogate '
                   f'\\u{ord(item[at]):04x} at position {at}); expected valid UTF-8 text')
  return None


def invalid_text(value, where: str = '') -> Optional[tuple[str, int]]:
  """(field, position) of the first string value in `value` with a lone surrogate, or None
  (dict keys are not looked at)."""
  for field, item, is_key in _walk(value, where):
    if isinstance(item, str) and not is_key:
      at = _surrogate_at(item)
      if at is not None:
        return field, at
  return None


def loads(text: Union[str, bytes]) -> Any:
  """Parses RFC 8259 JSON (bytes must be UTF-8) into valid-Unicode Python values.

  Raises JsonError: a syntax error names its line and column; NaN, Infinity, a
  number out of float range and a lone surrogate name the field they are in
  (`messages[0].content`), with `field` set to it.
  """
  if isinstance(text, (bytes, bytearray)):
    try:
      text = bytes(text).decode('utf-8')
    except UnicodeDecodeError as e:
      raise JsonError(f'byte {e.start} is not UTF-8 ({bytes(text)[e.start:e.start + 1]!r}); '
                      'expected UTF-8 encoded JSON') from None
  if text.startswith('\ufeff'):   # a byte-order mark, which RFC 8259 lets a reader ignore
    text = text[1:]
  try:
    value = _DECODER.decode(text)
  except json.JSONDecodeError as e:
    raise JsonError(f'not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
  except RecursionError:
    raise JsonError('not valid JSON here (nested too deeply)') from None
  except ValueError as e:   # e.g. an integer of more digits than Python converts
    raise JsonError(f'not valid JSON here ({e})') from None
  bad = _first_bad(value, '')
  if bad is not None:
    field, what = bad
    raise JsonError(f'{field or "the body"} {what}', field or None)
  return value


def check_utf8_file(path: Union[str, pathlib.Path]) -> None:
  """Raises JsonError naming the line of the first byte of `path` that is not UTF-8."""
  data = pathlib.Path(path).read_bytes()
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise JsonError(f'{path}:{line}: byte {data[e.start:e.start + 1]!r} at column {column} is '
                    'not UTF-8; expected a UTF-8 text file') from None


def iter_jsonl(path, on_invalid=None) -> Iterator[tuple[int, Any]]:
  """(line number, value) for each non-blank line of a JSON-lines file, strictly parsed.

  `path`: a str or any path object with .open('rb') (pathlib, or an epath that
  may be remote, as `calibrate --queries=gs://...` gives). A line that is not
  strict JSON raises JsonError naming path:line, or, with `on_invalid`, is
  skipped after `on_invalid(line number, the line's JsonError)` (a log a crash
  may have left a torn line in).
  """
  path = path if hasattr(path, 'open') else pathlib.Path(path)
  with path.open('rb') as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        value = loads(raw)
      except JsonError as e:
        if on_invalid is None:
          raise JsonError(f'{path}:{lineno}: {e.message}', e.field) from None
        on_invalid(lineno, e)
        continue
      yield lineno, value


def read_jsonl(path) -> list[tuple[int, Any]]:
  """Every (line number, value) of a JSON-lines file; see iter_jsonl."""
  return list(iter_jsonl(path))
