"""Reading a request: the bearer token, the body limit, strict JSON, and what the router
reads of a chat or route body. Every problem raises `RequestError` naming the field."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Optional

from entrorouter_jax import strict_json
from entrorouter_jax.serving.errors import RequestError
from entrorouter_jax.serving.tools import tool_result_ids

ROUTER_MODEL = 'router'
# The cookie GET /dashboard?token=T sets: an HMAC of the token, not the token itself, and
# good only for the dashboard's reads (the page, its files, GET /v1/stats).
DASHBOARD_COOKIE = 'entrorouter_dashboard'


def authorize(request, token: Optional[str]) -> None:
  """401 unless the request carries "Authorization: Bearer <token>" (None: no auth)."""
  if token is None:
    return
  header = request.headers.get('authorization', '')
  scheme, _, given = header.partition(' ')
  if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(),
                                                           token.encode()):
    raise RequestError(401, 'missing or wrong bearer token; expected the header '
                       '"Authorization: Bearer <token>"', None, 'authentication_error',
                       'invalid_api_key')


def dashboard_cookie(token: str) -> str:
  """Returns the dashboard cookie's value for bearer token `token`: HMAC-SHA256 of a fixed
  label keyed by the token (hex), so the cookie changes with the token and reveals nothing
  of it."""
  return hmac.new(token.encode(), b'entrorouter dashboard cookie', hashlib.sha256).hexdigest()


def authorize_read(request, token: Optional[str]) -> None:
  """401 unless the request carries the bearer token or the dashboard cookie of it (None: no
  auth). For the dashboard's GETs only: the cookie opens nothing that spends or changes."""
  if token is None:
    return
  cookie = request.cookies.get(DASHBOARD_COOKIE)
  if cookie is not None and hmac.compare_digest(cookie.encode(),
                                                dashboard_cookie(token).encode()):
    return
  header = request.headers.get('authorization', '')
  scheme, _, given = header.partition(' ')
  if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(),
                                                           token.encode()):
    raise RequestError(401, 'missing or wrong bearer token; expected the header '
                       '"Authorization: Bearer <token>", or, in a browser, '
                       '/dashboard?token=<token> opened once (it sets a cookie)', None,
                       'authentication_error', 'invalid_api_key')


async def read_json(request, max_bytes: int, lists: bool = False):
  """The body as a strict-JSON object (or, with `lists`, an object or a list); 413 past
  `max_bytes` (read no further), 400 otherwise."""
  length = request.headers.get('content-length')
  if length is not None and length.isdigit() and int(length) > max_bytes:
    raise RequestError(413, f'request body of {length} bytes is over the limit of '
                       f'{max_bytes} bytes', None, 'invalid_request_error',
                       'request_too_large')
  body = bytearray()
  async for chunk in request.stream():
    body.extend(chunk)
    if len(body) > max_bytes:
      raise RequestError(413, f'request body is over the limit of {max_bytes} '
                         'bytes', None, 'invalid_request_error', 'request_too_large')
  try:
    data = strict_json.loads(bytes(body))
  except strict_json.JsonError as e:
    raise RequestError(400, f'the request body is not strict JSON: {e.message}; expected a '
                       'JSON object (RFC 8259, UTF-8)', e.field) from None
  if not isinstance(data, dict) and not (lists and isinstance(data, list)):
    kind = {list: 'array', str: 'string', bool: 'boolean'}.get(type(data), type(data).__name__)
    raise RequestError(400, f'the request body is a JSON {kind}; expected an object'
                       + (' or a list of objects' if lists else ''))
  return data


def message_text(content, where: str) -> str:
  """The text of a message's content: a string, or OpenAI's list of parts."""
  if content is None:
    return ''
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for i, part in enumerate(content):
      if not isinstance(part, dict) or not isinstance(part.get('type'), str):
        raise RequestError(400, f'{where}.content[{i}] is {part!r}; expected a content part '
                           'object with a "type"', f'{where}.content')
      if part['type'] == 'text':
        if not isinstance(part.get('text'), str):
          raise RequestError(400, f'{where}.content[{i}].text is missing; expected a string',
                             f'{where}.content')
        texts.append(part['text'])
    return '\n'.join(texts)
  raise RequestError(400, f'{where}.content is {type(content).__name__}; expected a string '
                     'or a list of content parts', f'{where}.content')


def conversation_text(messages, route_on: str) -> str:
  """What the router reads of a chat request (after checking `messages`)."""
  if not isinstance(messages, list) or not messages:
    raise RequestError(400, 'messages is missing or empty; expected a non-empty list of '
                       '{"role", "content"} objects', 'messages')
  texts = []
  for i, m in enumerate(messages):
    where = f'messages[{i}]'
    if not isinstance(m, dict):
      raise RequestError(400, f'{where} is {type(m).__name__}; expected an object with '
                         '"role" and "content"', where)
    if not isinstance(m.get('role'), str) or not m['role']:
      raise RequestError(400, f'{where}.role is {m.get("role")!r}; expected a string such as '
                         '"user"', f'{where}.role')
    texts.append((m['role'], message_text(m.get('content'), where)))
  if route_on == 'last_user':
    users = [t for role, t in texts if role == 'user' and t.strip()]
    text = users[-1] if users else ''
  else:
    text = '\n'.join(t for _, t in texts if t.strip())
  if not text.strip():
    raise RequestError(400, 'messages hold no text to route on; expected a user message '
                       'with text content', 'messages')
  return text


def route_text(body: dict, route_on: str) -> tuple[str, str]:
  """(text, field) of a /v1/route body: {"query": ...} or {"messages": [...]}."""
  if 'query' in body:
    text = body['query']
    if not isinstance(text, str) or not text.strip():
      raise RequestError(400, f'query is {text!r}; expected a non-empty string', 'query')
    return text, 'query'
  if 'messages' in body:
    return conversation_text(body['messages'], route_on), 'messages'
  raise RequestError(400, 'query is missing; expected {"query": "..."} or {"messages": '
                     '[...]}', 'query')


def explore_field(body: dict) -> bool:
  """The body's "explore" (default true): false routes this request by the argmax even
  when the server explores (--explore > 0). 400 naming the field unless a JSON boolean."""
  explore = body.get('explore', True)
  if not isinstance(explore, bool):
    shown = repr(explore) if len(repr(explore)) <= 40 else repr(explore)[:40] + '...'
    raise RequestError(400, f'explore is {shown}; expected true or false', 'explore')
  return explore


def offers_tools(body: dict) -> bool:
  """Whether a chat or route body offers tools (a non-empty "tools" list)."""
  return isinstance(body.get('tools'), list) and bool(body['tools'])


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A checked chat request: the model asked for ("router" or a served pool model), the
  text to route on, whether to stream, whether it may be explored, whether it offers
  tools, and the tool-call ids its closing "tool" messages answer."""
  model: str
  text: str
  stream: bool
  explore: bool = True
  tools: bool = False
  tool_results: tuple = ()


def chat_request(body: dict, served: list, route_on: str) -> ChatRequest:
  """Checks a /v1/chat/completions body against the served models; returns it as a
  ChatRequest (RequestError naming the field otherwise)."""
  model = body.get('model')
  if not isinstance(model, str) or not model:
    raise RequestError(400, f'model is {model!r}; expected "router" or one of the pool '
                       f'models {served}', 'model')
  text = conversation_text(body.get('messages'), route_on)
  stream = body.get('stream', False)
  if not isinstance(stream, bool):
    raise RequestError(400, f'stream is {stream!r}; expected true or false', 'stream')
  explore = explore_field(body)
  if model != ROUTER_MODEL:
    if model not in served:
      raise RequestError(404, f'model {model!r} is not served here; expected "router" or '
                         f'one of {served}', 'model', 'invalid_request_error',
                         'model_not_found')
    if 'cost_weight' in body:
      raise RequestError(400, f'cost_weight applies to "model": "router" only; model is '
                         f'{model!r}', 'cost_weight')
  return ChatRequest(model, text, stream, explore, offers_tools(body),
                     tuple(tool_result_ids(body['messages'])))


MAX_FEEDBACK_ITEMS = 1000


def feedback_items(body) -> list[tuple[str, str, float]]:
  """The (where, id, score) of each item of a /v1/feedback body: {"id", "score"} or a list
  of 1 to MAX_FEEDBACK_ITEMS such objects (`where`: '' or '[i].'; other keys are ignored).
  RequestError 400 naming the field for anything else; returns only when all are good."""
  single = isinstance(body, dict)
  items = [body] if single else body
  if not single and not 1 <= len(items) <= MAX_FEEDBACK_ITEMS:
    raise RequestError(400, f'the body is a list of {len(items)} items; expected 1 to '
                       f'{MAX_FEEDBACK_ITEMS} {{"id", "score"}} objects')
  out = []
  for i, item in enumerate(items):
    where = '' if single else f'[{i}]'
    if not isinstance(item, dict):
      raise RequestError(400, f'{where} is a JSON {type(item).__name__}; expected an object '
                         '{"id": "<request id>", "score": <number in [0, 1]>}', where)
    prefix = f'{where}.' if where else ''
    request_id = item.get('id')
    if not isinstance(request_id, str) or not request_id:
      shown = 'missing' if 'id' not in item else f'{request_id!r}'[:60]
      raise RequestError(400, f'{prefix}id is {shown}; expected the request id (a routed '
                         'completion\'s "id", or the x-entrorouter-request-id header) as a '
                         'string', f'{prefix}id')
    score = item.get('score')
    if (isinstance(score, bool) or not isinstance(score, (int, float))
        or not 0 <= score <= 1):
      shown = 'missing' if 'score' not in item else f'{score!r}'[:60]
      raise RequestError(400, f'{prefix}score is {shown}; expected a number in [0, 1]',
                         f'{prefix}score')
    out.append((prefix, request_id, float(score)))
  return out
