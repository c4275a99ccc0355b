"""Serving that learns: 0 decision lines lost across a SIGTERM under load. The real server
(`python -m entrorouter_jax.serve`, as tests/serving.py's `running_server` starts it, with
--decisions and --explore) on conftest's tiny `serve_workdir`, 64 concurrent clients, and
SIGTERM once a few hundred requests were answered (benchmarks/serve_reliability.py's
`sigterm_under_load`, which also prints these counts as a benchmark)."""

import asyncio

from benchmarks import serve_reliability
from serving import TOKEN, UPSTREAM_KEY

# running_server's flags and environment
FLAGS = ('--upstream_timeout=2', '--max_wait_ms=20', '--max_batch=32', '--max_body_bytes=65536')
ENV = {'JAX_PLATFORMS': 'cpu', 'UPSTREAM_KEY': UPSTREAM_KEY}


def test_no_decision_line_is_lost_across_a_sigterm_under_load(serve_workdir, tmp_path):
  log_dir = tmp_path / 'log'
  with serve_reliability.launched(serve_workdir, tmp_path,
                                  (*FLAGS, f'--decisions={log_dir}', '--explore=0.1'),
                                  token=TOKEN, env=ENV) as server:
    run = asyncio.run(serve_reliability.sigterm_under_load(server, clients=64,
                                                           signal_after=300, grace=30))
  server_log = server.log_path.read_text()[-3000:]

  # Every request before the signal was answered; some in flight at the signal were too,
  # and then the clients' connections failed (refused or reset; or a 503).
  assert set(run.before) == {200} and run.before[200] >= 300, (run.before, server_log)
  assert run.acknowledged_after > 0, run.after
  assert set(run.after) - {200, 503} <= {'ConnectError', 'ReadError', 'RemoteProtocolError',
                                         'WriteError'}, run.after
  assert run.id_mismatches == []   # a chat completion's "id" is its request id

  logged, torn = serve_reliability.read_logged(log_dir)
  assert torn == []
  acknowledged = set(run.acknowledged)
  assert len(acknowledged) == sum(run.before.values()) + run.after[200]   # ids are unique
  assert acknowledged - set(logged) == set(), 'acknowledged requests without a decision line'
  assert {i: n for i, n in logged.items() if n != 1} == {}, 'ids logged more than once'
  endpoints = set(run.acknowledged.values())
  assert endpoints == {serve_reliability.CHAT, serve_reliability.ROUTE}

  assert run.exit_code == 0, (f'the server exited with {run.exit_code} '
                              f'{run.exit_seconds:.1f} s after SIGTERM', server_log)
  assert run.exit_seconds < 30
