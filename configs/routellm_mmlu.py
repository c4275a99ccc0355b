"""RouteLLM's MMLU two-model set (GPT-4-1106 vs Mixtral-8x7B), seeded split by query id.

  python -m entrorouter_jax.train --config=configs/routellm_mmlu.py --workdir=/tmp/mmlu
  python -m entrorouter_jax.evaluate --workdir=/tmp/mmlu

Costs come from list prices (configs/pools/routellm.yaml) x tokens estimated
from the text; the evaluation reports APGR and CPT(20/50/80%) beside AIQ. Only
the data is set here: the router is the default recipe (configs/common.py).
"""

import os

from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  config = common.get_base_config()
  config.data.name = 'routing_files'
  config.data.format = 'routellm'
  config.data.files = os.path.join(REPO, '..', 'shared', 'data', 'routellm', 'mmlu_responses')
  config.data.pool = os.path.join(REPO, 'configs', 'pools', 'routellm.yaml')
  config.data.max_len = 128           # token backbones (configs/transformer.py)
  config.data.vocab_size = 8000
  return config
