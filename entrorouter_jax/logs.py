"""What the command-line entry points print while they work: our INFO lines on
stderr, the libraries' only from WARNING up, and none of orbax's read-only notes."""

from __future__ import annotations

import logging
import sys


class _QuietReadOnlyCheckpoints(logging.Filter):
  """Drops orbax's warnings that a read-only CheckpointManager (how routers and
  evaluations open a finished run) is read-only: three lines per load, no news."""

  NOISE = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')

  def filter(self, record):
    message = record.getMessage()
    return not any(n in message for n in self.NOISE)


def show_progress_logs():
  """Our INFO lines (Stage 0, resumes, stage selection) on stderr; libraries
  (orbax, TFDS) only at WARNING and above."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _QuietReadOnlyCheckpoints) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietReadOnlyCheckpoints())
  logger = logging.getLogger('entrorouter_jax')
  logger.setLevel(logging.INFO)
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(message)s'))
    logger.addHandler(handler)
    logger.propagate = False
