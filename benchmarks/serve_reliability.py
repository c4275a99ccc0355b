"""The server under load: requests failed across hot reloads, decision lines lost at SIGTERM.

  python benchmarks/serve_reliability.py [--workdir=DIR] [--clients=64]

Starts `python -m entrorouter_jax.serve` on the router (without --workdir: a tiny
default-recipe router trained into a temporary folder, as the serving tests do) with
every pool model played by one local upstream that answers at once, and prints one
JSON line per figure (counts, never a pass or fail):
  serve_reloads   --clients concurrent clients send routed chat completions
                  ("model": "router") and /v1/route calls while POST /admin/reload
                  swaps the router 10 times, alternating between a copy of DIR whose
                  checkpoint has another mtime (another version) and DIR itself:
                  requests sent, failed_requests (any reply but 200, or no reply)
                  with their causes, each reload's duration (the "seconds" it
                  answers, and the wall time of the call), and whether every reload
                  answered 200 with the version of the workdir it was given
  serve_sigterm   a server with --decisions and --explore=0.1 under the same load is
                  sent SIGTERM once SIGNAL_AFTER requests have been answered; the
                  clients keep sending until their connections fail. acknowledged:
                  the ids of the requests answered 200 (a chat completion's "id" and
                  every reply's x-entrorouter-request-id); lost_lines: acknowledged ids
                  missing from DIR/decisions-*.jsonl; also lines logged twice, torn
                  lines, the exit status and how long the server took to exit.
Clients, upstream and server share this machine's cores.

tests/test_serve_shutdown.py runs `sigterm_under_load` against the test suite's server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = pathlib.Path(__file__).resolve().parents[1]

CHAT, ROUTE, RELOAD = '/v1/chat/completions', '/v1/route', '/admin/reload'
ID_HEADER = 'x-entrorouter-request-id'
TOKEN = 'bench-token-5d21'
SIGNAL_AFTER = 300   # requests answered before the SIGTERM
QUERIES = ['Prove that the sum of two even numbers is even.',
           'Write a Python function that reverses a list.',
           'Can my landlord keep the deposit for normal wear and tear?',
           'What is 17 times 23?']


# ------------------------------------------------------------------ server ---
@dataclasses.dataclass
class Server:
  """A running `entrorouter_jax.serve`: its base URL, process, upstreams and log file."""
  base: str
  proc: subprocess.Popen
  upstreams: object
  log_path: pathlib.Path
  token: str

  @property
  def headers(self) -> dict:
    return {'authorization': f'Bearer {self.token}'}


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '-', name.lower())


@contextlib.contextmanager
def launched(workdir, tmp, flags=(), token: str = TOKEN, env: Optional[dict] = None,
             start_timeout: float = 240):
  """`python -m entrorouter_jax.serve` on `workdir` in a subprocess (bearer `token`, every
  pool model's base_url on one local fake upstream, the pool file and server log in
  `tmp`, `flags` added), yielded as a Server once /healthz says ok; RuntimeError with
  the log's end if it does not come up. At exit the process, if still running, is
  terminated, and the upstreams closed."""
  from benchmarks.fake_upstream import Upstreams, free_port, wait_until_healthy
  workdir, tmp = pathlib.Path(workdir), pathlib.Path(tmp)
  names = json.loads((workdir / 'router.json').read_text())['model_names']
  upstreams = Upstreams(record=False)
  pool = {n: {'price_in': 1.0, 'price_out': 1.0, 'base_url': upstreams.url(slug(n)),
              'upstream_model': f'up-{slug(n)}', 'api_key_env': 'UPSTREAM_KEY'} for n in names}
  (tmp / 'pool.json').write_text(json.dumps(pool))
  port = free_port()
  log_path = tmp / 'serve.log'
  env = {'UPSTREAM_KEY': 'sk-upstream-bench', **os.environ, **(env or {}), 'ER_TOKEN': token}
  with log_path.open('w') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'entrorouter_jax.serve', f'--workdir={workdir}',
         f'--pool={tmp / "pool.json"}', f'--port={port}', '--auth_token_env=ER_TOKEN', *flags],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  server = Server(f'http://127.0.0.1:{port}', proc, upstreams, log_path, token)
  try:
    if not wait_until_healthy(server.base, proc, start_timeout):
      raise RuntimeError(f'the server did not come up: {log_path.read_text()[-3000:]}')
    yield server
  finally:
    if proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    upstreams.close()


def bumped_copy(workdir, destination) -> pathlib.Path:
  """`workdir` copied to `destination`, its first checkpoint file given an mtime 1 s later:
  the same router under another version (as tests/test_serve_reload.py's R1)."""
  from entrorouter_jax.serving import version as version_lib
  copy = pathlib.Path(shutil.copytree(workdir, destination))
  files = sorted(p for p in (copy / 'checkpoints').rglob('*') if p.is_file())
  stat = files[0].stat()
  os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert version_lib.router_version(copy) != version_lib.router_version(workdir)
  return copy


def train_tiny_router(tmp) -> pathlib.Path:
  """The tiny default-recipe router of the serving tests (tests/serving.py), in tmp/run."""
  from configs import rl as rl_config
  from entrorouter_jax import train
  tmp = pathlib.Path(tmp)
  config = rl_config.get_config()
  config.data.data_dir = str(tmp / 'tfds')
  config.data.synthetic.update(num_train=600, num_validation=50, num_test=200)
  config.anchor.update(space='tfidf', dim=32, k=20)
  config.model.update(members=2, hidden=32)
  config.sft.update(num_steps=30, batch_size=32, soft_weight_choices='', select_every=10)
  config.rl.update(num_steps=10, batch_size=32, select_every=5)
  config.eval_batch_size = 64
  train.train_and_evaluate(config, tmp / 'run')
  return tmp / 'run'


# ------------------------------------------------------------------- load ---
def _request(i: int, n: int) -> tuple[str, dict]:
  """Client i's n-th request: every fourth a /v1/route call, the rest routed chats."""
  text = f'{QUERIES[(i + n) % len(QUERIES)]} (client {i}, request {n})'
  if (i + n) % 4 == 0:
    return ROUTE, {'query': text}
  return CHAT, {'model': 'router', 'messages': [{'role': 'user', 'content': text}]}


def _ids_of(path: str, reply) -> list:
  """The request ids a 200 reply carries: its header, and a chat completion's "id"."""
  ids = [reply.headers.get(ID_HEADER)]
  if path == CHAT:
    try:
      ids.append(reply.json().get('id'))
    except ValueError:
      ids.append(None)
  return ids


def _http_client(clients: int):
  import httpx
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  return httpx.AsyncClient(timeout=30, limits=limits)


@dataclasses.dataclass
class SigtermRun:
  """What the clients saw around a SIGTERM: `acknowledged` {request id: endpoint} of every
  200 reply; `id_mismatches` the chat replies whose "id" and header differ (or lack one);
  `before` and `after` the replies (status code, or the exception's name) before and
  after the signal; `signalled_at` the requests answered when it was sent; `exit_code`
  (None: still running after the grace) and `exit_seconds` from signal to exit."""
  acknowledged: dict
  id_mismatches: list
  before: collections.Counter
  after: collections.Counter
  signalled_at: int
  exit_code: Optional[int]
  exit_seconds: float

  @property
  def acknowledged_after(self) -> int:
    """Requests answered 200 after the signal (in flight when it came)."""
    return self.after[200]


async def sigterm_under_load(server: Server, clients: int = 64, signal_after: int = SIGNAL_AFTER,
                             grace: float = 30.0) -> SigtermRun:
  """`clients` concurrent clients send requests (`_request`) to `server` until their
  connection fails; once `signal_after` requests have been answered the server is sent
  SIGTERM, and after the clients stop it is given `grace` seconds to exit. Before the
  signal a failed request is counted and the client goes on (unless the server is gone);
  after it, a client stops at its first reply that is not 200 or its first transport
  error. A reply counts as after the signal if it came after the signal was sent."""
  import httpx
  acknowledged, mismatches = {}, []
  before, after = collections.Counter(), collections.Counter()
  answered, signalled_at, signal_time = 0, 0, 0.0
  signalled, enough = asyncio.Event(), asyncio.Event()

  async def client(i: int, http):
    nonlocal answered
    for n in itertools.count():
      path, body = _request(i, n)
      try:
        reply = await http.post(server.base + path, json=body, headers=server.headers)
        outcome = reply.status_code
      except httpx.TransportError as e:
        outcome = type(e).__name__
      late = signalled.is_set()
      (after if late else before)[outcome] += 1
      if outcome == 200:
        ids = _ids_of(path, reply)
        if None in ids or len(set(ids)) != 1:
          mismatches.append(ids)
        acknowledged.update((request_id, path) for request_id in ids if request_id is not None)
        answered += 1
        if answered >= signal_after:
          enough.set()
      elif late or server.proc.poll() is not None:
        return
      else:
        await asyncio.sleep(0.05)

  def exited() -> tuple[Optional[int], float]:
    """(the exit status, or None if still running after `grace`; when that was seen)."""
    try:
      return server.proc.wait(grace), time.perf_counter()
    except subprocess.TimeoutExpired:
      return None, time.perf_counter()

  async def terminator():
    nonlocal signalled_at, signal_time
    await enough.wait()
    signalled_at, signal_time = answered, time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    signalled.set()
    return await asyncio.to_thread(exited)

  async with _http_client(clients) as http:
    stopper = asyncio.create_task(terminator())
    tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=grace + 60)
    for t in pending:   # still sending long after the signal: stopped here
      t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
      t.result()   # a client's own bug surfaces here
    if not signalled.is_set():
      stopper.cancel()
      raise RuntimeError(f'the server answered {answered} requests, fewer than the '
                         f'{signal_after} to send SIGTERM after; see {server.log_path}')
    code, exit_time = await stopper
  return SigtermRun(acknowledged, mismatches, before, after, signalled_at, code,
                    exit_time - signal_time)


def read_logged(directory) -> tuple[collections.Counter, list]:
  """(how often each id occurs in DIR/decisions-*.jsonl, the torn lines as "file:line: why"):
  a line is torn if it is not strict JSON, not an object with a string "id", or the
  file's last and without its newline."""
  from entrorouter_jax import strict_json
  counts, torn = collections.Counter(), []
  for path in sorted(pathlib.Path(directory).glob('decisions-*.jsonl')):
    raw = path.read_bytes()
    if raw and not raw.endswith(b'\n'):
      torn.append(f'{path.name}: the last line has no newline')

    def invalid(lineno, e, path=path):
      torn.append(f'{path.name}:{lineno}: {e.message}')

    for lineno, line in strict_json.iter_jsonl(path, on_invalid=invalid):
      if not isinstance(line, dict) or not isinstance(line.get('id'), str):
        torn.append(f'{path.name}:{lineno}: not an object with a string "id"')
        continue
      counts[line['id']] += 1
  return counts, torn


def sigterm_figure(run: SigtermRun, directory, clients: int) -> dict:
  """The serve_sigterm line: the run's counts against the decision log in `directory`."""
  logged, torn = read_logged(directory)
  acked = set(run.acknowledged)
  return {'figure': 'serve_sigterm', 'clients': clients, 'signal_after': run.signalled_at,
          'acknowledged': len(acked), 'acknowledged_after_signal': run.acknowledged_after,
          'logged': len(logged), 'lost_lines': len(acked - set(logged)),
          'logged_twice': sum(1 for c in logged.values() if c > 1),
          'torn_lines': len(torn), 'id_mismatches': len(run.id_mismatches),
          'replies_before_signal': {str(k): v for k, v in sorted(run.before.items(), key=str)},
          'replies_after_signal': {str(k): v for k, v in sorted(run.after.items(), key=str)},
          'exit_code': run.exit_code, 'exit_seconds': round(run.exit_seconds, 2)}


async def reloads_under_load(server: Server, workdirs: list, clients: int = 64,
                             pause: float = 0.05) -> dict:
  """`clients` concurrent clients send requests while POST /admin/reload loads each of
  `workdirs` in turn (`pause` s apart); the serve_reloads line."""
  import httpx
  from entrorouter_jax.serving import version as version_lib
  versions = [version_lib.router_version(w) for w in workdirs]
  replies = collections.Counter()
  done = asyncio.Event()

  async def client(i: int, http):
    n = 0
    while not done.is_set() or n == 0:
      path, body = _request(i, n)
      n += 1
      try:
        reply = await http.post(server.base + path, json=body, headers=server.headers)
        replies[reply.status_code] += 1
      except httpx.TransportError as e:
        replies[type(e).__name__] += 1

  reloads = []
  async with _http_client(clients + 1) as http:
    tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
    try:
      await asyncio.sleep(1.0)   # the load under way first
      for workdir in workdirs:
        t0 = time.perf_counter()
        try:
          r = await http.post(server.base + RELOAD, json={'workdir': str(workdir)},
                              headers=server.headers, timeout=120)
          status, answer = r.status_code, r.json() if r.status_code == 200 else {}
        except httpx.TransportError as e:
          status, answer = type(e).__name__, {}
        reloads.append({'status': status, 'version': answer.get('version'),
                        'seconds': answer.get('seconds'),
                        'wall_seconds': time.perf_counter() - t0})
        await asyncio.sleep(pause)
    finally:
      done.set()
    await asyncio.gather(*tasks)
  seconds = sorted(x['seconds'] for x in reloads if x['seconds'] is not None)
  return {'figure': 'serve_reloads', 'clients': clients, 'reloads': len(reloads),
          'reloads_ok': sum(x['status'] == 200 for x in reloads),
          'versions_as_asked': [x['version'] for x in reloads] == versions,
          'requests': sum(replies.values()),
          'failed_requests': sum(v for k, v in replies.items() if k != 200),
          'replies': {str(k): v for k, v in sorted(replies.items(), key=str)},
          'reload_seconds': [round(x['seconds'], 3) if x['seconds'] is not None else None
                             for x in reloads],
          'reload_wall_seconds': [round(x['wall_seconds'], 3) for x in reloads],
          'reload_seconds_median': round(seconds[len(seconds) // 2], 3) if seconds else None}


# ------------------------------------------------------------------- main ---
def reliability_figures(workdir: Optional[str] = None, clients: int = 64) -> list[dict]:
  """The serve_reloads and serve_sigterm lines (see the module docstring)."""
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if workdir is None:
      with contextlib.redirect_stdout(sys.stderr):   # stdout: the JSON lines only
        workdir = train_tiny_router(tmp / 'trained')
    workdir = pathlib.Path(workdir).resolve()
    other = bumped_copy(workdir, tmp / 'run1')
    (tmp / 'a').mkdir()
    with launched(workdir, tmp / 'a') as server:
      out.append(asyncio.run(reloads_under_load(server, [other, workdir] * 5, clients)))
    (tmp / 'b').mkdir()
    log_dir = tmp / 'b' / 'decisions'
    with launched(workdir, tmp / 'b', (f'--decisions={log_dir}', '--explore=0.1')) as server:
      run = asyncio.run(sigterm_under_load(server, clients))
    out.append(sigterm_figure(run, log_dir, clients))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None,
                      help='a finished training run (default: train a tiny router)')
  parser.add_argument('--clients', type=int, default=64, help='concurrent clients')
  args = parser.parse_args(argv)
  for fig in reliability_figures(args.workdir, args.clients):
    print(json.dumps(fig), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
