"""Agent traffic: requests with tools go to tool-capable pool models, and a follow-up ending
in a tool result goes to the model that made the call; with the official openai client on
the app in process (its tiny router from conftest's `serve_workdir`, the local fake
upstreams, which answer a request offering tools with a call of its first tool)."""

import json

import httpx
import pytest

from benchmarks.fake_upstream import Upstreams
from entrorouter_jax import feedback as feedback_lib, router as router_lib, serve
from entrorouter_jax.data import readers
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.serving import tools as tools_lib
from serving import QUERIES, slug
from test_serve_learning import in_process

openai = pytest.importorskip('openai')

TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The weather in a city.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}}}}]


@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


@pytest.fixture
def upstreams():
  u = Upstreams()
  yield u
  u.close()


def make_app(router, upstreams, tmp_path, tool_models, **settings):
  """The app over local upstreams, the pool marking `tool_models` tools: true, exploring
  uniformly (explore=1: a fresh route lands anywhere), its decision log in tmp_path/log."""
  pool = {n: {'price_in': 1.0, 'price_out': 1.0, 'base_url': upstreams.url(slug(n)),
              **({'tools': True} if n in tool_models else {})} for n in router.model_names}
  (tmp_path / 'pool.json').write_text(json.dumps(pool))
  settings = {'max_wait_ms': 0, 'explore': 1.0, 'seed': 5,
              'decisions': str(tmp_path / 'log'), **settings}
  return serve.create_app(router, readers.read_endpoints(tmp_path / 'pool.json'),
                          serve.Settings(**settings), warm_up=False)


def client_for(http):
  return openai.AsyncOpenAI(base_url='http://app/v1', api_key='unused', max_retries=0,
                            http_client=http)


def follow_up(question, call_reply):
  """The conversation a client sends after running the tool calls of `call_reply`."""
  message = call_reply.choices[0].message
  calls = [c.model_dump() for c in message.tool_calls]
  return [{'role': 'user', 'content': question},
          {'role': 'assistant', 'content': None, 'tool_calls': calls},
          *({'role': 'tool', 'tool_call_id': c['id'], 'content': '{"temp_c": 21}'}
            for c in calls)]


def decision_lines(tmp_path):
  return [json.loads(line) for p in sorted((tmp_path / 'log').glob('decisions-*.jsonl'))
          for line in p.read_text().splitlines()]


@pytest.mark.parametrize('stream', [False, True])
def test_a_tool_result_goes_back_to_the_model_that_made_the_call(router, upstreams, tmp_path,
                                                                 stream):
  capable = router.model_names[1::2]   # every other model takes tools
  app = make_app(router, upstreams, tmp_path, capable)
  rounds = 12

  async def calls(http):
    client, out = client_for(http), []
    for i in range(rounds):
      question = f'{QUERIES[i % len(QUERIES)]} (and the weather in Oslo?) #{i}'
      messages = [{'role': 'user', 'content': question}]
      if stream:
        raw = await client.chat.completions.with_raw_response.create(
            model='router', messages=messages, tools=TOOLS, stream=True)
        issuer = raw.headers['x-entrorouter-model']
        parts = [chunk async for chunk in raw.parse()]
        call_id = next(c.choices[0].delta.tool_calls[0].id for c in parts
                       if c.choices and c.choices[0].delta.tool_calls)
        conversation = [messages[0], {'role': 'assistant', 'content': None, 'tool_calls': [
            {'id': call_id, 'type': 'function',
             'function': {'name': 'get_weather', 'arguments': '{}'}}]},
                        {'role': 'tool', 'tool_call_id': call_id, 'content': '21 C'}]
        first_id = raw.headers['x-entrorouter-request-id']
      else:
        first = await client.chat.completions.create(model='router', messages=messages,
                                                      tools=TOOLS)
        issuer, call_id, first_id = first.model, first.choices[0].message.tool_calls[0].id, first.id
        conversation = follow_up(question, first)
      second = await client.chat.completions.create(model='router', messages=conversation,
                                                     tools=TOOLS)
      out.append((issuer, call_id, first_id, second))
    metrics = (await http.get('/metrics')).text
    return out, metrics

  out, metrics = in_process(app, calls)
  lines = {line['id']: line for line in decision_lines(tmp_path)}
  assert len(lines) == 2 * rounds
  issuers = set()
  for issuer, call_id, first_id, second in out:
    issuers.add(issuer)
    assert issuer in capable   # a request offering tools: tool-capable models only
    assert call_id.startswith(f'call-{slug(issuer)}-')
    assert second.model == issuer   # explore=1 would otherwise land anywhere
    assert second.choices[0].message.content == f'answer from {issuer} after {call_id}'
    first_line, second_line = lines[first_id], lines[second.id]
    assert first_line['explored'] and first_line['propensity'] == pytest.approx(1 / len(capable))
    assert first_line['follows'] is None
    assert second_line['follows'] == first_id and second_line['model'] == issuer
    assert second_line['propensity'] == 1.0 and second_line['explored'] is False
  assert len(issuers) > 1   # the calls came from several models: stickiness was tested
  assert f'entrorouter_sticky_total {float(rounds)}' in metrics
  # the upstream that answered each follow-up is the one that issued its call
  follow_ups = [(s, b) for s, b, _ in upstreams.seen if b['messages'][-1]['role'] == 'tool']
  assert [s for s, _ in follow_ups] == [slug(i) for i, *_ in out]


def test_without_a_remembered_call_the_follow_up_is_routed_afresh(router, upstreams, tmp_path):
  """An unknown (or forgotten) tool-call id: routed like any request; a pool marking no model
  tools: true routes requests with tools among every served model."""
  app = make_app(router, upstreams, tmp_path, tool_models=(), tool_calls_max=1)

  async def calls(http):
    client = client_for(http)
    first = await client.chat.completions.create(
        model='router', messages=[{'role': 'user', 'content': QUERIES[0]}], tools=TOOLS)
    # a second call pushes the first out of a memory of one
    await client.chat.completions.create(
        model='router', messages=[{'role': 'user', 'content': QUERIES[1]}], tools=TOOLS)
    return first, await client.chat.completions.create(
        model='router', messages=follow_up(QUERIES[0], first), tools=TOOLS)

  first, second = in_process(app, calls)
  lines = {line['id']: line for line in decision_lines(tmp_path)}
  assert lines[second.id]['follows'] is None and lines[second.id]['explored'] is True
  assert lines[first.id]['propensity'] == pytest.approx(1 / len(router.model_names))


def test_a_named_model_s_call_is_remembered_too(router, upstreams, tmp_path):
  name = router.model_names[0]
  app = make_app(router, upstreams, tmp_path, tool_models=())

  async def calls(http):
    client = client_for(http)
    first = await client.chat.completions.create(
        model=name, messages=[{'role': 'user', 'content': QUERIES[2]}], tools=TOOLS)
    return await client.chat.completions.create(
        model='router', messages=follow_up(QUERIES[2], first), tools=TOOLS)

  second = in_process(app, calls)
  assert second.model == name
  (line,) = decision_lines(tmp_path)   # the named request is not a decision
  assert line['follows'] is not None and line['model'] == name


def test_tool_calls_memory_is_bounded_in_size_and_age():
  now = [0.0]
  memory = tools_lib.ToolCalls(max_entries=3, ttl=10.0, clock=lambda: now[0])
  a, b = tools_lib.Issuer('a', 'req-a'), tools_lib.Issuer('b', 'req-b')
  memory.remember(['c1', 'c2'], a)
  now[0] = 5.0
  memory.remember(['c3', 'c4'], b)   # c1 leaves: 3 at most
  assert len(memory) == 3 and memory.issuer(['c1']) is None
  assert memory.issuer(['c2']) == a and memory.issuer(['c2', 'c3']) == b   # the latest
  now[0] = 12.0   # c2 (t=0) expired, c3 and c4 (t=5) not
  assert memory.issuer(['c2']) is None and memory.issuer(['c4']) == b and len(memory) == 2
  now[0] = 15.5
  assert memory.issuer(['c3', 'c4']) is None and len(memory) == 0
  with pytest.raises(ValueError, match='max_entries'):
    tools_lib.ToolCalls(max_entries=0)


def test_reading_call_ids_from_replies_chunks_and_conversations():
  reply = {'choices': [{'message': {'tool_calls': [{'id': 'x1'}, {'id': 'x2'}, {'id': ''},
                                                   'junk']}},
                       {'message': {'content': 'hi'}}, 'junk']}
  assert tools_lib.reply_call_ids(reply) == ['x1', 'x2']
  assert tools_lib.reply_call_ids({'choices': 'no'}) == []
  assert tools_lib.chunk_call_ids({'choices': [{'delta': {'tool_calls': [
      {'index': 0, 'id': 'y1'}]}}]}) == ['y1']
  assert tools_lib.chunk_call_ids({'choices': [{'delta': {'tool_calls': [
      {'index': 0, 'function': {'arguments': '{}'}}]}}]}) == []
  messages = [{'role': 'user', 'content': 'q'}, {'role': 'tool', 'tool_call_id': 'a'},
              {'role': 'tool', 'tool_call_id': 'b'}]
  assert sorted(tools_lib.tool_result_ids(messages)) == ['a', 'b']
  assert tools_lib.tool_result_ids(messages + [{'role': 'user', 'content': 'more'}]) == []


def test_pool_tools_must_be_a_boolean(tmp_path):
  path = tmp_path / 'pool.yaml'
  path.write_text('m: {price_in: 1, price_out: 1, base_url: "http://h:1/v1", tools: "yes"}\n')
  with pytest.raises(DataError, match=r"pool.yaml: entry 'm': field tools is 'yes'; expected "
                     'true'):
    readers.read_endpoints(path)
  path.write_text('m: {price_in: 1, price_out: 1, base_url: "http://h:1/v1", tools: true}\n')
  assert readers.read_endpoints(path)['m'].tools is True


def test_a_follow_up_s_score_scores_the_decision_it_follows(tmp_path):
  """feedback.join: the follow-up's line is no row; its (later) score goes to the decision
  that chose the model, and a score of a follow-up whose decision is not logged is unknown."""
  base = {'endpoint': 'chat', 'text': 'q', 'model': 'm', 'answered_by': 'm', 'propensity': 0.5,
          'explored': True, 'cost_weight': None, 'version': 'v', 'usage': None, 'cost': 0.01,
          'latency_ms': 1.0, 'status': 200, 'fallbacks': [], 'time': 1.0}
  lines = [{**base, 'id': 'root', 'follows': None},
           {**base, 'id': 'next', 'follows': 'root', 'propensity': 1.0},
           {**base, 'id': 'orphan', 'follows': 'req-not-logged', 'propensity': 1.0}]
  (tmp_path / 'decisions-0001.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  (tmp_path / 'feedback-0001.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in [
      {'id': 'root', 'score': 0.1, 'time': 5.0}, {'id': 'next', 'score': 0.9, 'time': 6.0},
      {'id': 'orphan', 'score': 0.5, 'time': 7.0}]))
  joined = feedback_lib.join(tmp_path)
  assert [(r['id'], r['score']) for r in joined.rows] == [('root', 0.9)]
  assert joined.dropped['follow_up'] == 2 and joined.unknown_scores == 1
  assert 'tool-call follow-ups 2' in joined.summary('x.csv')
