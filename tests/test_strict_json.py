"""strict_json: RFC 8259 JSON and valid Unicode only, every error naming its field or line."""

import json

import pytest

from entrorouter_jax import strict_json
from entrorouter_jax.strict_json import JsonError


def fails(text, *fragments, field=None):
  """loads(text) raises JsonError holding every fragment, with `field` set as given."""
  with pytest.raises(JsonError) as e:
    strict_json.loads(text)
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))
  assert e.value.field == field
  return str(e.value)


@pytest.mark.parametrize('word', ['NaN', 'Infinity', '-Infinity', '1e400', '-1e400'])
def test_non_json_numbers_name_their_field(word):
  body = '{"model": "a", "messages": [{"role": "user", "content": %s}]}' % word
  fails(body, 'messages[0].content', word, 'not a JSON number', 'expected a finite number',
        field='messages[0].content')
  fails(word, 'the body', word, field=None)
  fails(f'[1, {word}]', '[1]', word, field='[1]')


def test_lone_surrogates_in_values_and_keys():
  fails('{"messages": [{"content": "ok \\ud800 then"}]}', 'messages[0].content',
        'lone surrogate', '\\ud800', 'position 3', 'expected valid UTF-8 text',
        field='messages[0].content')
  fails('["fine", "\\udfff"]', '[1]', '\\udfff', field='[1]')
  fails('{"a": {"b\\ud800": 1}}', 'a has a key', 'lone surrogate', field='a')
  # A surrogate pair is one valid character.
  assert strict_json.loads('{"e": "\\ud83d\\ude00"}') == {'e': '\U0001F600'}


def test_bytes_must_be_utf8():
  fails(b'{"q": "caf\xe9"}', 'byte 10', "b'\\xe9'", 'not UTF-8', 'expected UTF-8')
  assert strict_json.loads('{"q": "café"}'.encode()) == {'q': 'café'}


def test_syntax_errors_and_deep_nesting():
  fails('{"a": 1,}', 'not valid JSON', 'line 1 column')
  fails('{"a":\n tru}', 'not valid JSON', 'line 2')
  fails('[' * 100_000 + ']' * 100_000, 'nested too deeply')
  assert strict_json.loads('[' * 50 + ']' * 50) == json.loads('[' * 50 + ']' * 50)


def test_valid_bodies_round_trip_as_json_loads():
  body = json.dumps({'model': 'router', 'messages': [{'role': 'user', 'content': 'héllo ✓ 😀'}],
                     'temperature': 0.7, 'max_tokens': 12, 'n': -3, 'big': 10 ** 30,
                     'tiny': 5e-324, 'stop': None, 'stream': False, 'nested': [[], {}, [1.5e300]]})
  assert strict_json.loads(body) == json.loads(body)
  assert strict_json.loads(body.encode()) == json.loads(body)
  assert strict_json.invalid_text(json.loads(body)) is None
  assert strict_json.invalid_text({'a': ['x', 'y\ud800']}) == ('a[1]', 1)


def test_jsonl_and_utf8_files_name_the_line(tmp_path):
  path = tmp_path / 'q.jsonl'
  path.write_bytes(b'{"query": "a"}\n\n{"query": "b"}\n')
  assert strict_json.read_jsonl(path) == [(1, {'query': 'a'}), (3, {'query': 'b'})]
  path.write_bytes(b'{"query": "a"}\n{"query": "b", "score": NaN}\n')
  with pytest.raises(JsonError, match=r'q\.jsonl:2: score is NaN') as e:
    strict_json.read_jsonl(path)
  assert e.value.field == 'score'
  path.write_bytes(b'{"query": "a"}\n{"query": "\\ud800"}\n')
  with pytest.raises(JsonError, match=r'q\.jsonl:2: query holds .*lone surrogate'):
    strict_json.read_jsonl(path)
  path.write_bytes(b'{"query": "a"}\n\n{"query": "\xff"}\n')
  with pytest.raises(JsonError, match=r'q\.jsonl:3: .*not UTF-8'):
    strict_json.read_jsonl(path)
  text = tmp_path / 't.csv'
  text.write_bytes(b'prompt,a\nfine,1\nbr\xc3oken,0\n')
  with pytest.raises(JsonError, match=r"t\.csv:3: byte b'\\xc3' at column 3 is not UTF-8"):
    strict_json.check_utf8_file(text)
  text.write_bytes('prompt,a\ncafé,1\n'.encode())
  strict_json.check_utf8_file(text)
