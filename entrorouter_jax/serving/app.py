"""The Starlette application: `create_app` checks the pool against the router and builds
the route table; the lifespan starts the micro-batcher and the upstream client and warms
the router up; the endpoints read the request, route, and forward (or answer the
decision only).

What the endpoints share is one frozen `Serving` on `app.state.serving`; while the app
runs (between the lifespan's start-up and shutdown) it carries the upstream client.
RequestError is answered by one exception handler; `Metered` counts and times the
replies, `ErrorBoundary` names each request and answers the unforeseen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Optional

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from entrorouter_jax import router as router_lib
from entrorouter_jax.data.pool import Endpoint
from entrorouter_jax.serving.errors import (ErrorBoundary, RequestError, http_error_reply,
                                            request_error_reply)
from entrorouter_jax.serving.metrics import Metered, Metrics
from entrorouter_jax.serving.requests import (ROUTER_MODEL, authorize, chat_request, read_json,
                                              route_text)
from entrorouter_jax.serving.routing import RoutingService
from entrorouter_jax.serving.settings import Settings
from entrorouter_jax.serving.upstream import forward_with_fallback, new_client

log = logging.getLogger('entrorouter_jax.serve')


@dataclasses.dataclass(frozen=True)
class Serving:
  """What the endpoints share: the settings, the pool's endpoints, the models served, the
  metrics, the micro-batched router, and the upstream client (None until the app runs)."""
  settings: Settings
  endpoints: dict
  served: list
  metrics: Metrics
  service: RoutingService
  client: Optional[httpx.AsyncClient] = None


@contextlib.asynccontextmanager
async def lifespan(base: Serving, warm_up: bool, app: Starlette):
  """Starts the batcher and the client, warms the router up, then serves; `healthz` says
  ready while `app.state.serving` holds the client."""
  service, settings = base.service, base.settings
  await service.batcher.start()
  client = new_client(settings)
  if warm_up:
    started = time.perf_counter()
    calls = await service.batcher.run_alone(service.router.warm_up, settings.max_batch)
    log.info('router warmed up (%d shapes, batches up to %d) in %.1f s', calls,
             settings.max_batch, time.perf_counter() - started)
  app.state.serving = dataclasses.replace(base, client=client)
  try:
    yield
  finally:
    app.state.serving = base
    await client.aclose()
    await service.batcher.stop()


async def healthz(request):
  """GET /healthz: 200 once the router is loaded and warmed up, 503 before."""
  serving: Serving = request.app.state.serving
  if serving.client is None:
    return JSONResponse({'status': 'starting'}, status_code=503)
  return JSONResponse({'status': 'ok', 'models': serving.served})


async def metrics_text(request):
  """GET /metrics: the Prometheus text."""
  serving: Serving = request.app.state.serving
  authorize(request, serving.settings.auth_token)
  return Response(serving.metrics.text(), media_type='text/plain; version=0.0.4; charset=utf-8')


async def route(request):
  """POST /v1/route: the decision only."""
  serving: Serving = request.app.state.serving
  authorize(request, serving.settings.auth_token)
  body = await read_json(request, serving.settings.max_body_bytes)
  text, field = route_text(body, serving.settings.route_on)
  decision = await serving.service.decide(text, body.get('cost_weight'), field)
  out = {'model': decision.model, 'probs': decision.probs, 'cost_weight': decision.cost_weight,
         'ranking': decision.ranking}
  if decision.threshold is not None:
    out['threshold'] = decision.threshold
  return JSONResponse(out)


async def chat(request):
  """POST /v1/chat/completions: routed (or a pool model by name), then forwarded."""
  serving: Serving = request.app.state.serving
  settings = serving.settings
  authorize(request, settings.auth_token)
  body = await read_json(request, settings.max_body_bytes)
  asked = chat_request(body, serving.served, settings.route_on)
  decision, candidates = None, [asked.model]
  if asked.model == ROUTER_MODEL:
    decision = await serving.service.decide(asked.text, body.get('cost_weight'))
    candidates = decision.ranking[:1 if settings.fallback == 'none' else settings.max_attempts]
  return await forward_with_fallback(serving.client, serving.endpoints, serving.metrics, body,
                                     candidates, decision, asked.stream)


def served_models(router: router_lib.Router, endpoints: dict[str, Endpoint]) -> list[str]:
  """The router's models the pool gives a base_url (ValueError if none); the rest is logged."""
  served = [n for n in router.model_names if n in endpoints and endpoints[n].base_url]
  if not served:
    raise ValueError(f'the pool gives no base_url for any model of the router; expected one '
                     f'for some of {router.model_names}')
  unserved = [n for n in router.model_names if n not in served]
  if unserved:
    log.warning('the pool gives no base_url for %s: routing picks among %s only', unserved,
                served)
  unknown = sorted(set(endpoints) - set(router.model_names))
  if unknown:
    log.warning('pool models %s are not among the router\'s %s: not served', unknown,
                router.model_names)
  return served


def create_app(router: router_lib.Router, endpoints: dict[str, Endpoint],
               settings: Optional[Settings] = None, warm_up: bool = True) -> Starlette:
  """The Starlette application (uvicorn serves it; tests may too)."""
  settings = settings or Settings()
  settings.check()
  served = served_models(router, endpoints)
  metrics = Metrics(served, settings.max_batch)
  base = Serving(settings, endpoints, served, metrics,
                 RoutingService(router, settings, metrics, served))
  routes = [
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', metrics_text, methods=['GET']),
      Route('/v1/route', route, methods=['POST']),
      Route('/v1/chat/completions', chat, methods=['POST']),
  ]
  paths = {r.path for r in routes}
  metered = {r.path: r.methods for r in routes if r.path != '/healthz'}
  app = Starlette(
      routes=routes, lifespan=functools.partial(lifespan, base, warm_up),
      exception_handlers={HTTPException: http_error_reply(paths),
                          RequestError: request_error_reply},
      middleware=[Middleware(ErrorBoundary, on_error=functools.partial(
                      metrics.count_unforeseen, paths)),
                  Middleware(Metered, metrics=metrics, metered=metered)])
  app.state.serving = base
  return app
