"""The decision log (`--decisions=DIR`): one JSON line per routing decision the server
made, the data that later learning (off-policy evaluation, feedback training) reads.

`DecisionLog.record` serialises a line and puts it on a queue; a daemon thread appends
the lines to DIR/decisions-<UTC yyyymmddTHHMMSS>-<n>.jsonl (strict JSON, UTF-8, one
object per line), opening a new file whenever the current one would grow past
`max_bytes` (a single line larger than that gets a file of its own). `close` writes
what is queued, flushes and fsyncs, and stops the thread.

Privacy: with this log on, the text each request was routed on (the user's prompt,
or the whole conversation under --route_on=conversation) is written to disk in
clear, together with the chosen model and the upstream's token usage. Keep DIR
where prompts may be kept, and rotate or delete its files as your data policy says.

The server writes one line per routed chat completion ("model": "router") and per
/v1/route call, with the keys of `serving.app` (id, time, endpoint, text, model,
answered_by, propensity, explored, cost_weight, version, usage, cost, latency_ms,
status, fallbacks).

With --decisions the server also takes scores (POST /v1/feedback) for the ids of its
log: a second `DecisionLog` (prefix 'feedback') writes them as {"id", "score", "time"}
lines to DIR/feedback-<stamp>-<n>.jsonl, and a `DecisionIndex` knows which ids the log
holds (this process's and, read once at start-up, those of DIR's earlier files).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import queue
import re
import threading
from typing import Callable, Optional

from entrorouter_jax import strict_json

log = logging.getLogger('entrorouter_jax.serve')

MAX_BYTES = 64 << 20
_CLOSE = object()   # the queue's last item: write what came before, then stop


class DecisionLog:
  """JSON lines appended by a writer thread to rotating files under `directory`."""

  def __init__(self, directory, max_bytes: int = MAX_BYTES,
               on_written: Optional[Callable[[int], None]] = None,
               prefix: str = 'decisions'):
    """Creates `directory` (and its parents) and starts the writer thread; `on_written(n)`
    is called from that thread after n more lines were written. The files are named
    <prefix>-<stamp>-<n>.jsonl."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
      raise ValueError(f'max_bytes is {max_bytes!r}; expected a whole number of bytes >= 1')
    if not isinstance(prefix, str) or not re.fullmatch(r'[A-Za-z0-9_]+', prefix):
      raise ValueError(f'prefix is {prefix!r}; expected a file name prefix of letters, digits '
                       'and underscores, such as "decisions"')
    self.prefix = prefix
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.max_bytes, self.on_written = max_bytes, on_written
    self.files: list[pathlib.Path] = []   # every file written, in order
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._closed = False
    self._file = None
    self._size = 0
    self._thread = threading.Thread(target=self._write_loop, name=f'{prefix}-log', daemon=True)
    self._thread.start()

  @property
  def closed(self) -> bool:
    return self._closed

  def record(self, line: dict) -> None:
    """Queues `line` as one JSON line and returns at once. ValueError (or TypeError) if it
    is not strict JSON (NaN, Infinity, a lone surrogate, a value JSON cannot hold);
    RuntimeError after `close`."""
    data = (json.dumps(line, ensure_ascii=False, allow_nan=False) + '\n').encode('utf-8')
    with self._lock:
      if self._closed:
        raise RuntimeError(f'the decision log in {self.directory} is closed; expected record() '
                           'before close()')
      self._queue.put(data)

  def close(self) -> None:
    """Writes every line queued before, flushes and fsyncs the file, stops the writer
    thread. A second call does nothing."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._queue.put(_CLOSE)
    self._thread.join()

  # ------------------------------------------------------------ writer thread ---
  def _write_loop(self) -> None:
    while True:
      item = self._queue.get()
      batch = [item]
      while item is not _CLOSE:   # what else is queued now goes out with one flush
        try:
          item = self._queue.get_nowait()
        except queue.Empty:
          break
        batch.append(item)
      written = 0
      for data in batch:
        if data is not _CLOSE:
          written += self._write(data)
      try:
        if self._file is not None:
          self._file.flush()
      except OSError:
        log.exception('decision log: flushing %s failed', self.files[-1])
      if written and self.on_written is not None:
        try:
          self.on_written(written)
        except Exception:  # noqa: BLE001 -- a metric's failure must not stop the writer
          log.exception('decision log: on_written failed')
      if batch[-1] is _CLOSE:
        self._finish_file()
        return

  def _write(self, data: bytes) -> int:
    """Appends one line, rotating first where it would pass max_bytes: 1 if written, 0 if
    the disk refused it (logged; the next line tries a new file)."""
    try:
      if self._file is not None and self._size + len(data) > self.max_bytes:
        self._finish_file()
      if self._file is None:
        self._open_file()
      self._file.write(data)
      self._size += len(data)
      return 1
    except OSError:
      log.exception('decision log: writing to %s failed; a line is lost',
                    self.files[-1] if self.files else self.directory)
      self._finish_file()
      return 0

  def _open_file(self) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S')
    n = len(self.files) + 1
    while True:   # never append to another log's file (a restart within the second)
      path = self.directory / f'{self.prefix}-{stamp}-{n}.jsonl'
      try:
        self._file = open(path, 'xb')
        break
      except FileExistsError:
        n += 1
    self.files.append(path)
    self._size = 0

  def _finish_file(self) -> None:
    """Flushes, fsyncs and closes the current file (if any)."""
    if self._file is None:
      return
    file, self._file = self._file, None
    try:
      file.flush()
      os.fsync(file.fileno())
    except OSError:
      log.exception('decision log: syncing %s failed', self.files[-1])
    try:
      file.close()
    except OSError:
      log.exception('decision log: closing %s failed', self.files[-1])


class DecisionIndex:
  """The ids of the decision log, each with the model that answered it (None for a
  /v1/route call or a failed request): those `add`ed by this process and those of the
  decisions-*.jsonl files already in `directory` when it was made (read once; a line that
  is not a JSON object with a string "id" is skipped with a warning naming file and line).
  The event loop's thread alone adds and looks up."""

  def __init__(self, directory, prefix: str = 'decisions'):
    self._answered_by: dict[str, Optional[str]] = {}
    directory = pathlib.Path(directory)
    paths = sorted(directory.glob(f'{prefix}-*.jsonl')) if directory.is_dir() else []
    for path in paths:
      self._read(path)
    if paths:
      log.info('decision log: %d request ids known from %d earlier files in %s',
               len(self._answered_by), len(paths), directory)

  def _read(self, path: pathlib.Path) -> None:
    """Adds the ids of one earlier file; returns nothing (bad lines are logged, skipped)."""
    def torn(lineno, e):
      log.warning('decision log: %s:%d: %s; expected one JSON object per line; skipped',
                  path, lineno, e.message)

    try:
      for lineno, line in strict_json.iter_jsonl(path, on_invalid=torn):
        if not isinstance(line, dict) or not isinstance(line.get('id'), str):
          log.warning('decision log: %s:%d: no string "id"; expected a decision line with '
                      'the request id; skipped', path, lineno)
          continue
        answered = line.get('answered_by')
        self._answered_by[line['id']] = answered if isinstance(answered, str) else None
    except OSError as e:
      log.warning('decision log: cannot read %s (%s); its ids are not known', path, e.strerror)

  def add(self, request_id: str, answered_by: Optional[str]) -> None:
    """Records that the log holds `request_id`, answered by `answered_by`; returns nothing."""
    self._answered_by[request_id] = answered_by

  def __contains__(self, request_id) -> bool:
    return request_id in self._answered_by

  def __len__(self) -> int:
    return len(self._answered_by)

  def answered_by(self, request_id: str) -> Optional[str]:
    """The model that answered `request_id` (None: none did, or the id is unknown)."""
    return self._answered_by.get(request_id)
