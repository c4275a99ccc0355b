"""What the command-line entry points share: flags, cluster start-up, clear errors.

Errors a user can act on (bad data, bad config, a run that cannot go on) are
printed as one `error: ...` line and exit with status 2, without a traceback;
set ENTROROUTER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import flags

from entrorouter_jax import logs

FLAGS = flags.FLAGS


def define_flags(config_required: bool = True):
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file; override keys with --config.KEY=VALUE.',
      lock_config=True)
  if config_required:
    flags.mark_flags_as_required(['config'])
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, eval). '
                      'Default: workdirs/<config file name>.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s id.')
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                    'Multi-host start-up: "on" always calls jax.distributed.initialize() '
                    '(which finds the cluster itself on Cloud TPU, SLURM, ...); "auto" only '
                    'when the flags above or SLURM_NTASKS > 1 / TPU_WORKER_HOSTNAMES name '
                    'several processes; "off" never.'),


def maybe_initialize_distributed():
  """jax.distributed.initialize() when flags name a coordinator, when --distributed=on
  (launch/tpu_vm.sh passes it: a Cloud TPU VM's workers learn the slice from the
  metadata server, not from the environment), or on a multi-process cluster the
  environment shows: a SLURM job with several tasks, TPU_WORKER_HOSTNAMES with several hosts."""
  import jax
  if FLAGS.distributed == 'off':
    return
  if FLAGS.coordinator_address is not None:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif FLAGS.distributed == 'on' or int(os.environ.get('SLURM_NTASKS', '1')) > 1 or (
      ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')):
    jax.distributed.initialize()


def default_workdir() -> pathlib.Path:
  config_path = FLAGS['config'].config_filename if hasattr(FLAGS['config'], 'config_filename') else ''
  name = pathlib.Path(str(config_path).split(':')[0]).stem or 'run'
  return pathlib.Path('workdirs') / name


def user_errors():
  from entrorouter_jax.data.dataset import DataError
  from entrorouter_jax.state import TrainingError
  return (DataError, TrainingError, FileNotFoundError, ValueError)


def run_main(argv, fn, default_workdir_from_config: bool = True):
  """Runs fn(config, workdir), printing the result summary or a one-line error."""
  del argv
  logs.show_progress_logs()
  from entrorouter_jax import evaluate
  from entrorouter_jax import paths
  workdir = paths.as_path(FLAGS.workdir or default_workdir())
  if not FLAGS.workdir:
    print(f'--workdir not given: writing to {workdir}', file=sys.stderr)
  try:
    maybe_initialize_distributed()
    results = fn(FLAGS.config, workdir)
  except user_errors() as e:
    if os.environ.get('ENTROROUTER_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  import jax
  if jax.process_index() == 0:
    print(evaluate.summary(results))
    print(f'results: {workdir / "eval" / "results.json"}')
