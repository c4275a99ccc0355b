"""The default recipe: embeddings backbone, cross-fitted members, utility head, stage selection."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, final_state, straight_and_resumed
from configs import rl as rl_config
from entrorouter_jax import (baselines, features, policy, route, router as router_lib,
                             selection, sharding, steps, suite, train)
from entrorouter_jax import metrics as metrics_lib
from entrorouter_jax.data import pipeline


def recipe_config(tmp_path, sft_steps=80, rl_steps=30, **model):
  """The recipe at a tiny size (TF-IDF space: no sentence encoder to run)."""
  config = rl_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.synthetic.update(num_train=600, num_validation=40, num_test=200)
  config.anchor.update(space='tfidf', k=20, dim=32)
  config.model.update(members=3, hidden=32, **model)
  config.sft.update(num_steps=sft_steps, batch_size=32, learning_rate=3e-3, warmup_steps=5,
                    select_every=10, patience=0, soft_weight_choices='0,0.3')
  config.rl.update(num_steps=rl_steps, batch_size=32, warmup_steps=5, select_every=10)
  config.log_every = 10
  config.checkpoint_every = 20
  config.eval_batch_size = 128
  return config


def test_utility_policy_matches_numpy():
  config = rl_config.get_config()
  config.model.update(members=3, hidden=8, temperature=0.2)
  model = policy.build_model(config, 1, 4, seed=0, feature_dim=6)
  rng = np.random.default_rng(0)
  batch = {'features': rng.normal(size=(5, 6)).astype(np.float32),
           'p_hat': rng.uniform(size=(5, 4)).astype(np.float32),
           'c_bar': rng.uniform(size=(5, 4)).astype(np.float32)}
  lam = np.array([0.0, 0.1, 0.5, 1.0, 3.0], np.float32)
  members = np.asarray(model(None, None, features=jnp.asarray(batch['features']), members=True))
  assert members.shape == (3, 5, 4)
  s = (1.0 / (1.0 + np.exp(-members))).mean(axis=0)
  want = (s - lam[:, None] * batch['c_bar']) / 0.2
  got = np.asarray(policy.policy_logits(model, batch, jnp.asarray(lam), config))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # lambda enters exactly: the policy's argmax is argmax s - lambda c_bar.
  np.testing.assert_array_equal(got.argmax(1), (s - lam[:, None] * batch['c_bar']).argmax(1))


def test_member_weights_and_spread_lambdas():
  fold = jnp.array([0, 1, 2, 0])
  np.testing.assert_array_equal(steps.member_weights(fold, 3, False),
                                [[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]])
  assert steps.member_weights(fold, 1, False) is None
  np.testing.assert_array_equal(steps.member_weights(fold, 1, True), [[0, 1, 1, 0]])
  # Two models: model 1 is better by 0.2 on every query and dearer by 1 (c_hat 0 vs 1).
  # Any lambda below 0.2 routes all to model 1 (cost 1), above it all to model 0 (cost 0).
  scores = np.array([[0.5, 0.7]] * 4)
  c = np.array([[0.0, 1.0]] * 4)
  y = np.array([[0, 1], [1, 1], [0, 1], [0, 0]], float)
  lams = baselines.spread_lambdas(scores, c, y, np.ones_like(y, bool), c, num=3)
  assert lams[0] < 0.2 < lams[-1]
  assert all(baselines.route(scores, c, l)[0] in (0, 1) for l in lams)


def test_batch_size_scales_down_on_small_data():
  assert train.scaled_batch_size(128, 20_000) == 128
  assert train.scaled_batch_size(128, 512) == 128          # a quarter is exactly 128
  assert train.scaled_batch_size(128, 500) == 64           # 125 -> 64
  assert train.scaled_batch_size(128, 100) == 16           # 25 -> 16
  assert train.scaled_batch_size(128, 10, divisor=8) == 8  # never below the mesh's divisor


def test_features_concat_space_and_encoder_cache(tmp_path, monkeypatch):
  texts = [f'question {i} about {"math" if i % 2 else "law"} and topic {i % 7}' for i in range(80)]
  tfidf = features.TfidfSpace(dim=8, min_df=1)
  both = features.ConcatSpace([tfidf, features.TfidfSpace(dim=4, min_df=1)])
  z = both.fit_transform(texts)
  assert z.shape == (80, 12)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  a, b = tfidf.transform(texts), both.spaces[1].transform(texts)
  np.testing.assert_allclose(z @ z.T, (a @ a.T + b @ b.T) / 2, atol=1e-5)

  calls = []

  class FakeBackbone:
    def transform(self, texts, progress=False):
      calls.append(len(texts))
      return np.tile(np.eye(3, dtype=np.float32)[:1], (len(texts), 1))

  space = features.EncoderSpace('some/folder', 64, 'left', cache=str(tmp_path / 'cache'))
  monkeypatch.setattr(space, '_backbone_space', lambda: FakeBackbone())
  first = space.transform(texts)
  again = space.transform(texts)
  np.testing.assert_array_equal(first, again)
  assert calls == [80]                             # the second call read the cache
  space.transform(texts[:10])                      # small sets are not cached
  space.transform(texts[:10])
  assert calls == [80, 10, 10]
  assert len(list((tmp_path / 'cache' / 'embeddings').glob('*.npy'))) == 1
  other = features.EncoderSpace('another/folder', 64, 'left', cache=str(tmp_path / 'cache'))
  monkeypatch.setattr(other, '_backbone_space', lambda: FakeBackbone())
  other.transform(texts)                           # another encoder: another key
  assert calls == [80, 10, 10, 80]
  # Routing turns the disk cache off: its batches are new texts.
  routed = features.for_routing(features.ConcatSpace([features.TfidfSpace(), other]))
  assert routed.spaces[1].disk_cache is False
  files = len(list((tmp_path / 'cache' / 'embeddings').glob('*.npy')))
  other.transform([t + ' (new)' for t in texts])
  assert calls == [80, 10, 10, 80, 80]
  assert len(list((tmp_path / 'cache' / 'embeddings').glob('*.npy'))) == files


def _train_batches(problem, n):
  """The first `n` batches of 32 of the training table the recipe's steps read."""
  dataset = pipeline.make_table_dataset(problem.train_table(), global_batch_size=32, seed=0)
  return [dict(b) for b, _ in zip(iter(dataset), range(n))]


def test_members_never_train_on_their_own_fold(tmp_path):
  config = recipe_config(tmp_path)
  config.optim.weight_decay = 0.0
  problem = train.prepare_problem(config, tmp_path / 'w')
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, shardings = train.create_state(config, 'sft', problem, mesh)
  _, schedule = train.make_optimizer(config, 'sft')
  step = jax.jit(train.make_train_step(config, 'sft', graphdef, problem, schedule))
  batch = _train_batches(problem, 1)[0]
  batch['fold'] = np.zeros_like(batch['fold'])     # every row in fold 0
  before = jax.device_get(state['nnx'][0]['members'])
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, batch)        # learning rate 0 at step 0 (warmup)
    new_state, metrics = step(new_state, batch)
  after = jax.device_get(new_state['nnx'][0]['members'])
  for name in ('w1', 'b1', 'w2', 'b2'):
    old, new = np.asarray(before[name][...]), np.asarray(after[name][...])
    np.testing.assert_array_equal(new[0], old[0])          # member 0 holds fold 0 out
    assert not np.array_equal(new[1:], old[1:])
  assert np.isfinite(float(metrics['dense_loss']))


def test_soft_weight_argument_equals_the_configured_weight(tmp_path):
  """The step's `soft_weight` argument (what lets the Stage-1 candidates share
  one compiled step) trains exactly as `sft.soft_weight` in the config does."""
  config = recipe_config(tmp_path)
  problem = train.prepare_problem(config, tmp_path / 'w')
  mesh = sharding.make_mesh(config.mesh)
  batches = _train_batches(problem, 3)

  def trained(weight, passed):
    cfg = copy.deepcopy(config)
    cfg.sft.soft_weight = 0.0 if passed else weight
    graphdef, state, _ = train.create_state(cfg, 'sft', problem, mesh)
    _, schedule = train.make_optimizer(cfg, 'sft')
    step = jax.jit(train.make_train_step(cfg, 'sft', graphdef, problem, schedule))
    losses = []
    with jax.set_mesh(mesh):
      for b in batches:
        state, metrics = (step(state, b, np.float32(weight)) if passed else step(state, b))
        losses.append(float(metrics['loss']))
    return losses, jax.tree.leaves(jax.device_get(state['nnx'][0]))

  want_losses, want_params = trained(0.3, passed=False)
  got_losses, got_params = trained(0.3, passed=True)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
  for g, w in zip(got_params, want_params):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
  assert trained(0.0, passed=False)[0] != want_losses   # the weight does matter


def test_recipe_trains_selects_and_routes_along_its_curve(tmp_path, monkeypatch):
  config = recipe_config(tmp_path)
  workdir = tmp_path / 'run'
  built = []
  make_step = train.make_train_step
  monkeypatch.setattr(train, 'make_train_step',
                      lambda config, stage, *a: built.append(stage) or make_step(config, stage, *a))
  results = train.train_and_evaluate(config, workdir)
  assert built == ['sft', 'rl']   # the two Stage-1 candidates share one compiled step
  utility = results['expected_utility']
  assert utility['router'] > utility['uniform'] + 0.5 * (utility['bayes_optimal'] - utility['uniform'])

  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  checks = [r for r in records if 'select_score' in r]
  stages = ('sft_soft0', 'sft_soft0.3', 'rl')
  assert [(r['stage'], r['step']) for r in checks] == (
      [(c, s) for c in stages[:2] for s in range(0, 81, 10)] + [('rl', s) for s in range(0, 31, 10)])
  for stage in stages:
    scores = [r['select_score'] for r in checks if r['stage'] == stage]
    best = [r['select_best'] for r in checks if r['stage'] == stage]
    np.testing.assert_allclose(best, np.minimum.accumulate(scores), rtol=1e-6)
  # Stage 1 ran once per soft weight and kept the best out-of-fold utility;
  # RL started from that candidate (its first check scores the same parameters).
  choice = json.loads((workdir / 'sft_choice.json').read_text())
  utilities = {n: c['oof_utility'] for n, c in choice['candidates'].items()}
  assert set(utilities) == {'sft_soft0', 'sft_soft0.3'}
  assert choice['chosen'] == max(utilities, key=utilities.get)
  assert choice['soft_weight'] == {'sft_soft0': 0.0, 'sft_soft0.3': 0.3}[choice['chosen']]
  rl_start = next(r['select_score'] for r in checks if r['stage'] == 'rl')
  assert rl_start == pytest.approx(-utilities[choice['chosen']], rel=1e-5)
  logged = [r for r in records if 'loss' in r]
  assert {'dense_loss', 'soft_loss', 'temperature'} <= set(logged[0])
  info = json.loads((workdir / 'router.json').read_text())
  assert info['feature_dim'] == 32 and len(info['lambda_set']) >= 2
  assert info['checkpoint'] == 'checkpoints/rl'

  # The final checkpoint holds the parameters of the best RL check.
  problem = train.prepare_problem(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _, _ = train.create_state(config, 'rl', problem, mesh)
  score = train.make_selection_score(config, 'rl', graphdef, problem, mesh)
  _, target = train.state_lib.abstract_state(config, 'rl', 1, len(problem.model_names), mesh,
                                            problem.feature_dim)
  manager = ocp.CheckpointManager(workdir / 'checkpoints' / 'rl',
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']
  assert int(restored['done']) == 1
  final = score(restored['nnx'])
  assert final == pytest.approx(min(r['select_score'] for r in checks if r['stage'] == 'rl'),
                                rel=1e-5)

  # One checkpoint, the whole curve: a higher cost weight never routes dearer.
  router = router_lib.load_router(workdir)
  queries = problem.test.queries[:100].tolist()
  costs = []
  for lam in (0.0, 0.05, 0.3, 2.0, 50.0):
    recs = route.route_records(router, queries, cost_weight=lam)
    costs.append(np.mean([router.model_costs[router.model_names.index(r['model'])] for r in recs]))
  assert all(a >= b - 1e-12 for a, b in zip(costs, costs[1:])), costs
  assert costs[0] > costs[-1]
  success, c_bar = router.scores(queries)
  np.testing.assert_array_equal(
      [router.model_names.index(r['model']) for r in route.route_records(router, queries, 0.3)],
      baselines.route(success, c_bar, 0.3))

  # A finished run reruns as a no-op with the same result.
  again = train.train_and_evaluate(config, workdir)
  assert again['router'] == results['router']


def test_early_stopping_ends_the_stage_with_its_best_parameters(tmp_path):
  config = recipe_config(tmp_path, sft_steps=400, rl_steps=0)
  config.stages = 'sft'
  config.sft.update(learning_rate=3e-2, patience=2, select_every=10, soft_weight_choices='')
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  checks = [r for r in records if 'select_score' in r]
  last = checks[-1]['step']
  assert last < 400                                   # it stopped early ...
  scores = [r['select_score'] for r in checks]
  best_at = int(np.argmin(scores))
  assert len(scores) - 1 - best_at == 2               # ... two checks after its best
  manager = ocp.CheckpointManager(workdir / 'checkpoints' / 'sft',
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  assert manager.latest_step() == last


def test_sft_candidates_alone_route_and_start_rl(tmp_path):
  """stages='sft' with candidates: routing and rl.init_checkpoint find the chosen one."""
  config = recipe_config(tmp_path, sft_steps=20)
  config.stages = 'sft'
  workdir = tmp_path / 'sft_only'
  train.train_and_evaluate(config, workdir)
  chosen = json.loads((workdir / 'sft_choice.json').read_text())['chosen']
  info = json.loads((workdir / 'router.json').read_text())
  assert info['checkpoint'] == f'checkpoints/{chosen}' and info['final_stage'] == 'sft'
  router = router_lib.load_router(workdir)
  assert len(route.route_records(router, ['a level 2 question about algebra'])) == 1
  problem = train.prepare_problem(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  params = train._restore_params(config, workdir, 'sft', problem, mesh)
  manager = ocp.CheckpointManager(workdir / 'checkpoints' / chosen,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  saved = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']['nnx']
  saved = saved.get(0, saved.get('0'))          # the model's half of (model, optimizer)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_route_cli_takes_a_cost_weight(tmp_path):
  config = recipe_config(tmp_path, sft_steps=20, rl_steps=10)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  outs = []
  for lam in ('0', '1000'):
    out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.route', f'--workdir={workdir}',
                          f'--cost_weight={lam}', 'a level 5 question about algebra'],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    outs.append(json.loads(out.stdout))
  names = json.loads((workdir / 'router.json').read_text())['model_names']
  costs = json.loads((workdir / 'router.json').read_text())['model_costs']
  assert costs[names.index(outs[1]['model'])] == min(costs)   # lambda huge: the cheapest
  bad = subprocess.run([sys.executable, '-m', 'entrorouter_jax.route', f'--workdir={workdir}',
                        '--cost_weight=-1', 'x'], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and 'cost_weight' in bad.stderr and 'Traceback' not in bad.stderr

  # evaluate: the router's curve is its lambda sweep (the baselines' lambdas).
  out = subprocess.run([sys.executable, '-m', 'entrorouter_jax.evaluate', f'--workdir={workdir}'],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  lams = [p['lambda'] for p in results['curve']]
  assert lams[0] == 0.0 and lams == sorted(lams) and 0.0 < results['aiq'] <= 1.0
  assert results['curve'][-1]['cost'] == min(
      v['cost'] for k, v in results['baselines'].items() if k.startswith('single:'))
  for name in ('knn', 'linear', 'mlp', 'ensemble', 'task_best', 'oracle', 'random'):
    assert 0.0 < results['baselines'][name]['aiq'] <= 1.0, name
  assert results['baselines']['oracle']['aiq'] >= results['aiq']


def _recipe_cmd(workdir, tmp_path):
  overrides = {
      'data.data_dir': tmp_path / 'tfds', 'data.synthetic.num_train': 300,
      'data.synthetic.num_validation': 20, 'data.synthetic.num_test': 60,
      'anchor.space': 'tfidf', 'anchor.k': 10, 'anchor.dim': 16, 'model.members': 2,
      'model.hidden': 16, 'sft.num_steps': 30, 'sft.batch_size': 16, 'sft.select_every': 5,
      'sft.soft_weight_choices': '0,0.3',
      'sft.patience': 0, 'rl.num_steps': 40, 'rl.batch_size': 16, 'rl.select_every': 5,
      'log_every': 5, 'checkpoint_every': 10,
  }
  return ([sys.executable, '-m', 'entrorouter_jax.train', '--config=configs/rl.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()])


def test_recipe_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  """kill -9 mid-RL (selection state included), rerun: the same final state, bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  straight, resumed, _ = straight_and_resumed(lambda w: _recipe_cmd(w, tmp_path), tmp_path, env,
                                              kill_at_rl_step=20)
  assert final_state(resumed)[0] == 40
  rows = lambda d: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
  keys = [(r['stage'], r['step'], 'select_score' in r) for r in rows(resumed)]
  assert len(keys) == len(set(keys))
  assert rows(resumed) == rows(straight)


@pytest.mark.parametrize('overrides,error,message', [
    ({'model.backbone': 'scratch', 'model.members': 3}, ValueError,
     'members=3 needs model.backbone=embeddings'),
    # The SFT candidates, and rl.select='utility', are compared by routing utility.
    ({'model.head': 'softmax'}, train.TrainingError, "soft_weight_choices needs model.head='utility'"),
    ({'model.head': 'softmax', 'sft.soft_weight_choices': ''}, train.TrainingError,
     "select='utility' needs model.head='utility'"),
    ({'sft.soft_weight_choices': '0.1,x'}, train.TrainingError, 'soft_weight_choices'),
    ({'model.lambda_set': '0.1,-2'}, train.TrainingError, 'lambda_set'),
    ({'anchor.space': 'words'}, train.TrainingError, "anchor.space='words'"),
], ids=['members', 'candidates-head', 'select-head', 'candidates', 'lambda-set', 'space'])
def test_recipe_errors_are_clear(tmp_path, overrides, error, message):
  config = suite.apply_overrides(recipe_config(tmp_path), overrides)
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_selection_score_runs_each_member_on_its_own_rows(tmp_path):
  """The out-of-fold check runs member j alone on fold j's rows; its scores
  equal scoring every row with every member and keeping the holder's output."""
  config = recipe_config(tmp_path)
  problem = train.prepare_problem(config, tmp_path / 'w')
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state, _ = train.create_state(config, 'sft', problem, mesh)
  members = config.model.members
  rows = np.flatnonzero(problem.folds < members)
  member = problem.folds[rows]
  model_graphdef, params, _ = selection.scoring_params(graphdef, state['nnx'], mesh)
  params['members']['w1'][...] = params['members']['w1'][...] + jnp.arange(members)[:, None, None]
  state['nnx'][0]['members']['w1'][...] = params['members']['w1'][...]   # members differ
  arrays = policy.policy_arrays(problem.inputs('train', rows),
                                problem.tables['train']['p_hat'][rows],
                                problem.tables['train']['c_bar'][rows], 0.0)
  every = policy.batched(policy.make_member_forward(config, model_graphdef, mesh), params, mesh,
                         config.eval_batch_size, arrays)['members']      # [n, M, K]
  z = every[np.arange(len(rows)), member].astype(np.float64)
  y, mask = problem.train.outcomes[rows], problem.train.outcome_mask[rows]
  cell = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
  want_bce = np.sum(np.where(mask, cell, 0.0)) / mask.sum()
  got_bce = train.make_selection_score(config, 'sft', graphdef, problem, mesh, how='bce')(
      state['nnx'])
  assert got_bce == pytest.approx(want_bce, rel=1e-6)
  s = 1.0 / (1.0 + np.exp(-z))
  cost_hat = problem.train.costs[rows] / problem.c_ref
  c_bar = problem.tables['train']['c_bar'][rows]
  want_utility = -np.mean([metrics_lib.route_accuracy_cost(
      baselines.route(s, c_bar, lam), y - lam * cost_hat, mask, cost_hat)['accuracy']
      for lam in problem.lambda_set])
  got_utility = train.make_selection_score(config, 'sft', graphdef, problem, mesh,
                                           how='utility')(state['nnx'])
  assert got_utility == pytest.approx(want_utility, rel=1e-6)
