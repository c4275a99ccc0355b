"""One bad request never fails the requests beside it, and never gets a bare 500.

Against the real server (conftest's `served`: `python -m entrorouter_jax.serve`
on a tiny trained router, local upstreams) and the real app in process: a
seeded fuzz of malformed chat and route bodies, a poisoned request among 32
innocent ones sharing a micro-batch, and an unforeseen failure inside the
router's forward.
"""

import asyncio
import json
import re

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from entrorouter_jax import router as router_lib, serve
from entrorouter_jax.batching import MicroBatcher
from entrorouter_jax.data import readers
from serving import QUERIES, auth

CHAT, ROUTE = '/v1/chat/completions', '/v1/route'


def assert_openai_error(r: httpx.Response):
  """A 4xx/5xx reply in OpenAI's error layout: {"error": {"message", "type", ...}}."""
  body = r.json()
  assert set(body['error']) >= {'message', 'type', 'param', 'code'}, r.text
  assert isinstance(body['error']['message'], str) and body['error']['message']
  assert isinstance(body['error']['type'], str) and body['error']['type']


# ================================================================ batcher ===
def test_micro_batcher_fails_only_the_poisoned_item():
  calls = []

  def fn(items):
    calls.append(list(items))
    if 'poison' in items:
      raise ValueError('cannot read poison')
    return [2 * x for x in items]

  async def go():
    batcher = MicroBatcher(fn, max_batch=64, max_wait_ms=200)
    await batcher.start()
    items = list(range(16)) + ['poison'] + list(range(16, 32))
    out = await asyncio.gather(*[batcher.submit(x) for x in items], return_exceptions=True)
    alone = await asyncio.gather(batcher.submit('poison'), return_exceptions=True)
    await batcher.stop()
    return items, out, alone[0]

  items, out, alone = asyncio.run(go())
  for item, result in zip(items, out):
    if item == 'poison':
      assert isinstance(result, ValueError) and 'poison' in str(result)
    else:
      assert result == 2 * item
  assert len(calls[0]) == 33                            # they shared one batch ...
  assert [len(c) for c in calls[1:34]] == [1] * 33      # ... which ran again item by item
  assert isinstance(alone, ValueError) and calls[-1] == ['poison']   # a batch of one: once


# ========================================================== the real server ===
def test_a_poisoned_request_among_32_fails_alone(served):
  """A lone surrogate in one user message, 32 innocent requests beside it."""
  base = served[0]
  poisoned = b'{"model": "router", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'

  async def trial(k):
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=30) as http:
      calls = [http.post(CHAT, json={'model': 'router', 'messages': [
          {'role': 'user', 'content': f'{QUERIES[i % 4]} (trial {k}, request {i})'}]})
               for i in range(32)]
      calls.insert(k * 7 % 33, http.post(CHAT, content=poisoned,
                                         headers={'content-type': 'application/json'}))
      return await asyncio.gather(*calls)

  for k in range(3):
    replies = asyncio.run(trial(k))
    bad = replies.pop(k * 7 % 33)
    assert bad.status_code == 400, bad.text
    assert_openai_error(bad)
    assert bad.json()['error']['param'] == 'messages[0].content'
    assert 'surrogate' in bad.json()['error']['message']
    assert [r.status_code for r in replies] == [200] * 32, [r.text for r in replies]


@pytest.mark.parametrize('raw, param', [
    (b'{"model": "router", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
     'temperature'),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
     'top_p'),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "n": -Infinity}', 'n'),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "seed": 1e400}',
     'seed'),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "user": "\\udfff"}',
     'user'),
    (b'{"model": "router", "messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "a\\ud83d"}]}]}', 'messages[0].content[0].text'),
    (b'{"model": "router", "cost_weight": 1' + b'0' * 400 + b', "messages": '
     b'[{"role": "user", "content": "hi"}]}', 'cost_weight'),
])
def test_non_json_numbers_and_invalid_unicode_get_400_naming_the_field(served, raw, param):
  r = httpx.post(f'{served[0]}{CHAT}', content=raw,
                 headers={**auth(), 'content-type': 'application/json'})
  assert r.status_code == 400, r.text
  assert_openai_error(r)
  assert r.json()['error']['param'] == param
  assert param in r.json()['error']['message']


def test_unknown_paths_and_methods_get_openai_errors(served):
  r = httpx.get(f'{served[0]}/v1/nothing', headers=auth())
  assert r.status_code == 404 and r.json()['error']['code'] == 'not_found'
  r = httpx.get(f'{served[0]}{CHAT}', headers=auth())
  assert r.status_code == 405 and r.json()['error']['code'] == 'method_not_allowed'
  assert r.headers['x-entrorouter-request-id'].startswith('req-')


# ------------------------------------------------------------------- fuzz ---
LONE = st.sampled_from(['\ud800', 'x\udfff', '\udbff\udbff', 'ok \ud83d'])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10 ** 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), LONE,
    st.sampled_from(['', ' ', 'router', 'user', 'text', '\x00', '\u2028', 'NaN']))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), LONE), inner,
                                                 max_size=4)), max_leaves=12)
KEYS = st.sampled_from(['model', 'messages', 'stream', 'cost_weight', 'temperature', 'n', 'tools',
                        'query', 'user', 'max_tokens', 'response_format', 'seed', 'top_p'])
SPOTS = st.sampled_from(['body', 'message', 'part'])


@st.composite
def malformed_requests(draw):
  """(endpoint, body bytes): a good body with fields replaced, dropped or added, then
  written as Python's lenient JSON (NaN, Infinity, escaped or raw surrogates) and
  sometimes cut or corrupted byte-wise."""
  endpoint = draw(st.sampled_from([CHAT, CHAT, CHAT, ROUTE]))
  query = draw(st.sampled_from(QUERIES))
  message = {'role': 'user', 'content': query}
  if draw(st.booleans()):
    message['content'] = [{'type': 'text', 'text': query}]
  body = {'model': 'router', 'messages': [message]} if endpoint == CHAT else {'query': query}
  for _ in range(draw(st.integers(1, 3))):
    content = message.get('content')
    part = content[0] if isinstance(content, list) and content and \
        isinstance(content[0], dict) else message
    target = {'body': body, 'message': message, 'part': part}[draw(SPOTS)]
    key = draw(st.one_of(KEYS, st.sampled_from(['role', 'content', 'type', 'text']),
                         st.text(max_size=6), LONE))
    if draw(st.integers(0, 4)) == 0:
      target.pop(key, None)
    else:
      target[key] = draw(VALUES)
  text = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
  raw = text.encode('utf-8', 'surrogatepass')   # raw lone surrogates: bytes that are not UTF-8
  cut = draw(st.integers(0, 9))
  if cut == 0:
    raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
  elif cut == 1:
    at = draw(st.integers(0, len(raw)))
    raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
  return endpoint, raw


@pytest.fixture(scope='module')
def fuzz_client(served):
  with httpx.Client(base_url=served[0], timeout=30,
                    headers={**auth(), 'content-type': 'application/json'}) as http:
    yield http


@settings(max_examples=1200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=malformed_requests())
def test_fuzzed_bodies_never_get_a_500(fuzz_client, request):
  endpoint, raw = request
  r = fuzz_client.post(endpoint, content=raw)
  assert r.status_code < 500, (raw, r.status_code, r.text)
  if r.status_code >= 400:
    assert_openai_error(r)


def test_after_the_fuzz_the_server_serves_and_counted_no_500(served, fuzz_client):
  # Runs after the fuzz in file order; on its own (or on another test worker) it sends
  # one bad body itself.
  assert fuzz_client.post(CHAT, content=b'{"model": NaN}').status_code == 400
  r = fuzz_client.post(CHAT, json={'model': 'router',
                                   'messages': [{'role': 'user', 'content': QUERIES[0]}]})
  assert r.status_code == 200 and r.json()['choices'][0]['message']['content']
  metrics = fuzz_client.get('/metrics').text
  # (A 502 from a test of upstreams all down may share this server: 500 is the server's own.)
  assert not re.search(r'entrorouter_requests_total{[^}]*status="500"} [1-9]', metrics)
  assert re.search(r'entrorouter_requests_total{endpoint="/v1/chat/completions",'
                   r'status="400"} [1-9]', metrics)


# ============================================================ the app in process ===
def test_a_forward_failing_on_one_text_fails_that_request_alone(serve_workdir):
  """An unforeseen error inside the shared forward: the batch runs again item by item,
  the 32 innocent requests are answered, the poisoned one gets an OpenAI-style 500
  naming its request id and none of the server's internals."""
  router = router_lib.load_router(serve_workdir)
  probs = router.probs

  def probs_that_fail_on_poison(texts, *args, **kwargs):
    if any('POISON' in t for t in texts):
      raise RuntimeError('secret internals: /srv/weights/shard-3 is corrupt')
    return probs(texts, *args, **kwargs)

  router.probs = probs_that_fail_on_poison
  endpoints = {n: readers.Endpoint(n, 'http://127.0.0.1:9/v1') for n in router.model_names}
  app = serve.create_app(router, endpoints, serve.Settings(max_wait_ms=200, max_batch=64),
                         warm_up=False)
  texts = [f'{QUERIES[i % 4]} ({i})' for i in range(32)]
  texts.insert(11, 'POISON pill')

  async def go():
    async with app.router.lifespan_context(app):
      transport = httpx.ASGITransport(app=app)
      async with httpx.AsyncClient(transport=transport, base_url='http://app') as http:
        replies = await asyncio.gather(*[http.post(ROUTE, json={'query': t}) for t in texts])
        metrics = (await http.get('/metrics')).text
    return replies, metrics

  replies, metrics = asyncio.run(go())
  bad = replies.pop(11)
  assert bad.status_code == 500
  assert_openai_error(bad)
  request_id = bad.headers['x-entrorouter-request-id']
  assert request_id in bad.json()['error']['message']
  assert 'secret' not in bad.text and 'shard' not in bad.text and 'RuntimeError' not in bad.text
  assert [r.status_code for r in replies] == [200] * 32
  want = probs([t for t in texts if 'POISON' not in t])
  got = np.array([[r.json()['probs'][n] for n in router.model_names] for r in replies])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert len({r.headers['x-entrorouter-request-id'] for r in replies} | {request_id}) == 33
  assert re.search(r'entrorouter_requests_total{endpoint="/v1/route",status="500"} 1\.0',
                   metrics)
  # The shared forward was tried once with all 33 (then item by item, not counted).
  count = float(re.search(r'^entrorouter_batch_size_count (\S+)$', metrics, re.M).group(1))
  assert count == 32
