"""The server's speed: requests/s and routing overhead at concurrency 1, 16 and 64.

  python benchmarks/serve_speed.py [--workdir=DIR] [--requests=300] [--serve_flag=FLAG ...]
                                   [--stats_history=N]

Starts `python -m entrorouter_jax.serve` on the router (without --workdir: the
default recipe briefly trained, as in routing_speed.py) with every pool model
played by one local upstream that answers at once, then at each concurrency
sends requests from that many concurrent clients and prints one JSON line:
  route_ms_p50/p99       POST /v1/route: the routing decision through HTTP,
                         micro-batching included (the overhead a request pays)
  chat_ms_p50/p99, chat_requests_per_s
                         POST /v1/chat/completions with "model": "router",
                         forwarded to the upstream
  direct_ms_p50          the same chat request sent to the upstream itself
  overhead_ms_p50        chat_ms_p50 - direct_ms_p50
  mean_batch             requests per router forward (from /metrics)
Clients, upstream and server share this machine's cores.

  python benchmarks/serve_speed.py --overhead [--workdir=DIR] [--package_root=CHECKOUT]

times the server's own work per chat request instead, in one process: the app
(`serve.create_app`) behind httpx's ASGI transport, the router's forward
replaced by a fixed distribution and every upstream by httpx.MockTransport, so
what is left is parsing, routing bookkeeping, middleware and forwarding; 64
concurrent clients, one JSON line per round (`us_per_request`: wall time;
`cpu_us_per_request`: this process's CPU time, which other jobs on the machine disturb
less). With
--package_root the package is imported from another checkout (a commit to
compare against).

--stats_history=N runs either with the server's dashboard history at N buckets (0: off;
default: the server's default, on), to time what recording it costs a request;
--overhead --compare_stats runs the app with the history on and off in the same process,
their rounds alternated (the fairest comparison on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCURRENCY = (1, 16, 64)


async def _load(client, url: str, bodies: list, concurrency: int) -> tuple[list, float]:
  """Latencies (s) of every request and the wall time, `concurrency` at a time."""
  latencies, it = [], iter(bodies)

  async def worker():
    for body in it:
      t0 = time.perf_counter()
      r = await client.post(url, json=body)
      r.raise_for_status()
      latencies.append(time.perf_counter() - t0)

  t0 = time.perf_counter()
  await asyncio.gather(*[worker() for _ in range(concurrency)])
  return latencies, time.perf_counter() - t0


def _batches(text: str) -> tuple[float, float]:
  count = float(re.search(r'^entrorouter_batch_size_count (\S+)$', text, re.M).group(1))
  total = float(re.search(r'^entrorouter_batch_size_sum (\S+)$', text, re.M).group(1))
  return count, total


def serve_figures(workdir: str | None = None, requests: int = 300,
                  serve_flags: tuple = ()) -> list[dict]:
  import httpx
  from benchmarks import fake_upstream, routing_speed
  from entrorouter_jax import router as router_lib
  tmp = tempfile.TemporaryDirectory()
  if workdir is None:
    workdir = routing_speed.train_short_router(os.path.join(tmp.name, 'router'))
  router = router_lib.load_router(workdir)
  names = router.model_names
  queries = routing_speed._queries(router, requests)
  del router
  upstream = fake_upstream.Upstreams(record=False)
  up_url = upstream.url('up')
  pool = os.path.join(tmp.name, 'pool.json')
  with open(pool, 'w') as f:
    json.dump({n: {'price_in': 1, 'price_out': 1, 'base_url': up_url} for n in names}, f)
  port = fake_upstream.free_port()
  log = open(os.path.join(tmp.name, 'serve.log'), 'w')
  proc = subprocess.Popen([sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}',
                           f'--pool={pool}', f'--port={port}', '--max_batch=64',
                           *[f.replace('{tmp}', tmp.name) for f in serve_flags]],
                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  base = f'http://127.0.0.1:{port}'
  if not fake_upstream.wait_until_healthy(base, proc, 600):
    raise RuntimeError(f'the server did not start; see {log.name}')
  ms = lambda v, p: round(1000 * float(np.percentile(v, p)), 3)
  out = []

  async def measure(c: int) -> dict:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
      route_bodies = [{'query': q} for q in queries]
      chat_bodies = [{'model': 'router', 'messages': [{'role': 'user', 'content': q}]}
                     for q in queries]
      direct_bodies = [{'model': 'up', 'messages': [{'role': 'user', 'content': q}]}
                       for q in queries]
      await _load(client, f'{base}/v1/route', route_bodies[:max(c, 8)], c)   # warm
      before = _batches((await client.get(f'{base}/metrics')).text)
      route_lat, _ = await _load(client, f'{base}/v1/route', route_bodies, c)
      after = _batches((await client.get(f'{base}/metrics')).text)
      chat_lat, chat_wall = await _load(client, f'{base}/v1/chat/completions', chat_bodies, c)
      direct_lat, _ = await _load(client, f'{up_url}/chat/completions', direct_bodies, c)
    forwards = after[0] - before[0]
    return {'figure': 'serve', 'concurrency': c, 'requests': len(queries),
            'route_ms_p50': ms(route_lat, 50), 'route_ms_p99': ms(route_lat, 99),
            'chat_ms_p50': ms(chat_lat, 50), 'chat_ms_p99': ms(chat_lat, 99),
            'chat_requests_per_s': round(len(queries) / chat_wall, 1),
            'direct_ms_p50': ms(direct_lat, 50),
            'overhead_ms_p50': round(ms(chat_lat, 50) - ms(direct_lat, 50), 3),
            'mean_batch': round((after[1] - before[1]) / max(forwards, 1), 2),
            'space': json.loads(open(os.path.join(workdir, 'config.json')).read())[
                'anchor']['space']}

  try:
    for c in CONCURRENCY:
      out.append(asyncio.run(measure(c)))
  finally:
    proc.terminate()
    proc.wait(30)
    upstream.close()
    log.close()
    tmp.cleanup()
  return out


def overhead_figures(workdir: str, requests: int = 2000, concurrency: int = 64,
                     rounds: int = 4, settings: Optional[dict] = None,
                     variants: Optional[list] = None) -> list[dict]:
  """The server's own microseconds per chat request (see the module docstring);
  `settings`: more Settings fields for the app (e.g. {'stats_history': 0}). With
  `variants` (a list of such dicts) one app per variant, each round run on each in turn."""
  import inspect
  import httpx
  from entrorouter_jax import router as router_lib, serve
  try:
    from entrorouter_jax.data.pool import Endpoint
  except ImportError:   # checkouts before data/pool.py
    from entrorouter_jax.data.readers import Endpoint
  router = router_lib.load_router(workdir)
  k = len(router.model_names)
  fixed = np.full(k, 1.0 / k, np.float32)
  fixed[0] += 0.01
  fixed /= fixed.sum()
  router.probs = lambda texts, *args, **kwargs: np.tile(fixed, (len(texts), 1))
  reply = json.dumps({'id': 'b', 'object': 'chat.completion', 'created': 0, 'model': 'up',
                      'choices': [{'index': 0, 'finish_reason': 'stop',
                                   'message': {'role': 'assistant', 'content': 'ok'}}],
                      'usage': {'prompt_tokens': 12, 'completion_tokens': 3,
                                'total_tokens': 15}}).encode()
  real_client = httpx.AsyncClient

  class MockedUpstreams(real_client):   # the server's upstream client, answering at once
    def __init__(self, *args, **kwargs):
      kwargs['transport'] = httpx.MockTransport(lambda request: httpx.Response(
          200, content=reply, headers={'content-type': 'application/json'}))
      super().__init__(*args, **kwargs)

  endpoints = {n: Endpoint(n, 'http://upstream.invalid/v1') for n in router.model_names}
  priced = {}   # the pool's prices, where this checkout's create_app takes them
  if 'prices' in inspect.signature(serve.create_app).parameters:
    priced['prices'] = {n: types.SimpleNamespace(price_in=1.0 + i, price_out=2.0 + i)
                        for i, n in enumerate(router.model_names)}
  body = {'model': 'router', 'messages': [{'role': 'system', 'content': 'Be brief.'},
                                          {'role': 'user', 'content': 'What is 17 times 23?'}]}
  out = []

  async def measure():
    httpx.AsyncClient = MockedUpstreams
    try:
      async with contextlib.AsyncExitStack() as stack:
        clients = []
        for extra in variants or [settings or {}]:
          app = serve.create_app(router, endpoints, serve.Settings(
              max_wait_ms=0.0, max_batch=64, **extra), warm_up=False, **priced)
          await stack.enter_async_context(app.router.lifespan_context(app))
          client = await stack.enter_async_context(real_client(
              transport=httpx.ASGITransport(app=app), base_url='http://server'))
          clients.append((extra, client))
        for i in range(rounds):
          for extra, client in clients:
            cpu = time.process_time()
            latencies, wall = await _load(client, '/v1/chat/completions', [body] * requests,
                                          concurrency)
            cpu = time.process_time() - cpu
            out.append({'figure': 'serve_overhead', 'round': i, 'requests': requests,
                        'concurrency': concurrency,
                        'us_per_request': round(1e6 * wall / requests, 1),
                        'cpu_us_per_request': round(1e6 * cpu / requests, 1),
                        'requests_per_s': round(requests / wall, 1),
                        'settings': extra,
                        'package': os.path.dirname(os.path.dirname(serve.__file__))})
    finally:
      httpx.AsyncClient = real_client

  asyncio.run(measure())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='a trained router (default: train one)')
  parser.add_argument('--requests', type=int, default=300, help='requests per concurrency')
  parser.add_argument('--serve_flag', action='append', default=[],
                      help='a flag for the server, repeatable ({tmp}: a temporary folder), e.g. '
                      '--serve_flag=--explore=0.05 --serve_flag=--decisions={tmp}/decisions')
  parser.add_argument('--overhead', action='store_true',
                      help='time the server\'s own work per request, in one process')
  parser.add_argument('--package_root', default=None,
                      help='import entrorouter_jax from this checkout (with --overhead)')
  parser.add_argument('--stats_history', type=int, default=None,
                      help='the dashboard history\'s buckets (0: off; default: the server\'s)')
  parser.add_argument('--compare_stats', action='store_true',
                      help='with --overhead: the history on and off, rounds alternated')
  parser.add_argument('--rounds', type=int, default=4, help='rounds (with --overhead)')
  args = parser.parse_args()
  settings = {} if args.stats_history is None else {'stats_history': args.stats_history}
  if args.stats_history is not None:
    args.serve_flag.append(f'--stats_history={args.stats_history}')
  if args.overhead:
    if args.package_root:
      sys.path.insert(0, os.path.abspath(args.package_root))
    workdir = args.workdir
    if workdir is None:
      from benchmarks import routing_speed
      workdir = routing_speed.train_short_router(tempfile.mkdtemp(prefix='serve_overhead_'))
    variants = [{}, {'stats_history': 0}] if args.compare_stats else None
    for fig in overhead_figures(workdir, max(args.requests, 2000), rounds=args.rounds,
                                settings=settings, variants=variants):
      print(json.dumps(fig), flush=True)
    return
  for fig in serve_figures(args.workdir, args.requests, tuple(args.serve_flag)):
    print(json.dumps({**fig, 'serve_flags': args.serve_flag}), flush=True)


if __name__ == '__main__':
  main()
