"""The router as a transformer over tokens (the package's own encoder, trained
from scratch), with the plain softmax policy head: SFT then RL.

  python -m entrorouter_jax.train --config=configs/transformer.py

This was the default before the embeddings recipe (configs/common.py); it
stays for long-text or very large data, where training the encoder pays.
`model.backbone=hf_encoder|hf_decoder` with `model.checkpoint` starts it from
pretrained weights instead.
"""

from configs import common


def transformer(config):
  """Switches a config to the token transformer with the softmax head."""
  config.model.update(backbone='scratch', head='softmax', members=1, temperature=1.0)
  config.anchor.update(space='tfidf', prior='task')
  config.sft.update(num_steps=600, soft_weight=1.0, soft_weight_choices='', dense_weight=0.0,
                    select='')
  config.rl.update(num_steps=800, learning_rate=3e-4, dense_weight=0.0, select='')
  return config


def get_config():
  config = transformer(common.get_base_config())
  config.stages = 'sft,rl'
  return config
