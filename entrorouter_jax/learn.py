"""The nightly step of a serving loop: a deployed router's logs -> the next router, if it wins.

  python -m entrorouter_jax.learn --workdir=R0 --decisions=LOGDIR --out=R1 [--force] \\
      [--scores=FILE.jsonl] [--config.KEY=VALUE ...]

R0 is the router the server ran (a finished run's workdir) and LOGDIR its --decisions
directory (decisions-*.jsonl and the feedback-*.jsonl scores of POST /v1/feedback). In R1
(created; it must not exist or be empty):

  1. R1/feedback.csv: LOGDIR's decisions joined with their scores (`entrorouter_jax.feedback`;
     --scores adds scores judged elsewhere);
  2. the off-policy stage (configs/feedback.py, data.files=R1/feedback.csv,
     rl.init_checkpoint=R0; --config.KEY=VALUE overrides its keys) trained into R1/.staging;
  3. R1/eval/offpolicy.json: the staged router's off-policy estimates on the judged rows of
     the log's test split, which it was not trained on (written by training,
     `evaluate.offpolicy_results`): IPS, SNIPS, DR with 95% intervals, the logging policy's
     realised means there, "improves" (DR's lower end beats the logging utility) and
     "vs_init" (the paired DR gain over R0's own policy on those rows, with its one-sided
     95% lower bound);
  4. where it improves on both (`wins`: DR's lower end beats the logging utility, and the
     gain over R0's lower bound is > 0), or with --force, the staged router's files move
     into R1, a router
     workdir like any other (route, serve, evaluate load it); otherwise the staging folder is
     removed and R1 keeps only feedback.csv and eval/offpolicy.json.

The estimate and the verdict are printed either way (exit 0); bad input (R1 not empty, R0
not a trained workdir, a log without a judged row, a bad flag or config) is one
`error: ...` line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Optional

from absl import flags

from entrorouter_jax import feedback as feedback_lib, paths
from entrorouter_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'feedback.py'
FEEDBACK_LOG = 'feedback.csv'
STAGING = '.staging'
OFFPOLICY = 'offpolicy.json'


class LearnError(ValueError):
  """Input the nightly step cannot use: the message names the flag or file and what was
  expected."""


@dataclasses.dataclass
class Learned:
  """What `learn` did: the off-policy estimates (offpolicy.json's content), whether R1 now
  holds the new router, and the join (rows written, judged, dropped)."""
  results: dict
  written: bool
  joined: feedback_lib.Joined
  out: pathlib.Path


def check_init_workdir(workdir) -> pathlib.Path:
  """`workdir` as a path; LearnError naming --workdir where it is not a finished training
  run's workdir (config.json, router.json and stage0.pkl with its training table)."""
  path = paths.as_path(workdir)
  if not path.is_dir():
    raise LearnError(f'--workdir={workdir}: not a directory; expected the workdir of the '
                     'trained router that logged the decisions')
  stage0, name = workdir_lib.finished_run_stage0(path)
  if stage0 is None:
    raise LearnError(f'--workdir={workdir}: {name} is missing or incomplete there; expected '
                     'the workdir of a finished training run (the router that logged the '
                     'decisions)')
  return path


def check_out(out) -> pathlib.Path:
  """`out` as a path; LearnError naming --out where it exists and is not an empty folder."""
  path = paths.as_path(out)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise LearnError(f'--out={out}: exists and is not empty; expected a new (or empty) '
                     'folder for the next router')
  return path


def stage_config(config, log_path, init_workdir):
  """A copy of `config` (configs/feedback.py with the caller's overrides) that trains the
  off-policy stage on `log_path` from `init_workdir`; LearnError where the overrides set
  data.files or rl.init_checkpoint (the nightly step sets them)."""
  import copy
  for key, value in (('data.files', config.data.files),
                     ('rl.init_checkpoint', config.rl.init_checkpoint)):
    if value:
      raise LearnError(f'--config.{key}={value}: set by learn itself (the joined log and '
                       '--workdir); leave it out')
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.files = str(log_path)
    config.rl.init_checkpoint = str(init_workdir)
  return config


def promote(staging: pathlib.Path, out: pathlib.Path) -> None:
  """Moves every file of `staging` into `out` (merging folders both have, staging's files
  replacing out's) and removes `staging`; returns nothing."""
  for entry in sorted(staging.iterdir()):
    target = out / entry.name
    if entry.is_dir() and target.is_dir():
      promote(entry, target)
      continue
    if target.is_dir():
      shutil.rmtree(target)
    os.replace(entry, target)
  staging.rmdir()


def learn(workdir, decisions, out, config, *, scores: Optional[str] = None,
          force: bool = False) -> Learned:
  """The nightly step (module doc) with `config` as configs/feedback.py's config with the
  caller's overrides; returns a `Learned`. LearnError (or FeedbackError) on bad input,
  raised before anything is written; training's own errors (TrainingError, DataError) pass
  through, R1 then holding the log and the staging folder."""
  from entrorouter_jax import evaluate, train
  init = check_init_workdir(workdir)
  out = check_out(out)
  joined = feedback_lib.join(decisions, scores)
  if not joined.judged:
    raise LearnError(f'--decisions={decisions}: no judged row to learn from; expected scores '
                     f'(its feedback-*.jsonl or --scores) for logged chat completions '
                     f'({joined.summary(out / FEEDBACK_LOG)})')
  log_path = out.absolute() / FEEDBACK_LOG
  config = stage_config(config, log_path, init.absolute())
  out.mkdir(parents=True, exist_ok=True)
  feedback_lib.write(joined.rows, log_path)
  print(joined.summary(log_path))

  staging = out / STAGING
  train.train_and_evaluate(config, staging)
  # The verdict is out of sample: training wrote the staged router's estimates on the log's
  # test split, rows it was not trained on (on its own training rows DR is optimistic).
  held_out = staging / 'eval' / OFFPOLICY
  if not held_out.exists():
    shutil.rmtree(staging)
    raise LearnError(f'{log_path}: its test split holds no judged row, so the new router '
                     'cannot be judged on rows it was not trained on; expected more scored '
                     'decisions')
  results = json.loads(held_out.read_text())
  written = wins(results) or force
  if written:
    promote(staging, out)
  else:
    shutil.rmtree(staging)
  evaluate.write_results(out, results, OFFPOLICY)
  return Learned(results=results, written=written, joined=joined, out=out)


def wins(results: dict) -> bool:
  """Whether the new router may replace R0: DR's lower end beats the logging policy's
  realised utility, and the paired gain over R0's policy (offpolicy.json's "vs_init")
  has a lower bound > 0."""
  return bool(results['improves']) and bool(results.get('vs_init', {}).get('improves'))


def verdict(learned: Learned) -> str:
  """The lines printed at the end: the DR estimate against the logging policy, and whether
  R1 holds the new router."""
  r = learned.results
  dr, logging = r['dr'], r['logging']
  lines = [f"new router (DR) on {r['rows']} judged rows: utility {dr['utility']:.4f} "
           f"[{dr['ci95'][0]:.4f}, {dr['ci95'][1]:.4f}] vs the logging policy's realised "
           f"{logging['utility']:.4f}"]
  if 'vs_init' in r:
    v = r['vs_init']
    lines.append(f"paired DR gain over R0's policy: {v['gain']:+.4f} (one-sided 95% lower "
                 f"bound {v['lower']:+.4f})")
  if learned.written:
    why = ('DR lower end beats the logging policy and the gain over R0 is positive'
           if wins(r) else 'forced: the new router does not show a win over R0')
    lines.append(f'{learned.out} written ({why})')
  else:
    lines.append(f'{learned.out} not written (the new router does not show a win over R0: '
                 'both lower bounds must clear it; --force to write it anyway)')
  lines.append(f'estimate: {learned.out / "eval" / OFFPOLICY}')
  return '\n'.join(lines)


def main(argv):
  from entrorouter_jax import cli, logs
  logs.show_progress_logs()
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  try:
    learned = learn(FLAGS.workdir, FLAGS.decisions, FLAGS.out, FLAGS.config,
                    scores=FLAGS.scores, force=FLAGS.force)
  except (LearnError, feedback_lib.FeedbackError, workdir_lib.RouterError, OSError,
          *cli.user_errors()) as e:
    if os.environ.get('ENTROROUTER_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(verdict(learned))


if __name__ == '__main__':
  from absl import app
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      'config', str(CONFIG_FILE), 'The off-policy stage\'s config (default '
      'configs/feedback.py); override keys with --config.KEY=VALUE.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'R0: the trained router that logged the decisions.',
                      required=True)
  flags.DEFINE_string('decisions', None, 'The server\'s --decisions directory.', required=True)
  flags.DEFINE_string('scores', None, 'JSON lines {"id", "score"[, "time"]} judged elsewhere.')
  flags.DEFINE_string('out', None, 'R1: the new router\'s workdir (new or empty).',
                      required=True)
  flags.DEFINE_bool('force', False, 'Write the new router even where DR does not show it '
                    'beats R0.')
  app.run(main)
