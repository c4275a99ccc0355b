"""The `routing_files` TFDS builder."""
from entrorouter_jax.datasets.routing_files.routing_files import RoutingFiles, RoutingFilesConfig  # noqa: F401 (re-export)
