"""The training problem: the data, the tokenizer, Stage 0 and what the stages share.

`prepare_problem` loads both splits, the tokenizer and Stage 0's tables (cached
in DIR/stage0.pkl, `workdir.Stage0`) and fixes what every stage reads alike:
the strongest model and c_ref, the utility head's lambda set, each training
query's fold and the models' base rates. `stage_list` and `holds_out` read the
stage settings that decide how the training queries are split.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import numpy as np

from entrorouter_jax import baselines, capability, features
from entrorouter_jax import state as state_lib
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax import neighbours
from entrorouter_jax.data import sources
from entrorouter_jax.data.dataset import RoutingDataset
from entrorouter_jax.data.splits import unit_hash
from entrorouter_jax.model import num_members
from entrorouter_jax.state import TrainingError

log = logging.getLogger('entrorouter_jax.train')

STAGES = workdir_lib.STAGES
# Folds of the training queries when one member holds one out (model.members = 1
# with stage selection): that member trains on 4/5 and is checked on 1/5.
HOLDOUT_FOLDS = 5


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


def stage0_key(config, data_name: str, train: RoutingDataset, test: RoutingDataset) -> str:
  """What Stage 0's results depend on: the prepared data set's full name (for
  routing_files it holds a digest of the files' contents), the model subset,
  the split sizes, `config.anchor` and the space's settings."""
  return json.dumps({'anchor': config.anchor.to_dict(), 'models': train.model_names,
                     'data': data_name, 'sizes': [train.num_queries, test.num_queries],
                     'space': features.space_key(config)}, sort_keys=True, default=str)


def compute_stage0(config, key: str, train: RoutingDataset,
                   test: RoutingDataset) -> workdir_lib.Stage0:
  """Stage-0 capability estimates and the query space: the space (to embed new
  queries), both splits' tables and embeddings, and the training table (the
  kNN of routing time)."""
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
      **neighbours.search_settings(config.anchor))
  return workdir_lib.Stage0(
      key=key, strongest=int(est['strongest']), c_ref=float(est['c_ref']), space=est['space'],
      tables={s: {'p_hat': est[s][0], 'c_bar': est[s][1]} for s in ('train', 'test')},
      features={'train': est['train_feats'], 'test': est['query_feats']['test']},
      train_feats=est['train_feats'], train_outcomes=train.outcomes,
      train_mask=train.outcome_mask, train_cost_hat=train.costs / est['c_ref'],
      train_tasks=train.tasks.tolist())


def stage0(config, data_name: str, train: RoutingDataset, test: RoutingDataset,
           workdir) -> workdir_lib.Stage0:
  """Stage 0 for this data and config: DIR/stage0.pkl where its key matches,
  else computed (`compute_stage0`) and stored there."""
  key = stage0_key(config, data_name, train, test)
  cached = workdir_lib.read_stage0(workdir)
  if cached is not None and cached.key == key:
    return cached
  result = compute_stage0(config, key, train, test)
  if jax.process_index() == 0:
    workdir_lib.write_stage0(workdir, result)
  return result


def lambda_set(config, train: RoutingDataset, s0: workdir_lib.Stage0) -> np.ndarray:
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
  table = s0.tables['train']
  return np.asarray(baselines.spread_lambdas(
      table['p_hat'], table['c_bar'], train.outcomes, train.outcome_mask,
      train.costs / s0.c_ref), np.float32)


def fold_ids(ids, seed: int, num_folds: int) -> np.ndarray:
  """int32[N] in [0, num_folds): a seeded hash of each query id (row order does not matter)."""
  return np.array([min(int(unit_hash(seed + 1, str(i)) * num_folds), num_folds - 1)
                   for i in ids], np.int32)


def base_rates(train: RoutingDataset) -> np.ndarray:
  """float32[K]: each model's success rate on the training queries (0.5 where it has none)."""
  counts = train.outcome_mask.sum(axis=0)
  rates = np.where(train.outcome_mask, train.outcomes, 0.0).sum(axis=0) / np.maximum(counts, 1)
  return np.where(counts > 0, rates, 0.5).astype(np.float32)


def stage_list(config) -> list[str]:
  """The stages to run, checked: 'sft', 'rl' or both in that order (without
  'sft' where `rl.init_checkpoint` names the SFT checkpoint RL starts from)."""
  stages = workdir_lib.stage_names(config)
  if not stages or any(s not in STAGES for s in stages) or (
      stages != sorted(stages, key=STAGES.index)):
    raise TrainingError(f'stages={config.stages!r}; expected "sft", "rl" or "sft,rl"')
  if 'rl' in stages and config.rl.init_checkpoint and 'sft' in stages:
    stages.remove('sft')
  return stages


def holds_out(config) -> bool:
  """Whether members train on their folds only: always with several members,
  and with one member where a stage selects (it is then checked on fold 0)."""
  return num_members(config.model) > 1 or any(
      state_lib.selects(config, s) for s in stage_list(config))


def prepare_problem(config, workdir) -> Problem:
  """Prepares the data (TFDS), the tokenizer and the Stage-0 tables."""
  builder, splits = sources.load_splits(config.data, ('train', 'test'))
  train, test = splits['train'], splits['test']
  tok = state_lib.load_tokenizer(config, workdir, train.queries.tolist())
  s0 = stage0(config, builder.info.full_name, train, test, workdir)
  members = num_members(config.model)
  return Problem(builder=builder, train=train, test=test, tokenizer=tok,
                 strongest=s0.strongest, c_ref=s0.c_ref, tables=s0.tables,
                 features=s0.features, lambda_set=lambda_set(config, train, s0),
                 folds=fold_ids(train.ids, config.seed,
                                members if members > 1 else HOLDOUT_FOLDS),
                 base_rates=base_rates(train), max_len=config.data.max_len,
                 truncate=config.data.truncate)
