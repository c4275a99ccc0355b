"""The training problem: the data, the tokenizer, Stage 0 and what the stages share.

`prepare_problem` loads both splits, the tokenizer and Stage 0's tables (cached
in DIR/stage0.pkl, `workdir.Stage0`) and fixes what every stage reads alike:
the strongest model and c_ref, the utility head's lambda set, each training
query's fold and the models' base rates. `stage_list` and `holds_out` read the
stage settings that decide how the training queries are split.

Learning from feedback (`rl.estimator='offpolicy'`, configs/feedback.py): the
data is a deployed router's log, one observed cell per query, and the stage
starts from that router (`InitRouter`, rl.init_checkpoint). Its model and
query-space settings are adopted (`adopt_init_router`), Stage 0 embeds the
logged queries in its fitted space and estimates p_hat, c_bar by kNN over the
logged (observed) cells in its c_ref's units, and its lambda set is kept, so
that lambda (and the log's cost_weight) means what it meant for that router.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Optional

import jax
import numpy as np

from entrorouter_jax import baselines, capability, features, paths
from entrorouter_jax import state as state_lib
from entrorouter_jax import router as router_lib, workdir as workdir_lib
from entrorouter_jax import neighbours
from entrorouter_jax.data import pipeline, sources
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
  # Learning from feedback: log pi_b(m|x, lambda), float32[N_train, L + 1, K], the
  # logging router's policy on the training rows at the L lambdas of
  # `behaviour_lambdas` and at the row's logged one (`train.behaviour_table`).
  log_behaviour: Optional[np.ndarray] = None

  @property
  def model_names(self) -> list[str]:
    return self.train.model_names

  @property
  def feature_dim(self) -> int:
    return int(self.features['train'].shape[1])

  @property
  def is_feedback(self) -> bool:
    """Whether the training data is a feedback log (one observed cell per query)."""
    return self.train.propensities is not None

  def train_table(self) -> dict:
    """Per training query, what the steps read besides tokens: Stage 0's
    tables, the fold, and for the embeddings backbone the features, outcomes,
    outcome mask and costs ({name: array[N_train, ...]}). A feedback log adds
    `logged` (int32, the logged column), its `propensity` and `cost_weight`
    (float32, NaN = none; TFDS records carry these two for token backbones)
    and, once set, `log_behaviour` (log pi_b, float32[N_train, L + 1, K])."""
    table = dict(self.tables['train'], fold=self.folds)
    if self.tokenizer is None:
      table.update(features=self.features['train'], outcomes=self.train.outcomes,
                   outcome_mask=self.train.outcome_mask, costs=self.train.costs)
    if self.is_feedback:
      table['logged'] = self.train.logged_models().astype(np.int32)
      if self.tokenizer is None:
        table.update(pipeline.feedback_tables(self.train))
    if self.log_behaviour is not None:
      table['log_behaviour'] = self.log_behaviour
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


# ====================================================== learning from feedback ===
OFFPOLICY = 'offpolicy'


def is_offpolicy(config) -> bool:
  """Whether the run learns from feedback logs: the RL stage with rl.estimator='offpolicy'."""
  return config.rl.estimator == OFFPOLICY and 'rl' in workdir_lib.stage_names(config)


@dataclasses.dataclass
class InitRouter:
  """The router that logged the feedback (rl.init_checkpoint, a finished run's workdir)."""
  workdir: object
  config: object           # its config.json
  info: workdir_lib.RouterInfo
  stage0: workdir_lib.Stage0

  @property
  def final_stage(self) -> str:
    return self.info.final_stage or workdir_lib.stage_names(self.config)[-1]


def read_init_router(config) -> Optional[InitRouter]:
  """The logging router of an off-policy run (None for any other run); TrainingError
  where rl.init_checkpoint is unset or not a finished run's workdir."""
  if not is_offpolicy(config):
    return None
  where = config.rl.init_checkpoint
  if not where:
    raise TrainingError("rl.estimator='offpolicy' (configs/feedback.py) needs "
                        'rl.init_checkpoint=DIR, the router that logged the data')
  workdir = paths.as_path(where)
  s0, name = workdir_lib.finished_run_stage0(workdir)
  if s0 is None:
    raise TrainingError(f'rl.init_checkpoint={str(where)!r}: {name} is missing or incomplete '
                        'there; expected the workdir of a finished training run (the router '
                        'that logged the data)')
  if (workdir / workdir_lib.ADDED_MODELS).is_file():
    raise TrainingError(f'rl.init_checkpoint={str(where)!r}: that router has models added or '
                        f'removed after training ({workdir_lib.ADDED_MODELS}), which a stage '
                        'cannot start from; expected a trained router (retrain with those '
                        'models in data.models)')
  return InitRouter(workdir=workdir, config=workdir_lib.read_config(workdir),
                    info=workdir_lib.read_router_info(workdir), stage0=s0)


def adopt_init_router(config, init: Optional[InitRouter]):
  """`config` as an off-policy run from `init` trains it: a copy with the logging
  router's model and anchor sections (its network and query space), its token
  settings and tokenizer (token backbones) and its model names as the feedback
  reader's columns (data.read_options.models, unless set); `config` itself where
  `init` is None."""
  if init is None:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    for section in ('model', 'anchor'):
      if config[section].to_dict() != init.config[section].to_dict():
        log.info('rl.init_checkpoint: using its %s settings', section)
      config[section] = copy.deepcopy(init.config[section])
    if 'models' not in config.data.read_options:
      config.data.read_options.models = list(init.info.model_names)
    for key in ('max_len', 'truncate'):
      config.data[key] = init.config.data[key]
    tokenizer = paths.as_path(init.workdir) / 'tokenizer.model'
    if not config.data.tokenizer and tokenizer.is_file():
      config.data.tokenizer = str(tokenizer)
  return config


def behaviour_lambdas(config, problem: 'Problem') -> np.ndarray:
  """float32[L]: the lambdas an off-policy step draws from, at which the logging
  policy is tabulated: the lambda set (utility head), else rl.cost_weight alone;
  TrainingError for a lambda-conditioned router (its draws are continuous)."""
  from entrorouter_jax.policy import is_utility
  if is_utility(config):
    return np.asarray(problem.lambda_set, np.float32)
  if config.model.lambda_conditioned:
    raise TrainingError("rl.estimator='offpolicy' needs model.head='utility' or a fixed cost "
                        'weight; model.lambda_conditioned=True draws lambdas the logging '
                        'policy is not tabulated at')
  return np.asarray([config.rl.cost_weight], np.float32)


class _FittedSpace:
  """A fitted query space whose fit() keeps it as it is (Stage 0 in the logging
  router's space)."""

  def __init__(self, space):
    self.space = space

  def fit(self, texts):
    del texts
    return self

  def transform(self, texts):
    return self.space.transform(texts)


# ================================================================ Stage 0 ===
def stage0_key(config, data_name: str, train: RoutingDataset, test: RoutingDataset,
               init: Optional[InitRouter] = None) -> str:
  """What Stage 0's results depend on: the prepared data set's full name (for
  routing_files it holds a digest of the files' contents), the model subset,
  the split sizes, `config.anchor` and the space's settings (and the logging
  router whose space it uses, where `init` is given)."""
  key = {'anchor': config.anchor.to_dict(), 'models': train.model_names,
         'data': data_name, 'sizes': [train.num_queries, test.num_queries],
         'space': features.space_key(config)}
  if config.data.get('train_queries', 0):   # a sample: which one
    key['train_sample'] = [config.data.train_queries, config.data.get('train_sample_seed', 0)]
  if init is not None:
    key['init'] = [str(init.workdir), init.stage0.key]
  return json.dumps(key, sort_keys=True, default=str)


def compute_stage0(config, key: str, train: RoutingDataset, test: RoutingDataset,
                   init: Optional[InitRouter] = None) -> workdir_lib.Stage0:
  """Stage-0 capability estimates and the query space: the space (to embed new
  queries), both splits' tables and embeddings, and the training table (the
  kNN of routing time).

  With `init` (learning from feedback) the space is the logging router's, as
  fitted, and strongest, c_ref are its own: the kNN estimates over the observed
  (logged) cells are rescaled to that c_ref (c_bar is linear in the costs)."""
  try:
    space = features.make_space(config) if init is None else _FittedSpace(init.stage0.space)
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
  if init is not None:
    scale = est['c_ref'] / init.stage0.c_ref
    for split in ('train', 'test'):
      est[split] = (est[split][0], (est[split][1] * scale).astype(np.float32))
    est.update(strongest=init.stage0.strongest, c_ref=init.stage0.c_ref,
               space=init.stage0.space)
  return workdir_lib.Stage0(
      key=key, strongest=int(est['strongest']), c_ref=float(est['c_ref']), space=est['space'],
      tables={s: {'p_hat': est[s][0], 'c_bar': est[s][1]} for s in ('train', 'test')},
      features={'train': est['train_feats'], 'test': est['query_feats']['test']},
      train_feats=est['train_feats'], train_outcomes=train.outcomes,
      train_mask=train.outcome_mask, train_cost_hat=train.costs / est['c_ref'],
      train_tasks=train.tasks.tolist())


def stage0(config, data_name: str, train: RoutingDataset, test: RoutingDataset,
           workdir, init: Optional[InitRouter] = None) -> workdir_lib.Stage0:
  """Stage 0 for this data and config: DIR/stage0.pkl where its key matches,
  else computed (`compute_stage0`) and stored there."""
  key = stage0_key(config, data_name, train, test, init)
  cached = workdir_lib.read_stage0(workdir)
  if cached is not None and cached.key == key:
    return cached
  result = compute_stage0(config, key, train, test, init)
  if jax.process_index() == 0:
    workdir_lib.write_stage0(workdir, result)
  return result


def lambda_set(config, train: RoutingDataset, s0: workdir_lib.Stage0,
               init: Optional[InitRouter] = None) -> np.ndarray:
  """The lambdas the utility head trains on (`model.lambda_set`): 'auto' or a list;
  learning from feedback, 'auto' is the logging router's set (router.json)."""
  spec = str(config.model.get('lambda_set', 'auto')).strip()
  if spec == 'auto' and init is not None and init.info.lambda_set:
    return np.asarray(init.info.lambda_set, np.float32)
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


def prepare_problem(config, workdir, init: Optional[InitRouter] = None) -> Problem:
  """Prepares the data (TFDS), the tokenizer and the Stage-0 tables (in the logging
  router's space and units where `init` is given)."""
  builder, splits = sources.load_splits(config.data, ('train', 'test'))
  train, test = splits['train'], splits['test']
  if init is not None and train.model_names != list(init.info.model_names):
    raise TrainingError(f'data.files={config.data.files!r}: the feedback has models '
                        f'{train.model_names}; expected rl.init_checkpoint\'s '
                        f'{list(init.info.model_names)}, in that order (data.models, '
                        'data.read_options.models)')
  tok = state_lib.load_tokenizer(config, workdir, train.queries.tolist())
  s0 = stage0(config, builder.info.full_name, train, test, workdir, init)
  members = num_members(config.model)
  return Problem(builder=builder, train=train, test=test, tokenizer=tok,
                 strongest=s0.strongest, c_ref=s0.c_ref, tables=s0.tables,
                 features=s0.features, lambda_set=lambda_set(config, train, s0, init),
                 folds=fold_ids(train.ids, config.seed,
                                members if members > 1 else HOLDOUT_FOLDS),
                 base_rates=base_rates(train), max_len=config.data.max_len,
                 truncate=config.data.truncate)


def behaviour_table(config, init: InitRouter, problem: Problem, mesh) -> np.ndarray:
  """log pi_b(m|x, lambda), float32[N_train, L + 1, K]: the logging router's own
  policy on the training rows (its query space, Stage-0 tables and checkpoint) at
  the L lambdas the stage draws from (`behaviour_lambdas`), and in slot L at the
  row's logged cost weight (its operating one where the log has none), so that the
  KL term compares pi and pi_b at the same lambda."""
  router = router_lib.load_router(init.workdir, mesh)
  queries = problem.train.queries.tolist()
  lambdas = behaviour_lambdas(config, problem)
  lam = np.full(len(queries), router.default_cost_weight)
  own = problem.train.cost_weights
  if own is not None:
    lam = np.where(np.isfinite(own), own, lam)
  feats = router.features(queries)
  tables = router.anchor_tables(queries, feats)
  probs = np.zeros((len(queries), len(lambdas) + 1, len(problem.model_names)))
  for slot, value in enumerate(lambdas):
    probs[:, slot] = router.probs(queries, float(value), tables, feats)
  for value in np.unique(lam):
    rows = np.flatnonzero(lam == value)
    probs[rows, -1] = router.probs([queries[i] for i in rows], float(value),
                                   (tables[0][rows], tables[1][rows]), feats[rows])
  log.info('rl: the logging policy pi_b from %s on %d training rows at %d lambdas',
           init.workdir, len(queries), len(lambdas))
  return np.log(np.maximum(probs, 1e-30)).astype(np.float32)
