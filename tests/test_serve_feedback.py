"""Serving that learns, part two: POST /v1/feedback (scores for the decision log's ids, the
feedback log, the metrics) on the app in process, and `python -m entrorouter_jax.feedback`,
which joins decisions and scores into a feedback log the trainer's reader reads."""

import json
import re
import subprocess
import sys

import pytest

from benchmarks.fake_upstream import Upstreams
from conftest import REPO_ROOT
from entrorouter_jax import feedback as feedback_cli, router as router_lib, serve
from entrorouter_jax.data import pool as pool_lib, readers
from serving import QUERIES, TOKEN, serve_log_to, slug
from test_serve_learning import CHAT, in_process

FEEDBACK = '/v1/feedback'
AUTH = {'authorization': f'Bearer {TOKEN}'}


@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


@pytest.fixture
def upstreams():
  u = Upstreams()
  yield u
  u.close()


def make_app(router, upstreams, tmp_path, decisions=True, **settings):
  """The app over local upstreams, priced, with its decision log in tmp_path/log."""
  names = router.model_names
  pool = {n: {'price_in': 1.0 + i, 'price_out': 2.0, 'base_url': upstreams.url(slug(n))}
          for i, n in enumerate(names)}
  (tmp_path / 'pool.json').write_text(json.dumps(pool))
  return serve.create_app(
      router, readers.read_endpoints(tmp_path / 'pool.json'),
      serve.Settings(max_wait_ms=0, auth_token=TOKEN, max_body_bytes=4096,
                     decisions=str(tmp_path / 'log') if decisions else None, **settings),
      warm_up=False, version='v1', prices=pool_lib.prices(tmp_path / 'pool.json'))


async def chat(http, query):
  r = await http.post(CHAT, headers=AUTH, json={'model': 'router', 'messages': [
      {'role': 'user', 'content': query}]})
  assert r.status_code == 200, r.text
  return r.json()


def feedback_lines(directory):
  return [json.loads(line) for p in sorted(directory.glob('feedback-*.jsonl'))
          for line in p.read_text(encoding='utf-8').splitlines()]


def sample(text, name, label):
  found = re.search(rf'^{name}\{{model="{re.escape(label)}"\}} (\S+)$', text, re.M)
  return float(found.group(1)) if found else 0.0


def test_feedback_is_written_counted_and_bad_bodies_write_nothing(router, upstreams, tmp_path):
  app = make_app(router, upstreams, tmp_path)
  log = tmp_path / 'log'
  bad_bodies = [({'id': 'req-nope', 'score': 0.5}, 404, 'id'),
                ({'id': None, 'score': 1.5}, 400, 'score'),
                ({'score': 0.5}, 400, 'id'),
                ({'id': None, 'score': '0.5'}, 400, 'score'),
                ({'id': None, 'score': True}, 400, 'score'),
                ('{"id": null, "score": NaN}', 400, 'score'),
                ([{'id': None, 'score': 0.5}] * 3 + [{'id': None, 'score': 2}], 400,
                 '[3].score'),
                ([{'id': None, 'score': 0.5}, {'id': 'req-nope', 'score': 0.5}], 404, '[1].id'),
                ([], 400, None),
                ({'id': None, 'score': 0.5, 'pad': 'x' * 5000}, 413, None)]

  async def calls(http):
    answers = [await chat(http, q) for q in QUERIES[:3]]
    ids = [a['id'] for a in answers]
    one = await http.post(FEEDBACK, headers=AUTH, json={'id': ids[0], 'score': 1,
                                                        'note': 'extra keys are ignored'})
    three = await http.post(FEEDBACK, headers=AUTH, json=[
        {'id': ids[0], 'score': 0.25}, {'id': ids[1], 'score': 0.5}, {'id': ids[2], 'score': 0}])
    bad = []
    for body, _, _ in bad_bodies:
      if isinstance(body, str):
        content = body.replace('null', json.dumps(ids[0]))
      else:
        content = json.dumps(body).replace('null', json.dumps(ids[0]))
      bad.append(await http.post(FEEDBACK, content=content,
                                 headers={**AUTH, 'content-type': 'application/json'}))
    bad.append(await http.post(FEEDBACK, json={'id': ids[0], 'score': 0.5}))   # no token
    return answers, one, three, bad, (await http.get('/metrics', headers=AUTH)).text

  answers, one, three, bad, metrics = in_process(app, calls)
  assert one.status_code == 200 and one.json() == {'accepted': 1}
  assert three.status_code == 200 and three.json() == {'accepted': 3}
  for r, (_, status, field) in zip(bad, bad_bodies):
    assert r.status_code == status, r.text
    if field is not None:
      assert r.json()['error']['param'] == field and field in r.json()['error']['message']
  assert bad[-1].status_code == 401
  lines = feedback_lines(log)   # the logs are closed: every accepted line is on disk
  ids = [a['id'] for a in answers]
  assert [(x['id'], x['score']) for x in lines] == [
      (ids[0], 1.0), (ids[0], 0.25), (ids[1], 0.5), (ids[2], 0.0)]   # nothing of the bad ones
  assert all(set(x) == {'id', 'score', 'time'} and isinstance(x['time'], float) for x in lines)
  assert lines[0]['time'] <= lines[1]['time'] == lines[3]['time']

  by_model = {}
  for a, scores in zip(answers, ([1.0, 0.25], [0.5], [0.0])):
    count, total = by_model.get(a['model'], (0, 0.0))
    by_model[a['model']] = (count + len(scores), total + sum(scores))
  for model, (count, total) in by_model.items():
    assert sample(metrics, 'entrorouter_feedback_total', model) == count
    assert sample(metrics, 'entrorouter_feedback_score_total', model) == pytest.approx(total)
  assert re.search(r'^entrorouter_requests_total\{endpoint="/v1/feedback",status="200"\} 2',
                   metrics, re.M)


def test_without_decisions_feedback_is_404(router, upstreams, tmp_path):
  app = make_app(router, upstreams, tmp_path, decisions=False)

  async def calls(http):
    return await http.post(FEEDBACK, headers=AUTH, json={'id': 'req-1', 'score': 1})

  r = in_process(app, calls)
  assert r.status_code == 404 and 'keeps no decision log' in r.json()['error']['message']


def test_ids_survive_a_restart_and_the_later_score_wins(router, upstreams, tmp_path, caplog):
  async def first(http):
    return [(await chat(http, q))['id'] for q in QUERIES[:2]]

  ids = in_process(make_app(router, upstreams, tmp_path), first)
  log = tmp_path / 'log'
  with open(next(log.glob('decisions-*.jsonl')), 'a') as f:
    f.write('{"id": "torn line\n')   # a crash's torn line: skipped with a warning

  async def second(http):
    old = await http.post(FEEDBACK, headers=AUTH, json={'id': ids[0], 'score': 0.2})
    again = await http.post(FEEDBACK, headers=AUTH, json={'id': ids[0], 'score': 0.9})
    return old, again

  with caplog.at_level('WARNING', logger='entrorouter_jax.serve'), serve_log_to(caplog):
    old, again = in_process(make_app(router, upstreams, tmp_path), second)
  assert old.status_code == again.status_code == 200, old.text
  assert any(re.search(r'decisions-.*\.jsonl:\d+: .*skipped', r.getMessage())
             for r in caplog.records)
  joined = feedback_cli.join(log)
  scores = {r['id']: r['score'] for r in joined.rows}
  assert scores == {ids[0]: 0.9, ids[1]: None}
  assert joined.dropped['malformed'] == 1


def decision(i, **over):
  line = {'id': f'req-{i}', 'time': 1000.0 + i, 'endpoint': 'chat', 'text': f'query {i}',
          'model': 'big', 'answered_by': 'big', 'propensity': 0.8, 'explored': False,
          'cost_weight': 0.5, 'version': 'v7', 'usage': {}, 'cost': 0.01 * (i + 1),
          'latency_ms': 5.0, 'status': 200, 'fallbacks': []}
  return {**line, **over}


@pytest.mark.parametrize('suffix', ['.csv', '.jsonl'])
def test_feedback_cli_writes_the_expected_rows(tmp_path, suffix):
  log = tmp_path / 'log'
  log.mkdir()
  lines = [decision(0), decision(1, model='small', answered_by='small', propensity=0.2),
           decision(2, answered_by='small', fallbacks=['big']),            # a fallback
           decision(3, answered_by=None, status=502, cost=None),           # every upstream down
           decision(4, endpoint='route', answered_by=None, cost=None),     # /v1/route
           decision(5, cost_weight=None)]
  (log / 'decisions-20250101T000000-1.jsonl').write_text(
      ''.join(json.dumps(x) + '\n' for x in lines))
  (log / 'feedback-20250101T000001-1.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in [
      {'id': 'req-0', 'score': 0.1, 'time': 2000.0},
      {'id': 'req-1', 'score': 1.0, 'time': 2000.0},
      {'id': 'req-2', 'score': 1.0, 'time': 2000.0}]))
  scores = tmp_path / 'scores.jsonl'
  scores.write_text(''.join(json.dumps(x) + '\n' for x in [
      {'id': 'req-0', 'score': 0.7},                   # no time: after the server's
      {'id': 'req-1', 'score': 0.0, 'time': 1500.0},   # older than the server's: loses
      {'id': 'req-elsewhere', 'score': 1.0}]))         # unknown: counted
  out = tmp_path / f'logs{suffix}'
  run = subprocess.run([sys.executable, '-m', 'entrorouter_jax.feedback', f'--decisions={log}',
                        f'--scores={scores}', f'--out={out}'], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == (
      f'{out}: 3 rows written (2 judged, 1 unjudged); dropped: /v1/route calls 1, tool-call '
      'follow-ups 0, failed (status != 200) 1, fallbacks 1, without cost 0, repeated ids 0, malformed lines 0; '
      'scores of unknown ids: 1')
  if suffix == '.jsonl':
    rows = [json.loads(x) for x in out.read_text().splitlines()]
  else:
    import csv
    with out.open(newline='') as f:
      rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == ['req-0', 'req-1', 'req-5']
  assert list(rows[0]) == list(feedback_cli.COLUMNS)
  cell = (lambda v: v) if suffix == '.jsonl' else (lambda v: None if v == '' else float(v))
  assert [cell(r['score']) for r in rows] == [0.7, 1.0, None]
  assert [cell(r['cost']) for r in rows] == pytest.approx([0.01, 0.02, 0.06])
  assert [cell(r['propensity']) for r in rows] == [0.8, 0.2, 0.8]
  assert [cell(r['cost_weight']) for r in rows] == [0.5, 0.5, None]
  assert [r['query'] for r in rows] == ['query 0', 'query 1', 'query 5']
  assert [r['model'] for r in rows] == ['big', 'small', 'big']
  assert {r['policy'] for r in rows} == {'v7'}

  data = readers.read_feedback(out)   # the trainer's reader: the judged rows
  assert dict(zip(data.ids, data.propensities)) == {'req-0': 0.8, 'req-1': 0.2}


def test_feedback_cli_errors_name_the_line(tmp_path):
  log = tmp_path / 'log'
  log.mkdir()
  (log / 'decisions-20250101T000000-1.jsonl').write_text(json.dumps(decision(0)) + '\n')
  scores = tmp_path / 'scores.jsonl'
  scores.write_text('{"id": "req-0", "score": 1}\n{"id": "req-0", "score": true}\n')
  run = subprocess.run([sys.executable, '-m', 'entrorouter_jax.feedback', f'--decisions={log}',
                        f'--scores={scores}', f'--out={tmp_path / "o.csv"}'], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 2
  assert run.stderr.startswith('error: ') and 'scores.jsonl:2: score is True' in run.stderr
