"""The training entry point end to end on a tiny config, resume, configs and the CLI."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, kill_then_rerun
from configs import common, rl as rl_config, sft as sft_config, transformer as transformer_config
from entrorouter_jax import train


def tiny_config(tmp_path, sft_steps=60, rl_steps=60):
  """The token transformer (configs/transformer.py) at a tiny size."""
  config = transformer_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.synthetic.update(num_train=800, num_validation=50, num_test=300)
  config.data.max_len = 32
  config.data.vocab_size = 300
  config.model.update(num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  config.anchor.k = 20
  config.anchor.dim = 32
  config.sft.update(num_steps=sft_steps, batch_size=32, learning_rate=3e-3, warmup_steps=5)
  config.rl.update(num_steps=rl_steps, batch_size=32, learning_rate=1e-3, warmup_steps=5)
  config.log_every = 10
  config.checkpoint_every = 20
  config.eval_batch_size = 128
  return config


def test_tiny_sft_then_rl_beats_the_uniform_policy(tmp_path):
  config = tiny_config(tmp_path)
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, workdir)

  saved = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert saved['router']['accuracy'] == pytest.approx(results['router']['accuracy'])
  for key in ('dataset', 'split', 'models', 'strongest', 'router', 'oracle', 'single_models',
              'expected_utility'):
    assert key in saved
  for key in ('accuracy', 'cost', 'retained_accuracy', 'cost_saved', 'share', 'entropy'):
    assert key in saved['router']
  assert set(saved['router']['share']) == set(saved['models'])
  assert sum(saved['router']['share'].values()) == pytest.approx(1.0)
  utility = saved['expected_utility']
  assert set(utility) >= {'router', 'bayes_optimal', 'uniform'}
  assert utility['router'] > utility['uniform'] + 0.3 * (utility['bayes_optimal'] - utility['uniform'])

  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['stage'], r['step']) for r in records] == (
      [('sft', s) for s in range(10, 61, 10)] + [('rl', s) for s in range(10, 61, 10)])
  for r in records:
    assert {'step', 'stage', 'loss', 'entropy'} <= set(r) and np.isfinite(r['loss'])
  assert any(f.name.startswith('events') for f in (workdir / 'tensorboard').iterdir())
  # RL logs its own terms and diagnostics.
  assert {'pg_loss', 'anchor_loss', 'entropy_loss', 'kl_anchor', 'alpha', 'beta',
          'entropy_target', 'kl_old', 'batch_entropy'} <= set(records[-1])


def _final_params(workdir):
  manager = ocp.CheckpointManager(pathlib.Path(workdir, 'checkpoints', 'rl').absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  return manager.latest_step(), jax.tree.leaves(state)


def _train_cmd(workdir, tmp_path, extra=()):
  overrides = {
      'data.data_dir': tmp_path / 'tfds', 'data.synthetic.num_train': 400,
      'data.synthetic.num_validation': 20, 'data.synthetic.num_test': 100,
      'data.max_len': 24, 'data.vocab_size': 200, 'model.num_layers': 1, 'model.d_model': 16,
      'model.num_heads': 2, 'model.mlp_dim': 32, 'anchor.k': 10, 'anchor.dim': 16,
      'sft.num_steps': 30, 'sft.batch_size': 16, 'rl.num_steps': 40, 'rl.batch_size': 16,
      'log_every': 5, 'checkpoint_every': 10,
  }
  return ([sys.executable, '-m', 'entrorouter_jax.train', '--config=configs/transformer.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
          + list(extra))


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  """kill -9 mid-RL, rerun: the final parameters equal an uninterrupted run's, bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  straight = tmp_path / 'straight'
  subprocess.run(_train_cmd(straight, tmp_path), cwd=REPO_ROOT, env=env, check=True,
                 capture_output=True)

  resumed = tmp_path / 'resumed'
  out = kill_then_rerun(_train_cmd(resumed, tmp_path), resumed / 'checkpoints' / 'rl' / '20', env)
  # The rerun's RL progress bar starts at the checkpointed step (20 of 40).
  assert re.search(r'rl:\s+50%\|[^|\n]*\| 20/40 ', out.stderr), out.stderr[-4000:]

  step_a, leaves_a = _final_params(straight)
  step_b, leaves_b = _final_params(resumed)
  assert step_a == step_b == 40
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The metrics file holds each logged step once.
  lines = [json.loads(l) for l in (resumed / 'metrics.jsonl').read_text().splitlines()]
  keys = [(r['stage'], r['step']) for r in lines]
  assert len(keys) == len(set(keys)) == 30 // 5 + 40 // 5
  want = [json.loads(l) for l in (straight / 'metrics.jsonl').read_text().splitlines()]
  assert [r['loss'] for r in lines] == [r['loss'] for r in want]


def test_rl_starts_from_a_named_sft_checkpoint(tmp_path):
  config = tiny_config(tmp_path, sft_steps=20, rl_steps=10)
  config.stages = 'sft'
  train.train_and_evaluate(config, tmp_path / 'sft')
  config = tiny_config(tmp_path, sft_steps=20, rl_steps=10)
  config.rl.init_checkpoint = str(tmp_path / 'sft')
  train.train_and_evaluate(config, tmp_path / 'rl')
  assert not (tmp_path / 'rl' / 'checkpoints' / 'sft').exists()
  assert (tmp_path / 'rl' / 'checkpoints' / 'rl' / '10').is_dir()
  config.rl.init_checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(train.TrainingError, match='nowhere'):
    train.train_and_evaluate(config, tmp_path / 'rl2')


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
  config = tiny_config(tmp_path, sft_steps=10, rl_steps=0)
  config.stages = 'sft'
  config.model.temperature = 0.0      # logits / 0 -> inf/nan
  with pytest.raises(train.TrainingError, match='loss became nan'):
    train.train_and_evaluate(config, tmp_path / 'bad')


@pytest.mark.parametrize('module', [common, rl_config, sft_config, transformer_config])
def test_every_config_loads_and_every_key_is_read(module):
  config = module.get_config() if hasattr(module, 'get_config') else module.get_base_config()
  source = '\n'.join(p.read_text() for p in (REPO_ROOT / 'entrorouter_jax').rglob('*.py'))
  unused = []

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items') and key != 'read_options':
        walk(value, prefix + key + '.')
      elif not re.search(rf"\.{key}\b|['\"]{key}['\"]", source):
        unused.append(prefix + key)

  walk(config, '')
  assert not unused, f'config keys that no code reads: {unused}'


def test_bad_stage_list_is_an_error(tmp_path):
  config = tiny_config(tmp_path)
  config.stages = 'rl,sft'
  with pytest.raises(train.TrainingError, match='stages'):
    train.stage_list(config)


@pytest.mark.parametrize('content,expected', [
    ('id,prompt,a,a|total_cost\nq1,hello,1.5,0.1\n', r"row 1.*'a'.*1\.5.*\[0, 1\]"),
    ('id,text,a,a|total_cost\nq1,hello,1,0.1\n', r'query column'),
    ('id,prompt,a,a|total_cost\nq1,hello,1,-2\n', r'row 1.*-2'),
])
def test_cli_bad_data_file_exits_with_a_clear_error(tmp_path, content, expected):
  bad = tmp_path / 'BAD.csv'
  bad.write_text(content)
  out = subprocess.run(
      [sys.executable, '-m', 'entrorouter_jax.train', '--config=configs/rl.py',
       '--config.data.name=routing_files', f'--config.data.files={bad}',
       f'--workdir={tmp_path / "w"}', f'--config.data.data_dir={tmp_path / "tfds"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  error = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(error) == 1, out.stderr
  assert 'BAD.csv' in error[0] and re.search(expected, error[0]), error[0]


@pytest.mark.parametrize('overrides', [
    {'model.lambda_conditioned': True, 'model.lambda_min': 0.0, 'model.lambda_max': 1.0},
    {'rl.estimator': 'exact'},
    {'rl.ppo_epochs': 2, 'rl.normalize_advantage': True},
    {'model.anchor_in_logits': True, 'model.pooling': 'cls', 'model.positions': 'rotary'},
])
def test_training_variants_run(tmp_path, overrides):
  config = tiny_config(tmp_path, sft_steps=10, rl_steps=10)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  results = train.train_and_evaluate(config, tmp_path / 'run')
  assert 0.0 <= results['router']['accuracy'] <= 1.0
  records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['stage'] == 'rl' and np.isfinite(records[-1]['loss'])
