"""Memory plan of a training run, per device, before anything is allocated.

  python -m entrorouter_jax.plan --config=configs/rl.py \
      [--config.model.size=base --config.mesh.fsdp=4 ...] \
      [--num_devices=N] [--vocab_size=V] [--num_models=K] [--json]

For the configured network (a token encoder's size and sequence length
`data.max_len`, or the embeddings backbone's members on Stage 0's features), each stage's
global batch (`sft.batch_size` / `rl.batch_size`) and mesh (`config.mesh` laid
over `num_devices` devices), prints per device:

* parameters: from the real abstract train state (`state.abstract_train_state`,
  i.e. `nnx.eval_shape`, nothing allocated) and its real NamedShardings: each
  array's bytes are divided over the mesh axes its PartitionSpec names
  (replicated arrays count whole), so FSDP / tensor settings change the number.
* optimizer: the same for the optimizer state (AdamW: two fp32 moments and the
  step counts), plus the rest of the train state (step, rng key data, alpha,
  h0, the stage selection's counters and, where a stage selects, its copy of
  the best parameters), so parameters + optimizer is exactly the train state.
* gradients: one fp32 copy of the parameters, sharded like them.
* activations: an estimate of what one train step keeps for the backward pass
  (see `activation_bytes`).

With fewer real devices than `num_devices` no Mesh is built: the shardings are
computed on a `jax.sharding.AbstractMesh` of shape
`sharding.mesh_shape(config.mesh, num_devices)`, which gives the same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import jax
import numpy as np
from flax import nnx

from entrorouter_jax import sharding, state as state_lib, train
from entrorouter_jax.model import model_dims

DEFAULT_NUM_MODELS = 7
_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2}


# ------------------------------------------------------------ arithmetic ---
def _mesh_sizes(mesh) -> dict:
  return {name: int(size) for name, size in dict(mesh.shape).items()}


def _per_device_bytes(leaf, named_sharding, mesh_sizes: dict) -> int:
  """Bytes one device holds of `leaf` (ceil per dimension, like XLA's shard shape)."""
  spec = tuple(named_sharding.spec) + (None,) * (len(leaf.shape) - len(named_sharding.spec))
  shard = []
  for dim, axes in zip(leaf.shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shard.append(-(-dim // math.prod(mesh_sizes[a] for a in names)))
  return math.prod(shard) * np.dtype(leaf.dtype).itemsize


def _tree_bytes(abstract, shardings, mesh_sizes: dict) -> tuple[int, int, int]:
  """(per-device bytes, global bytes, element count) of an abstract pytree."""
  leaves = jax.tree.leaves(abstract)
  shard_leaves = jax.tree.leaves(shardings)
  if len(leaves) != len(shard_leaves):
    raise ValueError(f'{len(leaves)} arrays but {len(shard_leaves)} shardings')
  per_device = sum(_per_device_bytes(x, s, mesh_sizes) for x, s in zip(leaves, shard_leaves))
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  count = sum(math.prod(x.shape) for x in leaves)
  return per_device, total, count


def activation_bytes(config, batch_per_device: int, num_models: int, tensor: int = 1) -> int:
  """Estimate of the activations one train step keeps for the backward pass, per device.

  Token backbones: b = batch per device, L = tokens per query (max_len, +1
  with CLS pooling), E = d_model, H = heads, M = mlp_dim, t = the mesh's
  tensor size (splits H and M where it divides them), s = bytes of the
  compute dtype (model.dtype):

    per layer  b*L*[(8E + c*M/t)*s + (H/t)*L*(4 + s)]
               8E: LN1 in/out, q, k, v, attention out, LN2 in/out;
               c*M: MLP hidden, c = 2 for GELU (pre/post activation), 3 for
               SwiGLU (gate, up, product); H*L: the float32 scores and the
               softmax probabilities. With M = 4E (every SIZES entry) this is
               b*L*(16E*s + H*L*(4 + s)) for GELU.
    plus       b*L*E*(s + 2*4)  the embedding output, the float32 final-LN
               output and the masked-pooling product,
    plus       4 * b*K*4 bytes  the float32 logits, log-probs and their grads
               (RL: times (1 + group_size) for the sampled-action tables).

  The embeddings backbone (R members, hidden width W, D-wide features):
  b*D*4 for the input, R*b*2W*4 for each member's hidden layer before and
  after GELU, and the logits term above for R*b rows.

  Dropout masks (dropout > 0) and XLA's fusion/rematerialisation are ignored;
  the estimate is meant to be within about 2x of a compiled step.
  """
  dims = encoder_dims(config.model, config)
  b = batch_per_device
  group = 1 + int(config.rl.group_size)
  if dims['kind'] == 'embeddings':
    rows = dims['members'] * b
    return (b * dims['feature_dim'] * 4 + rows * 2 * dims['hidden'] * 4
            + 4 * rows * num_models * 4 * group)
  s = _DTYPE_BYTES[config.model.dtype]
  E, H, M, N = dims['d_model'], dims['num_heads'], dims['mlp_dim'], dims['num_layers']
  scratch = dims['kind'] == 'scratch'
  L = config.data.max_len + (scratch and config.model.pooling == 'cls')
  h_local = H // tensor if H % tensor == 0 else H
  m_local = M // tensor if M % tensor == 0 else M
  c = 3 if dims['mlp'] == 'swiglu' else 2
  per_layer = b * L * ((8 * E + c * m_local) * s + h_local * L * (4 + s))
  embed = b * L * E * (s + 2 * 4)
  logits = 4 * b * num_models * 4 * group
  return N * per_layer + embed + logits


def encoder_dims(model_cfg, config=None) -> dict:
  """What the planner knows of the network, with its `kind` and a `label`.

  Token backbones: num_layers, d_model, num_heads, mlp_dim, mlp ('gelu' |
  'swiglu'), from the scratch encoder's size or a pretrained backbone's
  config.json. The embeddings backbone: members, hidden and feature_dim
  (the width of `config.anchor.space`; needs the whole `config`).
  """
  from entrorouter_jax import backbones, features
  from entrorouter_jax.model import num_members
  kind = backbones.kind_of(model_cfg)
  if kind == 'embeddings':
    if config is None:
      raise ValueError('the embeddings backbone is planned from the whole config '
                       '(anchor.space sets its input width)')
    members, hidden = num_members(model_cfg), int(model_cfg.hidden)
    dim = features.feature_dim(config)
    return dict(kind=kind, members=members, hidden=hidden, feature_dim=dim,
                label=f'{members} MLP members x {hidden} hidden on {dim}-d '
                      f'{config.anchor.space} features')
  if kind == 'scratch':
    return dict(model_dims(model_cfg), kind=kind, mlp=model_cfg.mlp,
                label=f'model {model_cfg.size}')
  cfg = backbones.backbone_config(model_cfg)
  return dict(kind=kind, num_layers=cfg.num_layers, d_model=cfg.hidden_size,
              num_heads=cfg.num_heads, mlp_dim=cfg.intermediate_size, vocab_size=cfg.vocab_size,
              mlp='swiglu' if kind == 'hf_decoder' else 'gelu',   # gated MLPs: 3 tensors
              label=f'{kind} {model_cfg.checkpoint}'
              + (' (frozen)' if model_cfg.freeze_backbone else ''))


def _mesh_for(config, num_devices: int):
  """(mesh, built): a real Mesh when enough devices exist, else an AbstractMesh."""
  if len(jax.devices()) >= num_devices:
    return sharding.make_mesh(config.mesh, jax.devices()[:num_devices]), True
  shape = sharding.mesh_shape(config.mesh, num_devices)
  return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 3), False


# ------------------------------------------------------------------ plan ---
def plan(config, num_devices: int | None = None, vocab_size: int | None = None,
         num_models: int | None = None) -> dict:
  """The per-device memory plan of each configured stage, in bytes (see module doc)."""
  num_devices = len(jax.devices()) if num_devices is None else int(num_devices)
  dims = encoder_dims(config.model, config)
  feature_dim = dims.get('feature_dim')
  vocab_size = int(dims.get('vocab_size', config.data.vocab_size) if vocab_size is None
                   else vocab_size)
  num_models = DEFAULT_NUM_MODELS if num_models is None else int(num_models)
  mesh, built = _mesh_for(config, num_devices)
  sizes = _mesh_sizes(mesh)
  divisor = sizes['data'] * sizes['fsdp']
  out = {
      'model': dict(size=config.model.size, dtype=config.model.dtype, **dims),
      'seq_len': int(config.data.max_len), 'vocab_size': vocab_size, 'num_models': num_models,
      'num_devices': num_devices, 'mesh': sizes, 'mesh_built': built, 'stages': {},
  }
  for stage in train.stage_list(config):
    _, build, shardings = state_lib.abstract_train_state(config, stage, vocab_size, num_models,
                                                         mesh, feature_dim)
    _, abstract = nnx.split(nnx.eval_shape(build))   # as abstract_train_state does
    param_dev, param_all, num_params = _tree_bytes(abstract[0], shardings['nnx'][0], sizes)
    opt_dev, opt_all, _ = _tree_bytes(abstract[1], shardings['nnx'][1], sizes)
    # The rest of the train state: its bookkeeping scalars (step, rng key data,
    # alpha, h0, the selection's score and counters) and, where the stage
    # selects, the copy of the best parameters, sharded like them.
    whole = jax.eval_shape(functools.partial(state_lib.initial_values, config, build,
                                             'best' in shardings))
    rest = {k: v for k, v in whole.items() if k != 'nnx'}
    extra = _tree_bytes(rest, {k: shardings[k] for k in rest}, sizes)[0]
    global_batch = int(config[stage].batch_size)
    per_device_batch = -(-global_batch // divisor)
    grads = param_dev   # fp32, sharded like the parameters
    if config.model.get('freeze_backbone') and 'backbone' in abstract[0]:
      grads -= _tree_bytes(abstract[0]['backbone'], shardings['nnx'][0]['backbone'], sizes)[0]
    acts = activation_bytes(config, per_device_batch, num_models, sizes['tensor'])
    out['stages'][stage] = {
        'global_batch': global_batch, 'batch_per_device': per_device_batch,
        'batch_divisible': global_batch % divisor == 0,
        'num_params': num_params,
        'params_bytes': param_dev, 'optimizer_bytes': opt_dev + extra,
        'gradient_bytes': grads, 'activation_bytes': acts,
        'total_bytes': param_dev + opt_dev + extra + grads + acts,
        'params_bytes_global': param_all, 'optimizer_bytes_global': opt_all + extra,
    }
  return out


def _human(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024.0


def format_plan(p: dict) -> str:
  """A human-readable table of `plan(...)`."""
  m = p['model']
  mesh = ' x '.join(f'{k}={v}' for k, v in p['mesh'].items())
  if m['kind'] == 'embeddings':
    network = f"{m['label']}; {p['num_models']} models"
  else:
    network = (f"{m['label']}: {m['num_layers']} layers, d_model {m['d_model']}, "
               f"{m['num_heads']} heads, mlp {m['mlp_dim']}, compute {m['dtype']}; "
               f"seq {p['seq_len']}, vocab {p['vocab_size']}, {p['num_models']} models")
  lines = [
      network,
      f"mesh {mesh} on {p['num_devices']} devices"
      + ('' if p['mesh_built'] else ' (computed on an abstract mesh: fewer real devices)'),
  ]
  stages = list(p['stages'])
  rows = [('global batch', 'global_batch', False), ('batch / device', 'batch_per_device', False),
          ('parameters', 'params_bytes', True), ('optimizer', 'optimizer_bytes', True),
          ('gradients', 'gradient_bytes', True), ('activations (est.)', 'activation_bytes', True),
          ('total / device', 'total_bytes', True)]
  width = max(len(r[0]) for r in rows)
  lines.append(f"{'per device':<{width}}  " + '  '.join(f'{s:>12}' for s in stages))
  for label, key, is_bytes in rows:
    cells = [_human(p['stages'][s][key]) if is_bytes else str(p['stages'][s][key])
             for s in stages]
    lines.append(f'{label:<{width}}  ' + '  '.join(f'{c:>12}' for c in cells))
  for s in stages:
    st = p['stages'][s]
    lines.append(f"{s}: {st['num_params']:,} parameters ({_human(st['params_bytes_global'])} "
                 f"unsharded)" + ('' if st['batch_divisible'] else
                                  f"; batch {st['global_batch']} does not divide over "
                                  f"{p['mesh']['data'] * p['mesh']['fsdp']} batch shards"))
  return '\n'.join(lines)


# ------------------------------------------------------------------- CLI ---
def main(argv):
  del argv
  from absl import flags
  from entrorouter_jax import cli
  FLAGS = flags.FLAGS
  try:
    p = plan(FLAGS.config, FLAGS.num_devices, FLAGS.vocab_size, FLAGS.num_models)
  except cli.user_errors() as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_plan(p))
  if FLAGS.json:
    print(json.dumps(p))


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file; override keys with --config.KEY=VALUE.',
      lock_config=True)
  flags.mark_flags_as_required(['config'])
  flags.DEFINE_integer('num_devices', None, 'Devices to plan for (default: those present).')
  flags.DEFINE_integer('vocab_size', None, 'Default: config.data.vocab_size.')
  flags.DEFINE_integer('num_models', None, f'Default: {DEFAULT_NUM_MODELS}.')
  flags.DEFINE_bool('json', False, 'Also print the plan as one JSON line.')
  app.run(main)
