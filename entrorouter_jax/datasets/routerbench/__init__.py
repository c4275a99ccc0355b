"""The `routerbench` TFDS builder."""
from entrorouter_jax.datasets.routerbench.routerbench import Routerbench  # noqa: F401 (re-export)
