"""The OpenAI-compatible server, the official openai client against it, local upstreams.

One tiny router (the default recipe's head on TF-IDF features, a few steps) is
served by `python -m entrorouter_jax.serve` in a subprocess; every pool model's
base_url points at one small local HTTP server that plays the upstreams and
records what they receive (tests/serving.py, conftest's `served`).
"""

import asyncio
import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import REPO_ROOT
from entrorouter_jax import calibrate, route as route_lib, router as router_lib
from entrorouter_jax.batching import MicroBatcher
from entrorouter_jax.layers import width_buckets
from entrorouter_jax.data import readers

from serving import QUERIES, TOKEN, UPSTREAM_KEY, auth, client, route_of, slug

openai = pytest.importorskip('openai')


@pytest.fixture(scope='module')
def workdir(serve_workdir):
  return serve_workdir


def test_route_endpoint_matches_the_router(served, workdir):
  base, _, names, _ = served
  router = router_lib.load_router(workdir)
  expected = route_lib.route_records(router, QUERIES)
  for query, want in zip(QUERIES, expected):
    got = route_of(base, query)
    assert got['model'] == want['model']
    assert set(got['probs']) == set(names)
    assert got['probs'] == pytest.approx(want['distribution'], abs=1e-5)
    assert got['cost_weight'] == pytest.approx(router.default_cost_weight)
    assert got['ranking'][0] == got['model'] and sorted(got['ranking']) == sorted(names)


def test_cost_weight_moves_the_route(served):
  base = served[0]
  cheap = [route_of(base, q, cost_weight=50.0)['model'] for q in QUERIES]
  dear = [route_of(base, q, cost_weight=0.0)['model'] for q in QUERIES]
  assert route_of(base, QUERIES[0], cost_weight=50.0)['cost_weight'] == 50.0
  assert cheap != dear


def test_chat_completion_routed_through_the_openai_client(served):
  base, upstreams, names, _ = served
  chosen = route_of(base, QUERIES[1])['model']
  raw = client(base).chat.completions.with_raw_response.create(
      model='router', messages=[{'role': 'system', 'content': 'Be brief.'},
                                {'role': 'user', 'content': QUERIES[1]}])
  reply = raw.parse()
  assert raw.headers['x-entrorouter-model'] == chosen
  assert reply.model == chosen
  assert reply.choices[0].message.content == f'answer from up-{slug(chosen)}'
  slug_seen, body, authorization = upstreams.seen[-1]
  assert slug_seen == slug(chosen) and body['model'] == f'up-{slug(chosen)}'
  assert authorization == f'Bearer {UPSTREAM_KEY}'
  assert 'cost_weight' not in body and body['messages'][1]['content'] == QUERIES[1]


def test_a_pool_model_name_bypasses_routing(served):
  base, upstreams, names, _ = served
  reply = client(base).chat.completions.create(
      model=names[0], messages=[{'role': 'user', 'content': QUERIES[0]}])
  assert reply.model == names[0]
  assert reply.choices[0].message.content == f'answer from up-{slug(names[0])}'


def test_streaming(served):
  base, _, _, _ = served
  chosen = route_of(base, QUERIES[2])['model']
  chunks = list(client(base).chat.completions.create(
      model='router', stream=True, messages=[{'role': 'user', 'content': QUERIES[2]}]))
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == \
      f'answer from up-{slug(chosen)}'
  assert {c.model for c in chunks} == {chosen}


def test_hundreds_of_concurrent_requests_are_batched(served):
  base, upstreams, _, _ = served
  queries = [f'{QUERIES[i % 4]} (variant {i})' for i in range(200)]
  want = [route_of(base, q)['model'] for q in queries[:8]]

  def batches():
    text = httpx.get(f'{base}/metrics', headers=auth()).text
    return float(re.search(r'^entrorouter_batch_size_count (\S+)$', text, re.M).group(1))

  before = batches()

  async def go():
    aclient = openai.AsyncOpenAI(base_url=f'{base}/v1', api_key=TOKEN, max_retries=0,
                                 timeout=120)
    return await asyncio.gather(*[aclient.chat.completions.create(
        model='router', messages=[{'role': 'user', 'content': q}]) for q in queries])

  replies = asyncio.run(go())
  assert len(replies) == 200
  for reply in replies:
    assert reply.choices[0].message.content == f'answer from up-{slug(reply.model)}'
    assert reply.model_extra['entrorouter']['fallbacks'] == []
  assert [r.model for r in replies[:8]] == want
  used = batches() - before
  assert 1 <= used < 200 * 0.8, f'{used} forwards for 200 requests: no micro-batching'


def test_upstream_down_falls_back_to_the_next_model(served):
  base, upstreams, _, _ = served
  decision = route_of(base, QUERIES[3])
  first, second = decision['ranking'][:2]
  upstreams.mode[slug(first)] = 'down'
  try:
    raw = client(base).chat.completions.with_raw_response.create(
        model='router', messages=[{'role': 'user', 'content': QUERIES[3]}])
  finally:
    upstreams.mode.pop(slug(first))
  reply = raw.parse()
  assert reply.model == second
  assert raw.headers['x-entrorouter-fallbacks'] == first
  assert reply.model_extra['entrorouter']['fallbacks'] == [{'model': first, 'error': 'http_503'}]
  metrics = httpx.get(f'{base}/metrics', headers=auth()).text
  assert re.search(rf'entrorouter_upstream_errors_total{{.*model="{re.escape(first)}".*}} [1-9]',
                   metrics)


def test_upstream_timeout_falls_back_and_all_down_is_502(served):
  base, upstreams, names, _ = served
  first = route_of(base, QUERIES[0])['ranking'][0]
  upstreams.mode[slug(first)] = 'slow'
  try:
    reply = client(base).chat.completions.create(
        model='router', messages=[{'role': 'user', 'content': QUERIES[0]}])
    assert reply.model != first
    assert reply.model_extra['entrorouter']['fallbacks'] == [{'model': first, 'error': 'timeout'}]
  finally:
    upstreams.mode.pop(slug(first))
  for n in names:
    upstreams.mode[slug(n)] = 'down'
  try:
    r = httpx.post(f'{base}/v1/chat/completions', headers=auth(), json={
        'model': 'router', 'messages': [{'role': 'user', 'content': QUERIES[0]}]})
  finally:
    upstreams.mode.clear()
  assert r.status_code == 502
  assert r.json()['error']['code'] == 'upstream_unavailable'
  assert len(r.json()['entrorouter']['fallbacks']) == 3          # --max_attempts default


def test_upstream_rejecting_the_request_is_passed_back(served):
  base, upstreams, names, _ = served
  upstreams.mode[slug(names[0])] = 'reject'
  try:
    r = httpx.post(f'{base}/v1/chat/completions', headers=auth(), json={
        'model': names[0], 'messages': [{'role': 'user', 'content': 'hi'}]})
  finally:
    upstreams.mode.clear()
  assert r.status_code == 400 and r.json()['error']['type'] == 'reject'


@pytest.mark.parametrize('body, status, param', [
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, 400, 'model'),
    ({'model': 'router'}, 400, 'messages'),
    ({'model': 'router', 'messages': []}, 400, 'messages'),
    ({'model': 'router', 'messages': [{'content': 'hi'}]}, 400, 'messages[0].role'),
    ({'model': 'router', 'messages': [{'role': 'user', 'content': 7}]}, 400,
     'messages[0].content'),
    ({'model': 'gpt-17', 'messages': [{'role': 'user', 'content': 'hi'}]}, 404, 'model'),
    ({'model': 'router', 'stream': 'yes', 'messages': [{'role': 'user', 'content': 'hi'}]},
     400, 'stream'),
    ({'model': 'router', 'cost_weight': -1, 'messages': [{'role': 'user', 'content': 'hi'}]},
     400, 'cost_weight'),
])
def test_bad_chat_requests_get_4xx_naming_the_field(served, body, status, param):
  r = httpx.post(f'{served[0]}/v1/chat/completions', json=body, headers=auth())
  assert r.status_code == status, r.text
  assert r.json()['error']['param'] == param
  assert r.json()['error']['message']


def test_bad_route_requests_and_body_limits(served):
  base = served[0]
  r = httpx.post(f'{base}/v1/route', json={'text': 'hi'}, headers=auth())
  assert r.status_code == 400 and r.json()['error']['param'] == 'query'
  r = httpx.post(f'{base}/v1/route', content=b'{not json', headers=auth())
  assert r.status_code == 400 and 'not valid JSON' in r.json()['error']['message']
  r = httpx.post(f'{base}/v1/route', json={'query': 'x' * 70_000}, headers=auth())
  assert r.status_code == 413 and r.json()['error']['code'] == 'request_too_large'


def test_auth_is_required_and_keys_are_never_echoed(served):
  base, _, _, log_path = served
  assert httpx.get(f'{base}/healthz').status_code == 200
  for method, path in (('POST', '/v1/route'), ('POST', '/v1/chat/completions'),
                       ('GET', '/metrics')):
    r = httpx.request(method, f'{base}{path}', json={'query': 'hi'})
    assert r.status_code == 401 and r.json()['error']['type'] == 'authentication_error'
    r = httpx.request(method, f'{base}{path}', json={'query': 'hi'},
                      headers={'authorization': 'Bearer wrong'})
    assert r.status_code == 401
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f'{base}/v1', api_key='wrong', max_retries=0).chat.completions.create(
        model='router', messages=[{'role': 'user', 'content': 'hi'}])
  r = httpx.post(f'{base}/v1/chat/completions', headers=auth(), json={
      'model': 'router', 'messages': [{'role': 'user', 'content': QUERIES[0]}]})
  assert UPSTREAM_KEY not in r.text and UPSTREAM_KEY not in str(r.headers)
  assert UPSTREAM_KEY not in log_path.read_text() and TOKEN not in log_path.read_text()


def test_metrics_text(served):
  route_of(served[0], QUERIES[0])   # at least one routed request, whatever ran before
  text = httpx.get(f'{served[0]}/metrics', headers=auth()).text
  for name in ('entrorouter_requests_total', 'entrorouter_routes_total',
               'entrorouter_upstream_errors_total', 'entrorouter_request_latency_seconds_bucket',
               'entrorouter_routing_latency_seconds_bucket', 'entrorouter_batch_size_bucket',
               'entrorouter_upstream_latency_seconds_bucket'):
    assert name in text
  assert re.search(r'entrorouter_requests_total{endpoint="/v1/route",status="200"} [1-9]', text)


def test_serve_cli_errors(workdir, tmp_path):
  pool = tmp_path / 'pool.yaml'
  pool.write_text('a: {price_in: 1, price_out: 1}\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}',
                        f'--pool={pool}'], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and 'no base_url for any model' in out.stderr
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}',
                        f'--pool={pool}', '--auth_token_env=ER_UNSET_TOKEN'], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'ER_UNSET_TOKEN' in out.stderr


@pytest.mark.parametrize('entry, message', [
    ({'price_in': 1, 'price_out': 1, 'base_url': 'localhost:8000/v1'}, 'field base_url'),
    ({'price_in': 1, 'price_out': 1, 'base_url': 'http://x/v1', 'api_key_env': 'A-B'},
     'field api_key_env'),
    ({'price_in': 1, 'price_out': 1, 'upstream_model': ''}, 'field upstream_model'),
])
def test_pool_serving_keys_are_checked(tmp_path, entry, message):
  path = tmp_path / 'pool.json'
  path.write_text(json.dumps({'m': entry}))
  with pytest.raises(readers.DataError, match=message):
    readers.read_endpoints(path)


def test_pool_serving_keys_read_and_ignored_by_training(tmp_path):
  path = tmp_path / 'pool.yaml'
  path.write_text('m: {price_in: 1, price_out: 2, base_url: "http://h:1/v1/", '
                  'upstream_model: up, api_key_env: KEY}\n')
  assert readers.read_endpoints(path)['m'] == readers.Endpoint('m', 'http://h:1/v1', 'up', 'KEY')
  assert readers.read_pool(path) == [readers.ModelInfo('m', 1.0, 2.0)]


# ================================================================ batcher ===
def test_micro_batcher_batches_and_reports_errors():
  calls = []

  def fn(items):
    calls.append(list(items))
    if 'boom' in items:
      raise ValueError('boom')
    return [x * 2 for x in items]

  async def go():
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
    await batcher.start()
    results = await asyncio.gather(*[batcher.submit(i) for i in range(20)])
    with pytest.raises(ValueError, match='boom'):
      await batcher.submit('boom')
    await batcher.stop()
    return results

  assert asyncio.run(go()) == [2 * i for i in range(20)]
  sizes = [len(c) for c in calls[:-1]]
  assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) <= 4
  with pytest.raises(ValueError, match='max_batch'):
    MicroBatcher(fn, max_batch=0)


# ============================================================== calibrate ===
def test_calibrate_hits_the_target_and_route_uses_it(workdir, tmp_path):
  work = tmp_path / 'run'
  import shutil
  shutil.copytree(workdir, work)
  queries = tmp_path / 'traffic.jsonl'
  data = [f'{QUERIES[i % 4]} #{i}' for i in range(60)]
  queries.write_text(''.join(json.dumps({'query': q}) + '\n' for q in data))
  router = router_lib.load_router(work)
  success, c_bar = calibrate.estimates(router, work, data)
  points = calibrate.sweep(router, data, success, c_bar)
  costs = sorted(p['cost_per_query'] for p in points)
  target = float(np.median(costs))

  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.calibrate', f'--workdir={work}',
                        f'--queries={queries}', f'--target_cost={target}'], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  stored = json.loads((work / 'calibration.json').read_text())
  assert json.loads(out.stdout) == stored
  assert stored['expected']['cost_per_query'] <= target
  best = max(p['accuracy'] for p in points if p['cost_per_query'] <= target)
  assert stored['expected']['accuracy'] == pytest.approx(best)
  lam = stored['cost_weight']
  # The stored expectation is the router's own routing at that lambda on the sample.
  choice = np.argmax(success - lam * c_bar, axis=1)
  assert stored['expected']['cost_per_query'] == pytest.approx(
      float(c_bar[np.arange(60), choice].mean() * router.c_ref))

  calibrated = router_lib.load_router(work)
  assert calibrated.default_cost_weight == pytest.approx(lam)
  records = route_lib.route_records(calibrated, data)
  assert [r['model'] for r in records] == [calibrated.model_names[j] for j in choice]

  share = calibrate.calibrate(work, data, strong_share=0.0, store=False)
  assert share['expected']['strong_share'] == 0.0
  with pytest.raises(router_lib.RouterError, match='below what this router can reach'):
    calibrate.calibrate(work, data, target_cost=costs[0] / 10, store=False)
  with pytest.raises(router_lib.RouterError, match='exactly one'):
    calibrate.calibrate(work, data, target_cost=1.0, strong_share=0.5, store=False)
  (work / 'calibration.json').write_text('{"cost_weight": -2}')
  with pytest.raises(router_lib.RouterError, match='cost_weight is -2'):
    router_lib.load_router(work)


def test_router_warm_up_covers_every_batch_and_width_bucket(workdir, monkeypatch):
  router = router_lib.load_router(workdir)
  shapes = []
  real = router.probs
  monkeypatch.setattr(router, 'probs', lambda q, *a, **kw: shapes.append(
      (len(q), len(q[0].split()))) or real(q, *a, **kw))
  calls = router.warm_up(6)
  assert calls == len(shapes)
  sizes = sorted({n for n, _ in shapes})
  assert sizes == [1, 2, 4, 8]          # a batch of 5 or 6 is padded to 8 rows
  lengths = sorted({w for _, w in shapes})
  # One text per width bucket up to the longest the router reads, and one longer.
  max_tokens = max(router.config.anchor.encoder_max_len, router.config.data.max_len)
  assert lengths[-1] > max_tokens and len(lengths) == len(width_buckets(max_tokens)) + 1


def test_all_upstreams_down_reply_names_the_model_tried_last(served):
  base, upstreams, names, _ = served
  for n in names:
    upstreams.mode[slug(n)] = 'down'
  try:
    r = httpx.post(f'{base}/v1/chat/completions', headers=auth(), json={
        'model': names[1], 'messages': [{'role': 'user', 'content': 'hi'}]})
  finally:
    upstreams.mode.clear()
  assert r.status_code == 502 and 'headers' not in r.json()
  assert r.headers['x-entrorouter-model'] == names[1]
  assert r.json()['entrorouter'] == {'model': names[1], 'routed': False, 'cost_weight': None,
                                     'fallbacks': [{'model': names[1], 'error': 'http_503'}]}


def test_a_pool_serving_some_models_routes_among_those(workdir):
  from entrorouter_jax import serve
  router = router_lib.load_router(workdir)
  probs = router.probs(QUERIES)
  favourite = router.model_names[int(np.bincount(probs.argmax(1)).argmax())]
  served = [n for n in router.model_names if n != favourite][:3]
  endpoints = {n: readers.Endpoint(n, 'http://127.0.0.1:9/v1') for n in served}
  app = serve.create_app(router, endpoints, serve.Settings(max_wait_ms=0), warm_up=False)
  with TestClient(app) as http:
    assert http.get('/healthz').json()['models'] == served
    for query, p in zip(QUERIES, probs):
      got = http.post('/v1/route', json={'query': query}).json()
      want = max(served, key=lambda n: p[router.model_names.index(n)])
      assert got['model'] == want and sorted(got['ranking']) == sorted(served)
    r = http.post('/v1/chat/completions', json={
        'model': favourite, 'messages': [{'role': 'user', 'content': 'hi'}]})
    assert r.status_code == 404 and r.json()['error']['param'] == 'model'
