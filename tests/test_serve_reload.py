"""Hot reload of the router (POST /admin/reload, SIGHUP) on the app in process, with the
tiny router of conftest's `serve_workdir` (R0), a copy of it whose checkpoint has another
mtime and so another version (R1), and the local fake upstreams."""

import asyncio
import json
import os
import re
import shutil

import pytest

from benchmarks.fake_upstream import Upstreams
from entrorouter_jax import router as router_lib, serve
from entrorouter_jax.data import readers
from entrorouter_jax.serving import version as version_lib
from serving import QUERIES, TOKEN, serve_log_to, slug
from test_serve_learning import CHAT, ROUTE, in_process

RELOAD = '/admin/reload'
AUTH = {'authorization': f'Bearer {TOKEN}'}


@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


@pytest.fixture(scope='module')
def second_workdir(serve_workdir, tmp_path_factory):
  """R1: serve_workdir copied, one checkpoint file given a new mtime (a new version)."""
  copy = tmp_path_factory.mktemp('reload') / 'run1'
  shutil.copytree(serve_workdir, copy)
  files = sorted(p for p in (copy / 'checkpoints').rglob('*') if p.is_file())
  stat = files[0].stat()
  os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert version_lib.router_version(copy) != version_lib.router_version(serve_workdir)
  return copy


@pytest.fixture
def upstreams():
  u = Upstreams()
  yield u
  u.close()


def make_app(router, upstreams, tmp_path, serve_workdir, **settings):
  """The app on R0 over local upstreams, its decision log in tmp_path/log."""
  pool = {n: {'price_in': 1.0, 'price_out': 1.0, 'base_url': upstreams.url(slug(n))}
          for n in router.model_names}
  (tmp_path / 'pool.json').write_text(json.dumps(pool))
  settings = {'max_wait_ms': 1, 'max_batch': 8, 'auth_token': TOKEN,
              'decisions': str(tmp_path / 'log'), **settings}
  return serve.create_app(router, readers.read_endpoints(tmp_path / 'pool.json'),
                          serve.Settings(**settings), warm_up=False,
                          version=serve.router_version(serve_workdir))


def metric(text, name, labels=''):
  """The value of one series of the Prometheus text (None if absent)."""
  found = re.search(rf'^{name}{re.escape(labels)} (\S+)$', text, re.M)
  return float(found.group(1)) if found else None


async def chat(http, query, **headers):
  return await http.post(CHAT, headers={**AUTH, **headers}, json={
      'model': 'router', 'messages': [{'role': 'user', 'content': query}]})


def decision_versions(directory):
  return [json.loads(line)['version'] for p in sorted(directory.glob('decisions-*.jsonl'))
          for line in p.read_text(encoding='utf-8').splitlines()]


def test_reload_swaps_the_router_and_its_version(router, upstreams, tmp_path, serve_workdir,
                                                 second_workdir):
  v0, v1 = serve.router_version(serve_workdir), version_lib.router_version(second_workdir)
  app = make_app(router, upstreams, tmp_path, serve_workdir)

  async def calls(http):
    before = await chat(http, QUERIES[0])
    health0 = (await http.get('/healthz')).json()
    reload = await http.post(RELOAD, headers=AUTH, json={'workdir': str(second_workdir)})
    health1 = (await http.get('/healthz')).json()
    after = await chat(http, QUERIES[1])
    routed = await http.post(ROUTE, headers=AUTH, json={'query': QUERIES[2]})
    return before, health0, reload, health1, after, routed, (
        await http.get('/metrics', headers=AUTH)).text

  before, health0, reload, health1, after, routed, metrics = in_process(app, calls)
  assert reload.status_code == 200, reload.text
  got = reload.json()
  assert got['version'] == v1 and got['models'] == router.model_names
  assert isinstance(got['seconds'], float) and got['seconds'] >= 0
  assert health0['version'] == v0 and health1['version'] == v1 and health1['status'] == 'ok'
  for r in (before, after, routed):
    assert r.status_code == 200, r.text
  assert metric(metrics, 'entrorouter_router_info', f'{{version="{v1}"}}') == 1
  assert metric(metrics, 'entrorouter_router_info', f'{{version="{v0}"}}') is None
  assert metric(metrics, 'entrorouter_reloads_total', '{result="ok"}') == 1
  assert metric(metrics, 'entrorouter_reloads_total', '{result="failed"}') == 0
  assert decision_versions(tmp_path / 'log') == [v0, v1, v1]   # chat, then chat and route


def test_reloads_under_load_fail_no_request(router, upstreams, tmp_path, serve_workdir,
                                            second_workdir):
  app = make_app(router, upstreams, tmp_path, serve_workdir, decisions=None)
  workdirs = [second_workdir, serve_workdir] * 5
  versions = [version_lib.router_version(w) for w in workdirs]

  async def calls(http):
    done = asyncio.Event()

    async def client(i):
      statuses = []
      while not done.is_set() or not statuses:
        if i % 2:
          r = await chat(http, QUERIES[i % len(QUERIES)] + f' #{i}')
        else:
          r = await http.post(ROUTE, headers=AUTH, json={'query': QUERIES[i % len(QUERIES)]})
        statuses.append(r.status_code)
      return statuses

    async def reloads():
      answers = []
      try:
        for w in workdirs:
          answers.append(await http.post(RELOAD, headers=AUTH, json={'workdir': str(w)}))
          await asyncio.sleep(0.05)
      finally:
        done.set()
      return answers

    clients = [asyncio.create_task(client(i)) for i in range(64)]
    answers = await reloads()
    statuses = await asyncio.gather(*clients)
    return answers, statuses, (await http.get('/healthz')).json(), (
        await http.get('/metrics', headers=AUTH)).text

  answers, statuses, health, metrics = in_process(app, calls)
  assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
  assert [a.json()['version'] for a in answers] == versions
  flat = [s for per_client in statuses for s in per_client]
  assert len(flat) >= 64 and set(flat) == {200}, sorted(set(flat))
  assert health['version'] == versions[-1]
  assert metric(metrics, 'entrorouter_reloads_total', '{result="ok"}') == 10
  assert metric(metrics, 'entrorouter_reloads_total', '{result="failed"}') == 0


def test_a_failed_reload_keeps_the_old_router(router, upstreams, tmp_path, serve_workdir):
  v0 = serve.router_version(serve_workdir)
  app = make_app(router, upstreams, tmp_path, serve_workdir)
  (tmp_path / 'not-a-run').mkdir()

  async def calls(http):
    missing = await http.post(RELOAD, headers=AUTH, json={'workdir': str(tmp_path / 'nope')})
    not_run = await http.post(RELOAD, headers=AUTH, json={'workdir': str(tmp_path / 'not-a-run')})
    bodies = [await http.post(RELOAD, headers=AUTH, json=body)
              for body in ({}, {'workdir': ''}, {'workdir': 3})]
    routed = await http.post(ROUTE, headers=AUTH, json={'query': QUERIES[0]})
    return missing, not_run, bodies, routed, (await http.get('/healthz')).json(), (
        await http.get('/metrics', headers=AUTH)).text

  missing, not_run, bodies, routed, health, metrics = in_process(app, calls)
  assert missing.status_code == 400, missing.text
  error = missing.json()['error']
  assert error['param'] == 'workdir' and error['code'] == 'reload_failed'
  assert 'nope' in error['message'] and 'not a directory' in error['message']
  assert not_run.status_code == 400 and 'did not load' in not_run.json()['error']['message']
  for r in bodies:   # a bad body is no reload: not counted
    assert r.status_code == 400 and r.json()['error']['param'] == 'workdir', r.text
    assert 'workdir is' in r.json()['error']['message']
  assert routed.status_code == 200 and health['version'] == v0
  assert metric(metrics, 'entrorouter_router_info', f'{{version="{v0}"}}') == 1
  assert metric(metrics, 'entrorouter_reloads_total', '{result="failed"}') == 2
  assert metric(metrics, 'entrorouter_reloads_total', '{result="ok"}') == 0


def test_admin_needs_the_token_or_loopback(router, upstreams, tmp_path, serve_workdir):
  async def reload(http, headers):
    return await http.post(RELOAD, headers=headers, json={'workdir': ''})

  async def no_auth(http):
    return await reload(http, {}), await reload(http, {'authorization': 'Bearer wrong'})

  missing, wrong = in_process(make_app(router, upstreams, tmp_path, serve_workdir), no_auth)
  assert missing.status_code == wrong.status_code == 401
  assert missing.json()['error']['type'] == 'authentication_error'

  async def open_(http):
    return await reload(http, {})

  exposed = in_process(make_app(router, upstreams, tmp_path, serve_workdir, auth_token=None,
                                host='0.0.0.0'), open_)
  assert exposed.status_code == 403 and '0.0.0.0' in exposed.json()['error']['message']
  for host in ('127.0.0.1', '::1', 'localhost'):   # loopback without a token: allowed
    local = in_process(make_app(router, upstreams, tmp_path, serve_workdir, auth_token=None,
                                host=host), open_)
    assert local.status_code == 400 and local.json()['error']['param'] == 'workdir', local.text


def test_sighup_reloads_from_a_repointed_symlink(router, upstreams, tmp_path, serve_workdir,
                                                 second_workdir, caplog):
  link = tmp_path / 'current'
  link.symlink_to(serve_workdir, target_is_directory=True)
  app = make_app(router, upstreams, tmp_path, serve_workdir, workdir=str(link))
  v1 = version_lib.router_version(second_workdir)

  async def calls(http):
    link.unlink()
    link.symlink_to(second_workdir, target_is_directory=True)   # a new run: the link moves
    answer = await app.state.reloader.reload_from_settings()   # what SIGHUP runs
    return answer, (await http.get('/healthz')).json()

  with caplog.at_level('INFO', logger='entrorouter_jax.serve'), serve_log_to(caplog):
    answer, health = in_process(app, calls)
  assert answer['version'] == v1 and health['version'] == v1
  assert any(v1 in r.getMessage() and 'reloaded' in r.getMessage() for r in caplog.records)


def test_a_warm_up_failure_answers_500_and_the_old_router_serves_on(
    router, upstreams, tmp_path, serve_workdir, second_workdir, monkeypatch):
  from entrorouter_jax.serving import reload as reload_lib
  v0 = serve.router_version(serve_workdir)
  app = make_app(router, upstreams, tmp_path, serve_workdir)
  app.state.reloader.warm_up = True   # the app itself skipped its warm-up: the reload does not
  real_load = router_lib.load_router

  def broken(path, *args, **kwargs):
    loaded = real_load(path, *args, **kwargs)

    def warm_up(*_):
      raise RuntimeError('out of device memory')
    object.__setattr__(loaded, 'warm_up', warm_up)
    return loaded

  monkeypatch.setattr(reload_lib.router_lib, 'load_router', broken)

  async def calls(http):
    failed = await http.post(RELOAD, headers=AUTH, json={'workdir': str(second_workdir)})
    routed = await chat(http, QUERIES[1])
    return failed, routed, (await http.get('/healthz')).json(), (
        await http.get('/metrics', headers=AUTH)).text

  failed, routed, health, metrics = in_process(app, calls)
  assert failed.status_code == 500, failed.text
  error = failed.json()['error']
  assert error['code'] == 'reload_failed' and 'did not warm up' in error['message']
  assert 'out of device memory' in error['message']
  assert routed.status_code == 200 and health['version'] == v0
  assert metric(metrics, 'entrorouter_reloads_total', '{result="failed"}') == 1
