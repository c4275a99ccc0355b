"""Stage 1 alone: Soft Supervision on the embedded synthetic data.

  python -m entrorouter_jax.train --config=configs/sft.py --workdir=/tmp/sft
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.stages = 'sft'
  return config
