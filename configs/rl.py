"""The main job: Soft Supervision, then RL with the Soft Anchor.

  python -m entrorouter_jax.train --config=configs/rl.py
With --config.rl.init_checkpoint=DIR (an SFT workdir), SFT is skipped and RL
starts from that checkpoint.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.stages = 'sft,rl'
  return config
