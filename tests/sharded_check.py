"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices.

Trains a few SFT and RL steps of a tiny router on one device and on several
meshes, from the same initial state and the same batches, and prints one JSON
line: the largest relative loss difference and the largest parameter
difference per mesh; then saves a state sharded over 8 devices and restores it
on 4 devices and on 1, printing whether the values survived exactly.

With `--backbone=DIR` (a BERT-format checkpoint; tests/test_backbones.py) it
instead checks a router on that pretrained encoder: SFT steps on
data=2 x fsdp=2 x tensor=2 against one device.
"""

import json
import pathlib
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from entrorouter_jax import sharding, state as state_lib, train  # noqa: E402
from entrorouter_jax.data import pipeline  # noqa: E402
from test_train import tiny_config  # noqa: E402

MESHES = {'data=8': (8, 1, 1), 'data=2,fsdp=4': (2, 4, 1), 'data=4,tensor=2': (4, 1, 2)}
STEPS = 4


def mesh_of(shape, n):
  cfg = ml_collections.ConfigDict(dict(zip(('data', 'fsdp', 'tensor'), shape)))
  return sharding.make_mesh(cfg, jax.devices()[:n])


def run(config, problem, stage, mesh, batches):
  _, schedule = train.make_optimizer(config, stage)
  graphdef, state, sh = train.create_state(config, stage, problem, mesh)
  if config.model.backbone != 'scratch':
    state['nnx'][0]['backbone'] = train.load_pretrained_backbone(config, state, sh)
  step = jax.jit(train.make_train_step(config, stage, graphdef, problem, schedule),
                 in_shardings=(sh, sharding.batch_sharding(mesh)),
                 out_shardings=(sh, sharding.replicated(mesh)), donate_argnums=0)
  losses = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, metrics = step(state, pipeline.to_global(b, sharding.batch_sharding(mesh)))
      losses.append(float(metrics['loss']))
  return losses, [np.asarray(x) for x in jax.tree.leaves(state['nnx'])], state, sh


def setup(config, workdir):
  problem = train.prepare_problem(config, workdir)
  feat = pipeline.Featurize(problem.tokenizer, config.data.max_len, extras=problem.tables['train'])
  it = iter(pipeline.make_dataset(problem.builder.as_data_source(split='train'), feat,
                                  global_batch_size=32, seed=0))
  return problem, [next(it) for _ in range(STEPS)]


def backbone_main(workdir, checkpoint):
  config = tiny_config(workdir)
  config.model.update(backbone='hf_encoder', checkpoint=checkpoint)
  problem, batches = setup(config, workdir)
  ref_losses, ref_params, _, _ = run(config, problem, 'sft', mesh_of((1, 1, 1), 1), batches)
  losses, params, state, _ = run(config, problem, 'sft', mesh_of((2, 2, 2), 8), batches)
  kernel = state['nnx'][0]['backbone']['layers'][0]['attn']['wq'][...]
  print('RESULT ' + json.dumps({
      'loss_rel': max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
      'param_abs': max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)),
      'wq_spec': [None if a is None else str(a) for a in kernel.sharding.spec]}))


def main(workdir):
  workdir = pathlib.Path(workdir)
  config = tiny_config(workdir)
  config.model.update(d_model=32, num_heads=4, mlp_dim=64)
  problem, batches = setup(config, workdir)
  out = {}
  for stage in ('sft', 'rl'):
    ref_losses, ref_params, _, _ = run(config, problem, stage, mesh_of((1, 1, 1), 1), batches)
    for name, shape in MESHES.items():
      losses, params, state, sh = run(config, problem, stage, mesh_of(shape, 8), batches)
      out[f'{stage} {name}'] = {
          'loss_rel': max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
          'param_abs': max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)),
      }

  # A checkpoint written on 8 devices (data=2 x fsdp=4) restores on 4 and on 1.
  _, _, state, sh = run(config, problem, 'sft', mesh_of((2, 4, 1), 8), batches[:1])
  want = [np.asarray(x) for x in jax.tree.leaves(state)]
  manager = ocp.CheckpointManager((workdir / 'ckpt').absolute())
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  for n, shape in ((4, (2, 2, 1)), (1, (1, 1, 1))):
    mesh = mesh_of(shape, n)
    _, _, target_sh = state_lib.abstract_train_state(config, 'sft', problem.tokenizer.vocab_size,
                                                     len(problem.model_names), mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, target_sh)
    restored = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    leaves = jax.tree.leaves(restored)
    out[f'restore on {n}'] = {
        'equal': all(np.array_equal(np.asarray(a), b) for a, b in zip(leaves, want)),
        'devices': sorted({len(x.sharding.device_set) for x in leaves}),
    }
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  if len(sys.argv) > 2 and sys.argv[2].startswith('--backbone='):
    backbone_main(pathlib.Path(sys.argv[1]), sys.argv[2].split('=', 1)[1])
  else:
    main(sys.argv[1])
