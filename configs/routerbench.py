"""RouterBench (RouterDC's 3,178-query subset: ARC-Challenge, MBPP, Winogrande x 11 LLMs).

  python -m entrorouter_jax.train --config=configs/routerbench.py --workdir=/tmp/rb
  python -m entrorouter_jax.evaluate --workdir=/tmp/rb

Uses the subset's own train/test split (column routerdc_split). `data.manual_dir`
defaults to ../shared/data/routerbench beside the repository.
"""

import os

from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  config = common.get_base_config()
  config.data.name = 'routerbench'
  config.data.manual_dir = os.path.join(REPO, '..', 'shared', 'data', 'routerbench')
  # ARC prompts carry few-shot examples first and the question last: keep the end.
  config.data.truncate = 'left'
  config.data.max_len = 128
  config.data.vocab_size = 4000
  config.model.dropout = 0.1
  # 2,225 training queries: the kNN anchor is a strong prior here, so the
  # network learns corrections to it (logits = f(x) + log A).
  config.model.anchor_in_logits = True
  config.sft.cost_weight = 0.01
  config.rl.cost_weight = 0.01
  return config
