"""The training entry point end to end on a tiny config, resume, configs and the CLI."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, final_state, straight_and_resumed
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
  straight, resumed, out = straight_and_resumed(lambda w: _train_cmd(w, tmp_path), tmp_path, env,
                                                kill_at_rl_step=20)
  # The rerun's RL progress bar starts at the checkpointed step (20 of 40).
  assert re.search(r'rl:\s+50%\|[^|\n]*\| 20/40 ', out.stderr), out.stderr[-4000:]
  assert final_state(resumed)[0] == 40
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


# Names the code gives a config section besides its own (config[stage] for both stages).
SECTION_ALIASES = {'sft': ('stage_cfg',), 'rl': ('stage_cfg',)}


@pytest.mark.parametrize('module', [common, rl_config, sft_config, transformer_config])
def test_every_config_loads_and_every_key_is_read(module):
  """Every leaf key is read where its section is: `section.key` (config.anchor.k,
  anchor.k), `section_cfg.key` (a section passed on), through a name the section is
  assigned to (`s = data_cfg.synthetic`; s.num_train), or by its quoted name;
  top-level keys as `config.key`."""
  config = module.get_config() if hasattr(module, 'get_config') else module.get_base_config()
  source = '\n'.join(p.read_text() for p in (REPO_ROOT / 'entrorouter_jax').rglob('*.py'))
  unused = []

  def names_of(section):
    assigned = re.findall(rf"^\s*(\w+) = [\w.]*\.{section}\s*$", source, re.M)
    return {section, f'{section}_cfg', *assigned, *SECTION_ALIASES.get(section, ())}

  def walk(node, prefix, section):
    for key, value in node.items():
      if hasattr(value, 'items') and key != 'read_options':
        walk(value, prefix + key + '.', key)
        continue
      owners = names_of(section) if section else {'config'}
      read = any(re.search(rf"\b{name}\.{key}\b", source) for name in owners)
      if not read and not re.search(rf"['\"]{key}['\"]", source):
        unused.append(prefix + key)

  walk(config, '', None)
  assert not unused, f'config keys that no code reads: {unused}'


def test_bad_stage_list_is_an_error(tmp_path):
  config = tiny_config(tmp_path)
  config.stages = 'rl,sft'
  with pytest.raises(train.TrainingError, match='stages'):
    train.stage_list(config)


def test_workdir_files_of_older_runs_load(tmp_path):
  """stage0.pkl is a pickled dict (older runs' too, some without the training
  table), router.json may lack the newer keys; both load into their dataclasses."""
  import pickle
  from entrorouter_jax import workdir as workdir_lib
  feats = np.ones((3, 2), np.float32)
  full = {'key': 'k', 'strongest': 1, 'c_ref': 0.5, 'space': 'a space',
          'tables': {'train': {'p_hat': feats, 'c_bar': feats}},
          'features': {'train': feats}, 'train_feats': feats, 'train_outcomes': feats,
          'train_mask': feats > 0, 'train_cost_hat': feats, 'train_tasks': ['t'] * 3}
  (tmp_path / 'stage0.pkl').write_bytes(pickle.dumps(full))
  stage0 = workdir_lib.load_stage0(tmp_path)
  assert (stage0.strongest, stage0.c_ref, stage0.space, stage0.train_tasks) == (
      1, 0.5, 'a space', ['t'] * 3)
  workdir_lib.write_stage0(tmp_path, stage0)
  assert list(pickle.loads((tmp_path / 'stage0.pkl').read_bytes())) == list(full)
  older = {k: full[k] for k in ('strongest', 'c_ref', 'space', 'tables')}
  (tmp_path / 'stage0.pkl').write_bytes(pickle.dumps(older))
  assert workdir_lib.read_stage0(tmp_path).key is None
  with pytest.raises(workdir_lib.RouterError, match='lacks the training table'):
    workdir_lib.load_stage0(tmp_path)
  (tmp_path / 'router.json').write_text(json.dumps(
      {'model_names': ['a', 'b'], 'strongest': 1, 'c_ref': 0.5, 'model_costs': [0.1, 1.0]}))
  info = workdir_lib.read_router_info(tmp_path)
  assert (info.model_names, info.feature_dim, info.lambda_set) == (['a', 'b'], None, None)


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
def test_training_variants_learn(tmp_path, overrides):
  """Each variant trains end to end: finite losses, RL moves the parameters SFT left,
  and the router beats the uniform policy's expected utility."""
  config = tiny_config(tmp_path, sft_steps=20, rl_steps=10)
  config.update_from_flattened_dict(overrides)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)
  saved = json.loads((workdir / 'eval' / 'results.json').read_text())
  utility = saved['expected_utility']
  assert utility['router'] > utility['uniform'], utility
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {r['stage'] for r in records} == {'sft', 'rl'}
  assert all(np.isfinite(r['loss']) for r in records)
  _, sft_leaves = final_state(workdir, 'sft')
  _, rl_leaves = final_state(workdir, 'rl')
  assert any(a.shape == b.shape and not np.array_equal(a, b)
             for a, b in zip(map(np.asarray, sft_leaves), map(np.asarray, rl_leaves)))
  if config.model.lambda_conditioned:   # one checkpoint, a policy per cost weight
    from entrorouter_jax import router as router_lib
    router = router_lib.load_router(workdir)
    queries = ['What is 2 + 2?', 'Prove the theorem.', 'Write a sorting function.']
    assert not np.allclose(router.probs(queries, 0.0), router.probs(queries, 1.0))
