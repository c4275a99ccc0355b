"""Agent traffic: a follow-up that answers a tool call goes back to the model that made it.

A model's reply may ask for tool calls (`choices[].message.tool_calls[].id`, or in a stream
`choices[].delta.tool_calls[].id`); the client runs the tools and sends the conversation
again, ending in "tool" messages that carry those ids (`tool_call_id`). Routed afresh, such
a follow-up could land on a model that never saw the call. `ToolCalls` remembers, for each
call id the server relayed, the model that issued it and the request whose decision chose
that model (bounded in size and age); `tool_result_ids` reads a follow-up's ids.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Iterable, Optional


@dataclasses.dataclass(frozen=True)
class Issuer:
  """Who issued a tool call: the pool model, and the id of the request that chose it (a
  routed request, whose decision log line has that id, or one that named the model)."""
  model: str
  request_id: Optional[str]


class ToolCalls:
  """The tool-call ids the server relayed -> their `Issuer`, at most `max_entries` (the
  oldest go first) and each for `ttl` seconds. Safe to share between threads."""

  def __init__(self, max_entries: int = 100_000, ttl: float = 3600.0,
               clock: Callable[[], float] = time.monotonic):
    if max_entries < 1 or not ttl > 0:
      raise ValueError(f'max_entries={max_entries}, ttl={ttl}; expected >= 1 and > 0')
    self.max_entries, self.ttl, self.clock = max_entries, ttl, clock
    self._calls: collections.OrderedDict = collections.OrderedDict()   # id -> (time, Issuer)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._calls)

  def remember(self, call_ids: Iterable[str], issuer: Issuer) -> None:
    """Notes that `issuer` made the calls `call_ids`; returns nothing."""
    now = self.clock()
    with self._lock:
      for call_id in call_ids:
        self._calls.pop(call_id, None)
        self._calls[call_id] = (now, issuer)
      while len(self._calls) > self.max_entries:
        self._calls.popitem(last=False)
      self._expire(now)

  def issuer(self, call_ids: Iterable[str]) -> Optional[Issuer]:
    """The issuer of the latest remembered call among `call_ids` (None if none is
    remembered, or they have expired)."""
    now = self.clock()
    with self._lock:
      self._expire(now)
      found = [self._calls[c] for c in call_ids if c in self._calls]
    return max(found, key=lambda f: f[0])[1] if found else None

  def _expire(self, now: float) -> None:
    while self._calls:
      first = next(iter(self._calls.values()))
      if now - first[0] <= self.ttl:
        return
      self._calls.popitem(last=False)


def _ids_of(calls) -> list[str]:
  if not isinstance(calls, list):
    return []
  return [c['id'] for c in calls if isinstance(c, dict) and isinstance(c.get('id'), str)
          and c['id']]


def reply_call_ids(reply) -> list[str]:
  """The tool-call ids a chat completion (a JSON object) asks for."""
  choices = reply.get('choices') if isinstance(reply, dict) else None
  if not isinstance(choices, list):
    return []
  return [i for ch in choices if isinstance(ch, dict) and isinstance(ch.get('message'), dict)
          for i in _ids_of(ch['message'].get('tool_calls'))]


def chunk_call_ids(chunk) -> list[str]:
  """The tool-call ids a streamed chunk starts (the first delta of each call carries it)."""
  choices = chunk.get('choices') if isinstance(chunk, dict) else None
  if not isinstance(choices, list):
    return []
  return [i for ch in choices if isinstance(ch, dict) and isinstance(ch.get('delta'), dict)
          for i in _ids_of(ch['delta'].get('tool_calls'))]


def tool_result_ids(messages) -> list[str]:
  """The `tool_call_id`s of the "tool" messages that end a (checked) conversation: what a
  follow-up answers; [] where its last message is not a tool result."""
  ids = []
  for m in reversed(messages):
    if not isinstance(m, dict) or m.get('role') != 'tool':
      break
    if isinstance(m.get('tool_call_id'), str) and m['tool_call_id']:
      ids.append(m['tool_call_id'])
  return ids
