"""Training: Stage 0 -> Soft Supervision -> RL with the Soft Anchor -> evaluation.

  python -m entrorouter_jax.train --config=configs/rl.py [--workdir=DIR]

Reading order: `prepare_problem` (data, tokenizer, Stage-0 tables), `run_stage`
(one stage's loop: sharded state, grain iterator, jitted step, checkpoints,
metrics), `train_and_evaluate` (the stages in order, then the test split).
Rerunning on a workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
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

from entrorouter_jax import backbones, capability, evaluate, objectives, paths, schedules, sharding
from entrorouter_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from entrorouter_jax.data.dataset import RoutingDataset
from entrorouter_jax.router import build_model, make_forward, policy_logits, policy_probs
from entrorouter_jax.writers import MetricsWriter

log = logging.getLogger(__name__)

STAGES = ('sft', 'rl')


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, bad stage list, missing checkpoint)."""


# ============================================================== the problem ===
@dataclasses.dataclass
class Problem:
  """Everything data-side that the stages share."""
  builder: object
  train: RoutingDataset
  test: RoutingDataset
  tokenizer: tokenizer_lib.Tokenizer
  strongest: int                       # index of the strongest model (training accuracy)
  c_ref: float                         # its mean training cost: c_hat = c / c_ref
  tables: dict                         # split -> {'p_hat', 'c_bar'} float32[N, K]

  @property
  def model_names(self) -> list[str]:
    return self.train.model_names


def _stage0(config, data_name: str, train: RoutingDataset, test: RoutingDataset,
            workdir):
  """Stage-0 capability estimates, computed once and cached in the workdir.

  The cache is keyed by the prepared data set's full name (for routing_files it
  holds a digest of the files' contents), the model subset and `config.anchor`.
  """
  key = json.dumps({'anchor': config.anchor.to_dict(), 'models': train.model_names,
                    'anchor_in_logits': config.model.anchor_in_logits,
                    'data': data_name, 'sizes': [train.num_queries, test.num_queries],
                    **({'backbone': [config.model.backbone, config.model.checkpoint,
                                     config.model.pooling, config.data.max_len,
                                     config.data.truncate]}
                       if config.anchor.space == 'backbone' else {})},
                   sort_keys=True, default=str)
  cache = workdir / 'stage0.pkl'
  if cache.is_file():
    with cache.open('rb') as f:
      cached = pickle.load(f)
    if cached.get('key') == key:
      return cached
  space = anchor_space(config)
  log.info('Stage 0: kNN capability estimates (k=%d, %s space) on %d training queries',
           config.anchor.k, config.anchor.space, train.num_queries)
  est = capability.capability_estimates(
      train.queries.tolist(), train.outcomes, train.outcome_mask, train.costs,
      train.tasks.tolist(), {'test': (test.queries.tolist(), test.tasks.tolist())},
      k=config.anchor.k, alpha=config.anchor.alpha, prior=config.anchor.prior,
      dim=config.anchor.dim, min_df=config.anchor.min_df, space=space)
  result = {
      'key': key, 'strongest': int(est['strongest']), 'c_ref': float(est['c_ref']),
      'space': est['space'],
      'tables': {s: {'p_hat': est[s][0], 'c_bar': est[s][1]} for s in ('train', 'test')},
  }
  if config.model.anchor_in_logits:
    # Routing new queries then needs their neighbours in the training table.
    result.update(train_feats=est['train_feats'],
                  train_outcomes=train.outcomes, train_mask=train.outcome_mask,
                  train_cost_hat=train.costs / est['c_ref'], train_tasks=train.tasks.tolist())
  if jax.process_index() == 0:
    paths.write_atomic(cache, pickle.dumps(result))
  return result


def anchor_space(config):
  """Stage 0's neighbour space: None (capability's TF-IDF -> SVD) or the backbone's."""
  if config.anchor.space == 'tfidf':
    return None
  if config.anchor.space == 'backbone':
    if backbones.kind_of(config.model) == 'scratch':
      raise TrainingError("anchor.space='backbone' needs a pretrained model.backbone "
                          "('hf_encoder' or 'hf_decoder') and model.checkpoint")
    return backbones.BackboneSpace(config.model, config.data.max_len, config.data.truncate)
  raise TrainingError(f"anchor.space={config.anchor.space!r}; expected 'tfidf' or 'backbone'")


def load_tokenizer(config, workdir, train_texts=None):
  """The backbone's own tokenizer; else data.tokenizer; else the one trained on the
  training queries and cached as DIR/tokenizer.model (trained here if missing)."""
  if backbones.kind_of(config.model) != 'scratch':
    if config.data.tokenizer:
      raise TrainingError(f'data.tokenizer={config.data.tokenizer!r} with a pretrained '
                          'backbone: the tokenizer comes from model.checkpoint; unset one')
    return backbones.load_tokenizer(config.model)
  if config.data.tokenizer:
    return tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  path = paths.as_path(workdir) / 'tokenizer.model'
  if train_texts is None:
    return tokenizer_lib.Tokenizer.load(path)
  return tokenizer_lib.load_or_train(path, train_texts, config.data.vocab_size)


def prepare_problem(config, workdir) -> Problem:
  """Prepares the data (TFDS), the tokenizer and the Stage-0 tables."""
  builder, splits = sources.load_splits(config.data, ('train', 'test'))
  train, test = splits['train'], splits['test']
  tok = load_tokenizer(config, workdir, train.queries.tolist())
  s0 = _stage0(config, builder.info.full_name, train, test, workdir)
  return Problem(builder=builder, train=train, test=test, tokenizer=tok,
                 strongest=s0['strongest'], c_ref=s0['c_ref'], tables=s0['tables'])


# =========================================================== model & state ===
def _schedule(stage_cfg, peak: float):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak,
      warmup_steps=min(stage_cfg.warmup_steps, max(stage_cfg.num_steps - 1, 0)),
      decay_steps=max(stage_cfg.num_steps, 1), end_value=0.1 * peak)


def _param_group(params):
  """'backbone' for the pretrained backbone's parameters, 'head' for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'backbone' if getattr(path[0], 'key', None) == 'backbone' else 'head',
      params)


def make_optimizer(config, stage: str):
  """AdamW with linear warmup and cosine decay, after global-norm clipping.

  With a pretrained backbone its parameters get their own learning rate,
  optim.backbone_lr_scale x the stage's (same schedule), or none at all with
  model.freeze_backbone. Returns (tx, the head's schedule).
  """
  optim_cfg, stage_cfg = config.optim, config[stage]
  schedule = _schedule(stage_cfg, stage_cfg.learning_rate)
  adamw = lambda lr: optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2,
                                 weight_decay=optim_cfg.weight_decay)
  if backbones.kind_of(config.model) == 'scratch':
    update = adamw(schedule)
  else:
    backbone = (optax.set_to_zero() if config.model.freeze_backbone else
                adamw(_schedule(stage_cfg, stage_cfg.learning_rate * optim_cfg.backbone_lr_scale)))
    update = optax.multi_transform({'backbone': backbone, 'head': adamw(schedule)}, _param_group)
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), update), schedule


def abstract_train_state(config, stage: str, vocab_size: int, num_models: int, mesh):
  """(graphdef, build, shardings) of a stage's train state, without allocating it.

  state = {'nnx': nnx.State of (model, optimizer), 'step': int32, 'rng': key data,
           'alpha': entropy coefficient, 'h0': entropy after Stage 1}
  """
  tx, _ = make_optimizer(config, stage)

  def build():
    with nnx.use_eager_sharding(False):
      model = build_model(config, vocab_size, num_models, config.seed)
      return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  repl = sharding.replicated(mesh)
  shardings = {'nnx': sharding.state_shardings(abstract, mesh), 'step': repl, 'rng': repl,
               'alpha': repl, 'h0': repl}
  return graphdef, build, shardings


def create_state(config, stage: str, problem: Problem, mesh):
  """The train state, created already sharded: (graphdef, state, shardings)."""
  graphdef, build, shardings = abstract_train_state(
      config, stage, problem.tokenizer.vocab_size, len(problem.model_names), mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return {'nnx': nnx.state(build()), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.key_data(jax.random.key(config.seed + 17)),
            'alpha': jnp.asarray(config.rl.alpha_init, jnp.float32),
            'h0': jnp.zeros((), jnp.float32)}

  with jax.set_mesh(mesh):
    state = init()
  return graphdef, state, shardings


def sample_cost_weight(config, stage_cfg, rng, batch_size):
  """lambda per query: drawn from [lambda_min, lambda_max] when lambda-conditioned."""
  if config.model.lambda_conditioned:
    return jax.random.uniform(rng, (batch_size,), minval=config.model.lambda_min,
                              maxval=config.model.lambda_max)
  return jnp.full((batch_size,), stage_cfg.cost_weight, jnp.float32)


# ================================================================ the step ===
def make_train_step(config, stage: str, graphdef, problem: Problem, schedule):
  """One jitted optimisation step of `stage` (state, batch) -> (state, metrics)."""
  stage_cfg = config[stage]
  rl = config.rl
  common = dict(tau_anchor=config.anchor.tau, strongest=problem.strongest,
                collapse_threshold=rl.collapse_threshold)

  def step_fn(state, batch):
    model, optimizer = nnx.merge(graphdef, state['nnx'])
    rng, lam_rng, drop_rng, act_rng = jax.random.split(jax.random.wrap_key_data(state['rng']), 4)
    batch = dict(batch, cost_hat=batch['costs'] / problem.c_ref)
    cost_weight = sample_cost_weight(config, stage_cfg, lam_rng, batch['tokens'].shape[0])
    logits_of = lambda m: policy_logits(m, batch, cost_weight, config,
                                        deterministic=config.model.dropout == 0.0,
                                        rngs=nnx.Rngs(dropout=drop_rng))
    new_state = dict(state)
    if stage == 'sft':
      loss_fn = lambda m: objectives.sft_loss(
          logits_of(m), batch, cost_weight, tau=stage_cfg.tau, mix=stage_cfg.anchor_mix, **common)
      (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads)
    else:
      beta = schedules.interpolate(rl.beta_start, rl.beta_end, state['step'], rl.num_steps,
                                   rl.entropy_schedule)
      target = schedules.entropy_target(state['step'], rl.num_steps, state['h0'],
                                        rl.entropy_min, rl.entropy_schedule)
      kwargs = dict(rng=act_rng, beta=beta, alpha=state['alpha'], estimator=rl.estimator,
                    group_size=rl.group_size, normalize_advantage=rl.normalize_advantage,
                    ppo_clip=rl.ppo_clip, **common)
      if rl.ppo_epochs > 1:
        # pi_old and the actions are fixed for all epochs of this batch.
        old = jax.nn.log_softmax(jax.lax.stop_gradient(logits_of(model)), -1)
        actions = jax.random.categorical(act_rng, old, axis=-1,
                                         shape=(rl.group_size, old.shape[0])).T
        kwargs.update(old_log_probs=old, actions=actions)
      loss_fn = lambda m: objectives.rl_loss(logits_of(m), batch, cost_weight, **kwargs)
      for _ in range(rl.ppo_epochs):
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
      new_state['alpha'] = schedules.dual_ascent(state['alpha'], target, metrics['entropy'],
                                                 rl.entropy_lr)
      metrics['entropy_target'] = target
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = schedule(state['step'])
    new_state.update(nnx=nnx.state((model, optimizer)), step=state['step'] + 1,
                     rng=jax.random.key_data(rng))
    return new_state, metrics

  return step_fn


# =============================================================== one stage ===
def _checkpoint_manager(path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.as_path(path), options=ocp.CheckpointManagerOptions(
          save_interval_steps=1,
          preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints)))


def dataset_probs(config, graphdef, nnx_state, mesh, problem: Problem, split: str,
                  cost_weight: float, limit: Optional[int] = None) -> np.ndarray:
  """pi(m|x) from a train state for the queries of `split` (the first `limit`): float32[N, K]."""
  data = getattr(problem, split)
  n = data.num_queries if limit is None else min(limit, data.num_queries)
  model_graphdef, params = nnx.split(nnx.merge(graphdef, nnx_state)[0])
  if jax.process_count() > 1:
    # Every process scores the whole split on its own devices (cheap next to
    # training), from a full copy of the parameters.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}),
                              jax.local_devices())
  tokens, mask = problem.tokenizer.encode_batch(data.queries[:n].tolist(), config.data.max_len,
                                                config.data.truncate)
  tables = problem.tables[split]
  return policy_probs(make_forward(config, model_graphdef, mesh), params, mesh,
                      config.eval_batch_size, tokens, mask, tables['p_hat'][:n],
                      tables['c_bar'][:n], cost_weight)


def _initial_entropy(config, graphdef, state, mesh, problem) -> float:
  """H_0: mean policy entropy over (up to) 2,048 training queries."""
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'train',
                        config.rl.cost_weight, limit=2048)
  return float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1)))


def run_stage(config, stage: str, problem: Problem, mesh, workdir, writer: MetricsWriter,
              init_params=None, init_from=None):
  """Runs (or resumes) one stage to its `num_steps`; returns (graphdef, final state).

  A fresh stage starts from `init_params` (the previous stage's parameters) or
  from the SFT checkpoint under `init_from`; a resumed one from its own checkpoint.
  """
  stage_cfg = config[stage]
  _, schedule = make_optimizer(config, stage)
  graphdef, state, shardings = create_state(config, stage, problem, mesh)
  featurize = pipeline.Featurize(problem.tokenizer, config.data.max_len, config.data.truncate,
                                 extras=problem.tables['train'])
  dataset = pipeline.make_dataset(
      problem.builder.as_data_source(split='train'), featurize,
      global_batch_size=stage_cfg.batch_size, seed=config.seed + STAGES.index(stage))
  iterator = iter(dataset)
  manager = _checkpoint_manager(workdir / 'checkpoints' / stage, config)

  latest = manager.latest_step()
  if latest is not None:
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(iterator)))
    state = restored['state']
    log.info('%s: resumed from the checkpoint at step %d', stage, latest)
  else:
    if init_from is not None:
      init_params = _restore_params(init_from, 'sft', state)
    if init_params is not None:
      state['nnx'][0] = jax.device_put(init_params, shardings['nnx'][0])
    elif backbones.kind_of(config.model) != 'scratch':
      state['nnx'][0]['backbone'] = load_pretrained_backbone(config, state, shardings)
    if stage == 'rl':
      h0 = _initial_entropy(config, graphdef, state, mesh, problem)
      state['h0'] = jax.device_put(jnp.asarray(h0, jnp.float32), shardings['h0'])
      log.info('rl: initial policy entropy H_0 = %.4f nats', h0)
  start = int(state['step'])
  writer.truncate(stage, start)

  step_fn = jax.jit(make_train_step(config, stage, graphdef, problem, schedule),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  batch_sh = sharding.batch_sharding(mesh)
  num_steps = stage_cfg.num_steps

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))

  progress = _progress(stage, start, num_steps)
  pending = None   # the previous step's metrics: checked while the next step runs
  with jax.set_mesh(mesh):
    for step in range(start, num_steps):
      batch = pipeline.to_global(next(iterator), batch_sh)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        _check_finite(pending, stage, step, manager)
      pending = metrics
      done = step + 1
      if done % config.log_every == 0 or done == num_steps:
        _check_finite(metrics, stage, done, manager)
        writer.write(stage, done, jax.device_get(metrics), problem.model_names)
        progress.set_postfix(loss=f'{float(metrics["loss"]):.4f}',
                             entropy=f'{float(metrics["entropy"]):.3f}')
      if done % config.checkpoint_every == 0 or done == num_steps:
        save(done)
      progress.update(1)
  if pending is not None:
    _check_finite(pending, stage, num_steps, manager)
  progress.close()
  manager.wait_until_finished()
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


def _restore_params(workdir, stage: str, like: dict):
  """The model parameters of `stage`'s last checkpoint under `workdir` (RL's init).

  `like` is a freshly created train state: its structure, shapes and shardings
  are the restore target (both stages share the optimizer's structure).
  """
  path = paths.as_path(workdir)
  for candidate in (path / 'checkpoints' / stage, path):
    if not candidate.is_dir():
      continue
    manager = ocp.CheckpointManager(candidate, options=ocp.CheckpointManagerOptions(
        read_only=True))
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(like)))
      return restored['state']['nnx'][0]
  raise TrainingError(f'rl.init_checkpoint={str(workdir)!r}: no checkpoint found there '
                      f'(looked in {path / "checkpoints" / stage} and {path})')


def _write_router_info(workdir, problem: Problem, final_stage: str) -> None:
  """router.json: what routing needs beside the checkpoint and the tokenizer."""
  cost_hat = problem.train.costs / problem.c_ref
  info = {'model_names': problem.model_names, 'strongest': problem.strongest,
          'c_ref': problem.c_ref, 'model_costs': cost_hat.mean(axis=0).tolist(),
          'final_stage': final_stage, 'data': problem.builder.info.full_name}
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
    graphdef, state = run_stage(config, stage, problem, mesh, workdir, writer, init_params=params,
                                init_from=init_from if stage == 'rl' else None)
    params = state['nnx'][0]
  writer.close()

  cost_weight = config.rl.cost_weight if stages[-1] == 'rl' else config.sft.cost_weight
  if jax.process_index() == 0:
    _write_router_info(workdir, problem, stages[-1])
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'test', cost_weight)
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
