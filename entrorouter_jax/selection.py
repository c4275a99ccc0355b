"""Scoring a train state's policy outside the step: the out-of-fold check that
stage selection and the Stage-1 candidates read (`make_selection_score`), and
the policy on a split's queries (`dataset_probs`).
"""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from entrorouter_jax import backbones, baselines, sharding
from entrorouter_jax import metrics as metrics_lib
from entrorouter_jax import state as state_lib
from entrorouter_jax.model import num_members
from entrorouter_jax.policy import (batched, is_utility, make_forward, make_member_forward,
                                    policy_arrays)
from entrorouter_jax.problem import Problem
from entrorouter_jax.state import TrainingError


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
  rows = np.flatnonzero(problem.folds < num_members(config.model))
  train = problem.train
  y, mask = train.outcomes[rows], train.outcome_mask[rows]
  cost_hat = train.costs[rows] / problem.c_ref
  c_bar = problem.tables['train']['c_bar'][rows]
  held_out_outputs = _held_out_outputs(config, graphdef, problem, mesh, rows)

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


def _held_out_outputs(config, graphdef, problem: Problem, mesh, rows):
  """nnx state -> f of each of the training `rows` by the member that holds it
  out, float64[n, K].

  The embeddings backbone's members are independent MLPs with stacked weights:
  each runs alone (its slice) on the rows it holds out, a 1/M share of the
  work of running every member on every row. A token backbone is one network:
  member 0, holding fold 0 out. Each member's rows are cut once here.
  """
  members = num_members(config.model)
  member = problem.folds[rows]
  arrays = policy_arrays(problem.inputs('train', rows), problem.tables['train']['p_hat'][rows],
                         problem.tables['train']['c_bar'][rows], 0.0)
  stacked = backbones.kind_of(config.model) == 'embeddings'
  parts = [(j, idx, {k: v[idx] for k, v in arrays.items()})
           for j, idx in enumerate(np.flatnonzero(member == j) for j in range(members))
           if len(idx)] if stacked else [(0, np.arange(len(rows)), arrays)]
  cache = {}

  def outputs(nnx_state) -> np.ndarray:
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

  return outputs


def scoring_params(graphdef, nnx_state, mesh):
  """(model graphdef, parameters, mesh) to score queries with outside the train step.

  In a multi-process run every process scores on its own devices (cheap next
  to training), from a full copy of the parameters.
  """
  model_graphdef, params = nnx.split(nnx.merge(graphdef, nnx_state)[state_lib.MODEL])
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
