"""What the server's tests and benchmark share: `Upstreams`, a fake OpenAI-compatible
upstream (one local HTTP server that plays every pool model, answers at once or as told:
down, slow, rejecting, and records what it receives), a free port for the server, and
the wait for it to come up."""

import http.server
import json
import re
import socket
import subprocess
import threading
import time


class Upstreams:
  """One local HTTP server playing every pool model at /<slug>/v1/chat/completions.

  `mode[slug]`: 'ok' (default), 'down' (503), 'slow' (answers after 10 s),
  'reject' (400, the request's fault). `seen` records (slug, body, authorization)
  unless `record` is False. `url(slug)` is a model's base_url. A request offering
  tools whose last message is not a tool result is answered with a call of its first
  tool, id "call-<slug>-<n>" (as a stream too); the tool's result then gets the
  answer "answer from <model> after <tool_call_id>". A reply's usage is 3 prompt and 3
  completion tokens, or what `usage(slug, body)` returns as (prompt, completion) tokens.
  """

  def __init__(self, record: bool = True, usage=None):
    self.mode, self.seen, self.lock, self.record = {}, [], threading.Lock(), record
    self.usage = usage or (lambda slug, body: (3, 3))
    self.calls = 0   # tool calls issued
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'
      disable_nagle_algorithm = True   # headers and body in separate writes: no 40 ms stall

      def log_message(self, *args):
        pass

      def do_POST(self):
        m = re.fullmatch(r'/([^/]+)/v1/chat/completions', self.path)
        body = json.loads(self.rfile.read(int(self.headers['content-length'])))
        slug = m.group(1) if m else '?'
        if outer.record:
          with outer.lock:
            outer.seen.append((slug, body, self.headers.get('authorization')))
        mode = outer.mode.get(slug, 'ok')
        if mode == 'slow':
          time.sleep(10)
        if mode in ('down', 'reject') or not m:
          status = 400 if mode == 'reject' else 503
          data = json.dumps({'error': {'message': f'{slug} says {mode}', 'type': mode}}).encode()
          self.send_response(status)
          self.send_header('content-type', 'application/json')
          self.send_header('content-length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
          return
        text = f'answer from {body["model"]}'
        messages = body.get('messages') or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        call = None
        if last.get('role') == 'tool':
          text += f' after {last.get("tool_call_id")}'
        elif isinstance(body.get('tools'), list) and body['tools']:
          tool = body['tools'][0] if isinstance(body['tools'][0], dict) else {}
          function = tool.get('function')
          name = function.get('name', 'tool') if isinstance(function, dict) else 'tool'
          with outer.lock:
            outer.calls += 1
            call = {'id': f'call-{slug}-{outer.calls}', 'type': 'function',
                    'function': {'name': str(name), 'arguments': '{}'}}
        if body.get('stream') and call is not None:
          self.send_response(200)
          self.send_header('content-type', 'text/event-stream')
          self.send_header('connection', 'close')
          self.end_headers()
          first = {**call, 'index': 0, 'function': {**call['function'], 'arguments': ''}}
          for delta, finish in (({'role': 'assistant', 'tool_calls': [first]}, None),
                                ({'tool_calls': [{'index': 0, 'function': {'arguments': '{}'}}]},
                                 'tool_calls')):
            chunk = {'id': 'c1', 'object': 'chat.completion.chunk', 'created': 1,
                     'model': body['model'], 'choices': [
                         {'index': 0, 'delta': delta, 'finish_reason': finish}]}
            self.wfile.write(f'data: {json.dumps(chunk)}\n\n'.encode())
          self.wfile.write(b'data: [DONE]\n\n')
          self.close_connection = True
          return
        if body.get('stream'):
          self.send_response(200)
          self.send_header('content-type', 'text/event-stream')
          self.send_header('connection', 'close')
          self.end_headers()
          for piece in ('answer ', 'from ', body['model']):
            chunk = {'id': 'c1', 'object': 'chat.completion.chunk', 'created': 1,
                     'model': body['model'], 'choices': [
                         {'index': 0, 'delta': {'content': piece}, 'finish_reason': None}]}
            self.wfile.write(f'data: {json.dumps(chunk)}\n\n'.encode())
          self.wfile.write(b'data: [DONE]\n\n')
          self.close_connection = True
          return
        message = ({'role': 'assistant', 'content': None, 'tool_calls': [call]} if call
                   else {'role': 'assistant', 'content': text})
        prompt, completion = outer.usage(slug, body)
        data = json.dumps({
            'id': 'c1', 'object': 'chat.completion', 'created': 1, 'model': body['model'],
            'choices': [{'index': 0, 'finish_reason': 'tool_calls' if call else 'stop',
                         'message': message}],
            'usage': {'prompt_tokens': prompt, 'completion_tokens': completion,
                      'total_tokens': prompt + completion}}).encode()
        self.send_response(200)
        self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    http.server.ThreadingHTTPServer.request_queue_size = 1024  # hundreds connect at once
    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.server.daemon_threads = True
    self.port = self.server.server_address[1]
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def url(self, slug: str) -> str:
    return f'http://127.0.0.1:{self.port}/{slug}/v1'

  def close(self):
    self.server.shutdown()


def free_port() -> int:
  """A TCP port on 127.0.0.1 free for a server to bind."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_until_healthy(base: str, proc: subprocess.Popen, timeout: float) -> bool:
  """Whether the server at `base` (run by `proc`) answers /healthz with 200 within
  `timeout` seconds; False, and `proc` killed, if it exits or does not in time."""
  import httpx
  deadline = time.time() + timeout
  while True:
    try:
      if httpx.get(f'{base}/healthz', timeout=2).status_code == 200:
        return True
    except httpx.HTTPError:
      pass
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      return False
    time.sleep(0.5)
