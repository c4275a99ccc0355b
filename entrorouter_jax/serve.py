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
      "cost_weight", "ranking", "propensity", "explored"}: the decision only.
  POST /v1/feedback  {"id": "<request id>", "score": 0..1} or a list of up to 1000:
      scores for ids of the decision log (--decisions; 404 without), written to
      DIR/feedback-*.jsonl; `python -m entrorouter_jax.feedback` joins them with the
      decisions into a feedback log to train on.
  GET /healthz    200 once the router is loaded and warmed up; "version" names the
      router (a digest of its workdir's config.json and checkpoint files).
  GET /metrics    Prometheus text: requests, routes per model, upstream errors,
      fallbacks, latency histograms, micro-batch sizes, the live router's version
      (entrorouter_router_info{version}) and reloads (entrorouter_reloads_total{result}).
  GET /dashboard  A page drawing /v1/stats, refreshed every 5 s (serving/dashboard.py; its
      scripts, uPlot included, are the package's own files: nothing loads from elsewhere).
      With --auth_token_env, open /dashboard?token=TOKEN once: the right token sets an
      HttpOnly, SameSite=Strict cookie good for the dashboard's GETs and redirects (303)
      to /dashboard.
  GET /v1/stats[?buckets=N]  JSON: the live router (version, loaded_at), the calibration in
      force, totals since the start (routes per model, explored, fallbacks, spend against
      always the strongest model -- an estimate --, latency p50/p95, feedback per model)
      and the last --stats_history buckets of --stats_bucket_s seconds of the same as
      series, with the reloads (serving/stats.py). --stats_history=0: off (404).
  POST /admin/reload  {"workdir": "PATH"}: hot reload. The router at PATH is loaded
      (the server keeps serving meanwhile), checked against the pool, warmed up and
      swapped in; requests in flight finish on the old one. 200 {"version", "models",
      "seconds"} once it serves; 400 (a bad workdir, a router the pool serves none of)
      or 500 (its warm-up failed) leave the old router serving. One reload at a time.
      /admin/* needs the bearer token; without --auth_token_env it is refused (403)
      unless --host is loopback. SIGHUP reloads from --workdir as given (a symlink
      repointed to a new run is followed); the result is logged.

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

Serving that learns: --explore=EPS (default 0: the argmax) routes each routed
request ("model": "router", and /v1/route) to a model sampled from
(1 - EPS) pi + EPS / K' over the K' served models (--seed fixes the draws), and
reports the chosen model's probability there as its "propensity"; a request
with "explore": false is routed by the argmax (propensity 1). --decisions=DIR
appends one JSON line per routed chat completion and per /v1/route call to
DIR/decisions-*.jsonl (serving/decisions.py): the request id (a routed
completion's "id"), the text routed on -- prompts are written to disk --, the
chosen and answering model, propensity, usage, dollar cost, latency, status.

Safe by default: binds 127.0.0.1 unless --host says otherwise; with
--auth_token_env=NAME every request but /healthz must carry
"Authorization: Bearer $NAME" (401 otherwise; the dashboard's GETs take the cookie
/dashboard?token= sets instead); upstream keys are read from
their environment variables when a request is forwarded and are never logged
or echoed; request bodies over --max_body_bytes get 413; upstream calls time
out after --upstream_timeout seconds.

This module is the command line; the server is in `entrorouter_jax.serving`. It
loads a router with `router.load_router`, reads the pool with `data.pool`, and
imports nothing of the trainer nor of the table readers.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
from typing import Optional

from absl import app as absl_app, flags

from entrorouter_jax import router as router_lib
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.data.pool import Endpoint, prices as pool_prices, read_endpoints
from entrorouter_jax.serving.settings import ROUTE_ON, Settings, is_loopback
from entrorouter_jax.serving.version import router_version  # noqa: F401 -- re-exported

log = logging.getLogger('entrorouter_jax.serve')
FLAGS = flags.FLAGS
TOKEN_PARAM = re.compile(r'([?&]token=)[^&\s]*')


def create_app(router: router_lib.Router, endpoints: dict[str, Endpoint],
               settings: Optional[Settings] = None, warm_up: bool = True,
               version: str = 'unknown', prices: Optional[dict] = None):
  """The Starlette application of `serving.app.create_app`, imported on first use: the
  server needs the [serve] extras, which `main` checks for first."""
  from entrorouter_jax.serving import app
  return app.create_app(router, endpoints, settings, warm_up, version, prices)


def settings_from_flags() -> Settings:
  """Returns the Settings of the flags; ValueError naming --auth_token_env when the
  variable it names is unset or empty."""
  token = None
  if FLAGS.auth_token_env:
    token = os.environ.get(FLAGS.auth_token_env)
    if not token:
      raise ValueError(f'--auth_token_env={FLAGS.auth_token_env}: that environment variable is '
                       'unset or empty; expected it to hold the bearer token clients send')
  return Settings(max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                  upstream_timeout=FLAGS.upstream_timeout, max_body_bytes=FLAGS.max_body_bytes,
                  fallback=FLAGS.fallback, max_attempts=FLAGS.max_attempts,
                  route_on=FLAGS.route_on, auth_token=token, explore=FLAGS.explore,
                  seed=FLAGS.seed, decisions=FLAGS.decisions, host=FLAGS.host,
                  workdir=FLAGS.workdir, tool_calls_max=FLAGS.tool_calls_max,
                  tool_calls_ttl=FLAGS.tool_calls_ttl, stats_history=FLAGS.stats_history,
                  stats_bucket_s=FLAGS.stats_bucket_s)


class HideTokens(logging.Filter):
  """A logging filter for uvicorn's access log: the value of a "token" query parameter
  (GET /dashboard?token=...) is written as "***"."""

  def filter(self, record: logging.LogRecord) -> bool:
    if isinstance(record.args, tuple):
      record.args = tuple(TOKEN_PARAM.sub(r'\1***', a) if isinstance(a, str) else a
                          for a in record.args)
    return True


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  try:
    for module in ('prometheus_client', 'starlette', 'uvicorn'):
      importlib.import_module(module)
  except ImportError as e:
    print(f"error: serving needs {e.name}: pip install -e '.[serve]'", file=sys.stderr)
    sys.exit(2)
  import uvicorn
  from entrorouter_jax import logs
  logs.show_progress_logs()
  logging.getLogger('entrorouter_jax').setLevel(logging.INFO)
  try:
    settings = settings_from_flags()
    settings.check()   # before the router loads: a bad flag fails fast
    endpoints = read_endpoints(FLAGS.pool)
    prices = pool_prices(FLAGS.pool)
    router = router_lib.load_router(FLAGS.workdir)
    version = router_version(FLAGS.workdir)
    app = create_app(router, endpoints, settings, version=version, prices=prices)
  except (router_lib.RouterError, DataError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not is_loopback(FLAGS.host) and settings.auth_token is None:
    log.warning('serving on %s without --auth_token_env: anyone who reaches this port can '
                'spend your upstream keys (/admin/* is refused: 403)', FLAGS.host)
  lam = router.default_cost_weight if router.moves_with_cost_weight else None
  log.info('routing %s (version %s) over %s at cost weight %s%s', FLAGS.workdir, version,
           router.model_names, lam, ' (calibrated)' if router.calibration else '')
  if settings.explore > 0:
    log.info('exploring: routed requests sample from (1 - %g) pi + %g / K\' (seed %s)',
             settings.explore, settings.explore, settings.seed)
  if settings.decisions is not None:
    log.info('decision log: %s (the routed prompts are written there)', settings.decisions)
  # uvicorn shuts down gracefully on SIGTERM (requests in flight answered, the decision log
  # drained and fsynced), then raises the signal again for the handler it found: exit 0.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  logging.getLogger('uvicorn.access').addFilter(HideTokens())
  if settings.stats_history:
    host = f'[{FLAGS.host}]' if ':' in FLAGS.host else FLAGS.host
    log.info('dashboard: http://%s:%d/dashboard%s', host, FLAGS.port,
             f'?token=${FLAGS.auth_token_env} (once)' if settings.auth_token else '')
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
  flags.DEFINE_float('explore', Settings.explore, 'Exploration rate EPS in [0, 1]: routed '
                     "requests sample their model from (1 - EPS) pi + EPS / K'; 0: the argmax.")
  flags.DEFINE_integer('seed', Settings.seed, 'Seed of the exploration draws (default: fresh).')
  flags.DEFINE_string('decisions', Settings.decisions, 'Directory of the decision log: a JSON '
                      'line per routed request, prompts included (default: off).')
  flags.DEFINE_integer('tool_calls_max', Settings.tool_calls_max, 'Tool-call ids remembered, '
                       'so that a follow-up answering a call goes to the model that made it.')
  flags.DEFINE_float('tool_calls_ttl', Settings.tool_calls_ttl, 'Seconds a tool-call id is '
                     'remembered.')
  flags.DEFINE_integer('stats_history', Settings.stats_history, 'Buckets of the dashboard\'s '
                       'history (GET /v1/stats, /dashboard); 0: off.')
  flags.DEFINE_float('stats_bucket_s', Settings.stats_bucket_s, 'Seconds per bucket of the '
                     'dashboard\'s history.')
  flags.DEFINE_string('log_level', 'info', 'uvicorn log level.')
  flags.DEFINE_bool('access_log', False, 'uvicorn access log (paths and statuses only).')
  absl_app.run(main)
