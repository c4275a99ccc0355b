"""RouterBench (RouterDC's 3,178-query subset: ARC-Challenge, MBPP, Winogrande x 11 LLMs).

  python -m entrorouter_jax.train --config=configs/routerbench.py --workdir=/tmp/rb
  python -m entrorouter_jax.evaluate --workdir=/tmp/rb

Uses the subset's own train/test split (column routerdc_split). `data.manual_dir`
defaults to ../shared/data/routerbench beside the repository. Only the data is
set here: the router is the default recipe (configs/common.py), the one the
quality suite measures on every data set.
"""

import os

from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  config = common.get_base_config()
  config.data.name = 'routerbench'
  config.data.manual_dir = os.path.join(REPO, '..', 'shared', 'data', 'routerbench')
  # ARC prompts carry few-shot examples first and the question last: keep the
  # end (token backbones, e.g. configs/transformer.py; the sentence encoder of
  # the default recipe keeps the end too, anchor.encoder_truncate).
  config.data.truncate = 'left'
  config.data.max_len = 128
  config.data.vocab_size = 4000
  return config
