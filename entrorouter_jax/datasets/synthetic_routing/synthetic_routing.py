"""`synthetic_routing`: the embedded default routing data (no download).

See `entrorouter_jax/data/synthetic.py` for the world it generates. Bump
VERSION whenever the generator changes, so cached copies are rebuilt.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from entrorouter_jax.data import synthetic
from entrorouter_jax.data.tfds_base import RoutingBuilder


@dataclasses.dataclass(eq=False)
class SyntheticRoutingConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 20_000
  num_validation: int = 2_000
  num_test: int = 2_000

  @classmethod
  def make(cls, seed=0, num_train=20_000, num_validation=2_000, num_test=2_000):
    name = f'seed{seed}_{num_train}_{num_validation}_{num_test}'
    return cls(name=name, seed=seed, num_train=num_train,
               num_validation=num_validation, num_test=num_test)


class SyntheticRouting(RoutingBuilder):
  """Synthetic routing world: 7 models, 6 domains, item-response outcomes."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [SyntheticRoutingConfig.make()]

  @classmethod
  def config_for(cls, seed, num_train, num_validation, num_test):
    """The predefined config where it matches (TFDS refuses a lookalike), else a new one."""
    config = SyntheticRoutingConfig.make(seed, num_train, num_validation, num_test)
    for known in cls.BUILDER_CONFIGS:
      if known.name == config.name:
        return known
    return config

  def _load(self, dl_manager):
    c = self.builder_config
    return synthetic.generate(c.seed, c.num_train, c.num_validation, c.num_test)
