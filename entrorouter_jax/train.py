"""Training: Stage 0 -> Soft Supervision -> RL with the Soft Anchor -> evaluation.

  python -m entrorouter_jax.train --config=configs/rl.py [--workdir=DIR]

Reading order: `prepare_problem` (data, tokenizer, Stage-0 tables), `run_stage`
(one stage's loop: sharded state, grain iterator, jitted step, checkpoints,
metrics), `train_and_evaluate` (the stages in order, then the test split).
Rerunning on a workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pickle
import time
from typing import Optional

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from entrorouter_jax import (backbones, baselines, capability, evaluate, features, objectives,
                             paths, schedules, sharding)
from entrorouter_jax import metrics as metrics_lib
from entrorouter_jax import state as state_lib
from entrorouter_jax.data import pipeline, sources
from entrorouter_jax.data.dataset import RoutingDataset
from entrorouter_jax.data.splits import unit_hash
from entrorouter_jax.model import num_members
from entrorouter_jax.policy import (batched, is_utility, logits_from_outputs, make_forward,
                                    make_member_forward, member_outputs, policy_arrays)
from entrorouter_jax.state import (TrainingError, abstract_train_state,  # noqa: F401
                                   load_tokenizer, make_optimizer)
from entrorouter_jax.writers import MetricsWriter

log = logging.getLogger('entrorouter_jax.train')  # not __name__: '__main__' under python -m

STAGES = ('sft', 'rl')
# Folds of the training queries when one member holds one out (model.members = 1
# with stage selection): that member trains on 4/5 and is checked on 1/5.
HOLDOUT_FOLDS = 5


# ============================================================== the problem ===
@dataclasses.dataclass
class Problem:
  """Everything data-side that the stages share."""
  builder: object
  train: RoutingDataset
  test: RoutingDataset
  tokenizer: object                    # None for the embeddings backbone
  strongest: int                       # index of the strongest model (training accuracy)
  c_ref: float                         # its mean training cost: c_hat = c / c_ref
  tables: dict                         # split -> {'p_hat', 'c_bar'} float32[N, K]
  features: dict                       # split -> Stage 0's query space, float32[N, D]
  lambda_set: np.ndarray               # utility head: the lambdas training draws from
  folds: np.ndarray                    # int32[N_train]: member j never trains on fold j
  base_rates: np.ndarray               # float32[K]: each model's training success rate
  max_len: int = 64                    # token backbones: data.max_len and data.truncate
  truncate: str = 'right'

  @property
  def model_names(self) -> list[str]:
    return self.train.model_names

  @property
  def feature_dim(self) -> int:
    return int(self.features['train'].shape[1])

  def train_table(self) -> dict:
    """Per training query, what the steps read besides tokens: Stage 0's
    tables, the fold, and for the embeddings backbone the features, outcomes,
    outcome mask and costs ({name: array[N_train, ...]})."""
    table = dict(self.tables['train'], fold=self.folds)
    if self.tokenizer is None:
      table.update(features=self.features['train'], outcomes=self.train.outcomes,
                   outcome_mask=self.train.outcome_mask, costs=self.train.costs)
    return table

  def inputs(self, split: str, rows=None) -> dict:
    """The network's inputs for `split`'s queries (all, or `rows`): {'features'}
    (embeddings backbone) or {'tokens', 'token_mask'}."""
    data = getattr(self, split)
    rows = np.arange(data.num_queries) if rows is None else np.asarray(rows)
    if self.tokenizer is None:
      return {'features': self.features[split][rows]}
    tokens, mask = self.tokenizer.encode_batch(data.queries[rows].tolist(), self.max_len,
                                               self.truncate)
    return {'tokens': tokens, 'token_mask': mask}


def _stage0(config, data_name: str, train: RoutingDataset, test: RoutingDataset,
            workdir):
  """Stage-0 capability estimates and the query space, computed once and cached.

  The cache is keyed by the prepared data set's full name (for routing_files it
  holds a digest of the files' contents), the model subset, `config.anchor`
  and the space's settings. It keeps the space (to embed new queries), both
  splits' embeddings and the training table (the kNN of routing time).
  """
  key = json.dumps({'anchor': config.anchor.to_dict(), 'models': train.model_names,
                    'data': data_name, 'sizes': [train.num_queries, test.num_queries],
                    'space': features.space_key(config)}, sort_keys=True, default=str)
  cache = workdir / 'stage0.pkl'
  if cache.is_file():
    with cache.open('rb') as f:
      cached = pickle.load(f)
    if cached.get('key') == key:
      return cached
  try:
    space = features.make_space(config)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  log.info('Stage 0: query space %s, kNN capability estimates (k=%d) on %d training queries',
           config.anchor.space, config.anchor.k, train.num_queries)
  est = capability.capability_estimates(
      train.queries.tolist(), train.outcomes, train.outcome_mask, train.costs,
      train.tasks.tolist(), {'test': (test.queries.tolist(), test.tasks.tolist())},
      k=config.anchor.k, alpha=config.anchor.alpha, prior=config.anchor.prior,
      dim=config.anchor.dim, min_df=config.anchor.min_df, space=space,
      **capability.search_settings(config.anchor))
  result = {
      'key': key, 'strongest': int(est['strongest']), 'c_ref': float(est['c_ref']),
      'space': est['space'],
      'tables': {s: {'p_hat': est[s][0], 'c_bar': est[s][1]} for s in ('train', 'test')},
      'features': {'train': est['train_feats'], 'test': est['query_feats']['test']},
      # Routing new queries: their neighbours in the training table.
      'train_feats': est['train_feats'], 'train_outcomes': train.outcomes,
      'train_mask': train.outcome_mask, 'train_cost_hat': train.costs / est['c_ref'],
      'train_tasks': train.tasks.tolist(),
  }
  if jax.process_index() == 0:
    paths.write_atomic(cache, pickle.dumps(result))
  return result


def lambda_set(config, train: RoutingDataset, s0: dict) -> np.ndarray:
  """The lambdas the utility head trains on (`model.lambda_set`): 'auto' or a list."""
  spec = str(config.model.get('lambda_set', 'auto')).strip()
  if spec != 'auto':
    try:
      values = [float(v) for v in spec.split(',') if v.strip()]
    except ValueError:
      values = []
    if not values or min(values) < 0:
      raise TrainingError(f'model.lambda_set={spec!r}; expected "auto" or a comma-separated '
                          'list of lambdas >= 0')
    return np.asarray(sorted(values), np.float32)
  table = s0['tables']['train']
  return np.asarray(baselines.spread_lambdas(
      table['p_hat'], table['c_bar'], train.outcomes, train.outcome_mask,
      train.costs / s0['c_ref']), np.float32)


def fold_ids(ids, seed: int, num_folds: int) -> np.ndarray:
  """int32[N] in [0, num_folds): a seeded hash of each query id (row order does not matter)."""
  return np.array([min(int(unit_hash(seed + 1, str(i)) * num_folds), num_folds - 1)
                   for i in ids], np.int32)


def holds_out(config) -> bool:
  """Whether members train on their folds only: always with several members,
  and with one member where a stage selects (it is then checked on fold 0)."""
  return num_members(config.model) > 1 or any(
      state_lib.selects(config, s) for s in stage_list(config))


def prepare_problem(config, workdir) -> Problem:
  """Prepares the data (TFDS), the tokenizer and the Stage-0 tables."""
  builder, splits = sources.load_splits(config.data, ('train', 'test'))
  train, test = splits['train'], splits['test']
  tok = load_tokenizer(config, workdir, train.queries.tolist())
  s0 = _stage0(config, builder.info.full_name, train, test, workdir)
  members = num_members(config.model)
  counts = train.outcome_mask.sum(axis=0)
  rates = np.where(train.outcome_mask, train.outcomes, 0.0).sum(axis=0) / np.maximum(counts, 1)
  problem = Problem(builder=builder, train=train, test=test, tokenizer=tok,
                    strongest=s0['strongest'], c_ref=s0['c_ref'], tables=s0['tables'],
                    features=s0['features'], lambda_set=lambda_set(config, train, s0),
                    folds=fold_ids(train.ids, config.seed,
                                   members if members > 1 else HOLDOUT_FOLDS),
                    base_rates=np.where(counts > 0, rates, 0.5).astype(np.float32),
                    max_len=config.data.max_len, truncate=config.data.truncate)
  return problem


# =========================================================== model & state ===
def create_state(config, stage: str, problem: Problem, mesh, compiled: Optional[dict] = None):
  """`stage`'s train state for `problem`, created already sharded: (graphdef, state,
  shardings); `compiled` as in `state.create_state`."""
  return state_lib.create_state(config, stage, state_lib.vocab_size(problem.tokenizer),
                                len(problem.model_names), mesh, problem.feature_dim, compiled)


def sample_cost_weight(config, stage_cfg, rng, batch_size, lambdas=None):
  """lambda per query: drawn from the lambda set (utility head), from
  [lambda_min, lambda_max] (lambda-conditioned), else the stage's cost_weight."""
  if is_utility(config) and lambdas is not None:
    lambdas = jnp.asarray(lambdas, jnp.float32)
    return lambdas[jax.random.randint(rng, (batch_size,), 0, lambdas.shape[0])]
  if config.model.lambda_conditioned:
    return jax.random.uniform(rng, (batch_size,), minval=config.model.lambda_min,
                              maxval=config.model.lambda_max)
  return jnp.full((batch_size,), stage_cfg.cost_weight, jnp.float32)


def scaled_batch_size(batch_size: int, num_train: int, divisor: int = 1) -> int:
  """The batch a stage trains with: `batch_size`, or for small data the largest
  power of two up to a quarter of the training queries (so an epoch is at least
  four steps), never below the mesh's batch divisor."""
  quarter = max(num_train // 4, 1)
  if batch_size <= quarter:
    return batch_size
  return max(divisor, 2 ** int(math.floor(math.log2(quarter))))


def member_weights(fold, members: int, hold_out: bool):
  """float32[M, B]: 1 where member j trains on the row (its fold is not j), or
  None (one member trained on every row)."""
  if members == 1 and not hold_out:
    return None
  return (fold[None, :] != jnp.arange(members)[:, None]).astype(jnp.float32)


# ================================================================ the step ===
def make_train_step(config, stage: str, graphdef, problem: Problem, schedule):
  """One jitted optimisation step of `stage` (state, batch) -> (state, metrics).

  The members' rows are stacked into one batch of M x B rows (member-major),
  each weighted by whether that member trains on the query. SFT's soft-target
  weight may come as a third argument `soft_weight` (a float32 scalar; default:
  `sft.soft_weight`), so the Stage-1 candidates share one compiled step.
  """
  stage_cfg = config[stage]
  rl = config.rl
  common = dict(tau_anchor=config.anchor.tau, strongest=problem.strongest,
                collapse_threshold=rl.collapse_threshold)
  members = num_members(config.model)
  hold_out = holds_out(config)
  dense_weight = float(stage_cfg.get('dense_weight', 0.0))
  deterministic = config.model.dropout == 0.0 and config.model.get('input_noise', 0.0) == 0.0

  def step_fn(state, batch, soft_weight=None):
    model, optimizer = nnx.merge(graphdef, state['nnx'])
    rng, lam_rng, drop_rng, act_rng = jax.random.split(jax.random.wrap_key_data(state['rng']), 4)
    batch = dict(batch, cost_hat=batch['costs'] / problem.c_ref)
    cost_weight = sample_cost_weight(config, stage_cfg, lam_rng, batch['outcomes'].shape[0],
                                     problem.lambda_set)
    weights = member_weights(batch.get('fold'), members, hold_out)
    if weights is not None:
      weights = weights.reshape(-1)
    tile = lambda x: jnp.tile(x, (members,) + (1,) * (x.ndim - 1))
    rows = {k: tile(batch[k]) for k in ('outcomes', 'outcome_mask', 'cost_hat', 'p_hat', 'c_bar')}
    stacked_weight = tile(cost_weight)

    def forward(m):
      """(success outputs f, policy logits), both float32[M * B, K]."""
      f = member_outputs(m, batch, cost_weight, config, deterministic=deterministic,
                         rngs=nnx.Rngs(dropout=drop_rng))
      logits = logits_from_outputs(m, f, batch, cost_weight, config)
      k = f.shape[-1]
      return f.reshape(-1, k), logits.reshape(-1, k)

    def dense_term(f):
      if dense_weight == 0.0:
        return jnp.zeros(())
      return objectives.success_loss(f, rows['outcomes'], rows['outcome_mask'], weights)

    new_state = dict(state)
    if stage == 'sft':
      def loss_fn(m):
        f, logits = forward(m)
        soft, metrics = objectives.sft_loss(
            logits, rows, stacked_weight, tau=stage_cfg.tau, mix=stage_cfg.anchor_mix,
            weights=weights, **common)
        dense = dense_term(f)
        weight = stage_cfg.get('soft_weight', 1.0) if soft_weight is None else soft_weight
        loss = weight * soft + dense_weight * dense
        metrics.update(loss=loss, soft_loss=soft, dense_loss=dense)
        return loss, metrics
      (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads)
    else:
      beta = schedules.interpolate(rl.beta_start, rl.beta_end, state['step'], rl.num_steps,
                                   rl.entropy_schedule)
      target = schedules.entropy_target(state['step'], rl.num_steps, state['h0'],
                                        rl.entropy_min, rl.entropy_schedule)
      kwargs = dict(rng=act_rng, beta=beta, alpha=state['alpha'], estimator=rl.estimator,
                    group_size=rl.group_size, normalize_advantage=rl.normalize_advantage,
                    ppo_clip=rl.ppo_clip, weights=weights, **common)
      if rl.ppo_epochs > 1:
        # pi_old and the actions are fixed for all epochs of this batch.
        old = jax.nn.log_softmax(jax.lax.stop_gradient(forward(model)[1]), -1)
        actions = jax.random.categorical(act_rng, old, axis=-1,
                                         shape=(rl.group_size, old.shape[0])).T
        kwargs.update(old_log_probs=old, actions=actions)

      def loss_fn(m):
        f, logits = forward(m)
        loss, metrics = objectives.rl_loss(logits, rows, stacked_weight, **kwargs)
        dense = dense_term(f)
        loss = loss + dense_weight * dense
        metrics.update(loss=loss, dense_loss=dense)
        return loss, metrics

      for _ in range(rl.ppo_epochs):
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
      new_state['alpha'] = schedules.dual_ascent(state['alpha'], target, metrics['entropy'],
                                                 rl.entropy_lr)
      metrics['entropy_target'] = target
    if is_utility(config):
      metrics['temperature'] = model.temperature()
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = schedule(state['step'])
    new_state.update(nnx=nnx.state((model, optimizer)), step=state['step'] + 1,
                     rng=jax.random.key_data(rng))
    return new_state, metrics

  return step_fn


# ============================================================== selection ===
def make_selection_score(config, stage: str, graphdef, problem: Problem, mesh,
                         how: Optional[str] = None):
  """The stage's out-of-fold check: nnx state -> a score to minimise (a float).

  Every training query held out by a member (its fold is below the member
  count) is scored by that member alone: 'bce' = the dense loss there,
  'utility' = minus the mean utility y - lambda c_hat of routing it by
  argmax s - lambda c_bar, averaged over the lambda set. `how` defaults to
  the stage's `select`.
  """
  how = how or config[stage].select
  if how == 'utility' and not is_utility(config):
    raise TrainingError(f"{stage}.select='utility' needs model.head='utility'; use 'bce'")
  members = num_members(config.model)
  rows = np.flatnonzero(problem.folds < members)
  member = problem.folds[rows]
  train = problem.train
  y, mask = train.outcomes[rows], train.outcome_mask[rows]
  cost_hat = train.costs[rows] / problem.c_ref
  c_bar = problem.tables['train']['c_bar'][rows]
  arrays = policy_arrays(problem.inputs('train', rows), problem.tables['train']['p_hat'][rows],
                         c_bar, 0.0)
  # The embeddings backbone's members are independent MLPs with stacked
  # weights: each runs alone (its slice) on the rows it holds out, a 1/M share
  # of the work of running every member on every row. A token backbone is one
  # network: member 0, holding fold 0 out. Each member's rows are cut once here.
  stacked = backbones.kind_of(config.model) == 'embeddings'
  parts = [(j, idx, {k: v[idx] for k, v in arrays.items()})
           for j, idx in enumerate(np.flatnonzero(member == j) for j in range(members))
           if len(idx)] if stacked else [(0, np.arange(len(rows)), arrays)]
  cache = {}

  def held_out_outputs(nnx_state) -> np.ndarray:
    """f of each scored row by the member that holds it out, float64[n, K]."""
    model_graphdef, params, score_mesh = scoring_params(graphdef, nnx_state, mesh)
    if 'forward' not in cache:
      cache['forward'] = make_member_forward(config, model_graphdef, score_mesh)
    z = np.empty((len(rows), len(problem.model_names)), np.float64)
    for j, idx, part in parts:
      one = params
      if stacked:
        one = nnx.State(dict(params))
        one['members'] = jax.tree.map(lambda w: w[j:j + 1], params['members'])
      z[idx] = batched(cache['forward'], one, score_mesh, config.eval_batch_size,
                       part)['members'][:, 0]
    return z

  def score(nnx_state) -> float:
    z = held_out_outputs(nnx_state)      # [n, K]
    if how == 'bce':
      cell = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
      return float(np.sum(np.where(mask, cell, 0.0)) / max(mask.sum(), 1))
    s = 1.0 / (1.0 + np.exp(-z))
    gained = [metrics_lib.route_accuracy_cost(baselines.route(s, c_bar, lam), y - lam * cost_hat,
                                              mask, cost_hat)['accuracy']
              for lam in problem.lambda_set]
    return -float(np.mean(gained))

  return score


# =============================================================== one stage ===
def _checkpoint_manager(path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.as_path(path), options=ocp.CheckpointManagerOptions(
          save_interval_steps=1,
          preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints)))


def scoring_params(graphdef, nnx_state, mesh):
  """(model graphdef, parameters, mesh) to score queries with outside the train step.

  In a multi-process run every process scores on its own devices (cheap next
  to training), from a full copy of the parameters.
  """
  model_graphdef, params = nnx.split(nnx.merge(graphdef, nnx_state)[0])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}),
                              jax.local_devices())
  return model_graphdef, params, mesh


def dataset_probs(config, graphdef, nnx_state, mesh, problem: Problem, split: str,
                  cost_weight: float, limit: Optional[int] = None) -> dict:
  """The policy on `split`'s queries (the first `limit`), from a train state:
  {'probs': pi(m|x) float32[N, K]} (and 'success' s(x, m) for the utility head)."""
  data = getattr(problem, split)
  n = data.num_queries if limit is None else min(limit, data.num_queries)
  model_graphdef, params, mesh = scoring_params(graphdef, nnx_state, mesh)
  tables = problem.tables[split]
  arrays = policy_arrays(problem.inputs(split, np.arange(n)), tables['p_hat'][:n],
                         tables['c_bar'][:n], cost_weight)
  return batched(make_forward(config, model_graphdef, mesh), params, mesh,
                 config.eval_batch_size, arrays)


def _initial_entropy(config, graphdef, state, mesh, problem) -> float:
  """H_0: mean policy entropy over (up to) 2,048 training queries."""
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'train',
                        config.rl.cost_weight, limit=2048)['probs']
  return float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1)))


def _base_rate_bias(config, state, shardings, problem):
  """Utility head: each output starts at its model's training success rate
  (logit of the base rate), as the success baselines do."""
  rates = np.clip(problem.base_rates, 1e-3, 1 - 1e-3)
  bias = np.log(rates / (1 - rates)).astype(np.float32)
  params = state['nnx'][0]
  if 'members' in params:
    leaf = params['members']['b2']
    leaf[...] = jax.device_put(np.broadcast_to(bias, leaf.shape).copy(), leaf.sharding)
  else:
    leaf = params['head']['bias']
    leaf[...] = jax.device_put(bias, leaf.sharding)


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def run_stage(config, stage: str, problem: Problem, mesh, workdir, writer: MetricsWriter,
              init_params=None, init_from=None, label: Optional[str] = None,
              compiled: Optional[dict] = None):
  """Runs (or resumes) one stage; returns (graphdef, final state).

  `label` (default: the stage's name) names its checkpoint folder under
  DIR/checkpoints, its rows in metrics.jsonl and its progress bar: the SFT
  candidates (`run_sft_candidates`) are one stage under several labels.

  A fresh stage starts from `init_params` (the previous stage's parameters) or
  from the SFT checkpoint under `init_from`; a resumed one from its own
  checkpoint. A stage that selects (state.selects) checks its out-of-fold
  score every `select_every` steps, may stop early (`patience`), and ends with
  the parameters that scored best; its last checkpoint holds those.

  The step takes `sft.soft_weight` as an argument, so runs that differ in that
  weight alone can share one compiled step: given a dict `compiled`, the
  jitted step (and the state's initialiser) is kept there and reused
  (`run_sft_candidates`).
  """
  stage_cfg = config[stage]
  _, schedule = make_optimizer(config, stage)
  compiled = {} if compiled is None else compiled
  graphdef, state, shardings = create_state(config, stage, problem, mesh, compiled)
  seed = config.seed + STAGES.index(stage)
  batch_size = scaled_batch_size(stage_cfg.batch_size, problem.train.num_queries,
                                 sharding.batch_divisor(mesh))
  if batch_size != stage_cfg.batch_size:
    log.info('%s: %d training queries: batch %d instead of %s.batch_size=%d (at most a '
             'quarter of the queries per batch)', label or stage, problem.train.num_queries,
             batch_size, stage, stage_cfg.batch_size)
  read = dict(prefetch=config.data.get('prefetch', pipeline.PREFETCH),
              read_threads=config.data.get('read_threads', pipeline.READ_THREADS))
  if problem.tokenizer is None:   # everything the step reads is in memory
    dataset = pipeline.make_table_dataset(problem.train_table(), global_batch_size=batch_size,
                                          seed=seed, **read)
  else:
    featurize = pipeline.Featurize(problem.tokenizer, config.data.max_len, config.data.truncate,
                                   extras=problem.train_table())
    dataset = pipeline.make_dataset(problem.builder.as_data_source(split='train'), featurize,
                                    global_batch_size=batch_size, seed=seed, **read)
  iterator = iter(dataset)
  label = label or stage
  manager = _checkpoint_manager(workdir / 'checkpoints' / label, config)
  selecting = 'best' in state

  latest = manager.latest_step()
  if latest is not None:
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(iterator)))
    state = restored['state']
    log.info('%s: resumed from the checkpoint at step %d', label, latest)
  else:
    if init_from is not None:
      init_params = _restore_params(config, init_from, 'sft', problem, mesh)
    if init_params is not None:
      state['nnx'][0] = jax.device_put(init_params, shardings['nnx'][0])
    else:
      if backbones.kind_of(config.model) in backbones.PRETRAINED:
        state['nnx'][0]['backbone'] = load_pretrained_backbone(config, state, shardings)
      if is_utility(config):
        _base_rate_bias(config, state, shardings, problem)
    if stage == 'rl':
      h0 = _initial_entropy(config, graphdef, state, mesh, problem)
      state['h0'] = jax.device_put(jnp.asarray(h0, jnp.float32), shardings['h0'])
      log.info('rl: initial policy entropy H_0 = %.4f nats', h0)
  start = int(state['step'])
  writer.truncate(label, start)

  if ('step', stage) not in compiled:
    compiled['step', stage] = jax.jit(make_train_step(config, stage, graphdef, problem, schedule),
                              in_shardings=(shardings, sharding.batch_sharding(mesh),
                                            sharding.replicated(mesh)),
                              out_shardings=(shardings, sharding.replicated(mesh)),
                              donate_argnums=0, compiler_options=sharding.compiler_options())
  step_fn = compiled['step', stage]
  soft_weight = jax.device_put(np.float32(stage_cfg.get('soft_weight', 1.0)),
                               sharding.replicated(mesh))
  batch_sh = sharding.batch_sharding(mesh)
  num_steps = stage_cfg.num_steps
  score = make_selection_score(config, stage, graphdef, problem, mesh) if selecting else None
  every = int(stage_cfg.get('select_every', 0))
  patience = int(stage_cfg.get('patience', 0))
  put = lambda value, key: jax.device_put(value, shardings[key])

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))

  def check(done) -> bool:
    """The out-of-fold check at step `done`; True when the stage should stop."""
    value = score(state['nnx'])
    best = float(state['best_score'])
    if value < best:
      state.update(best=_copy(state['nnx'][0]), best_score=put(np.float32(value), 'best_score'),
                   since_best=put(np.int32(0), 'since_best'))
    else:
      state['since_best'] = put(np.int32(int(state['since_best']) + 1), 'since_best')
    writer.write(label, done, {'select_score': value, 'select_best': min(value, best)},
                 problem.model_names)
    return bool(patience) and int(state['since_best']) >= patience

  progress = _progress(label, start, num_steps)
  pending = None   # the previous step's metrics: checked while the next step runs
  # The host's copy of state['done']: reading the device's after each step
  # would wait for that step, and the next batch could not be read and placed
  # while it runs.
  finished = bool(int(state['done']))
  with jax.set_mesh(mesh):
    if selecting and start == 0 and not finished:
      check(0)   # the stage's starting point competes too
    step = start
    while step < num_steps and not finished:
      batch = pipeline.to_global(next(iterator), batch_sh)
      state, metrics = step_fn(state, batch, soft_weight)
      if pending is not None:
        _check_finite(pending, label, step, manager)
      pending = metrics
      step = done = step + 1
      if done % config.log_every == 0 or done == num_steps:
        _check_finite(metrics, label, done, manager)
        writer.write(label, done, jax.device_get(metrics), problem.model_names)
        progress.set_postfix(loss=f'{float(metrics["loss"]):.4f}',
                             entropy=f'{float(metrics["entropy"]):.3f}')
      stop = selecting and (done % every == 0 or done == num_steps) and check(done)
      if done == num_steps or stop:
        if selecting:   # the stage ends with its best parameters
          state['nnx'][0] = _copy(state['best'])
          log.info('%s: keeping the parameters of the best out-of-fold check (%s = %.5f)%s',
                   label, stage_cfg.select, float(state['best_score']),
                   f'; stopped early at step {done}' if stop else '')
        state['done'] = put(np.int32(1), 'done')
        finished = True
      if done % config.checkpoint_every == 0 or finished:
        save(done)
      progress.update(1)
  if pending is not None:
    _check_finite(pending, label, step, manager)
  progress.close()
  manager.wait_until_finished()
  return graphdef, state


def run_sft_candidates(config, problem: Problem, mesh, workdir, writer: MetricsWriter):
  """Stage 1 once per weight of `sft.soft_weight_choices`, keeping the one whose
  parameters route the training queries best out of fold.

  How much the soft-target cross-entropy should weigh beside the dense success
  loss depends on the data (with near-equal prices it teaches which model
  succeeds; with a wide price range it bends s away from calibrated success),
  so the data decides: each candidate trains as the stage would, in
  DIR/checkpoints/sft_soft<w> (and resumes there), and is scored by the
  out-of-fold utility check ('utility' in `make_selection_score`). The scores
  and the choice go to DIR/sft_choice.json, where routing and RL's
  `rl.init_checkpoint` find the chosen checkpoint. Returns (graphdef, state).
  """
  if not is_utility(config):
    raise TrainingError("sft.soft_weight_choices needs model.head='utility' (the candidates "
                        "are compared by routing utility); set sft.soft_weight_choices=''")
  if not holds_out(config):
    raise TrainingError('sft.soft_weight_choices compares out-of-fold utilities, so the '
                        'members must hold folds out: model.members >= 2 or sft.select set')
  scores, best = {}, None
  score = None
  compiled = {}   # the candidates differ in soft_weight alone: one compiled step
  for weight in state_lib.soft_weight_choices(config):
    candidate = copy.deepcopy(config)
    with candidate.unlocked():
      candidate.sft.soft_weight = weight
    name = state_lib.candidate_name(weight)
    graphdef, state = run_stage(candidate, 'sft', problem, mesh, workdir, writer, label=name,
                                compiled=compiled)
    if score is None:
      score = make_selection_score(config, 'sft', graphdef, problem, mesh, how='utility')
    utility = -score(state['nnx'])
    scores[name] = {'soft_weight': weight, 'oof_utility': utility}
    log.info('%s: out-of-fold utility %.5f', name, utility)
    if best is None or utility > scores[best[0]]['oof_utility']:
      best = (name, graphdef, state)
  name, graphdef, state = best
  log.info('sft: keeping %s (soft_weight = %g), the best out-of-fold utility', name,
           scores[name]['soft_weight'])
  if jax.process_index() == 0:
    paths.write_atomic(paths.as_path(workdir) / state_lib.SFT_CHOICE, json.dumps(
        {'chosen': name, 'soft_weight': scores[name]['soft_weight'], 'candidates': scores},
        indent=2) + '\n')
  return graphdef, state


def _progress(stage, start, total):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc=stage, unit='step', dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0)


def _check_finite(metrics, stage, step, manager):
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    manager.wait_until_finished()
    raise TrainingError(
        f'{stage}: the loss became {loss} at step {step}; stopping. The last good checkpoint '
        f'is at step {manager.latest_step()} under {manager.directory}. Try a lower '
        f'{stage}.learning_rate or optim.grad_clip.')


def load_pretrained_backbone(config, state, shardings):
  """The backbone's weights from model.checkpoint, placed on the backbone's shardings."""
  log.info('loading the pretrained %s from %s', config.model.backbone, config.model.checkpoint)
  target = state['nnx'][0]['backbone']
  nnx.replace_by_pure_dict(target, backbones.load_pretrained(config.model))
  return jax.device_put(target, shardings['nnx'][0]['backbone'])


def _restore_params(config, workdir, stage: str, problem: Problem, mesh):
  """The model parameters of `stage`'s last checkpoint under `workdir` (RL's init)."""
  path = paths.as_path(workdir)
  _, target = state_lib.abstract_state(config, stage, state_lib.vocab_size(problem.tokenizer),
                                       len(problem.model_names), mesh, problem.feature_dim)
  for candidate in (state_lib.stage_checkpoints(path, stage), path):
    if not candidate.is_dir():
      continue
    manager = ocp.CheckpointManager(candidate, options=ocp.CheckpointManagerOptions(
        read_only=True))
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return restored['state']['nnx'][0]
  raise TrainingError(f'rl.init_checkpoint={str(workdir)!r}: no checkpoint found there '
                      f'(looked in {path / "checkpoints" / stage} and {path})')


def _write_router_info(workdir, problem: Problem, final_stage: str) -> None:
  """router.json: what routing needs beside the checkpoint and the tokenizer."""
  cost_hat = problem.train.costs / problem.c_ref
  info = {'model_names': problem.model_names, 'strongest': problem.strongest,
          'c_ref': problem.c_ref, 'model_costs': cost_hat.mean(axis=0).tolist(),
          'final_stage': final_stage, 'data': problem.builder.info.full_name,
          'checkpoint': str(state_lib.stage_checkpoints(workdir, final_stage).relative_to(
              paths.as_path(workdir))),
          'feature_dim': problem.feature_dim, 'lambda_set': problem.lambda_set.tolist()}
  paths.write_atomic(workdir / 'router.json', json.dumps(info, indent=2) + '\n')


# ================================================================ the run ===
def stage_list(config) -> list[str]:
  stages = [s.strip() for s in config.stages.split(',') if s.strip()]
  if not stages or any(s not in STAGES for s in stages) or stages != sorted(stages, key=STAGES.index):
    raise TrainingError(f'stages={config.stages!r}; expected "sft", "rl" or "sft,rl"')
  if 'rl' in stages and config.rl.init_checkpoint and 'sft' in stages:
    stages.remove('sft')   # RL starts from the named SFT checkpoint
  return stages


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs the configured stages on `workdir` (resuming where it stopped), then evaluates."""
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  stages = stage_list(config)
  if jax.process_index() == 0:
    paths.write_atomic(workdir / 'config.json', config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.mesh)
  started = time.time()
  problem = prepare_problem(config, workdir)
  log.info('data: %s, %d train / %d test queries, %d models; strongest %s, c_ref %.3g',
               problem.builder.name, problem.train.num_queries, problem.test.num_queries,
               len(problem.model_names), problem.model_names[problem.strongest], problem.c_ref)

  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  params = None
  init_from = paths.as_path(config.rl.init_checkpoint) if config.rl.init_checkpoint else None
  for stage in stages:
    if stage == 'sft' and state_lib.soft_weight_choices(config):
      graphdef, state = run_sft_candidates(config, problem, mesh, workdir, writer)
    else:
      graphdef, state = run_stage(config, stage, problem, mesh, workdir, writer,
                                  init_params=params,
                                  init_from=init_from if stage == 'rl' else None)
    params = state['nnx'][0]
  writer.close()

  cost_weight = config.rl.cost_weight if stages[-1] == 'rl' else config.sft.cost_weight
  if jax.process_index() == 0:
    _write_router_info(workdir, problem, stages[-1])
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'test',
                        cost_weight)['probs']
  results = evaluate.router_results(problem.test, probs, strongest=problem.strongest,
                                    c_ref=problem.c_ref, cost_weight=cost_weight,
                                    dataset=problem.builder.name)
  results['train_seconds'] = round(time.time() - started, 1)
  if jax.process_index() == 0:
    evaluate.write_results(workdir, results)
  return results


# ================================================================== the CLI ===
def main(argv):
  from entrorouter_jax import cli
  cli.run_main(argv, train_and_evaluate, default_workdir_from_config=True)


if __name__ == '__main__':
  from entrorouter_jax import cli
  cli.define_flags()
  from absl import app
  app.run(main)
