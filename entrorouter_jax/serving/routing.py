"""The router behind a micro-batcher: a text (and an optional cost weight) -> a `Decision`,
the chosen model, the ranking a routed request falls back along, and the propensity of
the choice. With --explore=EPS > 0 the first model is sampled from the exploring policy
(1 - EPS) pi + EPS / K' over the served models (as `Router.sample` does), so that the
decision log holds the probability each logged model had of being chosen. A request that
offers tools is routed among the served models the pool marks tool-capable, where any is
(the exploring policy's K' and the propensity are theirs)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Optional

import numpy as np

from entrorouter_jax import router as router_lib, strict_json
from entrorouter_jax.batching import MicroBatcher
from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.metrics import Metrics
from entrorouter_jax.serving.settings import Settings
from entrorouter_jax.serving.tools import Issuer


@dataclasses.dataclass
class Decision:
  """Where one request goes: the chosen model, the served models best first, pi(m|x), the
  cost weight (or threshold) it was routed at, and how it was chosen: `explored` when
  sampled from the exploring policy, whose probability of this model is `propensity`
  (1.0 for the argmax, which is deterministic). A follow-up answering a tool call goes to
  the model that made the call: `follows` is then the id of the request whose decision
  chose that model (and `propensity` 1.0: the router did not choose). `switched`: explored
  to another model than the one the router would have chosen; `routing_ms`: the time the
  decision took (queueing for a batch and the forward)."""
  model: str
  ranking: list            # pool names: the chosen one, then the rest best first
  probs: dict              # name -> pi(m|x)
  cost_weight: Optional[float]
  threshold: Optional[float]
  propensity: float = 1.0
  explored: bool = False
  follows: Optional[str] = None
  switched: bool = False
  routing_ms: Optional[float] = None


class RoutingService:
  """The router behind a micro-batcher: text -> Decision."""

  def __init__(self, router: router_lib.Router, settings: Settings, metrics: Metrics,
               served: Optional[list] = None, tool_models: Optional[list] = None):
    self.router, self.settings, self.metrics = router, settings, metrics
    # The models requests may go to (those the pool gives an endpoint): routing
    # picks the best of them; a request with tools the best tool-capable one, where
    # the pool marks any of them.
    self.served = np.array([n in (served or router.model_names) for n in router.model_names])
    tool_capable = self.served & np.array([n in (tool_models or ()) for n in router.model_names])
    self.with_tools = tool_capable if tool_capable.any() else self.served
    self.explore = router_lib.check_explore(settings.explore, '--explore')
    # The exploration draws: one Generator, used on the event loop's thread only.
    self.rng = np.random.default_rng(settings.seed)
    self.batcher = MicroBatcher(self._route_batch, settings.max_batch, settings.max_wait_ms,
                                on_batch=self._observe_batch)
    # The requests between reading the Serving that holds this service and their decision
    # (`held`): a reload retires the service it replaced once they are done (`retire`).
    self._users, self._drained, self.stopped = 0, None, False

  @contextlib.contextmanager
  def held(self):
    """Yields nothing; while open, `retire` waits before it stops the batcher (enter it
    on the event loop with no await since the Serving was read)."""
    self._users += 1
    try:
      yield
    finally:
      self._users -= 1
      if self._users == 0 and self._drained is not None:
        self._drained.set()

  async def retire(self) -> None:
    """Stops the batcher once every request that holds this service (`held`) has its
    decision: none is left waiting in the queue of a stopped batcher. Returns nothing."""
    while self._users:
      self._drained = asyncio.Event()
      await self._drained.wait()
    self.stopped = True
    await self.batcher.stop()

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

  async def decide(self, text: str, requested_cost_weight=None, field: str = 'messages',
                   explore: bool = True, tools: bool = False,
                   follow: Optional[Issuer] = None) -> Decision:
    """Routes one text (checked here, before it joins a batch: a text the router
    cannot read fails alone, with a 400 naming `field`); returns the Decision.

    With --explore > 0 and `explore` (the request's own "explore", default true) the
    first model is drawn from (1 - EPS) pi + EPS / K' over the served models and
    `propensity` is its probability there; otherwise it is the argmax (or the
    threshold rule's choice) with propensity 1.0. The rest of the ranking is the
    other served models by probability either way. With `tools` (the request offers
    tools) "served" means the tool-capable served models, where the pool marks any.
    With `follow` (the issuer of the tool calls a follow-up answers), where its model is
    served, that model comes first (propensity 1.0, not explored, `follows` its request)."""
    lam = self.cost_weight_for(requested_cost_weight)
    if not isinstance(text, str) or not text.strip():
      raise RequestError(400, f'{field} holds no text to route on; expected a non-empty string',
                         field)
    bad = strict_json.invalid_text(text)
    if bad is not None:
      raise RequestError(400, f'{field} holds an invalid Unicode character (a lone surrogate at '
                         f'position {bad[1]}); expected valid UTF-8 text', field)
    if self.stopped:   # only a request that did not hold the service (`held`) gets here
      raise RequestError(503, 'the router this request was read with was reloaded; expected '
                         'the request again', None, 'server_error', 'router_reloaded')
    started = time.perf_counter()
    probs = await self.batcher.submit((text, lam))
    routing_s = time.perf_counter() - started
    self.metrics.routing_latency.observe(routing_s)
    names = self.router.model_names
    # Routers that lambda moves take their top model; the others the threshold rule.
    threshold = None if self.router.moves_with_cost_weight else self.router.default_threshold
    eligible = self.with_tools if tools else self.served
    served = np.where(eligible, probs, -1.0)   # never eligible
    first, _ = router_lib.choose(served[None], self.router.model_costs,
                                 1.0 if threshold is None else threshold)
    first, propensity, explored = int(first[0]), 1.0, False
    follows, switched = None, False
    if follow is not None and follow.model in names and self.served[names.index(follow.model)]:
      first, follows = names.index(follow.model), follow.request_id
      self.metrics.sticky.inc()
    elif explore and self.explore > 0:
      dist = router_lib.explore_distribution(np.asarray(probs)[None], eligible, self.explore)
      chosen, first = first, int(router_lib.draw(dist, self.rng)[0])
      propensity, explored, switched = float(dist[0, first]), True, first != chosen
      self.metrics.explored.inc()
    # Best first; ties to the cheaper model.
    order = sorted(np.flatnonzero(eligible), key=lambda j: (
        -float(probs[j]), float(self.router.model_costs[j])))
    if first in order:
      order.remove(first)
    ranking = [names[first]] + [names[j] for j in order]
    self.metrics.routes.labels(names[first]).inc()
    return Decision(model=names[first], ranking=ranking,
                    probs={n: float(p) for n, p in zip(names, probs)}, cost_weight=lam,
                    threshold=threshold, propensity=propensity, explored=explored,
                    follows=follows, switched=switched, routing_ms=routing_s * 1000)
