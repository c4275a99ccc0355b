"""The `synthetic_routing` TFDS builder."""
from entrorouter_jax.datasets.synthetic_routing.synthetic_routing import SyntheticRouting, SyntheticRoutingConfig  # noqa: F401 (re-export)
