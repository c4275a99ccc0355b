"""Forwarding a chat request to the pool's endpoints: `forward_with_fallback` calls the
candidate models in turn until one answers (connection errors, timeouts, 5xx, 429 and
401/403/404 move on to the next; other 4xx are passed back), and relays a stream's
server-sent events with each chunk's "model" set to the pool name. What became of the
request (who answered, the status, the upstream's usage and latency, the models tried
before) is kept in an `Outcome` for the decision log."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Optional

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from entrorouter_jax.data.pool import Endpoint
from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.metrics import Metrics
from entrorouter_jax.serving.routing import Decision
from entrorouter_jax.serving.settings import Settings
from entrorouter_jax.serving.tools import chunk_call_ids, reply_call_ids

log = logging.getLogger('entrorouter_jax.serve')

# Upstream statuses after which a routed request tries the next model: the
# model is down, overloaded or misconfigured. Other 4xx are the request's own
# fault and are passed back as they are.
RETRY_STATUSES = frozenset({401, 403, 404, 408, 429}) | frozenset(range(500, 600))
# The body fields that are the router's, not the upstream's: never forwarded.
ROUTER_FIELDS = frozenset({'cost_weight', 'explore'})


@dataclasses.dataclass
class Outcome:
  """What became of one forwarded request: the model whose reply went back (None if every
  model failed), the HTTP status sent to the client, the upstream's "usage" object (None
  if it sent none; a stream's only where a chunk carried it), the answering upstream's
  time from the request to its reply's last byte (ms; a stream's at its end), the models
  tried before it, and the ids of the tool calls the reply asks for. Filled in as the
  request goes; a stream's when it ends."""
  answered_by: Optional[str] = None
  status: Optional[int] = None
  usage: Optional[dict] = None
  latency_ms: Optional[float] = None
  fallbacks: list = dataclasses.field(default_factory=list)
  tool_calls: list = dataclasses.field(default_factory=list)


def new_client(settings: Settings) -> httpx.AsyncClient:
  """The client every upstream call goes through (--upstream_timeout; connect: at most 10 s)."""
  timeout = httpx.Timeout(settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout))
  return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
      max_connections=512, max_keepalive_connections=64))


def upstream_request(client: httpx.AsyncClient, endpoint: Endpoint, name: str,
                     body: dict) -> httpx.Request:
  """The chat request for pool model `name` at its endpoint; its key (read from the
  environment now) goes only into the Authorization header."""
  payload = {k: v for k, v in body.items() if k not in ROUTER_FIELDS}
  payload['model'] = endpoint.upstream_model or name
  headers = {'content-type': 'application/json'}
  if endpoint.api_key_env:
    key = os.environ.get(endpoint.api_key_env)
    if key:
      headers['authorization'] = f'Bearer {key}'
  return client.build_request('POST', f'{endpoint.base_url}/chat/completions',
                              json=payload, headers=headers)


def reply_headers(name: str, decision: Optional[Decision], failures: list) -> dict:
  """The x-entrorouter-* headers of a reply from (or after trying) model `name`."""
  headers = {'x-entrorouter-model': name}
  if failures:
    headers['x-entrorouter-fallbacks'] = ','.join(f['model'] for f in failures)
  if decision is not None and decision.cost_weight is not None:
    headers['x-entrorouter-cost-weight'] = f'{decision.cost_weight:g}'
  return headers


def about(name: str, decision: Optional[Decision], failures: list) -> dict:
  """The reply's "entrorouter" object."""
  return {'model': name, 'routed': decision is not None,
          'cost_weight': decision.cost_weight if decision else None,
          'fallbacks': failures}


async def relay_stream(upstream: httpx.Response, name: str, metrics: Metrics,
                       outcome: Optional[Outcome] = None, started: Optional[float] = None):
  """The upstream's server-sent events, each chunk's "model" set to the pool name; a
  chunk's "usage" object, the tool-call ids the chunks start and, at the end, the time
  since `started` go into `outcome`."""
  try:
    async for line in upstream.aiter_lines():
      if line.startswith('data:') and line[5:].strip() not in ('', '[DONE]'):
        try:
          chunk = json.loads(line[5:])
          if isinstance(chunk, dict) and 'model' in chunk:
            chunk['model'] = name
            line = 'data: ' + json.dumps(chunk)
          if outcome is not None and isinstance(chunk, dict):
            if isinstance(chunk.get('usage'), dict):
              outcome.usage = chunk['usage']
            outcome.tool_calls += chunk_call_ids(chunk)
        except json.JSONDecodeError:
          pass
      yield line + '\n'
  except httpx.HTTPError as e:
    metrics.upstream_errors.labels(name, 'stream_' + type(e).__name__).inc()
    log.warning('upstream %s failed mid-stream (%s)', name, type(e).__name__)
  finally:
    if outcome is not None and started is not None:
      outcome.latency_ms = (time.perf_counter() - started) * 1000
    await upstream.aclose()


async def call_upstream(client: httpx.AsyncClient, endpoint: Endpoint, name: str, body: dict,
                        stream: bool, metrics: Metrics, decision: Optional[Decision],
                        failures: list, reply_id: Optional[str] = None,
                        outcome: Optional[Outcome] = None):
  """One try of model `name`: the reply to send back (a Response; its JSON's "id" set to
  `reply_id` where one is given, and `outcome` filled in), or why it failed (a str, the
  metrics' reason) where the next model should be tried."""
  outcome = Outcome() if outcome is None else outcome
  started = time.perf_counter()
  try:
    upstream = await client.send(upstream_request(client, endpoint, name, body), stream=True)
  except httpx.TimeoutException:
    return 'timeout'
  except httpx.HTTPError as e:
    return type(e).__name__
  metrics.upstream_latency.labels(name).observe(time.perf_counter() - started)
  headers = reply_headers(name, decision, failures)
  if upstream.status_code in RETRY_STATUSES:
    await upstream.aclose()
    return f'http_{upstream.status_code}'
  if upstream.status_code >= 400:   # the request's own fault: the upstream's answer
    content = await upstream.aread()
    await upstream.aclose()
    outcome.answered_by, outcome.status = name, upstream.status_code
    outcome.latency_ms = (time.perf_counter() - started) * 1000
    return Response(content, status_code=upstream.status_code,
                    media_type=upstream.headers.get('content-type', 'application/json'),
                    headers=headers)
  if stream:
    outcome.answered_by, outcome.status = name, 200
    return StreamingResponse(relay_stream(upstream, name, metrics, outcome, started),
                             media_type='text/event-stream', headers=headers)
  try:
    content = await upstream.aread()
    data = json.loads(content)
    if not isinstance(data, dict):
      raise ValueError('not a JSON object')
  except (httpx.HTTPError, ValueError) as e:
    return f'bad_reply_{type(e).__name__}'
  finally:
    await upstream.aclose()
  data['model'] = name
  if reply_id is not None:
    data['id'] = reply_id
  data['entrorouter'] = about(name, decision, failures)
  outcome.answered_by, outcome.status = name, 200
  outcome.usage = data['usage'] if isinstance(data.get('usage'), dict) else None
  outcome.tool_calls = reply_call_ids(data)
  outcome.latency_ms = (time.perf_counter() - started) * 1000
  return JSONResponse(data, headers=headers)


async def forward_with_fallback(client: httpx.AsyncClient, endpoints: dict[str, Endpoint],
                                metrics: Metrics, body: dict, candidates: list[str],
                                decision: Optional[Decision], stream: bool,
                                reply_id: Optional[str] = None,
                                outcome: Optional[Outcome] = None) -> Response:
  """The first answer of the candidate models, tried in order; every failure is counted,
  logged and listed in the reply, and `outcome` (if given) says what became of the
  request. A JSON reply's "id" is set to `reply_id` where one is given. RequestError 502
  when they all fail."""
  outcome = Outcome() if outcome is None else outcome
  failures = []
  for i, name in enumerate(candidates):
    if i:
      metrics.fallbacks.labels(candidates[i - 1]).inc()
    reply = await call_upstream(client, endpoints[name], name, body, stream, metrics, decision,
                                failures, reply_id, outcome)
    if not isinstance(reply, str):
      outcome.fallbacks = [f['model'] for f in failures]
      return reply
    metrics.upstream_errors.labels(name, reply).inc()
    failures.append({'model': name, 'error': reply})
    log.warning('upstream %s failed (%s)%s', name, reply,
                '; trying the next model' if i + 1 < len(candidates) else '')
  last = failures[-1]['model']
  outcome.answered_by, outcome.status = None, 502
  outcome.fallbacks = [f['model'] for f in failures]
  raise RequestError(502, 'every upstream tried failed: ' + ', '.join(
      f"{f['model']} ({f['error']})" for f in failures), None, 'upstream_error',
      'upstream_unavailable', headers=reply_headers(last, decision, failures),
      extra={'entrorouter': about(last, decision, failures)})
