"""The router behind a micro-batcher: a text (and an optional cost weight) -> a `Decision`,
the chosen model and the ranking a routed request falls back along."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from entrorouter_jax import router as router_lib, strict_json
from entrorouter_jax.batching import MicroBatcher
from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.metrics import Metrics
from entrorouter_jax.serving.settings import Settings


@dataclasses.dataclass
class Decision:
  """Where one request goes: the chosen model, the served models best first, pi(m|x) and
  the cost weight (or threshold) it was routed at."""
  model: str
  ranking: list            # pool names, best first
  probs: dict              # name -> pi(m|x)
  cost_weight: Optional[float]
  threshold: Optional[float]


class RoutingService:
  """The router behind a micro-batcher: text -> Decision."""

  def __init__(self, router: router_lib.Router, settings: Settings, metrics: Metrics,
               served: Optional[list] = None):
    self.router, self.settings, self.metrics = router, settings, metrics
    # The models requests may go to (those the pool gives an endpoint): routing
    # picks the best of them.
    self.served = np.array([n in (served or router.model_names) for n in router.model_names])
    self.batcher = MicroBatcher(self._route_batch, settings.max_batch, settings.max_wait_ms,
                                on_batch=self._observe_batch)

  def _observe_batch(self, size: int, seconds: float) -> None:
    self.metrics.batch_size.observe(size)
    self.metrics.forward_seconds.observe(seconds)

  def _route_batch(self, items):
    """[(text, cost_weight or None)] -> [probs float[K]]: one forward per distinct lambda."""
    out = [None] * len(items)
    groups: dict = {}
    for i, (_, lam) in enumerate(items):
      groups.setdefault(lam, []).append(i)
    for lam, rows in groups.items():
      probs = self.router.probs([items[i][0] for i in rows], lam)
      for i, p in zip(rows, probs):
        out[i] = p
    return out

  def cost_weight_for(self, requested) -> Optional[float]:
    """The lambda to route a request at: its own (checked: 400 if unusable), else the
    router's default (None for a router that lambda does not move)."""
    if requested is None:
      return self.router.default_cost_weight if self.router.moves_with_cost_weight else None
    try:
      return self.router.check_cost_weight(requested)
    except router_lib.RouterError as e:
      raise RequestError(400, str(e), 'cost_weight') from None

  async def decide(self, text: str, requested_cost_weight=None,
                   field: str = 'messages') -> Decision:
    """Routes one text (checked here, before it joins a batch: a text the router
    cannot read fails alone, with a 400 naming `field`)."""
    lam = self.cost_weight_for(requested_cost_weight)
    if not isinstance(text, str) or not text.strip():
      raise RequestError(400, f'{field} holds no text to route on; expected a non-empty string',
                         field)
    bad = strict_json.invalid_text(text)
    if bad is not None:
      raise RequestError(400, f'{field} holds an invalid Unicode character (a lone surrogate at '
                         f'position {bad[1]}); expected valid UTF-8 text', field)
    started = time.perf_counter()
    probs = await self.batcher.submit((text, lam))
    self.metrics.routing_latency.observe(time.perf_counter() - started)
    names = self.router.model_names
    # Routers that lambda moves take their top model; the others the threshold rule.
    threshold = None if self.router.moves_with_cost_weight else self.router.default_threshold
    served = np.where(self.served, probs, -1.0)   # never eligible
    first, _ = router_lib.choose(served[None], self.router.model_costs,
                                 1.0 if threshold is None else threshold)
    first = int(first[0])
    # Best first; ties to the cheaper model.
    order = sorted(np.flatnonzero(self.served), key=lambda j: (
        -float(probs[j]), float(self.router.model_costs[j])))
    order.remove(first)
    ranking = [names[first]] + [names[j] for j in order]
    self.metrics.routes.labels(names[first]).inc()
    return Decision(model=names[first], ranking=ranking,
                    probs={n: float(p) for n, p in zip(names, probs)}, cost_weight=lam,
                    threshold=threshold)
