"""Shared test fixtures: where the real routing data lives, a compilation cache
for the session, and helpers for killed-and-resumed runs."""

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

# One persistent XLA compilation cache for the whole session, shared with every
# subprocess the tests start (they inherit the environment): the many tiny
# end-to-end runs compile the same steps again and again, and identical
# programs get identical executables either way. Set before jax is imported.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='entrorouter_jax_test_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
else:
  _CACHE = None


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get('ENTROROUTER_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


def shared_path(*parts: str) -> pathlib.Path:
  """A file under ../shared/data, or a skip naming what is missing."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'real routing data not found at {path} '
                '(expected ../shared/data beside the repository root, '
                'or set ENTROROUTER_SHARED_DATA)')
  return path


def final_state(workdir, stage: str = 'rl'):
  """(latest step, leaves of the train state) of a workdir's `stage` checkpoints."""
  import jax
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(pathlib.Path(workdir, 'checkpoints', stage).absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  return manager.latest_step(), jax.tree.leaves(state)


def straight_and_resumed(cmd_of, tmp_path, env, kill_at_rl_step: int):
  """Trains `cmd_of(workdir)` straight through, and again killed (-9) once its RL
  checkpoint `kill_at_rl_step` exists, then rerun to the end. Asserts both end in the
  same final RL state, bit for bit; returns (straight, resumed, the rerun's output)."""
  import numpy as np
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  subprocess.run(cmd_of(straight), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
  out = kill_then_rerun(cmd_of(resumed), resumed / 'checkpoints' / 'rl' / str(kill_at_rl_step),
                        env)
  step_a, leaves_a = final_state(straight)
  step_b, leaves_b = final_state(resumed)
  assert step_a == step_b
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return straight, resumed, out


def kill_then_rerun(cmd, marker: pathlib.Path, env, timeout: float = 300.0):
  """Starts `cmd`, kill -9s it once `marker` (a checkpoint folder) exists, then
  reruns it to the end; returns the rerun's CompletedProcess (text output)."""
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not marker.is_dir():
    assert proc.poll() is None, 'the run ended before it could be interrupted'
    assert time.time() < deadline, f'{marker} did not appear within {timeout:.0f} s'
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)


# ---------------------------------------------------------------- serving ---
@pytest.fixture(scope='session')
def serve_workdir(tmp_path_factory):
  """The tiny default-recipe router every serving test routes with (trained once)."""
  import serving
  return serving.train_tiny_router(tmp_path_factory.mktemp('serve'))


@pytest.fixture(scope='session')
def served(serve_workdir, tmp_path_factory):
  """(base URL of `serve` on serve_workdir, its Upstreams, pool names, its log path)."""
  import serving
  with serving.running_server(serve_workdir, tmp_path_factory.mktemp('pool')) as server:
    yield server
