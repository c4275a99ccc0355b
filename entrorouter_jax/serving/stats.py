"""The dashboard's numbers (GET /v1/stats, GET /dashboard): `Stats`, what the server did
since it started and, per bucket of --stats_bucket_s seconds, over the last
--stats_history buckets (1,440 one-minute buckets by default: 24 hours).

Per bucket, and in the totals since the start: routing decisions per chosen model (chat
completions and /v1/route calls, as entrorouter_routes_total counts them), the explored
ones (sampled from the exploring policy) and those of them that went to another model
than the router's own choice; routed chat completions, those answered after a fallback
and those no model answered, their dollars at the answering model's prices and the same
tokens at the strongest model's (an estimate of "always the strongest model": that model
would have used other token counts); scores received per model; and latency histograms:
the routing overhead, the answering upstream's time, and the time to answer a routed chat
completion (to the first byte of a stream).

Recording is a few counters per request into the current bucket (folded into the totals
once it closes); a latency goes into a histogram of log-spaced bins 2% wide (`Histogram`: a percentile read
from it is within 1% of the exact one, and it holds at most `Histogram.BINS` bins however
many values it took). Older buckets are dropped as new ones start, so nothing grows with
traffic or time: the history is at most `history` buckets, the reloads kept at most
`MAX_RELOADS`. A closed bucket's row is computed once. Everything here runs on the event
loop's thread: no locks.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Optional

MAX_RELOADS = 1000   # reload markers kept (those within the history are shown)


class Histogram:
  """Values >= 0 (milliseconds) counted in log-spaced bins: bin 0 holds [0, LOW], bin i >= 1
  holds (LOW * GROWTH^(i-1), LOW * GROWTH^i]; values past the last bin count in it."""
  GROWTH = 1.02
  LOW = 1e-3            # 1 microsecond
  BINS = 1 + math.ceil(math.log(3.6e6 / 1e-3) / math.log(1.02))   # up to an hour
  _SCALE = 1 / math.log(GROWTH)
  _SHIFT = 1 - math.log(LOW) / math.log(GROWTH)
  __slots__ = ('bins', 'count')

  def __init__(self):
    self.bins: dict = {}
    self.count = 0

  def add(self, ms: float) -> None:
    """Counts one value (ms); a value that is not a finite number >= 0 is ignored."""
    if not ms >= 0 or ms == math.inf:
      return
    # 1 + floor(log_GROWTH(ms / LOW)), with LOW and GROWTH folded into _SCALE and _SHIFT
    i = 0 if ms <= self.LOW else min(int(math.log(ms) * self._SCALE + self._SHIFT),
                                     self.BINS - 1)
    self.bins[i] = self.bins.get(i, 0) + 1
    self.count += 1

  def merge(self, other: 'Histogram') -> None:
    """Adds `other`'s counts to this histogram's."""
    for i, c in other.bins.items():
      self.bins[i] = self.bins.get(i, 0) + c
    self.count += other.count

  @classmethod
  def value(cls, i: int) -> float:
    """The value that stands for bin `i`: its geometric middle (LOW for bin 0)."""
    return cls.LOW if i == 0 else cls.LOW * cls.GROWTH ** (i - 0.5)

  def percentiles(self, qs=(50, 95)) -> list:
    """The percentiles `qs` (0..100) of the values counted, as NumPy's default (linear)
    method places them between the order statistics, each order statistic read as its
    bin's middle: within 1% of the exact figure. Returns [None, ...] when empty."""
    if not self.count:
      return [None] * len(qs)
    bins = sorted(self.bins.items())
    out = []
    for q in qs:
      rank = q / 100 * (self.count - 1)
      low, frac = int(math.floor(rank)), rank - math.floor(rank)
      a = self._at(bins, low)
      b = self._at(bins, low + 1) if frac > 0 else a
      out.append(a + (b - a) * frac)
    return out

  def _at(self, bins: list, k: int) -> float:
    """The value standing for the k-th smallest value counted (0-based)."""
    seen = 0
    for i, c in bins:
      seen += c
      if k < seen:
        return self.value(i)
    return self.value(bins[-1][0])


class Bucket:
  """What happened in one bucket of time (or, for the totals, since the start)."""
  __slots__ = ('start', 'routes', 'explored', 'switched', 'completions', 'fallbacks', 'failed',
               'priced', 'unpriced', 'actual', 'strongest', 'request', 'routing', 'upstream',
               'feedback')

  def __init__(self, start: float):
    self.start = start
    self.routes: dict = {}      # model -> routing decisions that chose it
    self.explored = 0           # decisions sampled from the exploring policy
    self.switched = 0           # ... of another model than the router's own choice
    self.completions = 0        # routed chat completions that ended
    self.fallbacks = 0          # ... answered by a model after another one failed
    self.failed = 0             # ... that no model answered
    self.priced = 0             # ... answered, with usage and both prices known
    self.unpriced = 0           # ... answered without usage or a price
    self.actual = 0.0           # dollars of the priced ones at the answering models' prices
    self.strongest = 0.0        # the same tokens at the strongest model's prices
    self.request, self.routing, self.upstream = Histogram(), Histogram(), Histogram()
    self.feedback: dict = {}    # model -> [count, sum of scores]

  def merge(self, other: 'Bucket') -> None:
    """Adds `other`'s counts, dollars, latencies and scores to this bucket's."""
    for model, n in other.routes.items():
      self.routes[model] = self.routes.get(model, 0) + n
    for name in ('explored', 'switched', 'completions', 'fallbacks', 'failed', 'priced',
                 'unpriced', 'actual', 'strongest'):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    for name in ('request', 'routing', 'upstream'):
      getattr(self, name).merge(getattr(other, name))
    for model, (n, total) in other.feedback.items():
      mine = self.feedback.setdefault(model, [0, 0.0])
      mine[0] += n
      mine[1] += total

  def latency(self) -> dict:
    """{"request"|"routing"|"upstream": {"p50", "p95", "count"}}: ms to the microsecond."""
    out = {}
    for name in ('request', 'routing', 'upstream'):
      histogram = getattr(self, name)
      p50, p95 = (None if p is None else round(p, 3) for p in histogram.percentiles())
      out[name] = {'p50': p50, 'p95': p95, 'count': histogram.count}
    return out

  def row(self) -> dict:
    """This bucket's figures as the series of /v1/stats hold them (mean scores to 4
    places: a short JSON)."""
    latency = self.latency()
    return {'t': self.start, 'routes': dict(self.routes), 'explored': self.explored,
            'switched': self.switched, 'completions': self.completions,
            'fallbacks': self.fallbacks, 'failed': self.failed,
            'actual': self.actual, 'strongest': self.strongest, 'priced': self.priced,
            'latency': latency,
            'feedback': {m: {'count': c, 'mean': round(s / c, 4)}
                         for m, (c, s) in self.feedback.items()}}


class Stats:
  """Totals since the start and the last `history` buckets of `bucket_s` seconds each
  (buckets are aligned to multiples of `bucket_s` since the epoch); `clock()` gives the
  time (seconds since the epoch)."""

  def __init__(self, history: int = 1440, bucket_s: float = 60.0,
               clock: Callable[[], float] = time.time):
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
      raise ValueError(f'history is {history!r}; expected a whole number of buckets >= 1')
    if not (isinstance(bucket_s, (int, float)) and not isinstance(bucket_s, bool)
            and math.isfinite(bucket_s) and bucket_s > 0):
      raise ValueError(f'bucket_s is {bucket_s!r}; expected seconds > 0')
    self.history, self.bucket_s, self.clock = history, float(bucket_s), clock
    self.since = clock()
    self.total = Bucket(self.since)               # every bucket closed so far, folded in
    self.index = self._index_of(self.since)      # the current bucket's: its start / bucket_s
    self.current = Bucket(self.index * self.bucket_s)
    self.closed: collections.deque = collections.deque(maxlen=history - 1)   # (index, row)
    self.reloads: collections.deque = collections.deque(maxlen=MAX_RELOADS)
    self.version: Optional[str] = None
    self.loaded_at: Optional[float] = None

  def _index_of(self, t: float) -> int:
    return math.floor(t / self.bucket_s)

  def _now(self) -> Bucket:
    """The bucket of the clock's time: the current one, or a new one once it has passed
    (the old one's row is kept, the oldest beyond `history` dropped)."""
    index = self._index_of(self.clock())
    if index > self.index:
      self.closed.append((self.index, self.current.row()))
      self.total.merge(self.current)
      self.index, self.current = index, Bucket(index * self.bucket_s)
    return self.current

  # ------------------------------------------------------------ recording ---
  def router_loaded(self, version: str, workdir=None, previous: Optional[str] = None) -> None:
    """Notes that the router `version` serves from now on; with `previous` (the version it
    replaced) it was a reload, kept as a marker {"time", "version", "previous",
    "workdir"}."""
    now = self.clock()
    if previous is not None:
      self.reloads.append({'time': now, 'version': version, 'previous': previous,
                           'workdir': None if workdir is None else str(workdir)})
    self.version, self.loaded_at = version, now

  def decision(self, model: str, explored: bool, routing_ms: Optional[float],
               switched: bool = False) -> None:
    """One routing decision: the chosen model, whether it was explored, the time it took,
    whether exploring chose another model than the router would have."""
    b = self._now()
    b.routes[model] = b.routes.get(model, 0) + 1
    if explored:
      b.explored += 1
      if switched:
        b.switched += 1
    if routing_ms is not None:
      b.routing.add(routing_ms)

  def answer_time(self, ms: float) -> None:
    """The time a routed chat completion took to answer (to the first byte of a stream)."""
    self._now().request.add(ms)

  def completion(self, answered: bool, fallbacks: int, upstream_ms: Optional[float],
                 actual: Optional[float], strongest: Optional[float]) -> None:
    """A routed chat completion that ended: whether a model answered, after how many
    failed upstreams, the answering upstream's time, its dollars at the answering model's
    prices (`actual`) and at the strongest model's (None: no usage or price)."""
    b = self._now()
    b.completions += 1
    if not answered:
      b.failed += 1
      return
    if fallbacks:
      b.fallbacks += 1
    if upstream_ms is not None:
      b.upstream.add(upstream_ms)
    if actual is None or strongest is None:
      b.unpriced += 1
    else:
      b.priced += 1
      b.actual += actual
      b.strongest += strongest

  def feedback(self, model: str, score: float) -> None:
    """One score received for a request `model` answered ("none": no model did)."""
    entry = self._now().feedback.setdefault(model, [0, 0.0])
    entry[0] += 1
    entry[1] += score

  # -------------------------------------------------------------- reading ---
  def rows(self, buckets: Optional[int] = None) -> list:
    """The rows of the last `buckets` buckets (default and at most: the whole history), not
    from before the start, oldest first: one per bucket, the empty ones included (no row
    is stored for a bucket nothing happened in), the current one last."""
    current = self._now()
    n = self.history if buckets is None else max(1, min(int(buckets), self.history))
    first = max(self.index - n + 1, self._index_of(self.since))
    kept = {i: row for i, row in self.closed if i >= first}
    return [kept.get(i) or Bucket(i * self.bucket_s).row() for i in range(first, self.index)
            ] + [current.row()]

  def totals(self) -> dict:
    """The totals since the start: {"routes", "decisions", "explored", "explored_share",
    "switched", "switched_share", "completions", "fallbacks", "failed", "spend",
    "latency_ms", "feedback"} (a share is of the decisions; None before the first)."""
    t = Bucket(self.since)   # the buckets closed, and the current one
    t.merge(self.total)
    t.merge(self._now())
    decisions = sum(t.routes.values())
    latency = t.latency()
    return {
        'routes': dict(t.routes), 'decisions': decisions, 'explored': t.explored,
        'explored_share': t.explored / decisions if decisions else None,
        'switched': t.switched, 'switched_share': t.switched / decisions if decisions else None,
        'completions': t.completions, 'fallbacks': t.fallbacks, 'failed': t.failed,
        'spend': {'actual': t.actual, 'strongest_only': t.strongest,
                  'saving': t.strongest - t.actual,
                  'saving_share': (t.strongest - t.actual) / t.strongest if t.strongest > 0
                  else None,
                  'priced': t.priced, 'unpriced': t.unpriced},
        'latency_ms': {'p50': latency['request']['p50'], 'p95': latency['request']['p95'],
                       'count': latency['request']['count'], 'routing': latency['routing'],
                       'upstream': latency['upstream']},
        'feedback': {m: {'count': c, 'mean': s / c} for m, (c, s) in t.feedback.items()}}

  def series(self, buckets: Optional[int] = None, models=()) -> dict:
    """The history as columns (one value per bucket, oldest first): {"bucket_s", "t",
    "routes": {model: [...]}, "decisions", "explored", "switched", "completions", "fallbacks",
    "failed", "spend": {"actual", "strongest_only"} (dollars in the bucket), "latency_ms":
    {"request"|"routing"|"upstream": {"p50", "p95"}} (null where nothing was timed),
    "feedback": {model: {"count", "mean"}}}; `models` come first in "routes"."""
    rows = self.rows(buckets)
    names = list(dict.fromkeys([*models, *(m for r in rows for m in r['routes'])]))
    rated = list(dict.fromkeys(m for r in rows for m in r['feedback']))
    return {
        'bucket_s': self.bucket_s, 't': [r['t'] for r in rows],
        'routes': {m: [r['routes'].get(m, 0) for r in rows] for m in names},
        'decisions': [sum(r['routes'].values()) for r in rows],
        'explored': [r['explored'] for r in rows],
        'switched': [r['switched'] for r in rows],
        'completions': [r['completions'] for r in rows],
        'fallbacks': [r['fallbacks'] for r in rows],
        'failed': [r['failed'] for r in rows],
        'spend': {'actual': [r['actual'] for r in rows],
                  'strongest_only': [r['strongest'] for r in rows]},
        'latency_ms': {name: {q: [r['latency'][name][q] for r in rows] for q in ('p50', 'p95')}
                       for name in ('request', 'routing', 'upstream')},
        'feedback': {m: {'count': [r['feedback'].get(m, {}).get('count', 0) for r in rows],
                         'mean': [r['feedback'].get(m, {}).get('mean') for r in rows]}
                     for m in rated}}

  def markers(self, since: float) -> list:
    """The reloads at or after `since` (seconds since the epoch), oldest first."""
    return [r for r in self.reloads if r['time'] >= since]
