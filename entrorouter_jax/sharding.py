"""The whole sharding strategy: one mesh, one logical-axis rules table.

Mesh axes: 'data' (batch), 'fsdp' (batch, and parameters split along 'embed'),
'tensor' (parameters split along heads / mlp / vocab). Every parameter names
its logical axes (model.py); RULES maps them to mesh axes, so data, FSDP and
tensor parallelism are settings of `config.mesh`, never separate code paths.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

log = logging.getLogger(__name__)

# YNNPACK does only the dots on XLA:CPU: its reduction fusions materialise
# every broadcast operand at full size (a LayerNorm's scalars as [tokens, width]),
# which slows the routing forward (benchmarks/RESULTS.md).
YNN_DOTS_ONLY = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT'
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': YNN_DOTS_ONLY}

# logical axis -> mesh axis (or axes, or None = replicated)
RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('position', None),
    ('models', None),
    ('cond', None),
    ('members', None),
    ('length', None),
)
_RULES = dict(RULES)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one -1 entry takes the devices left over."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if fixed <= 0 or num_devices % fixed:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices or min(sizes) < 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; '
                     f'{num_devices} are available (set one axis to -1 to fill the rest)')
  return tuple(sizes)


@functools.cache
def compiler_options() -> dict:
  """`jax.jit(compiler_options=...)` for the router's programs (train steps,
  routing forward): CPU_COMPILER_OPTIONS where the default backend is the CPU
  and this jaxlib takes them, else {}. An XLA_FLAGS that sets the same option
  wins (then {} here)."""
  if jax.default_backend() != 'cpu':
    return {}
  flags = os.environ.get('XLA_FLAGS', '')
  if any(name in flags for name in CPU_COMPILER_OPTIONS):
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception as e:  # an XLA without the option: its defaults
    log.info('XLA:CPU compiler options %s not taken (%s); using its defaults',
             CPU_COMPILER_OPTIONS, e)
    return {}
  return dict(CPU_COMPILER_OPTIONS)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_mesh(spec) -> P:
  """A PartitionSpec of logical names -> one of mesh axes (unknown names raise)."""
  out = []
  for name in spec:
    if name is None:
      out.append(None)
    elif name in _RULES:
      out.append(_RULES[name])
    else:
      raise KeyError(f'logical axis {name!r} has no rule in sharding.RULES')
  return P(*out)


def _fit(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide the dimension (replicates it instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def state_shardings(abstract_state, mesh) -> object:
  """NamedShardings for an nnx.State (parameters and optimizer state alike)."""
  specs = nnx.get_partition_spec(abstract_state)
  # optax.MaskedNode: the optimizer state of parameters a multi_transform leaves
  # without state (a frozen backbone); it holds no array.
  return jax.tree.map(
      lambda spec, leaf: leaf if isinstance(leaf, optax.MaskedNode) else NamedSharding(
          mesh, _fit(logical_to_mesh(spec), leaf.shape, mesh)),
      specs, abstract_state, is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp."""
  return NamedSharding(mesh, logical_to_mesh(('batch',)))


def batch_divisor(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp')]))
