"""Forwarding a chat request to the pool's endpoints: `forward_with_fallback` calls the
candidate models in turn until one answers (connection errors, timeouts, 5xx, 429 and
401/403/404 move on to the next; other 4xx are passed back), and relays a stream's
server-sent events with each chunk's "model" set to the pool name."""

from __future__ import annotations

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

log = logging.getLogger('entrorouter_jax.serve')

# Upstream statuses after which a routed request tries the next model: the
# model is down, overloaded or misconfigured. Other 4xx are the request's own
# fault and are passed back as they are.
RETRY_STATUSES = frozenset({401, 403, 404, 408, 429}) | frozenset(range(500, 600))


def new_client(settings: Settings) -> httpx.AsyncClient:
  """The client every upstream call goes through (--upstream_timeout; connect: at most 10 s)."""
  timeout = httpx.Timeout(settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout))
  return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
      max_connections=512, max_keepalive_connections=64))


def upstream_request(client: httpx.AsyncClient, endpoint: Endpoint, name: str,
                     body: dict) -> httpx.Request:
  """The chat request for pool model `name` at its endpoint; its key (read from the
  environment now) goes only into the Authorization header."""
  payload = {k: v for k, v in body.items() if k != 'cost_weight'}
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


async def relay_stream(upstream: httpx.Response, name: str, metrics: Metrics):
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


async def call_upstream(client: httpx.AsyncClient, endpoint: Endpoint, name: str, body: dict,
                        stream: bool, metrics: Metrics, decision: Optional[Decision],
                        failures: list):
  """One try of model `name`: the reply to send back (a Response), or why it failed (a
  str, the metrics' reason) where the next model should be tried."""
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
    return Response(content, status_code=upstream.status_code,
                    media_type=upstream.headers.get('content-type', 'application/json'),
                    headers=headers)
  if stream:
    return StreamingResponse(relay_stream(upstream, name, metrics),
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
  data['entrorouter'] = about(name, decision, failures)
  return JSONResponse(data, headers=headers)


async def forward_with_fallback(client: httpx.AsyncClient, endpoints: dict[str, Endpoint],
                                metrics: Metrics, body: dict, candidates: list[str],
                                decision: Optional[Decision], stream: bool) -> Response:
  """The first answer of the candidate models, tried in order; every failure is counted,
  logged and listed in the reply. RequestError 502 when they all fail."""
  failures = []
  for i, name in enumerate(candidates):
    if i:
      metrics.fallbacks.labels(candidates[i - 1]).inc()
    reply = await call_upstream(client, endpoints[name], name, body, stream, metrics, decision,
                                failures)
    if not isinstance(reply, str):
      return reply
    metrics.upstream_errors.labels(name, reply).inc()
    failures.append({'model': name, 'error': reply})
    log.warning('upstream %s failed (%s)%s', name, reply,
                '; trying the next model' if i + 1 < len(candidates) else '')
  last = failures[-1]['model']
  raise RequestError(502, 'every upstream tried failed: ' + ', '.join(
      f"{f['model']} ({f['error']})" for f in failures), None, 'upstream_error',
      'upstream_unavailable', headers=reply_headers(last, decision, failures),
      extra={'entrorouter': about(last, decision, failures)})
