"""The memory planner: exact state bytes, a sane activation estimate, FSDP savings."""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from configs import rl as rl_config, transformer as transformer_config
from entrorouter_jax import plan as plan_lib
from entrorouter_jax import sharding, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
V, K = 300, 5

# Planner total vs XLA's compiled footprint of the SFT step: accepted within
# [0.5, 2]. The planner counts what must be live at the peak of a train step
# (state, one gradient copy, the activations kept for the backward pass); XLA
# fuses elementwise ops (fewer buffers) but also holds transient buffers
# (optimizer update temporaries, the batch, metrics) the planner ignores, so a
# factor of 2 either way is the honest resolution of an a-priori estimate.
RATIO_RANGE = (0.5, 2.0)


def tiny_config():
  config = transformer_config.get_config()
  config.data.max_len = 32
  config.data.vocab_size = V
  config.model.size = 'tiny'
  config.sft.batch_size = 32
  config.rl.batch_size = 32
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def fake_problem():
  """What create_state / make_train_step read of a Problem, and nothing else."""
  return types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=V),
                               model_names=[f'm{i}' for i in range(K)], strongest=0, c_ref=1.0,
                               feature_dim=None, lambda_set=None)


def fake_batch(b, length):
  rng = np.random.default_rng(0)
  return {
      'tokens': jnp.asarray(rng.integers(0, V, (b, length)), jnp.int32),
      'token_mask': jnp.asarray(rng.random((b, length)) < 0.8),
      'outcomes': jnp.asarray(rng.random((b, K)) < 0.5, jnp.float32),
      'outcome_mask': jnp.ones((b, K), bool),
      'costs': jnp.asarray(rng.random((b, K)), jnp.float32),
      'p_hat': jnp.full((b, K), 0.5, jnp.float32),
      'c_bar': jnp.full((b, K), 0.5, jnp.float32),
      'index': jnp.arange(b, dtype=jnp.int32),
  }


def test_state_bytes_are_exact_and_estimate_matches_compiled_step():
  config = tiny_config()
  problem = fake_problem()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  p = plan_lib.plan(config, num_devices=1, vocab_size=V, num_models=K)
  sft = p['stages']['sft']

  # (1) parameters + optimizer == the real train state, byte for byte.
  graphdef, state, shardings = train.create_state(config, 'sft', problem, mesh)
  real = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  real_params = sum(x.nbytes for x in jax.tree.leaves(state['nnx'][0]))
  assert sft['params_bytes'] + sft['optimizer_bytes'] == real
  assert sft['params_bytes'] == real_params
  assert sft['num_params'] == sum(x.size for x in jax.tree.leaves(state['nnx'][0]))

  # (2) the whole estimate vs XLA's memory analysis of the compiled SFT step.
  _, schedule = train.make_optimizer(config, "sft")
  step = jax.jit(train.make_train_step(config, 'sft', graphdef, problem, schedule),
                 donate_argnums=0)
  batch = fake_batch(config.sft.batch_size, config.data.max_len)
  with jax.set_mesh(mesh):
    stats = step.lower(state, batch).compile().memory_analysis()
  compiled = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  ratio = sft['total_bytes'] / compiled
  print(f'planner {sft["total_bytes"]} B / compiled {compiled} B = {ratio:.2f}')
  assert RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1], (sft, stats)
  assert 'parameters' in plan_lib.format_plan(p)


def test_abstract_mesh_when_devices_are_missing():
  config = tiny_config()
  config.mesh.update(data=2, fsdp=4)
  p = plan_lib.plan(config, num_devices=8, vocab_size=V, num_models=K)
  assert p['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert p['stages']['rl']['batch_per_device'] == 4
  if len(jax.devices()) < 8:
    assert not p['mesh_built']


def _cli(*overrides):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'entrorouter_jax.plan', '--config=configs/transformer.py',
       '--config.model.size=small', '--num_devices=8', '--json', *overrides],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fsdp_cuts_parameter_bytes_on_eight_devices():
  procs = {'data8': _cli('--config.mesh.data=8'),
           'fsdp4': _cli('--config.mesh.data=2', '--config.mesh.fsdp=4')}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    *table, last = stdout.strip().splitlines()   # the table, then the --json line
    table = '\n'.join(table)
    assert 'parameters' in table and 'optimizer' in table, stdout
    out[name] = json.loads(last)
  for name in out:
    assert out[name]['mesh_built'], 'the 8 fake devices were not seen'
  data8, fsdp4 = out['data8']['stages']['sft'], out['fsdp4']['stages']['sft']
  assert data8['params_bytes'] == data8['params_bytes_global']   # pure data parallel
  ratio = data8['params_bytes'] / fsdp4['params_bytes']
  assert 3.0 <= ratio <= 4.0, ratio
  assert 3.0 <= data8['optimizer_bytes'] / fsdp4['optimizer_bytes'] <= 4.0
  assert math.isclose(fsdp4['params_bytes_global'], data8['params_bytes_global'])


def test_embeddings_recipe_state_bytes_are_exact():
  """configs/rl.py (the embeddings backbone, whose stages keep a best copy): the
  plan's parameters + optimizer are the real train state's bytes."""
  config = rl_config.get_config()
  config.anchor.update(space='tfidf', dim=48)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  p = plan_lib.plan(config, num_devices=1, num_models=K)
  problem = types.SimpleNamespace(tokenizer=None, model_names=[f'm{i}' for i in range(K)],
                                  feature_dim=48)
  for stage in ('sft', 'rl'):
    _, state, _ = train.create_state(config, stage, problem, mesh)
    assert 'best' in state
    real = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    planned = p['stages'][stage]
    assert planned['params_bytes'] + planned['optimizer_bytes'] == real
    assert planned['num_params'] == sum(x.size for x in jax.tree.leaves(state['nnx'][0]))
    assert planned['activation_bytes'] > 0
  assert '5 MLP members x 256 hidden on 48-d tfidf features' in plan_lib.format_plan(p)
