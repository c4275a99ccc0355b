"""The server's knobs: one `Settings`, checked before the app is built."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Optional

from entrorouter_jax import router as router_lib

ROUTE_ON = ('last_user', 'conversation')
MAX_STATS_HISTORY = 10080   # a week of one-minute buckets


def is_loopback(host: str) -> bool:
  """Returns whether `host` (an interface to bind) is loopback only: localhost, 127.0.0.0/8
  or ::1 (brackets allowed); False for any other name or address (0.0.0.0, ::, ...)."""
  host = str(host).strip().strip('[]')
  if host.lower() == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


@dataclasses.dataclass
class Settings:
  """The server's settings: the flags of `python -m entrorouter_jax.serve` of the same names."""
  max_batch: int = 64               # requests per router forward
  max_wait_ms: float = 2.0          # wait after the first request for more
  upstream_timeout: float = 120.0   # seconds per upstream call (connect: at most 10)
  max_body_bytes: int = 1 << 20     # larger request bodies get 413
  fallback: str = 'ranking'         # ranking | none
  max_attempts: int = 3             # models tried per routed request
  route_on: str = 'last_user'       # last_user | conversation
  auth_token: Optional[str] = None  # the bearer token requests must carry (None: no auth)
  explore: float = 0.0              # routed requests sample from (1 - e) pi + e / K'; 0: argmax
  seed: Optional[int] = None        # of the exploration draws (None: fresh entropy)
  decisions: Optional[str] = None   # directory of the decision log (None: no log)
  host: str = '127.0.0.1'           # the interface bound: beyond loopback, /admin/* needs a token
  workdir: Optional[str] = None     # the router's workdir as given: SIGHUP reloads from it
  tool_calls_max: int = 100_000     # tool-call ids remembered (a follow-up goes to their model)
  tool_calls_ttl: float = 3600.0    # seconds each is remembered
  stats_history: int = 1440         # buckets of the dashboard's history (0: no /v1/stats)
  stats_bucket_s: float = 60.0      # seconds per bucket of that history

  def check(self) -> None:
    """Returns nothing; ValueError naming the flag and what was expected for a bad value."""
    if self.max_batch < 1:
      raise ValueError(f'--max_batch={self.max_batch}; expected >= 1')
    if self.max_wait_ms < 0:
      raise ValueError(f'--max_wait_ms={self.max_wait_ms}; expected >= 0')
    if self.upstream_timeout <= 0:
      raise ValueError(f'--upstream_timeout={self.upstream_timeout}; expected seconds > 0')
    if self.max_body_bytes < 1:
      raise ValueError(f'--max_body_bytes={self.max_body_bytes}; expected >= 1')
    if self.fallback not in ('ranking', 'none'):
      raise ValueError(f'--fallback={self.fallback!r}; expected ranking or none')
    if self.max_attempts < 1:
      raise ValueError(f'--max_attempts={self.max_attempts}; expected >= 1')
    if self.tool_calls_max < 1:
      raise ValueError(f'--tool_calls_max={self.tool_calls_max}; expected >= 1')
    if not self.tool_calls_ttl > 0:
      raise ValueError(f'--tool_calls_ttl={self.tool_calls_ttl}; expected seconds > 0')
    if (isinstance(self.stats_history, bool) or not isinstance(self.stats_history, int)
        or not 0 <= self.stats_history <= MAX_STATS_HISTORY):
      raise ValueError(f'--stats_history={self.stats_history!r}; expected a whole number of '
                       f'buckets from 0 (off) to {MAX_STATS_HISTORY}')
    if (isinstance(self.stats_bucket_s, bool) or not isinstance(self.stats_bucket_s, (int, float))
        or not 1 <= self.stats_bucket_s <= 86400):
      raise ValueError(f'--stats_bucket_s={self.stats_bucket_s!r}; expected seconds from 1 to '
                       '86400')
    if self.route_on not in ROUTE_ON:
      raise ValueError(f'--route_on={self.route_on!r}; expected one of {ROUTE_ON}')
    try:
      router_lib.check_explore(self.explore, '--explore')
      if self.seed is not None:
        router_lib.check_seed(self.seed, '--seed')
    except router_lib.RouterError as e:
      raise ValueError(str(e)) from None
    if not isinstance(self.host, str) or not self.host.strip():
      raise ValueError(f'--host={self.host!r}; expected an interface to bind, e.g. 127.0.0.1')
    if self.workdir is not None and (not isinstance(self.workdir, (str, os.PathLike))
                                     or not str(self.workdir).strip()):
      raise ValueError(f'--workdir={self.workdir!r}; expected the workdir of a training run')
    if self.decisions is not None:
      if not isinstance(self.decisions, (str, os.PathLike)) or not str(self.decisions).strip():
        raise ValueError(f'--decisions={self.decisions!r}; expected a directory for the '
                         'decision log')
      if os.path.exists(self.decisions) and not os.path.isdir(self.decisions):
        raise ValueError(f'--decisions={self.decisions}: that path is a file; expected a '
                         'directory for the decision log (created if missing)')
