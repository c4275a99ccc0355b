"""Serving that learns, part one: exploration (--explore, --seed) and the decision log
(--decisions), on the app in process (httpx.ASGITransport inside the app's lifespan)
with the tiny router of conftest's `serve_workdir` and the local fake upstreams."""

import asyncio
import json
import os
import re
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from benchmarks.fake_upstream import Upstreams
from conftest import REPO_ROOT
from entrorouter_jax import route as route_lib, router as router_lib, serve
from entrorouter_jax.data import pool as pool_lib, readers
from entrorouter_jax.serving.decisions import DecisionLog
from serving import QUERIES, slug

CHAT, ROUTE = '/v1/chat/completions', '/v1/route'
LINE_KEYS = {'id', 'time', 'endpoint', 'text', 'model', 'answered_by', 'propensity', 'explored',
             'cost_weight', 'version', 'usage', 'cost', 'latency_ms', 'status', 'fallbacks',
             'follows'}


@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


def nowhere(router):
  """Endpoints for every model at a port nothing listens on (for /v1/route only)."""
  return {n: readers.Endpoint(n, 'http://127.0.0.1:9/v1') for n in router.model_names}


def in_process(app, calls):
  """Runs `await calls(http)` against `app` inside its lifespan; returns what it returns."""
  async def go():
    async with app.router.lifespan_context(app):
      transport = httpx.ASGITransport(app=app)
      async with httpx.AsyncClient(transport=transport, base_url='http://app') as http:
        return await calls(http)
  return asyncio.run(go())


def counter(metrics_text: str, name: str) -> float:
  return float(re.search(rf'^{name} (\S+)$', metrics_text, re.M).group(1))


# ============================================================ exploration ===
def test_explored_routes_follow_the_mixture_with_exact_propensities(router):
  eps, n, query = 0.5, 400, QUERIES[0]
  app = serve.create_app(router, nowhere(router),
                         serve.Settings(max_wait_ms=0, explore=eps, seed=1234), warm_up=False)

  async def calls(http):
    replies = []
    for start in range(0, n, 50):   # 50 at a time: they share forwards, the draws stay exact
      replies += await asyncio.gather(*[http.post(ROUTE, json={'query': query})
                                        for _ in range(start, start + 50)])
    quiet = await http.post(ROUTE, json={'query': query, 'explore': False})
    bad = await http.post(ROUTE, json={'query': query, 'explore': 'yes'})
    bad_chat = await http.post(CHAT, json={'model': 'router', 'explore': 1, 'messages': [
        {'role': 'user', 'content': query}]})
    return replies, quiet, bad, bad_chat, (await http.get('/metrics')).text

  replies, quiet, bad, bad_chat, metrics = in_process(app, calls)
  assert [r.status_code for r in replies] == [200] * n
  names = router.model_names
  pi = router.probs([query])[0].astype(np.float64)
  want = (1 - eps) * pi / pi.sum() + eps / len(names)
  chosen = [names.index(r.json()['model']) for r in replies]
  for r, j in zip(replies, chosen):
    got = r.json()
    assert got['explored'] is True
    assert got['propensity'] == pytest.approx(want[j], rel=1e-5, abs=1e-7)
    assert got['ranking'][0] == got['model'] and sorted(got['ranking']) == sorted(names)
    rest = got['ranking'][1:]   # the fallbacks: the others by probability
    assert [got['probs'][m] for m in rest] == sorted((got['probs'][m] for m in rest),
                                                     reverse=True)
  freq = np.bincount(chosen, minlength=len(names)) / n
  se = np.sqrt(want * (1 - want) / n)
  assert np.all(np.abs(freq - want) <= 4 * se), (freq, want)
  assert len(set(chosen)) > 1
  assert counter(metrics, 'entrorouter_explored_total') == n

  expected = route_lib.route_records(router, [query])[0]['model']
  assert quiet.status_code == 200
  assert quiet.json()['model'] == expected == names[int(np.argmax(pi))]
  assert quiet.json()['propensity'] == 1.0 and quiet.json()['explored'] is False
  for r in (bad, bad_chat):
    assert r.status_code == 400, r.text
    assert r.json()['error']['param'] == 'explore' and 'explore' in r.json()['error']['message']


def test_the_same_seed_gives_the_same_choices(router):
  def choices():
    app = serve.create_app(router, nowhere(router),
                           serve.Settings(max_wait_ms=0, explore=0.8, seed=99), warm_up=False)

    async def calls(http):
      return [(await http.post(ROUTE, json={'query': QUERIES[1]})).json()['model']
              for _ in range(30)]
    return in_process(app, calls)

  first = choices()
  assert first == choices() and len(set(first)) > 1


def test_without_explore_the_decisions_are_as_before(router):
  app = serve.create_app(router, nowhere(router), serve.Settings(max_wait_ms=0), warm_up=False)

  async def calls(http):
    plain = [await http.post(ROUTE, json={'query': q}) for q in QUERIES]
    asked = [await http.post(ROUTE, json={'query': q, 'explore': True}) for q in QUERIES]
    return plain, asked, (await http.get('/metrics')).text

  plain, asked, metrics = in_process(app, calls)
  expected = route_lib.route_records(router, QUERIES)
  for r, again, want in zip(plain, asked, expected):
    got = r.json()
    assert set(got) == {'model', 'probs', 'cost_weight', 'ranking', 'propensity', 'explored'}
    assert got['model'] == want['model'] and again.json()['model'] == want['model']
    assert got['propensity'] == 1.0 and got['explored'] is False
    assert got['probs'] == pytest.approx(want['distribution'], abs=1e-5)
  assert counter(metrics, 'entrorouter_explored_total') == 0


# =========================================================== decision log ===
def test_decision_log_keeps_every_record_once_across_rotations(tmp_path):
  written = []
  log = DecisionLog(tmp_path / 'log', max_bytes=4096, on_written=written.append)
  big = {'thread': -1, 'i': -1, 'text': 'x' * 5000}   # larger than a file: a file of its own

  def producer(t):
    for i in range(250):
      log.record({'thread': t, 'i': i, 'text': f'prompt {t}-{i} — naïve ünïcode'})
      if t == 0 and i == 100:
        log.record(big)

  threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  log.close()
  log.close()   # a second close does nothing
  files = sorted(p for p in (tmp_path / 'log').iterdir())
  assert files == sorted(log.files) and len(files) > 10
  assert all(re.fullmatch(r'decisions-\d{8}T\d{6}-\d+\.jsonl', p.name) for p in files)
  seen = []
  for path in files:
    raw = path.read_bytes()
    assert raw.endswith(b'\n')
    lines = raw.decode('utf-8').splitlines()
    assert len(raw) <= 4096 or len(lines) == 1
    for line in lines:
      record = json.loads(line)
      seen.append((record['thread'], record['i']))
  assert 'naïve' in files[0].read_text(encoding='utf-8')   # ensure_ascii=False
  assert sorted(seen) == sorted([(t, i) for t in range(4) for i in range(250)] + [(-1, -1)])
  assert sum(written) == 1001
  with pytest.raises(RuntimeError, match='closed'):
    log.record({'late': True})
  with pytest.raises(ValueError):
    DecisionLog(tmp_path / 'other', max_bytes=0)


def test_decision_log_refuses_what_is_not_strict_json(tmp_path):
  log = DecisionLog(tmp_path)
  with pytest.raises(ValueError):
    log.record({'usage': float('nan')})
  log.close()
  assert list(tmp_path.iterdir()) == []   # nothing written: no file at all


def test_the_server_logs_routed_requests(router, tmp_path):
  upstreams = Upstreams()
  names = router.model_names
  prices = {n: (1.0 + i, 4.0 + 2 * i) for i, n in enumerate(names)}
  pool = {n: {'price_in': prices[n][0], 'price_out': prices[n][1], 'base_url': upstreams.url(
      slug(n)), 'upstream_model': f'up-{slug(n)}'} for n in names}
  (tmp_path / 'pool.json').write_text(json.dumps(pool))
  logs = tmp_path / 'decisions'
  app = serve.create_app(router, readers.read_endpoints(tmp_path / 'pool.json'),
                         serve.Settings(max_wait_ms=0, decisions=str(logs)), warm_up=False,
                         version='v-test', prices=pool_lib.prices(tmp_path / 'pool.json'))
  messages = [{'role': 'user', 'content': QUERIES[1]}]

  async def calls(http):
    chat = await http.post(CHAT, json={'model': 'router', 'messages': messages})
    routed = await http.post(ROUTE, json={'query': QUERIES[2]})
    named = await http.post(CHAT, json={'model': names[0], 'messages': messages})
    stream = await http.post(CHAT, json={'model': 'router', 'stream': True,
                                         'messages': [{'role': 'user', 'content': QUERIES[0]}]})
    upstreams.mode[slug((await http.post(ROUTE, json={
        'query': QUERIES[3], 'explore': False})).json()['model'])] = 'down'
    fell_back = await http.post(CHAT, json={'model': 'router', 'messages': [
        {'role': 'user', 'content': QUERIES[3]}]})
    healthz = (await http.get('/healthz')).json()
    return chat, routed, named, stream, fell_back, healthz

  try:
    chat, routed, named, stream, fell_back, healthz = in_process(app, calls)
  finally:
    upstreams.close()
  assert healthz['version'] == 'v-test'
  for r in (chat, routed, named, stream, fell_back):
    assert r.status_code == 200, r.text
  lines = [json.loads(line) for p in sorted(logs.iterdir())
           for line in p.read_text(encoding='utf-8').splitlines()]
  # The chat naming a pool model wrote nothing; the rest one line each, in order. (The
  # /v1/route call that found the model to take down wrote one too.)
  assert [(x['endpoint'], x['text']) for x in lines] == [
      ('chat', QUERIES[1]), ('route', QUERIES[2]), ('chat', QUERIES[0]), ('route', QUERIES[3]),
      ('chat', QUERIES[3])]
  assert all(set(x) == LINE_KEYS for x in lines)
  assert all(x['version'] == 'v-test' and x['propensity'] == 1.0 and x['explored'] is False
             and x['cost_weight'] == pytest.approx(router.default_cost_weight) for x in lines)

  line = lines[0]
  model = chat.json()['model']
  assert line['id'] == chat.json()['id'] == chat.headers['x-entrorouter-request-id']
  assert line['model'] == line['answered_by'] == model and line['status'] == 200
  assert line['usage'] == {'prompt_tokens': 3, 'completion_tokens': 3, 'total_tokens': 6}
  assert line['cost'] == pytest.approx((3 * prices[model][0] + 3 * prices[model][1]) / 1e6)
  assert line['latency_ms'] > 0 and line['fallbacks'] == []
  assert isinstance(line['time'], float) and abs(line['time'] - lines[1]['time']) < 60

  line = lines[1]
  assert line['id'] == routed.headers['x-entrorouter-request-id']
  assert line['model'] == routed.json()['model'] and line['status'] == 200
  assert line['answered_by'] is None and line['usage'] is None and line['cost'] is None
  assert line['latency_ms'] is None and line['fallbacks'] == []

  line = lines[2]   # the stream: logged at its end, its chunks keep the upstream's id
  assert line['id'] == stream.headers['x-entrorouter-request-id']
  assert line['answered_by'] == line['model'] == stream.headers['x-entrorouter-model']
  assert line['usage'] is None and line['cost'] is None and line['latency_ms'] > 0
  assert '"id": "c1"' in stream.text

  line = lines[4]   # the first choice down: answered by the next of the ranking
  down = lines[3]['model']
  assert line['model'] == down and line['fallbacks'] == [down]
  assert line['answered_by'] == fell_back.json()['model'] != down
  assert line['id'] == fell_back.json()['id']
  answered = line['answered_by']
  assert line['cost'] == pytest.approx((3 * prices[answered][0] + 3 * prices[answered][1]) / 1e6)

  assert named.json()['id'] == 'c1'   # a pool model by name: the upstream's reply as it was
  assert counter(app.state.serving.metrics.text().decode(),
                 'entrorouter_decisions_written_total') == 5


def test_explored_chat_is_logged_with_its_propensity(router, tmp_path):
  upstreams = Upstreams()
  endpoints = {n: readers.Endpoint(n, upstreams.url(slug(n))) for n in router.model_names}
  app = serve.create_app(router, endpoints, serve.Settings(max_wait_ms=0, explore=1.0, seed=3,
                                                           decisions=str(tmp_path)),
                         warm_up=False)

  async def calls(http):
    return [await http.post(CHAT, json={'model': 'router', 'explore': True, 'messages': [
        {'role': 'user', 'content': q}]}) for q in QUERIES]

  try:
    replies = in_process(app, calls)
  finally:
    upstreams.close()
  lines = [json.loads(line) for p in tmp_path.iterdir() for line in p.read_text().splitlines()]
  assert [x['id'] for x in lines] == [r.json()['id'] for r in replies]
  for x, r in zip(lines, replies):
    # explore=1: uniform over the served models whatever pi says
    assert x['explored'] is True and x['propensity'] == pytest.approx(1 / len(endpoints))
    assert x['model'] == x['answered_by'] == r.json()['model']
    assert x['version'] == 'unknown' and x['cost'] is None   # no prices given
  assert len(upstreams.seen) == len(QUERIES)
  assert not any('explore' in body for _, body, _ in upstreams.seen)   # the router's field


# ================================================================ settings ===
def test_serve_cli_refuses_a_bad_explore(serve_workdir, tmp_path):
  pool = tmp_path / 'pool.yaml'
  pool.write_text('a: {price_in: 1, price_out: 1}\n')
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.serve',
                        f'--workdir={serve_workdir}', f'--pool={pool}', '--explore=1.5'],
                       cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and '--explore is 1.5' in out.stderr, out.stderr


@pytest.mark.parametrize('settings, message', [
    ({'explore': -0.1}, '--explore is -0.1'),
    ({'explore': float('nan')}, '--explore is nan'),
    ({'explore': True}, '--explore is True'),
    ({'seed': -1}, '--seed is -1'),
    ({'seed': 1.5}, '--seed is 1.5'),
    ({'decisions': ''}, '--decisions'),
])
def test_settings_check_names_the_flag(settings, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    serve.Settings(**settings).check()


def test_decisions_must_be_a_directory(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='--decisions=.*file.*expected a directory'):
    serve.Settings(decisions=str(tmp_path / 'file')).check()


def test_router_version_names_the_workdir_state(serve_workdir, tmp_path):
  import shutil
  work = tmp_path / 'run'
  shutil.copytree(serve_workdir, work)
  version = serve.router_version(work)
  assert re.fullmatch(r'[0-9a-f]{12}', version) and version == serve.router_version(work)
  checkpoint = next(p for p in (work / 'checkpoints').rglob('*') if p.is_file())
  stat = checkpoint.stat()
  os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
  assert serve.router_version(work) != version
