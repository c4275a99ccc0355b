"""Training: Stage 0 -> Soft Supervision -> RL with the Soft Anchor -> evaluation.

  python -m entrorouter_jax.train --config=configs/rl.py [--workdir=DIR]

Reading order: `problem.prepare_problem` (data, tokenizer, Stage-0 tables),
`run_stage` (one stage: sharded state, grain iterator, the jitted step of
`steps.py`, checkpoints, the out-of-fold checks of `selection.py`, metrics),
`train_and_evaluate` (the stages in order, then the test split). Rerunning on
a workdir resumes from its last checkpoint; what routing reads of the workdir
is `workdir.py`'s.

Learning from feedback (configs/feedback.py, rl.estimator='offpolicy'): the RL
stage starts from the router that logged the data (rl.init_checkpoint, its
final stage's parameters) and trains on the log's rows by `steps.offpolicy_update`.
The logged propensities give the ratio rho; the full distribution pi_b of the
KL term is the logging router's own policy on the training rows
(`behaviour_table`), computed once at the start and held fixed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Optional

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from entrorouter_jax import backbones, evaluate, paths, sharding
from entrorouter_jax import router as router_lib
from entrorouter_jax import state as state_lib
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax.data import pipeline
from entrorouter_jax.policy import is_utility
from entrorouter_jax.problem import (STAGES, InitRouter, Problem, adopt_init_router,
                                     behaviour_table, holds_out, prepare_problem,
                                     read_init_router, stage_list)
from entrorouter_jax.selection import dataset_probs, make_selection_score
from entrorouter_jax.state import (TrainingError, make_optimizer, model_params,
                                   set_model_params)
from entrorouter_jax.steps import make_train_step
from entrorouter_jax.writers import MetricsWriter

log = logging.getLogger('entrorouter_jax.train')  # not __name__: '__main__' under python -m


# =========================================================== model & state ===
def create_state(config, stage: str, problem: Problem, mesh, compiled: Optional[dict] = None):
  """`stage`'s train state for `problem`, created already sharded: (graphdef, state,
  shardings); `compiled` as in `state.create_state`."""
  return state_lib.create_state(config, stage, state_lib.vocab_size(problem.tokenizer),
                                len(problem.model_names), mesh, problem.feature_dim, compiled)


def scaled_batch_size(batch_size: int, num_train: int, divisor: int = 1) -> int:
  """The batch a stage trains with: `batch_size`, or for small data the largest
  power of two up to a quarter of the training queries (so an epoch is at least
  four steps), never below the mesh's batch divisor."""
  quarter = max(num_train // 4, 1)
  if batch_size <= quarter:
    return batch_size
  return max(divisor, 2 ** int(math.floor(math.log2(quarter))))


# ============================================================== selection ===
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class Selection:
  """A selecting stage's out-of-fold checks: the best parameters so far, kept in
  the state ('best', 'best_score', 'since_best'), and the patience rule."""

  def __init__(self, run: 'StageRun', score):
    self.run, self.score = run, score
    self.every = int(run.stage_cfg.get('select_every', 0))
    self.patience = int(run.stage_cfg.get('patience', 0))

  def due(self, done: int) -> bool:
    return done % self.every == 0 or done == self.run.stage_cfg.num_steps

  def check(self, state, done: int) -> bool:
    """The check at step `done` (updates `state`); True when the stage should stop."""
    run = self.run
    value = self.score(state['nnx'])
    best = float(state['best_score'])
    if value < best:
      state.update(best=_copy(model_params(state)),
                   best_score=run.put(np.float32(value), 'best_score'),
                   since_best=run.put(np.int32(0), 'since_best'))
    else:
      state['since_best'] = run.put(np.int32(int(state['since_best']) + 1), 'since_best')
    run.writer.write(run.label, done, {'select_score': value, 'select_best': min(value, best)},
                     run.problem.model_names)
    return bool(self.patience) and int(state['since_best']) >= self.patience

  def keep_best(self, state, done: int, stopped: bool) -> None:
    """The stage ends with the parameters of its best check."""
    set_model_params(state, _copy(state['best']))
    log.info('%s: keeping the parameters of the best out-of-fold check (%s = %.5f)%s',
             self.run.label, self.run.stage_cfg.select, float(state['best_score']),
             f'; stopped early at step {done}' if stopped else '')


# =============================================================== one stage ===
@dataclasses.dataclass
class StageRun:
  """What one stage's set-up, loop and checkpoints share."""
  config: ml_collections.ConfigDict
  stage: str
  label: str               # checkpoint folder, metrics label and progress bar
  problem: Problem
  mesh: object
  graphdef: object
  shardings: dict
  manager: ocp.CheckpointManager
  iterator: object         # the grain iterator (its position is checkpointed)
  writer: MetricsWriter

  @property
  def stage_cfg(self):
    return self.config[self.stage]

  def put(self, value, key: str):
    return jax.device_put(value, self.shardings[key])

  def save(self, state, step: int) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(self.iterator)))

  def restore_latest(self, state):
    """The state of the latest checkpoint (the iterator restored too), or None."""
    latest = self.manager.latest_step()
    if latest is None:
      return None
    restored = self.manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=grain.checkpoint.CheckpointRestore(self.iterator)))
    log.info('%s: resumed from the checkpoint at step %d', self.label, latest)
    return restored['state']

  def check_finite(self, metrics, step: int) -> None:
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      self.manager.wait_until_finished()
      raise TrainingError(
          f'{self.label}: the loss became {loss} at step {step}; stopping. The last good '
          f'checkpoint is at step {self.manager.latest_step()} under {self.manager.directory}. '
          f'Try a lower {self.label}.learning_rate or optim.grad_clip.')


def _checkpoint_manager(path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.as_path(path), options=ocp.CheckpointManagerOptions(
          save_interval_steps=1,
          preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints)))


def stage_dataset(config, stage: str, problem: Problem, mesh, label: str):
  """The stage's training batches: a grain dataset over the in-memory table
  (embeddings backbone) or the TFDS split, tokenised on the fly."""
  stage_cfg = config[stage]
  seed = config.seed + STAGES.index(stage)
  batch_size = scaled_batch_size(stage_cfg.batch_size, problem.train.num_queries,
                                 sharding.batch_divisor(mesh))
  if batch_size != stage_cfg.batch_size:
    log.info('%s: %d training queries: batch %d instead of %s.batch_size=%d (at most a '
             'quarter of the queries per batch)', label, problem.train.num_queries,
             batch_size, stage, stage_cfg.batch_size)
  read = dict(prefetch=config.data.get('prefetch', pipeline.PREFETCH),
              read_threads=config.data.get('read_threads', pipeline.READ_THREADS))
  if problem.tokenizer is None:   # everything the step reads is in memory
    return pipeline.make_table_dataset(problem.train_table(), global_batch_size=batch_size,
                                       seed=seed, **read)
  featurize = pipeline.Featurize(problem.tokenizer, config.data.max_len, config.data.truncate,
                                 extras=problem.train_table())
  return pipeline.make_dataset(problem.builder.as_data_source(split='train'), featurize,
                               global_batch_size=batch_size, seed=seed, **read)


def initialise(run: StageRun, state, init_params=None, init_from=None):
  """A fresh stage's starting point (in place): the previous stage's parameters,
  the SFT checkpoint under `init_from` (or, an `InitRouter`, the final stage of
  the router that logged the feedback), or the pretrained backbone and the
  utility head's base-rate bias; RL's initial entropy H_0."""
  config, problem, shardings = run.config, run.problem, run.shardings
  if isinstance(init_from, InitRouter):
    init_params = _restore_params(init_from.config, init_from.workdir, init_from.final_stage,
                                  problem, run.mesh)
  elif init_from is not None:
    init_params = _restore_params(config, init_from, 'sft', problem, run.mesh)
  if init_params is not None:
    set_model_params(state, jax.device_put(init_params, model_params(shardings)))
  else:
    if backbones.kind_of(config.model) in backbones.PRETRAINED:
      model_params(state)['backbone'] = load_pretrained_backbone(config, state, shardings)
    if is_utility(config):
      _base_rate_bias(state, problem)
  if run.stage == 'rl':
    h0 = _initial_entropy(config, run.graphdef, state, run.mesh, problem)
    state['h0'] = run.put(jnp.asarray(h0, jnp.float32), 'h0')
    log.info('rl: initial policy entropy H_0 = %.4f nats', h0)
  return state


def compiled_step(run: StageRun, schedule, compiled: dict):
  """The stage's jitted step, compiled once per `compiled` dict and stage."""
  if ('step', run.stage) not in compiled:
    mesh = run.mesh
    compiled['step', run.stage] = jax.jit(
        make_train_step(run.config, run.stage, run.graphdef, run.problem, schedule),
        in_shardings=(run.shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(run.shardings, sharding.replicated(mesh)),
        donate_argnums=0, compiler_options=sharding.compiler_options())
  return compiled['step', run.stage]


def train_loop(run: StageRun, state, step_fn, selection: Optional[Selection]):
  """Steps from the state's step to the stage's end (or an early stop), writing
  metrics and checkpoints; returns the final state."""
  config, stage_cfg, label = run.config, run.stage_cfg, run.label
  start, num_steps = int(state['step']), stage_cfg.num_steps
  soft_weight = jax.device_put(np.float32(stage_cfg.get('soft_weight', 1.0)),
                               sharding.replicated(run.mesh))
  batch_sh = sharding.batch_sharding(run.mesh)
  progress = _progress(label, start, num_steps)
  pending = None   # the previous step's metrics: checked while the next step runs
  # The host's copy of state['done']: reading the device's after each step
  # would wait for that step, and the next batch could not be read and placed
  # while it runs.
  finished = bool(int(state['done']))
  with jax.set_mesh(run.mesh):
    if selection and start == 0 and not finished:
      selection.check(state, 0)   # the stage's starting point competes too
    step = start
    while step < num_steps and not finished:
      batch = pipeline.to_global(next(run.iterator), batch_sh)
      state, metrics = step_fn(state, batch, soft_weight)
      if pending is not None:
        run.check_finite(pending, step)
      pending = metrics
      step = done = step + 1
      if done % config.log_every == 0 or done == num_steps:
        run.check_finite(metrics, done)
        run.writer.write(label, done, jax.device_get(metrics), run.problem.model_names)
        progress.set_postfix(loss=f'{float(metrics["loss"]):.4f}',
                             entropy=f'{float(metrics["entropy"]):.3f}')
      stop = bool(selection) and selection.due(done) and selection.check(state, done)
      if done == num_steps or stop:
        if selection:
          selection.keep_best(state, done, stop)
        state['done'] = run.put(np.int32(1), 'done')
        finished = True
      if done % config.checkpoint_every == 0 or finished:
        run.save(state, done)
      progress.update(1)
  if pending is not None:
    run.check_finite(pending, step)
  progress.close()
  run.manager.wait_until_finished()
  return state


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
  label = label or stage
  _, schedule = make_optimizer(config, stage)
  compiled = {} if compiled is None else compiled
  graphdef, state, shardings = create_state(config, stage, problem, mesh, compiled)
  iterator = iter(stage_dataset(config, stage, problem, mesh, label))
  run = StageRun(config=config, stage=stage, label=label, problem=problem, mesh=mesh,
                 graphdef=graphdef, shardings=shardings, iterator=iterator, writer=writer,
                 manager=_checkpoint_manager(
                     paths.as_path(workdir) / workdir_lib.CHECKPOINTS / label, config))
  restored = run.restore_latest(state)
  state = initialise(run, state, init_params, init_from) if restored is None else restored
  writer.truncate(label, int(state['step']))
  step_fn = compiled_step(run, schedule, compiled)
  selection = None
  if 'best' in state:
    selection = Selection(run, make_selection_score(config, stage, graphdef, problem, mesh))
  return graphdef, train_loop(run, state, step_fn, selection)


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
    workdir_lib.write_sft_choice(workdir, name, scores)
  return graphdef, state


def _progress(stage, start, total):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc=stage, unit='step', dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0)


def load_pretrained_backbone(config, state, shardings):
  """The backbone's weights from model.checkpoint, placed on the backbone's shardings."""
  log.info('loading the pretrained %s from %s', config.model.backbone, config.model.checkpoint)
  target = model_params(state)['backbone']
  nnx.replace_by_pure_dict(target, backbones.load_pretrained(config.model))
  return jax.device_put(target, model_params(shardings)['backbone'])


def _restore_params(config, workdir, stage: str, problem: Problem, mesh):
  """The model parameters of `stage`'s last checkpoint under `workdir` (RL's init),
  `config` being the one that checkpoint was trained with."""
  path = paths.as_path(workdir)
  _, target = state_lib.abstract_state(config, stage, state_lib.vocab_size(problem.tokenizer),
                                       len(problem.model_names), mesh, problem.feature_dim)
  for candidate in (workdir_lib.stage_checkpoints(path, stage), path):
    if not candidate.is_dir():
      continue
    manager = ocp.CheckpointManager(candidate, options=ocp.CheckpointManagerOptions(
        read_only=True))
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return model_params(restored['state'])
  raise TrainingError(f'rl.init_checkpoint={str(workdir)!r}: no checkpoint found there '
                      f'(looked in {path / workdir_lib.CHECKPOINTS / stage} and {path})')


def _initial_entropy(config, graphdef, state, mesh, problem) -> float:
  """H_0: mean policy entropy over (up to) 2,048 training queries."""
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'train',
                        config.rl.cost_weight, limit=2048)['probs']
  return float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1)))


def _base_rate_bias(state, problem):
  """Utility head: each output starts at its model's training success rate
  (logit of the base rate), as the success baselines do."""
  rates = np.clip(problem.base_rates, 1e-3, 1 - 1e-3)
  bias = np.log(rates / (1 - rates)).astype(np.float32)
  params = model_params(state)
  if 'members' in params:
    leaf = params['members']['b2']
    leaf[...] = jax.device_put(np.broadcast_to(bias, leaf.shape).copy(), leaf.sharding)
  else:
    leaf = params['head']['bias']
    leaf[...] = jax.device_put(bias, leaf.sharding)


def router_info(workdir, problem: Problem, final_stage: str) -> workdir_lib.RouterInfo:
  """router.json's content: what routing needs beside the checkpoint and the tokenizer."""
  checkpoint = workdir_lib.stage_checkpoints(workdir, final_stage)
  return workdir_lib.RouterInfo(
      model_names=problem.model_names, strongest=problem.strongest, c_ref=problem.c_ref,
      model_costs=(problem.train.costs / problem.c_ref).mean(axis=0).tolist(),
      final_stage=final_stage, data=problem.builder.info.full_name,
      checkpoint=str(checkpoint.relative_to(paths.as_path(workdir))),
      feature_dim=problem.feature_dim, lambda_set=problem.lambda_set.tolist())


# ================================================================ the run ===
def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs the configured stages on `workdir` (resuming where it stopped), then evaluates.

  On feedback logs the test split's results.json counts the cells no one logged
  as failures; results['offpolicy'] (eval/offpolicy.json) holds the router's
  off-policy estimates on the test split's logged rows (`evaluate.offpolicy_results`),
  with its paired DR gain over the rl.init_checkpoint router ('vs_init').
  """
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  stages = stage_list(config)
  init = read_init_router(config)
  config = adopt_init_router(config, init)
  if jax.process_index() == 0:
    paths.write_atomic(workdir / workdir_lib.CONFIG, config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.mesh)
  started = time.time()
  problem = prepare_problem(config, workdir, init)
  if init is not None:
    problem = dataclasses.replace(problem, log_behaviour=behaviour_table(config, init, problem,
                                                                         mesh))
  log.info('data: %s, %d train / %d test queries, %d models; strongest %s, c_ref %.3g',
           problem.builder.name, problem.train.num_queries, problem.test.num_queries,
           len(problem.model_names), problem.model_names[problem.strongest], problem.c_ref)

  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  params = None
  init_from = paths.as_path(config.rl.init_checkpoint) if config.rl.init_checkpoint else None
  if init is not None:
    init_from = init
  for stage in stages:
    if stage == 'sft' and state_lib.soft_weight_choices(config):
      graphdef, state = run_sft_candidates(config, problem, mesh, workdir, writer)
    else:
      graphdef, state = run_stage(config, stage, problem, mesh, workdir, writer,
                                  init_params=params,
                                  init_from=init_from if stage == 'rl' else None)
    params = model_params(state)
  writer.close()

  cost_weight = config.rl.cost_weight if stages[-1] == 'rl' else config.sft.cost_weight
  if jax.process_index() == 0:
    workdir_lib.write_router_info(workdir, router_info(workdir, problem, stages[-1]))
  probs = dataset_probs(config, graphdef, state['nnx'], mesh, problem, 'test',
                        cost_weight)['probs']
  results = evaluate.router_results(problem.test, probs, strongest=problem.strongest,
                                    c_ref=problem.c_ref, cost_weight=cost_weight,
                                    dataset=problem.builder.name)
  if problem.is_feedback and problem.test.num_queries and jax.process_index() == 0:
    # Against the router the stage started from (the logging one), paired on the same rows.
    baseline = None if init is None else (router_lib.load_router(init.workdir, mesh), init.workdir)
    results['offpolicy'] = evaluate.offpolicy_results(router_lib.load_router(workdir, mesh),
                                                      problem.test, workdir, baseline=baseline)
    evaluate.write_results(workdir, results['offpolicy'], 'offpolicy.json')
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
