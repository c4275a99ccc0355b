"""Learning from feedback end to end: a tiny router (conftest's `serve_workdir`) logs its own
exploring choices on the synthetic training queries, configs/feedback.py trains the
off-policy RL stage from it on that log, and the result routes and evaluates like any
router."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from configs import feedback as feedback_config
from conftest import REPO_ROOT
from entrorouter_jax import evaluate, problem as problem_lib, router as router_lib, train
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax.data import sources

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
OFFPOLICY_TERMS = ('value', 'rho', 'clip_fraction', 'kl_behaviour', 'entropy', 'direct',
                   'correction', 'success_loss', 'mean_ipw')


@pytest.fixture(scope='module')
def logged(serve_workdir, tmp_path_factory):
  """(log path, its rows as a DataFrame): the tiny router's exploring choices (explore 0.2)
  on its synthetic training queries, scored from the synthetic outcome table; every
  third row carries the cost weight 0.3, the last 5 rows are not judged yet."""
  tmp = tmp_path_factory.mktemp('feedback')
  data = sources.load_splits(workdir_lib.read_config(serve_workdir).data, ('train',))[1]['train']
  router = router_lib.load_router(serve_workdir)
  n = data.num_queries
  lam = np.where(np.arange(n) % 3 == 0, 0.3, np.nan)
  choice = np.zeros(n, int)
  propensity = np.zeros(n)
  for value in (0.3, None):
    rows = np.flatnonzero(lam == value) if value is not None else np.flatnonzero(np.isnan(lam))
    c, p, _ = router.sample(data.queries[rows].tolist(), explore=0.2, cost_weight=value,
                            seed=1)
    choice[rows], propensity[rows] = c, p
  rows = np.arange(n)
  frame = pd.DataFrame({
      'id': data.ids, 'query': data.queries,
      'model': np.asarray(router.model_names, object)[choice],
      'score': data.outcomes[rows, choice], 'cost': data.costs[rows, choice],
      'propensity': propensity, 'cost_weight': lam})
  frame.loc[frame.index[-5:], 'score'] = np.nan
  path = tmp / 'LOGS.csv'
  frame.to_csv(path, index=False)
  return path, frame


def feedback_config_for(tmp, log_path, init):
  config = feedback_config.get_config()
  config.data.files = str(log_path)
  config.data.data_dir = str(tmp / 'tfds')
  config.rl.update(init_checkpoint=str(init), num_steps=10, batch_size=32)
  config.log_every = 5
  config.eval_batch_size = 64
  return config


@pytest.fixture(scope='module')
def trained(serve_workdir, logged, tmp_path_factory):
  """The off-policy stage's workdir, trained in-process on the log, and its results."""
  tmp = tmp_path_factory.mktemp('offpolicy')
  config = feedback_config_for(tmp, logged[0], serve_workdir)
  results = train.train_and_evaluate(config, tmp / 'run')
  return tmp / 'run', results


def test_feedback_config_reads_the_log_and_switches_rl_off_policy():
  config = feedback_config.get_config()
  assert (config.stages, config.data.name, config.data.format) == (
      'rl', 'routing_files', 'feedback')
  assert (config.rl.estimator, config.rl.select) == ('offpolicy', '')
  assert config.rl.entropy_floor > 0 and config.rl.w_max == 20.0 and config.rl.clip_eps == 0.2
  assert problem_lib.is_offpolicy(config)
  config.stages = 'sft'
  assert not problem_lib.is_offpolicy(config)


def test_behaviour_at_picks_the_logging_policy_at_each_rows_lambda():
  """NumPy reference: slot L where the row has its own lambda, else the slot of the drawn
  lambda in the set."""
  from entrorouter_jax import steps
  rng = np.random.default_rng(0)
  lambdas = np.array([0.0, 0.1, 0.5], np.float32)
  table = rng.normal(size=(4, 4, 3)).astype(np.float32)
  drawn = np.array([0.5, 0.0, 0.1, 0.1], np.float32)
  own = np.array([False, False, True, False])
  got = np.asarray(steps.behaviour_at(table, drawn, own, lambdas))
  slots = [2, 0, 3, 1]
  np.testing.assert_array_equal(got, table[np.arange(4), slots])


def test_without_init_checkpoint_the_run_stops_with_a_clear_error(tmp_path, logged):
  config = feedback_config_for(tmp_path, logged[0], '')
  with pytest.raises(train.TrainingError, match='needs rl.init_checkpoint=DIR'):
    train.train_and_evaluate(config, tmp_path / 'run')
  config.rl.init_checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(train.TrainingError, match='nowhere.*config.json'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_offpolicy_stage_logs_its_terms_and_keeps_the_logging_router(trained, serve_workdir):
  workdir, results = trained
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [5, 10] and {r['stage'] for r in records} == {'rl'}
  for r in records:
    for term in OFFPOLICY_TERMS:
      assert np.isfinite(r[term]), (term, r)
    assert r['entropy_target'] >= 0.1 - 1e-6   # the floor of configs/common.py
  # pi starts as the logging router's policy, compared with pi_b at the same lambda
  assert records[0]['kl_behaviour'] < 0.1, records[0]
  config = workdir_lib.read_config(workdir)
  init_config = workdir_lib.read_config(serve_workdir)
  assert config.model.to_dict() == init_config.model.to_dict()
  assert config.anchor.to_dict() == init_config.anchor.to_dict()
  info, init_info = (workdir_lib.read_router_info(w) for w in (workdir, serve_workdir))
  assert info.model_names == init_info.model_names
  assert (info.c_ref, info.strongest, info.lambda_set) == (
      init_info.c_ref, init_info.strongest, init_info.lambda_set)
  assert not (workdir / 'checkpoints' / 'sft').exists()
  assert np.isfinite(results['offpolicy']['dr']['utility'])


def knn_reference(feats, outcomes, mask, cost_hat, k, alpha):
  """NumPy reference of Stage 0's leave-one-out kNN estimates (prior 'global'): p_hat =
  (observed y over the k nearest other rows + alpha prior) / (their count + alpha), the
  prior being the model's mean observed y over the other rows; c_bar = the neighbours'
  mean cost."""
  sims = feats @ feats.T
  np.fill_diagonal(sims, -np.inf)
  near = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  y = np.where(mask, outcomes, 0.0)
  prior = (y.sum(0) - y) / np.maximum(mask.sum(0) - mask, 1)
  p_hat = (y[near].sum(1) + alpha * prior) / (mask[near].sum(1) + alpha)
  return p_hat, cost_hat[near].mean(1)


def test_stage0_estimates_the_logged_cells_in_the_logging_routers_units(trained, serve_workdir):
  """The new Stage 0: the logging router's space and c_ref, one observed cell per row, and
  c_bar in that c_ref's units (the kNN of the log's costs / the logging router's c_ref)."""
  workdir, _ = trained
  s0, init_s0 = (workdir_lib.read_stage0(w) for w in (workdir, serve_workdir))
  assert (s0.c_ref, s0.strongest) == (init_s0.c_ref, init_s0.strongest)
  data = sources.load_splits(workdir_lib.read_config(workdir).data, ('train',))[1]['train']
  np.testing.assert_allclose(s0.train_feats[:20], init_s0.space.transform(
      data.queries[:20].tolist()), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s0.train_cost_hat, data.costs / init_s0.c_ref, rtol=1e-6)
  assert s0.train_mask.sum(axis=1).tolist() == [1] * data.num_queries
  anchor = workdir_lib.read_config(workdir).anchor
  p_hat, c_bar = knn_reference(s0.train_feats.astype(np.float64), s0.train_outcomes,
                               s0.train_mask, s0.train_cost_hat, anchor.k, anchor.alpha)
  np.testing.assert_allclose(s0.tables['train']['c_bar'], c_bar, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(s0.tables['train']['p_hat'], p_hat, rtol=1e-3, atol=1e-5)


def test_trained_router_routes_keeps_entropy_and_evaluates_on_the_log(trained, logged):
  workdir, _ = trained
  router = router_lib.load_router(workdir)
  queries = logged[1]['query'].tolist()[:64]
  probs = router.probs(queries)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  entropy = float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1)))
  assert entropy > 0.05, entropy
  full = evaluate.evaluate_workdir(workdir, 'test')     # the log's test split
  assert np.isfinite(full['router']['accuracy']) and np.isfinite(full['aiq'])
  results, data = evaluate.evaluate_feedback(workdir, str(logged[0]))
  assert results['rows'] == len(logged[1]) - 5 == data.num_queries
  assert results['cost_weight'] is None      # rows with and without their own lambda
  for name in ('ips', 'snips', 'dr'):
    assert np.isfinite(results[name]['utility']), results
    lo, hi = results[name]['ci95']
    assert lo <= results[name]['utility'] <= hi


def test_contract_command_trains_a_router_that_evaluates(serve_workdir, logged, tmp_path):
  new = tmp_path / 'new'
  out = subprocess.run(
      [sys.executable, '-m', 'entrorouter_jax.train', '--config=configs/feedback.py',
       f'--config.data.files={logged[0]}', f'--config.rl.init_checkpoint={serve_workdir}',
       f'--workdir={new}', f'--config.data.data_dir={tmp_path / "tfds"}',
       '--config.rl.num_steps=4', '--config.rl.batch_size=32', '--config.log_every=2'],
      cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  out = subprocess.run(
      [sys.executable, '-m', 'entrorouter_jax.evaluate', f'--workdir={new}',
       f'--feedback={logged[0]}'], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((new / 'eval' / 'offpolicy.json').read_text())['rows'] == len(logged[1]) - 5
