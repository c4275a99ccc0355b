"""The Starlette application: `create_app` checks the pool against the router and builds
the route table; the lifespan starts the micro-batcher and the upstream client and warms
the router up; the endpoints read the request, route, and forward (or answer the
decision only).

What the endpoints share is one frozen `Serving` on `app.state.serving`; while the app
runs (between the lifespan's start-up and shutdown) it carries the upstream client and,
with --decisions, the decision log: one line per routed chat completion and per
/v1/route call (`decision_line`; serving/decisions.py writes them), an index of its
ids, and the feedback log of the scores POST /v1/feedback accepts for those ids.
POST /admin/reload (and SIGHUP, with Settings.workdir) swaps in a Serving with another
router (serving/reload.py); an endpoint reads `app.state.serving` once, so a request in
flight finishes on the router it started with.
Tool calls the server relays are remembered (`ToolCalls`, kept across reloads): a routed
follow-up answering one goes to the model that made it, and a request that offers tools
is routed among the pool's tool-capable models where it marks any.
The dashboard's `Stats` (serving/stats.py; --stats_history=0: None) is kept across reloads
like the metrics: each routing decision, each routed chat completion's end (who answered,
after how many failures, its dollars and the same tokens at the strongest model's prices)
and each score go into it; GET /v1/stats and GET /dashboard (serving/dashboard.py) read it.
RequestError is answered by one exception handler; `Metered` counts and times the
replies, `ErrorBoundary` names each request and answers the unforeseen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import os
import time
from typing import Optional

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from entrorouter_jax import router as router_lib
from entrorouter_jax.data.pool import Endpoint, tool_models
from entrorouter_jax.serving import dashboard as dashboard_lib
from entrorouter_jax.serving.decisions import DecisionIndex, DecisionLog
from entrorouter_jax.serving.errors import (ErrorBoundary, RequestError, http_error_reply,
                                            request_error_reply, request_id_of)
from entrorouter_jax.serving.metrics import Metered, Metrics
from entrorouter_jax.serving.requests import (ROUTER_MODEL, authorize, chat_request,
                                              explore_field, feedback_items, offers_tools,
                                              read_json, route_text)
from entrorouter_jax.serving.reload import Reloader
from entrorouter_jax.serving.routing import Decision, RoutingService
from entrorouter_jax.serving.settings import Settings, is_loopback
from entrorouter_jax.serving.stats import Stats
from entrorouter_jax.serving.tools import Issuer, ToolCalls
from entrorouter_jax.serving.upstream import Outcome, forward_with_fallback, new_client

log = logging.getLogger('entrorouter_jax.serve')


@dataclasses.dataclass(frozen=True)
class Serving:
  """What the endpoints share: the settings, the pool's endpoints, the models served, the
  metrics, the micro-batched router, the router's version (a digest of its workdir), the
  pool's prices ({name: an object with price_in and price_out, dollars per 1M tokens}),
  and, while the app runs, the upstream client and, with --decisions, the decision log,
  the index of its ids and the feedback log (None otherwise). `tool_calls` remembers the
  issuer of each tool call relayed, and `stats` is the dashboard's history (None with
  --stats_history=0); both are the same across reloads."""
  settings: Settings
  endpoints: dict
  served: list
  metrics: Metrics
  service: RoutingService
  version: str = 'unknown'
  prices: dict = dataclasses.field(default_factory=dict)
  decisions: Optional[DecisionLog] = None
  client: Optional[httpx.AsyncClient] = None
  index: Optional[DecisionIndex] = None
  feedback: Optional[DecisionLog] = None
  tool_calls: ToolCalls = dataclasses.field(default_factory=ToolCalls)
  stats: Optional[Stats] = None


@contextlib.asynccontextmanager
async def lifespan(base: Serving, warm_up: bool, app: Starlette):
  """Starts the batcher, the client and, with --decisions, the decision log, its index
  (the ids of DIR's earlier decision files read once) and the feedback log; warms the
  router up, then serves; `healthz` says ready while `app.state.serving` holds the client.
  With Settings.workdir, SIGHUP reloads the router from it (where the platform has
  SIGHUP). At shutdown the live router's batcher stops (a reload may have replaced
  `base`'s), then both logs are closed (drained, fsynced)."""
  service, settings = base.service, base.settings
  await service.batcher.start()
  client = new_client(settings)
  if warm_up:
    started = time.perf_counter()
    calls = await service.batcher.run_alone(service.router.warm_up, settings.max_batch)
    log.info('router warmed up (%d shapes, batches up to %d) in %.1f s', calls,
             settings.max_batch, time.perf_counter() - started)
  decisions = index = feedback_log = None
  if settings.decisions is not None:
    index = DecisionIndex(settings.decisions)
    decisions = DecisionLog(settings.decisions, on_written=base.metrics.decisions_written.inc)
    feedback_log = DecisionLog(settings.decisions, prefix='feedback')
  app.state.serving = dataclasses.replace(base, client=client, decisions=decisions,
                                          index=index, feedback=feedback_log)
  if base.stats is not None:
    base.stats.router_loaded(base.version)   # serving from now on
  reloader: Reloader = app.state.reloader
  if settings.workdir is not None and reloader.install_sighup():
    log.info('SIGHUP reloads the router from %s', settings.workdir)
  try:
    yield
  finally:
    try:
      await reloader.uninstall_sighup()
    finally:
      async with reloader.lock:   # a reload under way ends first
        live = app.state.serving
        app.state.serving = dataclasses.replace(live, client=None, decisions=None, index=None,
                                                feedback=None)
    try:
      await client.aclose()
      await live.service.batcher.stop()
    finally:
      for opened in (decisions, feedback_log):
        if opened is not None:
          opened.close()


async def healthz(request):
  """GET /healthz: 200 once the router is loaded and warmed up, 503 before."""
  serving: Serving = request.app.state.serving
  if serving.client is None:
    return JSONResponse({'status': 'starting', 'version': serving.version}, status_code=503)
  return JSONResponse({'status': 'ok', 'models': serving.served, 'version': serving.version})


def admin_authorize(request, settings: Settings) -> None:
  """Returns when the request may use /admin/*: 403 on a server without a bearer token
  that binds beyond loopback (Settings.host), else 401 unless it carries the token."""
  if settings.auth_token is None and not is_loopback(settings.host):
    raise RequestError(403, f'/admin/* is off on a server bound to {settings.host} without a '
                       'bearer token; expected a server started with --auth_token_env, or '
                       'bound to loopback (127.0.0.1, ::1, localhost)', None,
                       'permission_error', 'admin_forbidden')
  authorize(request, settings.auth_token)


async def admin_reload(request):
  """POST /admin/reload {"workdir": PATH}: the router at PATH replaces the live one; 200
  {"version", "models", "seconds"} once it serves; 400 (a bad workdir or body, a router
  the pool serves none of) or 500 (its warm-up failed) with the old router serving on."""
  settings = request.app.state.serving.settings
  admin_authorize(request, settings)
  body = await read_json(request, settings.max_body_bytes)
  workdir = body.get('workdir')
  if not isinstance(workdir, str) or not workdir.strip():
    shown = 'missing' if 'workdir' not in body else f'{workdir!r}'[:60]
    raise RequestError(400, f'workdir is {shown}; expected the path of a finished training '
                       'run\'s workdir as a non-empty string', 'workdir')
  if request.app.state.serving.client is None:
    raise RequestError(503, 'the server is not running (starting or shutting down); expected '
                       'the reload once /healthz says ok', None, 'server_error', 'not_running')
  return JSONResponse(await request.app.state.reloader.reload(workdir))


async def metrics_text(request):
  """GET /metrics: the Prometheus text."""
  serving: Serving = request.app.state.serving
  authorize(request, serving.settings.auth_token)
  return Response(serving.metrics.text(), media_type='text/plain; version=0.0.4; charset=utf-8')


def dollar_cost(usage, price) -> Optional[float]:
  """The dollars of a reply: (prompt_tokens x price_in + completion_tokens x price_out) / 1e6
  of the upstream's `usage` and the model's `price` (price_in, price_out per 1M tokens);
  None where either is missing or the token counts are not numbers >= 0."""
  if not isinstance(usage, dict) or price is None:
    return None
  tokens = (usage.get('prompt_tokens'), usage.get('completion_tokens'))
  if not all(isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t)
             and t >= 0 for t in tokens):
    return None
  return (tokens[0] * price.price_in + tokens[1] * price.price_out) / 1e6


def decision_line(serving: Serving, request_id: Optional[str], endpoint: str, text: str,
                  decision: Decision, decided_at: float,
                  outcome: Optional[Outcome] = None) -> dict:
  """The decision log's line of one routed request (`endpoint`: "chat" or "route"; a
  route call has no `outcome`: nothing was forwarded, its status is 200)."""
  outcome = outcome or Outcome(status=200)
  price = serving.prices.get(outcome.answered_by) if outcome.answered_by else None
  return {'id': request_id, 'time': decided_at, 'endpoint': endpoint, 'text': text,
          'model': decision.model, 'answered_by': outcome.answered_by,
          'propensity': decision.propensity, 'explored': decision.explored,
          'cost_weight': decision.cost_weight, 'version': serving.version,
          'usage': outcome.usage, 'cost': dollar_cost(outcome.usage, price),
          'latency_ms': outcome.latency_ms, 'status': outcome.status,
          'fallbacks': list(outcome.fallbacks), 'follows': decision.follows}


def write_decision(serving: Serving, request_id: Optional[str], endpoint: str, text: str,
                   decision: Decision, decided_at: float,
                   outcome: Optional[Outcome] = None) -> None:
  """Queues the request's `decision_line` on the decision log; without --decisions nothing
  is built. A line the log cannot hold (an upstream usage that is not strict JSON) goes
  without its usage; after the log closed (a stream outliving the server's shutdown) it is
  dropped with a warning."""
  if serving.decisions is None:
    return
  line = decision_line(serving, request_id, endpoint, text, decision, decided_at, outcome)
  try:
    try:
      serving.decisions.record(line)
    except (ValueError, TypeError):
      log.warning('decision log: request %s: the upstream usage %r is not strict JSON; '
                  'logged without it', line.get('id'), line.get('usage'))
      serving.decisions.record({**line, 'usage': None, 'cost': None})
    if serving.index is not None and isinstance(line.get('id'), str):
      serving.index.add(line['id'], line.get('answered_by'))
  except RuntimeError:
    log.warning('decision log: request %s ended after the log closed; its line is lost',
                line.get('id'))


def record_decision(serving: Serving, decision: Decision) -> None:
  """Counts a routing decision in the dashboard's stats (where they are on)."""
  if serving.stats is not None:
    serving.stats.decision(decision.model, decision.explored, decision.routing_ms,
                           decision.switched)


def record_completion(serving: Serving, outcome: Outcome) -> None:
  """Counts a routed chat completion's end in the dashboard's stats (where they are on):
  who answered, after how many failed upstreams, in what time, its dollars at the pool's
  prices of the answering model and of the router's strongest model."""
  if serving.stats is None:
    return
  usage, answered = outcome.usage, outcome.answered_by
  actual = strongest = None
  if answered is not None and usage is not None:
    actual = dollar_cost(usage, serving.prices.get(answered))
    if actual is not None:
      strongest = dollar_cost(usage, serving.prices.get(
          dashboard_lib.strongest_model(serving.service.router)))
  serving.stats.completion(answered is not None, len(outcome.fallbacks), outcome.latency_ms,
                           actual, strongest)


async def at_end(stream, done):
  """`stream` (a streamed reply's body) passed through; `done()` once it ends, however."""
  try:
    async for chunk in stream:
      yield chunk
  finally:
    try:
      if hasattr(stream, 'aclose'):
        await stream.aclose()   # the relay's own end first: its latency, the upstream closed
    finally:
      done()


def remember_tool_calls(serving: Serving, outcome: Outcome, request_id: Optional[str]) -> None:
  """Notes who issued the tool calls of a reply (`outcome`): the model that answered and
  `request_id`, the request that chose it (a routed request's decision, or a request that
  named the model; a follow-up passes on the id it follows)."""
  if outcome.tool_calls and outcome.answered_by:
    serving.tool_calls.remember(outcome.tool_calls, Issuer(outcome.answered_by, request_id))


async def route(request):
  """POST /v1/route: the decision only, with the propensity of the chosen model."""
  settings: Settings = request.app.state.serving.settings   # the same across reloads
  authorize(request, settings.auth_token)
  body = await read_json(request, settings.max_body_bytes)
  text, field = route_text(body, settings.route_on)
  explore = explore_field(body)
  serving: Serving = request.app.state.serving   # this request's router, to its end
  with serving.service.held():
    decision = await serving.service.decide(text, body.get('cost_weight'), field, explore,
                                            offers_tools(body))
  decided_at = time.time()
  record_decision(serving, decision)
  out = {'model': decision.model, 'probs': decision.probs, 'cost_weight': decision.cost_weight,
         'ranking': decision.ranking, 'propensity': decision.propensity,
         'explored': decision.explored}
  if decision.threshold is not None:
    out['threshold'] = decision.threshold
  write_decision(serving, request_id_of(request), 'route', text, decision, decided_at)
  return JSONResponse(out)


async def chat(request):
  """POST /v1/chat/completions: routed (or a pool model by name), then forwarded. A routed
  completion's JSON "id" is the request id (x-entrorouter-request-id), and so is its
  decision log line's (a stream's chunks keep the upstream's ids). A routed follow-up
  whose closing "tool" messages answer calls this server relayed goes to the model that
  made them (its decision `follows` the request that chose that model)."""
  started = time.perf_counter()
  settings: Settings = request.app.state.serving.settings   # the same across reloads
  authorize(request, settings.auth_token)
  body = await read_json(request, settings.max_body_bytes)
  serving: Serving = request.app.state.serving   # this request's router, to its end
  with serving.service.held():
    asked = chat_request(body, serving.served, settings.route_on)
    if asked.model == ROUTER_MODEL:
      follow = serving.tool_calls.issuer(asked.tool_results) if asked.tool_results else None
      decision = await serving.service.decide(asked.text, body.get('cost_weight'),
                                              explore=asked.explore, tools=asked.tools,
                                              follow=follow)
  outcome, request_id = Outcome(), request_id_of(request)
  if asked.model != ROUTER_MODEL:
    reply = await forward_with_fallback(serving.client, serving.endpoints, serving.metrics, body,
                                        [asked.model], None, asked.stream, outcome=outcome)
    if not isinstance(reply, StreamingResponse):
      remember_tool_calls(serving, outcome, request_id)
    elif asked.tools:
      reply.body_iterator = at_end(reply.body_iterator,
                                   lambda: remember_tool_calls(serving, outcome, request_id))
    return reply
  decided_at = time.time()
  record_decision(serving, decision)
  candidates = decision.ranking[:1 if settings.fallback == 'none' else settings.max_attempts]

  def done():
    write_decision(serving, request_id, 'chat', asked.text, decision, decided_at, outcome)
    remember_tool_calls(serving, outcome, decision.follows or request_id)
    record_completion(serving, outcome)

  try:
    reply = await forward_with_fallback(serving.client, serving.endpoints, serving.metrics,
                                        body, candidates, decision, asked.stream, request_id,
                                        outcome)
  except Exception as e:
    outcome.status = e.status if isinstance(e, RequestError) else 500
    done()
    raise
  finally:
    if serving.stats is not None:   # to the reply's headers: a stream's first byte
      serving.stats.answer_time((time.perf_counter() - started) * 1000)
  if not isinstance(reply, StreamingResponse):
    done()
  elif serving.decisions is not None or asked.tools or serving.stats is not None:
    reply.body_iterator = at_end(reply.body_iterator, done)   # a stream's end: its line, stats
  return reply


async def feedback(request):
  """POST /v1/feedback: {"id", "score"} (or a list of up to 1000) for ids of the decision
  log, written to the feedback log with the time received; a later score for an id
  replaces the earlier. 200 {"accepted": n} when every item is good; otherwise a 4xx
  naming the field and nothing is written (404 for an unknown id, or without
  --decisions)."""
  serving: Serving = request.app.state.serving
  settings = serving.settings
  authorize(request, settings.auth_token)
  if serving.feedback is None or serving.index is None:
    raise RequestError(404, 'this server keeps no decision log, so it has no request ids to '
                       'score; expected a server started with --decisions=DIR', None,
                       'invalid_request_error', 'no_decision_log')
  items = feedback_items(await read_json(request, settings.max_body_bytes, lists=True))
  for prefix, request_id, _ in items:
    if request_id not in serving.index:
      shown = request_id if len(request_id) <= 60 else request_id[:60] + '...'
      raise RequestError(404, f'{prefix}id {shown!r} is not in the decision log; expected the '
                         'id of a routed request this server (or an earlier one on the same '
                         '--decisions directory) logged', f'{prefix}id', 'invalid_request_error',
                         'unknown_request_id')
  received = time.time()
  try:
    for _, request_id, score in items:
      serving.feedback.record({'id': request_id, 'score': score, 'time': received})
  except RuntimeError:
    raise RequestError(503, 'the server is shutting down; expected the feedback again once '
                       'it is back', None, 'server_error', 'shutting_down') from None
  for _, request_id, score in items:
    model = serving.index.answered_by(request_id) or 'none'
    serving.metrics.feedback.labels(model).inc()
    serving.metrics.feedback_score.labels(model).inc(score)
    if serving.stats is not None:
      serving.stats.feedback(model, score)
  return JSONResponse({'accepted': len(items)})


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


def check_decisions_dir(directory) -> None:
  """Creates the decision log's directory; ValueError naming --decisions if it cannot be
  created or written to."""
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--decisions={directory}: cannot create that directory ({e.strerror}); '
                     'expected a writable directory for the decision log') from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ValueError(f'--decisions={directory}: that directory is not writable; expected a '
                     'writable directory for the decision log')


def create_app(router: router_lib.Router, endpoints: dict[str, Endpoint],
               settings: Optional[Settings] = None, warm_up: bool = True,
               version: str = 'unknown', prices: Optional[dict] = None) -> Starlette:
  """The Starlette application (uvicorn serves it; tests may too). `version` names the
  router in /healthz and the decision log; `prices` ({name: an object with price_in and
  price_out, e.g. data.pool.prices(POOL)}) price the logged replies (none: cost null) and
  the dashboard's spend."""
  settings = settings or Settings()
  settings.check()
  if settings.decisions is not None:
    check_decisions_dir(settings.decisions)
  served = served_models(router, endpoints)
  metrics = Metrics(served, settings.max_batch)
  metrics.set_version(version)
  stats = None
  if settings.stats_history:
    stats = Stats(settings.stats_history, settings.stats_bucket_s)
    stats.router_loaded(version)
  base = Serving(settings, endpoints, served, metrics,
                 RoutingService(router, settings, metrics, served, tool_models(endpoints)),
                 version=version, prices=dict(prices or {}),
                 tool_calls=ToolCalls(settings.tool_calls_max, settings.tool_calls_ttl),
                 stats=stats)
  routes = [
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', metrics_text, methods=['GET']),
      Route('/v1/route', route, methods=['POST']),
      Route('/v1/chat/completions', chat, methods=['POST']),
      Route('/v1/feedback', feedback, methods=['POST']),
      Route('/v1/stats', dashboard_lib.stats, methods=['GET']),
      Route('/dashboard', dashboard_lib.dashboard, methods=['GET']),
      Route('/admin/reload', admin_reload, methods=['POST']),
  ]
  paths = {r.path for r in routes}
  metered = {r.path: r.methods for r in routes if r.path != '/healthz'}
  routes.append(Route('/dashboard/static/{name}', dashboard_lib.dashboard_file,
                      methods=['GET']))   # unmetered: the page's own files
  app = Starlette(
      routes=routes, lifespan=functools.partial(lifespan, base, warm_up),
      exception_handlers={HTTPException: http_error_reply(paths),
                          RequestError: request_error_reply},
      middleware=[Middleware(ErrorBoundary, on_error=functools.partial(
                      metrics.count_unforeseen, paths)),
                  Middleware(Metered, metrics=metrics, metered=metered)])
  app.state.serving = base
  app.state.reloader = Reloader(app, served_models, warm_up)
  app.state.dashboard_files = dashboard_lib.read_files()
  return app
