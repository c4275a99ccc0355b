"""The server's Prometheus metrics (`Metrics`) and `Metered`, the middleware that counts
each reply of the metered endpoints and times it to its first byte."""

from __future__ import annotations

import time

import prometheus_client as prom

from entrorouter_jax.layers import bucket

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
  """The server's Prometheus metrics, in a registry of their own."""

  def __init__(self, model_names, max_batch: int):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter('entrorouter_requests', 'HTTP requests answered.',
                                 ['endpoint', 'status'], registry=r)
    self.routes = prom.Counter('entrorouter_routes', 'Routing decisions, by chosen model.',
                               ['model'], registry=r)
    self.explored = prom.Counter('entrorouter_explored',
                                 'Routed requests whose model was sampled (--explore > 0).',
                                 registry=r)
    self.sticky = prom.Counter('entrorouter_sticky',
                               'Routed follow-ups sent to the model whose tool call they answer.',
                               registry=r)
    self.decisions_written = prom.Counter('entrorouter_decisions_written',
                                          'Lines written to the decision log (--decisions).',
                                          registry=r)
    self.feedback = prom.Counter('entrorouter_feedback',
                                 'Scores received (POST /v1/feedback), by the model that answered '
                                 'the scored request ("none": no model did).', ['model'],
                                 registry=r)
    self.feedback_score = prom.Counter('entrorouter_feedback_score',
                                       'Sum of the scores received, by the model that answered: '
                                       'mean score = this / entrorouter_feedback_total.',
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
    self.router_info = prom.Gauge('entrorouter_router_info',
                                  'The live router: 1 for its version (a digest of its workdir).',
                                  ['version'], registry=r)
    self.reloads = prom.Counter('entrorouter_reloads',
                                'Router reloads (POST /admin/reload, SIGHUP), by result.',
                                ['result'], registry=r)
    for result in ('ok', 'failed'):
      self.reloads.labels(result)
    for name in model_names:
      self.routes.labels(name)

  def set_version(self, version: str) -> None:
    """Names `version` the live router's in entrorouter_router_info (the only series)."""
    self.router_info.clear()
    self.router_info.labels(version).set(1)

  def text(self) -> bytes:
    """Returns the Prometheus text of every metric."""
    return prom.generate_latest(self.registry)

  def count_unforeseen(self, paths, path: str) -> None:
    """A request that failed unforeseen (ErrorBoundary's 500), by endpoint ('other' for a
    path not among `paths`)."""
    self.requests.labels(path if path in paths else 'other', '500').inc()


class Metered:
  """ASGI middleware: each reply of a metered endpoint is counted (entrorouter_requests, by
  endpoint and status) and its latency observed when its headers go out (the first byte
  of a stream).

  `metered` maps each metered path to the methods it serves (other methods get
  Starlette's 405, uncounted). On the `scrape` path only refusals count: a scrape of
  the metrics does not count itself.
  """

  def __init__(self, app, metrics: Metrics, metered: dict, scrape: str = '/metrics'):
    self.app, self.metrics, self.metered, self.scrape = app, metrics, metered, scrape

  async def __call__(self, scope, receive, send):
    path = scope.get('path')
    if scope['type'] != 'http' or scope.get('method') not in self.metered.get(path, ()):
      return await self.app(scope, receive, send)
    started = time.perf_counter()

    async def send_counted(message):
      if message['type'] == 'http.response.start':
        status = message['status']
        if path != self.scrape or status >= 400:
          self.metrics.requests.labels(path, str(status)).inc()
          self.metrics.latency.labels(path).observe(time.perf_counter() - started)
      await send(message)

    await self.app(scope, receive, send_counted)
