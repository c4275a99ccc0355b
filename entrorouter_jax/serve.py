"""An OpenAI-compatible server that routes each request to one model of the pool.

  python -m entrorouter_jax.serve --workdir=DIR --pool=POOL.yaml [--host=127.0.0.1 --port=8000]

The pool file is the training pool file with three more keys per model (see
README "Serving"):
  gpt-4o:   {price_in: 2.5, price_out: 10, base_url: https://api.openai.com/v1,
             upstream_model: gpt-4o, api_key_env: OPENAI_API_KEY}
Router models without a base_url are not served: routing picks the best of the
others.

Endpoints
  POST /v1/chat/completions  OpenAI's chat API. "model": "router" routes on the
      conversation's text (--route_on: the last user message, or every message)
      and forwards the request to the chosen model's base_url; a pool model's
      name bypasses routing. The reply is the upstream's, with "model" set to
      the pool name and an "entrorouter" object (chosen model, whether it was
      routed, the cost weight, the upstream failures before it); headers
      x-entrorouter-model and x-entrorouter-fallbacks say the same. "stream":
      true streams the upstream's server-sent events through. An optional
      "cost_weight" field (the openai client's extra_body) routes this request
      at that lambda.
  POST /v1/route  {"query": "..."} (or {"messages": [...]}) -> {"model", "probs",
      "cost_weight"}: the decision only.
  GET /healthz    200 once the router is loaded and warmed up.
  GET /metrics    Prometheus text: requests, routes per model, upstream errors,
      fallbacks, latency histograms, micro-batch sizes.

Concurrent requests are micro-batched into one forward of the router
(--max_batch, --max_wait_ms). When an upstream fails (connection error,
timeout, 5xx, 429, 401/403/404), a routed request goes to the next model of the
router's ranking (--fallback=ranking, at most --max_attempts models; 'none'
answers 502 at once); every failure is in the reply and in the metrics. Bad
requests get a 4xx with an OpenAI-style error body naming the field: bodies
are read as strict JSON (RFC 8259: no NaN or Infinity) of valid Unicode (no
lone surrogates), before anything is routed or forwarded. A request fails
alone: its text is checked before it joins a micro-batch, and a batch whose
forward fails is run again item by item. Every reply carries the header
x-entrorouter-request-id; anything unforeseen is logged under that id and
answered with an OpenAI-style 500 that names the id, never the internals.

Safe by default: binds 127.0.0.1 unless --host says otherwise; with
--auth_token_env=NAME every request but /healthz must carry
"Authorization: Bearer $NAME" (401 otherwise); upstream keys are read from
their environment variables when a request is forwarded and are never logged
or echoed; request bodies over --max_body_bytes get 413; upstream calls time
out after --upstream_timeout seconds.

This module loads a router with `router.load_router` and imports nothing of
the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import os
import sys
import time
import uuid
from typing import Optional

import numpy as np
from absl import app as absl_app, flags

from entrorouter_jax import router as router_lib, strict_json
from entrorouter_jax.batching import MicroBatcher
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.data.readers import Endpoint, read_endpoints
from entrorouter_jax.layers import bucket
from entrorouter_jax.route import choose

log = logging.getLogger('entrorouter_jax.serve')
FLAGS = flags.FLAGS

ROUTER_MODEL = 'router'
# Upstream statuses after which a routed request tries the next model: the
# model is down, overloaded or misconfigured. Other 4xx are the request's own
# fault and are passed back as they are.
RETRY_STATUSES = frozenset({401, 403, 404, 408, 429}) | frozenset(range(500, 600))
ROUTE_ON = ('last_user', 'conversation')
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


@dataclasses.dataclass
class Settings:
  max_batch: int = 64               # requests per router forward
  max_wait_ms: float = 2.0          # wait after the first request for more
  upstream_timeout: float = 120.0   # seconds per upstream call (connect: at most 10)
  max_body_bytes: int = 1 << 20     # larger request bodies get 413
  fallback: str = 'ranking'         # ranking | none
  max_attempts: int = 3             # models tried per routed request
  route_on: str = 'last_user'       # last_user | conversation
  auth_token: Optional[str] = None  # the bearer token requests must carry (None: no auth)

  def check(self) -> None:
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
    if self.route_on not in ROUTE_ON:
      raise ValueError(f'--route_on={self.route_on!r}; expected one of {ROUTE_ON}')


class RequestError(Exception):
  """A bad request: HTTP status, message, the offending field."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               kind: str = 'invalid_request_error', code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, kind: str = 'invalid_request_error', param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
  """OpenAI's error layout."""
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


REQUEST_ID_HEADER = 'x-entrorouter-request-id'


class ErrorBoundary:
  """ASGI middleware: a request id on every reply, and no bare 500.

  Anything an endpoint did not foresee is logged with the request's id and
  answered with an OpenAI-style 500 body that names the id and nothing of the
  server's internals (a stream already under way is closed instead).
  `on_error(path)` counts it.
  """

  def __init__(self, app, on_error=None):
    self.app, self.on_error = app, on_error

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    request_id = 'req-' + uuid.uuid4().hex
    replied = False

    async def send_with_id(message):
      nonlocal replied
      if message['type'] == 'http.response.start':
        replied = True
        message = {**message, 'headers': [*message.get('headers', []),
                                          (REQUEST_ID_HEADER.encode(), request_id.encode())]}
      await send(message)

    try:
      await self.app(scope, receive, send_with_id)
    except Exception:  # noqa: BLE001 -- the boundary: logged in full, answered without internals
      log.exception('request %s to %s failed unexpectedly', request_id, scope.get('path'))
      if self.on_error is not None:
        self.on_error(scope.get('path', ''))
      if replied:
        return
      body = json.dumps(error_body(
          f'the server could not answer this request (request id {request_id}); the server '
          'log has the details under that id', 'server_error', None, 'internal_error')).encode()
      await send({'type': 'http.response.start', 'status': 500, 'headers': [
          (b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
          (REQUEST_ID_HEADER.encode(), request_id.encode())]})
      await send({'type': 'http.response.body', 'body': body})


# ================================================================ routing ===
class Metrics:
  """The server's Prometheus metrics, in a registry of their own."""

  def __init__(self, model_names, max_batch: int):
    import prometheus_client as prom
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter('entrorouter_requests', 'HTTP requests answered.',
                                 ['endpoint', 'status'], registry=r)
    self.routes = prom.Counter('entrorouter_routes', 'Routing decisions, by chosen model.',
                               ['model'], registry=r)
    self.upstream_errors = prom.Counter('entrorouter_upstream_errors',
                                        'Failed upstream calls, by model and reason.',
                                        ['model', 'reason'], registry=r)
    self.fallbacks = prom.Counter('entrorouter_fallbacks',
                                  'Requests sent on to the next model after a failure.',
                                  ['from_model'], registry=r)
    self.latency = prom.Histogram('entrorouter_request_latency_seconds',
                                  'Time to answer a request (to the first byte when streaming).',
                                  ['endpoint'], buckets=LATENCY_BUCKETS, registry=r)
    self.routing_latency = prom.Histogram(
        'entrorouter_routing_latency_seconds',
        'Routing overhead of a request: queueing for a batch + the forward.',
        buckets=LATENCY_BUCKETS, registry=r)
    self.upstream_latency = prom.Histogram('entrorouter_upstream_latency_seconds',
                                           'Upstream call time (to its headers when streaming).',
                                           ['model'], buckets=LATENCY_BUCKETS, registry=r)
    sizes = sorted({bucket(n) for n in range(1, max_batch + 1)} | {max_batch})
    self.batch_size = prom.Histogram('entrorouter_batch_size',
                                     'Requests per router forward (micro-batching).',
                                     buckets=sizes, registry=r)
    self.forward_seconds = prom.Histogram('entrorouter_forward_seconds',
                                          'Time of one batched router forward.',
                                          buckets=LATENCY_BUCKETS, registry=r)
    for name in model_names:
      self.routes.labels(name)

  def text(self) -> bytes:
    import prometheus_client as prom
    return prom.generate_latest(self.registry)


@dataclasses.dataclass
class Decision:
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
    if requested is None:
      return self.router.default_cost_weight if self.router.moves_with_cost_weight else None
    value = None
    if isinstance(requested, (int, float)) and not isinstance(requested, bool):
      try:
        value = float(requested)
      except OverflowError:   # an integer beyond float's range
        value = None
    if value is None or not np.isfinite(value) or value < 0:
      shown = repr(requested) if len(repr(requested)) <= 40 else repr(requested)[:40] + '...'
      raise RequestError(400, f'cost_weight is {shown}; expected a finite number >= 0',
                         'cost_weight')
    if not self.router.moves_with_cost_weight:
      raise RequestError(400, 'cost_weight needs a router with the utility head or a '
                         'lambda-conditioned one; this router routes by threshold', 'cost_weight')
    return value

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
    first, _ = choose(served[None], self.router.model_costs,
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


# =============================================================== requests ===
def message_text(content, where: str) -> str:
  """The text of a message's content: a string, or OpenAI's list of parts."""
  if content is None:
    return ''
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for i, part in enumerate(content):
      if not isinstance(part, dict) or not isinstance(part.get('type'), str):
        raise RequestError(400, f'{where}.content[{i}] is {part!r}; expected a content part '
                           'object with a "type"', f'{where}.content')
      if part['type'] == 'text':
        if not isinstance(part.get('text'), str):
          raise RequestError(400, f'{where}.content[{i}].text is missing; expected a string',
                             f'{where}.content')
        texts.append(part['text'])
    return '\n'.join(texts)
  raise RequestError(400, f'{where}.content is {type(content).__name__}; expected a string '
                     'or a list of content parts', f'{where}.content')


def conversation_text(messages, route_on: str) -> str:
  """What the router reads of a chat request (after checking `messages`)."""
  if not isinstance(messages, list) or not messages:
    raise RequestError(400, 'messages is missing or empty; expected a non-empty list of '
                       '{"role", "content"} objects', 'messages')
  texts = []
  for i, m in enumerate(messages):
    where = f'messages[{i}]'
    if not isinstance(m, dict):
      raise RequestError(400, f'{where} is {type(m).__name__}; expected an object with '
                         '"role" and "content"', where)
    if not isinstance(m.get('role'), str) or not m['role']:
      raise RequestError(400, f'{where}.role is {m.get("role")!r}; expected a string such as '
                         '"user"', f'{where}.role')
    texts.append((m['role'], message_text(m.get('content'), where)))
  if route_on == 'last_user':
    users = [t for role, t in texts if role == 'user' and t.strip()]
    text = users[-1] if users else ''
  else:
    text = '\n'.join(t for _, t in texts if t.strip())
  if not text.strip():
    raise RequestError(400, 'messages hold no text to route on; expected a user message '
                       'with text content', 'messages')
  return text


def create_app(router: router_lib.Router, endpoints: dict[str, Endpoint],
               settings: Optional[Settings] = None, warm_up: bool = True):
  """The Starlette application (uvicorn serves it; tests may too)."""
  import httpx
  from starlette.applications import Starlette
  from starlette.exceptions import HTTPException
  from starlette.middleware import Middleware
  from starlette.responses import JSONResponse, Response, StreamingResponse
  from starlette.routing import Route

  settings = settings or Settings()
  settings.check()
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
  metrics = Metrics(served, settings.max_batch)
  service = RoutingService(router, settings, metrics, served)
  state = {'ready': False, 'client': None}

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    await service.batcher.start()
    timeout = httpx.Timeout(settings.upstream_timeout,
                            connect=min(10.0, settings.upstream_timeout))
    state['client'] = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
        max_connections=512, max_keepalive_connections=64))
    if warm_up:
      started = time.perf_counter()
      calls = await service.batcher.run_alone(router.warm_up, settings.max_batch)
      log.info('router warmed up (%d shapes, batches up to %d) in %.1f s', calls,
               settings.max_batch, time.perf_counter() - started)
    state['ready'] = True
    try:
      yield
    finally:
      state['ready'] = False
      await state['client'].aclose()
      await service.batcher.stop()

  def counted(endpoint: str, status: int, started: float) -> None:
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

  def fail(endpoint: str, e: RequestError, started: float, headers=None, **extra):
    """The OpenAI-style error reply (plus `extra` top-level fields), counted."""
    counted(endpoint, e.status, started)
    return JSONResponse({**error_body(e.message, e.kind, e.param, e.code), **extra},
                        status_code=e.status, headers=headers)

  def authorize(request) -> None:
    if settings.auth_token is None:
      return
    header = request.headers.get('authorization', '')
    scheme, _, token = header.partition(' ')
    if scheme.lower() != 'bearer' or not hmac.compare_digest(token.strip().encode(),
                                                             settings.auth_token.encode()):
      raise RequestError(401, 'missing or wrong bearer token; expected the header '
                         '"Authorization: Bearer <token>"', None, 'authentication_error',
                         'invalid_api_key')

  async def read_json(request) -> dict:
    length = request.headers.get('content-length')
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
      raise RequestError(413, f'request body of {length} bytes is over the limit of '
                         f'{settings.max_body_bytes} bytes', None, 'invalid_request_error',
                         'request_too_large')
    body = bytearray()
    async for chunk in request.stream():
      body.extend(chunk)
      if len(body) > settings.max_body_bytes:
        raise RequestError(413, f'request body is over the limit of {settings.max_body_bytes} '
                           'bytes', None, 'invalid_request_error', 'request_too_large')
    try:
      data = strict_json.loads(bytes(body))
    except strict_json.JsonError as e:
      raise RequestError(400, f'the request body is not strict JSON: {e.message}; expected a '
                         'JSON object (RFC 8259, UTF-8)', e.field) from None
    if not isinstance(data, dict):
      raise RequestError(400, f'the request body is a JSON {type(data).__name__}; expected an '
                         'object')
    return data

  async def healthz(_request):
    if not state['ready']:
      return JSONResponse({'status': 'starting'}, status_code=503)
    return JSONResponse({'status': 'ok', 'models': served})

  async def metrics_endpoint(request):
    started = time.perf_counter()
    try:
      authorize(request)
    except RequestError as e:
      return fail('/metrics', e, started)
    return Response(metrics.text(), media_type='text/plain; version=0.0.4; charset=utf-8')

  async def route_endpoint(request):
    started = time.perf_counter()
    try:
      authorize(request)
      body = await read_json(request)
      if 'query' in body:
        text = body['query']
        if not isinstance(text, str) or not text.strip():
          raise RequestError(400, f'query is {text!r}; expected a non-empty string', 'query')
      elif 'messages' in body:
        text = conversation_text(body['messages'], settings.route_on)
      else:
        raise RequestError(400, 'query is missing; expected {"query": "..."} or {"messages": '
                           '[...]}', 'query')
      decision = await service.decide(text, body.get('cost_weight'),
                                      'query' if 'query' in body else 'messages')
    except RequestError as e:
      return fail('/v1/route', e, started)
    counted('/v1/route', 200, started)
    out = {'model': decision.model, 'probs': decision.probs, 'cost_weight': decision.cost_weight,
           'ranking': decision.ranking}
    if decision.threshold is not None:
      out['threshold'] = decision.threshold
    return JSONResponse(out)

  def upstream_request(name: str, body: dict):
    ep = endpoints[name]
    payload = {k: v for k, v in body.items() if k != 'cost_weight'}
    payload['model'] = ep.upstream_model or name
    headers = {'content-type': 'application/json'}
    if ep.api_key_env:
      key = os.environ.get(ep.api_key_env)
      if key:
        headers['authorization'] = f'Bearer {key}'
    return state['client'].build_request('POST', f'{ep.base_url}/chat/completions',
                                         json=payload, headers=headers)

  def reply_headers(name: str, decision: Optional[Decision], failures: list) -> dict:
    headers = {'x-entrorouter-model': name}
    if failures:
      headers['x-entrorouter-fallbacks'] = ','.join(f['model'] for f in failures)
    if decision is not None and decision.cost_weight is not None:
      headers['x-entrorouter-cost-weight'] = f'{decision.cost_weight:g}'
    return headers

  def about(name: str, decision: Optional[Decision], failures: list) -> dict:
    return {'model': name, 'routed': decision is not None,
            'cost_weight': decision.cost_weight if decision else None,
            'fallbacks': failures}

  async def relay_stream(upstream, name: str):
    """The upstream's server-sent events, each chunk's "model" set to the pool name."""
    try:
      async for line in upstream.aiter_lines():
        if line.startswith('data:') and line[5:].strip() not in ('', '[DONE]'):
          try:
            chunk = json.loads(line[5:])
            if isinstance(chunk, dict) and 'model' in chunk:
              chunk['model'] = name
              line = 'data: ' + json.dumps(chunk)
          except json.JSONDecodeError:
            pass
        yield line + '\n'
    except httpx.HTTPError as e:
      metrics.upstream_errors.labels(name, 'stream_' + type(e).__name__).inc()
      log.warning('upstream %s failed mid-stream (%s)', name, type(e).__name__)
    finally:
      await upstream.aclose()

  async def chat(request):
    started = time.perf_counter()
    endpoint = '/v1/chat/completions'
    try:
      authorize(request)
      body = await read_json(request)
      model = body.get('model')
      if not isinstance(model, str) or not model:
        raise RequestError(400, f'model is {model!r}; expected "router" or one of the pool '
                           f'models {served}', 'model')
      text = conversation_text(body.get('messages'), settings.route_on)
      stream = body.get('stream', False)
      if not isinstance(stream, bool):
        raise RequestError(400, f'stream is {stream!r}; expected true or false', 'stream')
      if model == ROUTER_MODEL:
        decision = await service.decide(text, body.get('cost_weight'))
        candidates = decision.ranking
        if settings.fallback == 'none':
          candidates = candidates[:1]
        candidates = candidates[:settings.max_attempts]
      elif model in served:
        if 'cost_weight' in body:
          raise RequestError(400, f'cost_weight applies to "model": "router" only; model is '
                             f'{model!r}', 'cost_weight')
        decision, candidates = None, [model]
      else:
        raise RequestError(404, f'model {model!r} is not served here; expected "router" or '
                           f'one of {served}', 'model', 'invalid_request_error',
                           'model_not_found')
    except RequestError as e:
      return fail(endpoint, e, started)

    failures = []
    for i, name in enumerate(candidates):
      if i:
        metrics.fallbacks.labels(candidates[i - 1]).inc()
      call_started = time.perf_counter()
      try:
        upstream = await state['client'].send(upstream_request(name, body), stream=True)
      except httpx.TimeoutException:
        reason = 'timeout'
      except httpx.HTTPError as e:
        reason = type(e).__name__
      else:
        metrics.upstream_latency.labels(name).observe(time.perf_counter() - call_started)
        if upstream.status_code in RETRY_STATUSES:
          reason = f'http_{upstream.status_code}'
          await upstream.aclose()
        elif upstream.status_code >= 400:  # the request's own fault: the upstream's answer
          content = await upstream.aread()
          await upstream.aclose()
          counted(endpoint, upstream.status_code, started)
          return Response(content, status_code=upstream.status_code,
                          media_type=upstream.headers.get('content-type', 'application/json'),
                          headers=reply_headers(name, decision, failures))
        elif stream:
          counted(endpoint, 200, started)
          return StreamingResponse(relay_stream(upstream, name), media_type='text/event-stream',
                                   headers=reply_headers(name, decision, failures))
        else:
          try:
            content = await upstream.aread()
            data = json.loads(content)
            if not isinstance(data, dict):
              raise ValueError('not a JSON object')
          except (httpx.HTTPError, ValueError) as e:
            reason = f'bad_reply_{type(e).__name__}'
          else:
            data['model'] = name
            data['entrorouter'] = about(name, decision, failures)
            counted(endpoint, 200, started)
            return JSONResponse(data, headers=reply_headers(name, decision, failures))
          finally:
            await upstream.aclose()
      metrics.upstream_errors.labels(name, reason).inc()
      failures.append({'model': name, 'error': reason})
      log.warning('upstream %s failed (%s)%s', name, reason,
                  '; trying the next model' if i + 1 < len(candidates) else '')
    e = RequestError(502, 'every upstream tried failed: ' + ', '.join(
        f"{f['model']} ({f['error']})" for f in failures), None, 'upstream_error',
        'upstream_unavailable')
    last = failures[-1]['model']
    return fail(endpoint, e, started, entrorouter=about(last, decision, failures),
                headers=reply_headers(last, decision, failures))

  routes = [
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', metrics_endpoint, methods=['GET']),
      Route('/v1/route', route_endpoint, methods=['POST']),
      Route('/v1/chat/completions', chat, methods=['POST']),
  ]
  paths = {r.path for r in routes}

  async def http_error(_request, e: HTTPException):
    """Starlette's own 4xx (an unknown path, a wrong method) in OpenAI's error layout."""
    code = {404: 'not_found', 405: 'method_not_allowed'}.get(e.status_code)
    message = {404: f'no such endpoint; expected one of {sorted(paths)}',
               405: 'this endpoint does not take that method'}.get(e.status_code, str(e.detail))
    return JSONResponse(error_body(message, 'invalid_request_error', None, code),
                        status_code=e.status_code, headers=e.headers)

  def count_error(path: str) -> None:
    metrics.requests.labels(path if path in paths else 'other', '500').inc()

  return Starlette(routes=routes, lifespan=lifespan,
                   exception_handlers={HTTPException: http_error},
                   middleware=[Middleware(ErrorBoundary, on_error=count_error)])


# ==================================================================== CLI ===
def settings_from_flags() -> Settings:
  token = None
  if FLAGS.auth_token_env:
    token = os.environ.get(FLAGS.auth_token_env)
    if not token:
      raise ValueError(f'--auth_token_env={FLAGS.auth_token_env}: that environment variable is '
                       'unset or empty; expected it to hold the bearer token clients send')
  return Settings(max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                  upstream_timeout=FLAGS.upstream_timeout, max_body_bytes=FLAGS.max_body_bytes,
                  fallback=FLAGS.fallback, max_attempts=FLAGS.max_attempts,
                  route_on=FLAGS.route_on, auth_token=token)


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  try:
    import prometheus_client, starlette, uvicorn  # noqa: F401
  except ImportError as e:
    print(f"error: serving needs {e.name}: pip install -e '.[serve]'", file=sys.stderr)
    sys.exit(2)
  from entrorouter_jax import logs
  logs.show_progress_logs()
  logging.getLogger('entrorouter_jax').setLevel(logging.INFO)
  try:
    settings = settings_from_flags()
    endpoints = read_endpoints(FLAGS.pool)
    router = router_lib.load_router(FLAGS.workdir)
    app = create_app(router, endpoints, settings)
  except (router_lib.RouterError, DataError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if FLAGS.host not in ('127.0.0.1', 'localhost', '::1') and settings.auth_token is None:
    log.warning('serving on %s without --auth_token_env: anyone who reaches this port can '
                'spend your upstream keys', FLAGS.host)
  lam = router.default_cost_weight if router.moves_with_cost_weight else None
  log.info('routing %s over %s at cost weight %s%s', FLAGS.workdir, router.model_names, lam,
           ' (calibrated)' if router.calibration else '')
  uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level,
              access_log=FLAGS.access_log)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of a finished training run.', required=True)
  flags.DEFINE_string('pool', None, 'Pool file with base_url (and upstream_model, '
                      'api_key_env) per model.', required=True)
  flags.DEFINE_string('host', '127.0.0.1', 'Interface to bind (0.0.0.0: every interface).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('auth_token_env', None, 'Environment variable holding the bearer token '
                      'every request must carry.')
  flags.DEFINE_integer('max_batch', Settings.max_batch, 'Requests per router forward.')
  flags.DEFINE_float('max_wait_ms', Settings.max_wait_ms, 'Wait after the first request of a '
                     'batch for more (ms).')
  flags.DEFINE_float('upstream_timeout', Settings.upstream_timeout, 'Seconds per upstream call.')
  flags.DEFINE_integer('max_body_bytes', Settings.max_body_bytes, 'Larger bodies get 413.')
  flags.DEFINE_enum('fallback', Settings.fallback, ['ranking', 'none'], 'After an upstream '
                    'failure: the next model of the ranking, or 502 at once.')
  flags.DEFINE_integer('max_attempts', Settings.max_attempts, 'Models tried per routed request.')
  flags.DEFINE_enum('route_on', Settings.route_on, list(ROUTE_ON), 'What the router reads.')
  flags.DEFINE_string('log_level', 'info', 'uvicorn log level.')
  flags.DEFINE_bool('access_log', False, 'uvicorn access log (paths and statuses only).')
  absl_app.run(main)
