"""Errors in OpenAI's layout: `RequestError` (a bad request, or every upstream down), the
exception handlers that answer it and Starlette's own 4xx, and `ErrorBoundary`, the
middleware that puts a request id on every reply and answers anything unforeseen with a
500 naming that id."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Optional

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

log = logging.getLogger('entrorouter_jax.serve')

REQUEST_ID_HEADER = 'x-entrorouter-request-id'


class RequestError(Exception):
  """A request the server answers with an error: HTTP status, message, the offending
  field; `headers` and `extra` (top-level fields beside "error") go into the reply."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               kind: str = 'invalid_request_error', code: Optional[str] = None, *,
               headers: Optional[dict] = None, extra: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
    self.headers, self.extra = headers, extra or {}


def error_body(message: str, kind: str = 'invalid_request_error', param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
  """OpenAI's error layout."""
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


async def request_error_reply(_request, e: RequestError) -> JSONResponse:
  """The exception handler of RequestError: its OpenAI-style reply."""
  return JSONResponse({**error_body(e.message, e.kind, e.param, e.code), **e.extra},
                      status_code=e.status, headers=e.headers)


def http_error_reply(paths):
  """The exception handler of Starlette's own 4xx (an unknown path, a wrong method), in
  OpenAI's error layout; `paths` are the app's endpoints."""

  async def reply(_request, e: HTTPException) -> JSONResponse:
    code = {404: 'not_found', 405: 'method_not_allowed'}.get(e.status_code)
    message = {404: f'no such endpoint; expected one of {sorted(paths)}',
               405: 'this endpoint does not take that method'}.get(e.status_code, str(e.detail))
    return JSONResponse(error_body(message, 'invalid_request_error', None, code),
                        status_code=e.status_code, headers=e.headers)

  return reply


def request_id_of(request) -> Optional[str]:
  """The id ErrorBoundary gave this request (its x-entrorouter-request-id header), or
  None outside ErrorBoundary."""
  return request.scope.get('state', {}).get('request_id')


class ErrorBoundary:
  """ASGI middleware: a request id on every reply, and no bare 500.

  The id ('req-' and 32 hex digits, fresh per request) is also in the scope's state,
  where endpoints read it (`request_id_of`). Anything an endpoint did not foresee is
  logged with the request's id and answered with an OpenAI-style 500 body that names
  the id and nothing of the server's internals (a stream already under way is closed
  instead). `on_error(path)` counts it.
  """

  def __init__(self, app, on_error=None):
    self.app, self.on_error = app, on_error

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    request_id = 'req-' + uuid.uuid4().hex
    # The endpoints read it as request.state.request_id (`request_id_of`).
    scope = {**scope, 'state': {**scope.get('state', {}), 'request_id': request_id}}
    replied = False

    async def send_with_id(message):
      nonlocal replied
      if message['type'] == 'http.response.start':
        replied = True
        message = {**message, 'headers': [*message.get('headers', []),
                                          (REQUEST_ID_HEADER.encode(), request_id.encode())]}
      await send(message)

    try:
      await self.app(scope, receive, send_with_id)
    except Exception:  # noqa: BLE001 -- the boundary: logged in full, answered without internals
      log.exception('request %s to %s failed unexpectedly', request_id, scope.get('path'))
      if self.on_error is not None:
        self.on_error(scope.get('path', ''))
      if replied:
        return
      body = json.dumps(error_body(
          f'the server could not answer this request (request id {request_id}); the server '
          'log has the details under that id', 'server_error', None, 'internal_error')).encode()
      await send({'type': 'http.response.start', 'status': 500, 'headers': [
          (b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
          (REQUEST_ID_HEADER.encode(), request_id.encode())]})
      await send({'type': 'http.response.body', 'body': body})
