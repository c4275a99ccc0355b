"""Serving that learns: 0 decision lines lost across a SIGTERM under load. The real server
(`python -m entrorouter_jax.serve`, as tests/serving.py's `running_server` starts it, with
--decisions and --explore) on conftest's tiny `serve_workdir`, 64 concurrent clients, and
SIGTERM once a few hundred requests were answered (benchmarks/serve_reliability.py's
`sigterm_under_load`, which also prints these counts as a benchmark); and a real SIGHUP
reloading the router a repointed symlink names."""

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


def test_a_real_sighup_reloads_the_router_a_symlink_points_at(serve_workdir, tmp_path):
  """`serve --workdir=LINK`; LINK repointed at another run, then SIGHUP to the process:
  /healthz names the new version, and routed requests go on."""
  import os
  import signal
  import time

  import httpx

  from entrorouter_jax.serving import version as version_lib
  second = serve_reliability.bumped_copy(serve_workdir, tmp_path / 'run1')
  link = tmp_path / 'current'
  link.symlink_to(serve_workdir, target_is_directory=True)
  with serve_reliability.launched(link, tmp_path, FLAGS, token=TOKEN, env=ENV) as server:
    before = httpx.get(f'{server.base}/healthz').json()['version']
    link.unlink()
    link.symlink_to(second, target_is_directory=True)
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline, version = time.time() + 60, before
    while version == before and time.time() < deadline:
      time.sleep(0.2)
      version = httpx.get(f'{server.base}/healthz').json()['version']
    routed = httpx.post(f'{server.base}/v1/route', json={'query': 'What is 17 times 23?'},
                        headers={'authorization': f'Bearer {TOKEN}'})
    assert server.proc.poll() is None   # SIGHUP reloads; it does not end the server
  assert before == version_lib.router_version(serve_workdir)
  assert version == version_lib.router_version(second), server.log_path.read_text()[-2000:]
  assert routed.status_code == 200
