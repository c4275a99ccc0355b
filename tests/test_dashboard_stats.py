"""The dashboard's numbers: `Stats` (serving/stats.py: bounded history, buckets that roll,
percentiles against NumPy) on a fake clock, and, on the app in process with the tiny
router of conftest's `serve_workdir`, GET /v1/stats (what it counts, against /metrics and
the decision log; its auth) and GET /dashboard (the token's cookie and redirect, the
page's own files, --stats_history=0). tests/test_dashboard.py opens the page in a browser."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from benchmarks.fake_upstream import Upstreams
from entrorouter_jax import router as router_lib, serve
from entrorouter_jax.data import pool as pool_lib, readers
from entrorouter_jax.serving import dashboard as dashboard_lib, version as version_lib
from entrorouter_jax.serving.requests import DASHBOARD_COOKIE, dashboard_cookie
from entrorouter_jax.serving.stats import MAX_RELOADS, Histogram, Stats
from serving import QUERIES, TOKEN, slug
from test_serve_learning import CHAT, ROUTE, in_process

AUTH = {'authorization': f'Bearer {TOKEN}'}
STATS = '/v1/stats'


class Clock:
  """A settable clock for Stats."""

  def __init__(self, t=1_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


# ================================================================= Stats ===
def test_histogram_percentiles_match_numpy_within_a_bin():
  rng = np.random.default_rng(0)
  for values in (rng.lognormal(np.log(20), 1.0, 5000), rng.uniform(0.2, 3.0, 301),
                 np.array([7.5]), np.array([0.0, 0.0005, 12.0, 900.0]),
                 rng.exponential(400, 2000)):
    h = Histogram()
    for v in values:
      h.add(float(v))
    qs = (0, 5, 50, 95, 99, 100)
    got = h.percentiles(qs)
    want = np.percentile(values, qs)
    # a value is read as its bin's middle: 1% off at most (values under 1 us read as 1 us)
    np.testing.assert_allclose(got, want, rtol=0.0101, atol=Histogram.LOW)
    assert h.count == len(values)


def test_histogram_ignores_what_is_not_a_time_and_stays_bounded():
  h = Histogram()
  for bad in (float('nan'), -1.0, float('inf')):
    h.add(bad)
  assert h.count == 0 and h.percentiles() == [None, None]
  for v in np.geomspace(1e-6, 1e9, 50_000):   # from below 1 us to past an hour
    h.add(float(v))
  assert len(h.bins) <= Histogram.BINS and max(h.bins) == Histogram.BINS - 1
  assert h.count == 50_000


def test_buckets_roll_and_the_history_is_bounded():
  clock = Clock(600.0)   # bucket 10 of 60 s
  stats = Stats(history=5, bucket_s=60, clock=clock)
  for k in range(40):   # 40 buckets, one decision each, bucket 12 skipped
    clock.t = 600.0 + 60 * k + 30
    if k != 2:
      stats.decision('a' if k % 2 else 'b', explored=k % 3 == 0, routing_ms=float(k + 1),
                     switched=k % 6 == 0)
  assert len(stats.closed) <= 4   # the current bucket and 4 closed ones: 5
  series = stats.series()
  assert series['t'] == [600.0 + 60 * k for k in range(35, 40)]
  assert series['decisions'] == [1] * 5
  assert series['routes'] == {'a': [1, 0, 1, 0, 1], 'b': [0, 1, 0, 1, 0]}
  assert series['latency_ms']['routing']['p50'] == pytest.approx([36, 37, 38, 39, 40],
                                                                 rel=0.0101)
  totals = stats.totals()
  assert totals['decisions'] == 39 and totals['routes'] == {'b': 19, 'a': 20}
  assert totals['explored'] == sum(1 for k in range(40) if k != 2 and k % 3 == 0)
  assert totals['switched'] == sum(1 for k in range(40) if k % 6 == 0)
  assert totals['switched_share'] == pytest.approx(totals['switched'] / 39)
  assert totals['latency_ms']['routing']['count'] == 39

  # A quiet spell: the empty buckets are there (zeros, no latency), and only within history.
  clock.t = 600.0 + 60 * 42 + 1
  stats.decision('a', False, 2.0)
  series = stats.series()
  assert series['t'] == [600.0 + 60 * k for k in range(38, 43)]
  assert series['decisions'] == [1, 1, 0, 0, 1]
  assert series['latency_ms']['routing']['p95'][2:4] == [None, None]
  assert stats.series(buckets=2)['t'] == [600.0 + 60 * 41, 600.0 + 60 * 42]
  clock.t += 60 * 100   # nothing for longer than the history: empty buckets, the totals stay
  series = stats.series()
  assert len(series['t']) == 5 and series['decisions'] == [0] * 5 and len(stats.closed) <= 4
  assert stats.totals()['decisions'] == 40


def test_a_fresh_history_starts_at_the_start():
  clock = Clock(1000.0)
  stats = Stats(history=1440, bucket_s=60, clock=clock)
  clock.t = 1000.0 + 130
  series = stats.series()
  assert series['t'] == [960.0, 1020.0, 1080.0]   # not 1,440 empty buckets before it
  assert series['decisions'] == [0, 0, 0] and series['routes'] == {}


def test_spend_fallbacks_feedback_and_markers():
  clock = Clock(0.0)
  stats = Stats(history=10, bucket_s=10, clock=clock)
  stats.router_loaded('v0')
  assert stats.version == 'v0' and stats.loaded_at == 0.0 and not stats.reloads
  stats.completion(True, 0, 5.0, 0.001, 0.004)
  clock.t = 11.0
  stats.completion(True, 1, 7.0, 0.002, 0.004)   # answered after a fallback
  stats.completion(False, 3, None, None, None)   # every upstream failed
  stats.completion(True, 0, 6.0, None, None)     # no usage: unpriced
  stats.feedback('m1', 0.5)
  stats.feedback('m1', 1.0)
  stats.feedback('m2', 0.25)
  stats.router_loaded('v1', '/runs/r1', previous='v0')
  totals = stats.totals()
  spend = totals['spend']
  assert spend['actual'] == pytest.approx(0.003) and spend['strongest_only'] == pytest.approx(0.008)
  assert spend['saving'] == pytest.approx(0.005) and spend['saving_share'] == pytest.approx(0.625)
  assert (spend['priced'], spend['unpriced']) == (2, 1)
  assert (totals['completions'], totals['fallbacks'], totals['failed']) == (4, 1, 1)
  assert totals['latency_ms']['upstream']['count'] == 3
  assert totals['feedback'] == {'m1': {'count': 2, 'mean': 0.75}, 'm2': {'count': 1, 'mean': 0.25}}
  series = stats.series()
  assert series['spend']['actual'] == pytest.approx([0.001, 0.002])
  assert series['fallbacks'] == [0, 1] and series['failed'] == [0, 1]
  assert series['feedback']['m1'] == {'count': [0, 2], 'mean': [None, 0.75]}
  assert stats.version == 'v1' and stats.loaded_at == 11.0
  assert stats.markers(0.0) == [{'time': 11.0, 'version': 'v1', 'previous': 'v0',
                                 'workdir': '/runs/r1'}]
  assert stats.markers(12.0) == []
  for i in range(MAX_RELOADS + 5):
    stats.router_loaded(f'v{i + 2}', previous='x')
  assert len(stats.reloads) == MAX_RELOADS
  json.dumps(stats.totals(), allow_nan=False)
  json.dumps(stats.series(), allow_nan=False)


@pytest.mark.parametrize('kwargs', [{'history': 0}, {'history': 1.5}, {'history': True},
                                    {'bucket_s': 0}, {'bucket_s': float('nan')}])
def test_stats_refuse_a_bad_shape(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    Stats(**kwargs)


@pytest.mark.parametrize('settings, message', [
    ({'stats_history': -1}, '--stats_history'), ({'stats_history': 10081}, '--stats_history'),
    ({'stats_history': 2.0}, '--stats_history'), ({'stats_bucket_s': 0.5}, '--stats_bucket_s'),
    ({'stats_bucket_s': float('nan')}, '--stats_bucket_s')])
def test_settings_check_the_stats_flags(settings, message):
  with pytest.raises(ValueError, match=message):
    serve.Settings(**settings).check()


# ================================================================ the app ===
@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


@pytest.fixture
def upstreams():
  u = Upstreams()
  yield u
  u.close()


def make_app(router, upstreams, tmp_path, version='v0', **settings):
  """The app over local upstreams, each model priced differently, a decision log."""
  names = router.model_names
  pool = {n: {'price_in': 1.0 + i, 'price_out': 2.0 + 3 * i, 'base_url': upstreams.url(slug(n))}
          for i, n in enumerate(names)}
  (tmp_path / 'pool.json').write_text(json.dumps(pool))
  settings = {'max_wait_ms': 0, 'auth_token': TOKEN, 'decisions': str(tmp_path / 'log'),
              **settings}
  return serve.create_app(router, readers.read_endpoints(tmp_path / 'pool.json'),
                          serve.Settings(**settings), warm_up=False, version=version,
                          prices=pool_lib.prices(tmp_path / 'pool.json'))


def metric(text, name, labels=''):
  found = re.search(rf'^{name}{re.escape(labels)} (\S+)$', text, re.M)
  return float(found.group(1)) if found else None


def chat_body(query, **extra):
  return {'model': 'router', 'messages': [{'role': 'user', 'content': query}], **extra}


@pytest.fixture(scope='module')
def second_workdir(serve_workdir, tmp_path_factory):
  """serve_workdir copied, one checkpoint file given a new mtime: another version."""
  copy = tmp_path_factory.mktemp('dash_reload') / 'run1'
  shutil.copytree(serve_workdir, copy)
  first = sorted(p for p in (copy / 'checkpoints').rglob('*') if p.is_file())[0]
  stat = first.stat()
  os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  return copy


def test_stats_count_what_the_server_did(router, upstreams, tmp_path, second_workdir):
  names = router.model_names
  strongest = names[router.strongest]
  app = make_app(router, upstreams, tmp_path, explore=0.5, seed=3)

  async def calls(http):
    first = await http.post(ROUTE, headers=AUTH, json={'query': QUERIES[0], 'explore': False})
    upstreams.mode[slug(first.json()['model'])] = 'down'   # requests sent there fall back
    ids = []
    for i in range(12):
      r = await http.post(CHAT, headers=AUTH, json=chat_body(QUERIES[i % 4] + f' #{i}'))
      assert r.status_code == 200, r.text
      ids.append((r.json()['id'], r.json()['model']))
    stream = await http.post(CHAT, headers=AUTH, json=chat_body(QUERIES[0], stream=True))
    assert stream.status_code == 200
    for q in QUERIES:
      assert (await http.post(ROUTE, headers=AUTH, json={'query': q})).status_code == 200
    scores = [{'id': rid, 'score': (k % 5) / 4} for k, (rid, _) in enumerate(ids)]
    assert (await http.post('/v1/feedback', headers=AUTH, json=scores)).status_code == 200
    before = (await http.get(STATS, headers=AUTH)).json()
    reload = await http.post('/admin/reload', headers=AUTH,
                             json={'workdir': str(second_workdir)})
    assert reload.status_code == 200, reload.text
    after = await http.post(CHAT, headers=AUTH, json=chat_body(QUERIES[1]))
    assert after.status_code == 200
    last = (await http.get(STATS, headers=AUTH)).json()
    short = await http.get(STATS + '?buckets=1', headers=AUTH)
    bad = [await http.get(STATS + f'?buckets={b}', headers=AUTH) for b in ('0', 'x', '-1')]
    return ids, scores, before, last, short, bad, (await http.get('/metrics', headers=AUTH)).text

  ids, scores, before, last, short, bad, metrics = in_process(app, calls)
  for key in ('router', 'routes', 'spend', 'latency_ms', 'feedback'):
    assert key in before
  assert set(before['router']) >= {'version', 'loaded_at'}
  assert set(before['spend']) >= {'actual', 'strongest_only'}
  assert set(before['latency_ms']) >= {'p50', 'p95'}
  assert before['router']['version'] == 'v0' and before['router']['strongest'] == strongest
  v1 = version_lib.router_version(second_workdir)
  assert last['router']['version'] == v1 and last['router']['loaded_at'] >= before['router'][
      'loaded_at']
  assert [(r['version'], r['previous']) for r in last['reloads']] == [(v1, 'v0')]
  assert last['reloads'][0]['workdir'] == str(second_workdir)

  # Routes as /metrics counts them (chat completions and /v1/route calls).
  for name in names:
    assert last['routes'].get(name, 0) == metric(metrics, 'entrorouter_routes_total',
                                                 f'{{model="{name}"}}')
  assert last['decisions'] == 1 + 12 + 1 + 4 + 1
  assert last['explored'] == metric(metrics, 'entrorouter_explored_total') > 0
  assert last['explored_share'] == pytest.approx(last['explored'] / last['decisions'])
  assert 0 < last['switched'] < last['explored']   # some explored requests kept the top model
  assert last['completions'] == 14 and last['failed'] == 0
  lines = [json.loads(x) for p in sorted((tmp_path / 'log').glob('decisions-*.jsonl'))
           for x in p.read_text().splitlines()]
  chats = [x for x in lines if x['endpoint'] == 'chat']
  assert last['fallbacks'] == sum(1 for x in chats if x['fallbacks']) > 0

  # Spend: the decision log's costs; always-the-strongest: the same tokens at its prices.
  prices = pool_lib.prices(tmp_path / 'pool.json')
  priced = [x for x in chats if x['cost'] is not None]
  assert last['spend']['priced'] == len(priced) == 13   # the stream sent no usage
  assert last['spend']['unpriced'] == 1
  assert last['spend']['actual'] == pytest.approx(sum(x['cost'] for x in priced))
  top = prices[strongest]
  assert last['spend']['strongest_only'] == pytest.approx(sum(
      (x['usage']['prompt_tokens'] * top.price_in + x['usage']['completion_tokens']
       * top.price_out) / 1e6 for x in priced))
  assert last['spend']['saving'] == pytest.approx(
      last['spend']['strongest_only'] - last['spend']['actual'])
  assert last['spend']['strongest_model'] == strongest

  # Feedback per answering model.
  answered = {x['id']: x['answered_by'] for x in chats}
  for model in set(answered[s['id']] for s in scores):
    mine = [s['score'] for s in scores if answered[s['id']] == model]
    assert last['feedback'][model]['count'] == len(mine)
    assert last['feedback'][model]['mean'] == pytest.approx(np.mean(mine))

  # Latency: every routed completion timed; percentiles in order.
  lat = last['latency_ms']
  assert lat['count'] == 14 and 0 < lat['p50'] <= lat['p95']
  assert lat['routing']['count'] == 19 and lat['upstream']['count'] == 14

  # The series add up to the totals; calibration as the router has it.
  series = last['series']
  assert sum(series['decisions']) == last['decisions']
  for name, counts in series['routes'].items():
    assert sum(counts) == last['routes'].get(name, 0)
  assert sum(series['spend']['actual']) == pytest.approx(last['spend']['actual'])
  assert last['history'] == {'bucket_s': 60.0, 'buckets': 1440, 'shown': len(series['t'])}
  assert last['calibration']['cost_weight'] == (router.default_cost_weight
                                                if router.moves_with_cost_weight else None)
  assert last['calibration']['calibrated'] is bool(router.calibration)
  assert last['decision_log'] is True
  assert short.status_code == 200 and len(short.json()['series']['t']) == 1
  for r in bad:
    assert r.status_code == 400 and r.json()['error']['param'] == 'buckets'


def cookie_of(reply):
  header = reply.headers.get('set-cookie', '')
  name, _, rest = header.partition('=')
  return name, rest.split(';')[0], header


def test_the_token_sets_a_cookie_and_redirects(router, upstreams, tmp_path):
  app = make_app(router, upstreams, tmp_path)

  async def calls(http):
    opened = await http.get(f'/dashboard?token={TOKEN}&x=1', follow_redirects=False)
    wrong = await http.get('/dashboard?token=nope', follow_redirects=False)
    name, value, _ = cookie_of(opened)
    http.cookies.clear()   # sent only where a request says so
    jar = {'cookie': f'{name}={value}'}
    page = await http.get('/dashboard', headers=jar)
    files = {f: await http.get(f'/dashboard/static/{f}', headers=jar)
             for f in dashboard_lib.FILES}
    stats = await http.get(STATS, headers=jar)
    refused = {'page': await http.get('/dashboard'),
               'stats': await http.get(STATS),
               'file': await http.get('/dashboard/static/dashboard.js'),
               'wrong cookie': await http.get(STATS, headers={'cookie': f'{name}={TOKEN}'}),
               'cookie on /v1/route': await http.post(ROUTE, headers=jar,
                                                      json={'query': QUERIES[0]}),
               'cookie on /metrics': await http.get('/metrics', headers=jar)}
    bearer = await http.get(STATS, headers=AUTH)
    unknown = await http.get('/dashboard/static/../app.py', headers=jar)
    other = await http.get('/dashboard/static/dashboard.html', headers=jar)
    return opened, wrong, page, files, stats, refused, bearer, unknown, other

  opened, wrong, page, files, stats, refused, bearer, unknown, other = in_process(app, calls)
  assert opened.status_code == 303 and opened.headers['location'] == '/dashboard?x=1'
  name, value, header = cookie_of(opened)
  assert name == DASHBOARD_COOKIE and value == dashboard_cookie(TOKEN) and TOKEN not in header
  attributes = [a.strip().lower() for a in header.split(';')[1:]]
  assert 'httponly' in attributes and 'samesite=strict' in attributes and 'path=/' in attributes
  assert wrong.status_code == 401 and 'set-cookie' not in wrong.headers
  assert 'text/html' in wrong.headers['content-type']

  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  csp = page.headers['content-security-policy']
  assert "default-src 'none'" in csp and "script-src 'self'" in csp
  assert "connect-src 'self'" in csp and 'http' not in csp
  # Nothing on the page loads from elsewhere: every src and href is the server's own.
  for url in re.findall(r'(?:src|href)="([^"]*)"', page.text):
    assert not re.match(r'^(?:[a-z]+:)?//', url) and not url.startswith('http'), url
  assert set(re.findall(r'dashboard/static/([\w.]+)', page.text)) <= set(dashboard_lib.FILES)
  for f, r in files.items():
    assert r.status_code == 200, (f, r.status_code)
    assert r.headers['content-type'] == dashboard_lib.FILES[f]
  assert b'uPlot' in files['uPlot.iife.min.js'].content
  assert b'MIT License' in files['uPlot.LICENSE'].content
  assert stats.status_code == 200 and stats.json()['router']['version'] == 'v0'
  for what, r in refused.items():
    assert r.status_code == 401, what
  assert 'text/html' in refused['page'].headers['content-type']
  assert refused['stats'].json()['error']['code'] == 'invalid_api_key'
  assert bearer.status_code == 200
  assert unknown.status_code == 404 and other.status_code == 404


def test_without_auth_the_token_link_still_redirects(router, upstreams, tmp_path):
  app = make_app(router, upstreams, tmp_path, auth_token=None)

  async def calls(http):
    return (await http.get('/dashboard?token=anything', follow_redirects=False),
            await http.get('/dashboard'), await http.get(STATS))

  opened, page, stats = in_process(app, calls)
  assert opened.status_code == 303 and opened.headers['location'] == '/dashboard'
  assert 'set-cookie' not in opened.headers
  assert page.status_code == 200 and stats.status_code == 200


def test_stats_history_off(router, upstreams, tmp_path):
  app = make_app(router, upstreams, tmp_path, stats_history=0)

  async def calls(http):
    chat = await http.post(CHAT, headers=AUTH, json=chat_body(QUERIES[0]))
    return chat, await http.get(STATS, headers=AUTH), await http.get('/dashboard', headers=AUTH)

  chat, stats, page = in_process(app, calls)
  assert chat.status_code == 200
  assert stats.status_code == 404 and stats.json()['error']['code'] == 'stats_off'
  assert page.status_code == 404 and '--stats_history' in page.text


def test_the_access_log_hides_the_token():
  import logging
  record = logging.LogRecord('uvicorn.access', logging.INFO, __file__, 1,
                             '%s - "%s %s HTTP/%s" %d',
                             ('127.0.0.1:5', 'GET', f'/dashboard?token={TOKEN}&x=1', '1.1', 303),
                             None)
  assert serve.HideTokens().filter(record)
  assert TOKEN not in record.getMessage() and 'token=***&x=1' in record.getMessage()
