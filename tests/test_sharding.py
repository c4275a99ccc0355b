"""Sharded training equals unsharded training; checkpoints move between device counts.

Both run in subprocesses: the fake device count must be set before JAX starts.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ENV = dict(os.environ, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('sharded')
  out = subprocess.run([sys.executable, str(REPO_ROOT / 'tests' / 'sharded_check.py'),
                        str(workdir)], cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('stage', ['sft', 'rl'])
@pytest.mark.parametrize('mesh', ['data=8', 'data=2,fsdp=4', 'data=4,tensor=2'])
def test_sharded_steps_match_one_device(sharded_results, stage, mesh):
  """Four steps on 8 devices vs 1: losses to 1e-5 relative, parameters and Adam
  moments to 2e-4 absolute (float32 reductions run in another order)."""
  r = sharded_results[f'{stage} {mesh}']
  assert r['loss_rel'] < 1e-5
  assert r['param_abs'] < 2e-4


@pytest.mark.parametrize('n', [4, 1])
def test_checkpoint_from_8_devices_restores_on_fewer(sharded_results, n):
  r = sharded_results[f'restore on {n}']
  assert r['equal'] and r['devices'] == [n]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_and_one_device_log_the_same_losses_as_eight_devices(tmp_path):
  """The scale-out contract through the CLI: 1 process x 8 devices (data=2 x fsdp=4),
  2 processes x 4 devices (jax.distributed on localhost, CPU collectives) and
  1 device log the same `loss` at every step, and the same out-of-fold checks,
  to 1e-5 relative."""
  common = ['--config=configs/rl.py', f'--config.data.data_dir={tmp_path / "tfds"}',
            '--config.data.synthetic.num_train=600', '--config.data.synthetic.num_validation=20',
            '--config.data.synthetic.num_test=100', '--config.data.max_len=24',
            '--config.data.vocab_size=200', '--config.model.num_layers=1',
            '--config.model.d_model=32', '--config.anchor.k=10', '--config.anchor.dim=16',
            '--config.sft.num_steps=4', '--config.rl.num_steps=4', '--config.log_every=1',
            '--config.sft.batch_size=32', '--config.rl.batch_size=32']
  train = [sys.executable, '-m', 'entrorouter_jax.train'] + common

  def env(devices):
    return dict(ENV, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')

  # The single runs also prepare the data, so the two processes only read it.
  for name, devices, mesh in (('eight', 8, ('2', '4')), ('one', 1, ('1', '1'))):
    subprocess.run(train + [f'--workdir={tmp_path / name}', f'--config.mesh.data={mesh[0]}',
                            f'--config.mesh.fsdp={mesh[1]}'],
                   cwd=REPO_ROOT, env=env(devices), check=True, capture_output=True)
  port = _free_port()
  procs = [subprocess.Popen(train + [f'--workdir={tmp_path / "two"}', '--config.mesh.data=2',
                                     '--config.mesh.fsdp=4', f'--coordinator_address=localhost:{port}',
                                     '--num_processes=2', f'--process_id={i}'],
                            cwd=REPO_ROOT, env=env(4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

  def logged(name):
    """(stage, step, what, value): every step's loss and every out-of-fold check."""
    lines = (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
    return [(r['stage'], r['step'], key, r[key]) for r in map(json.loads, lines)
            for key in ('loss', 'select_score') if key in r]

  want = logged('eight')
  # Three Stage-1 candidates (sft.soft_weight_choices) and RL, 4 steps each.
  assert sum(1 for w in want if w[2] == 'loss') == 16
  assert {w[0] for w in want} == {'sft_soft0', 'sft_soft0.1', 'sft_soft0.3', 'rl'}
  for name in ('two', 'one'):
    got = logged(name)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
      assert abs(g[3] - w[3]) <= 1e-5 * abs(w[3]), (name, g, w)
