"""The replay simulator: a full-information data set becomes a stream of traffic on which
bandit learners route, see only the cell they chose, and redeploy (METHOD.md, "Learning from
feedback": the replay protocol).

  python -m entrorouter_jax.online --workdir=DIR [--seeds=3] [--seed_labels=20]
      [--datasets=NAME=FORMAT:PATH,...] [--pools=NAME=POOL.yaml] [--methods=a,b]
      [--scenario=new_model=NAME@F | new_model=auto@F | price_change=NAME*X@F | task_shift]
      [--new_model_labels=N] [--config.KEY=VALUE ...]

Data sets as the quality suite has them (`suite_datasets`: without --datasets everything in
../shared/data; `default` names those inside a list). Per data set and seed:
  - features: the recipe's frozen query space (`config.anchor.space`, fitted on the training
    queries' texts), the same for every method;
  - `seed_labels` training queries, a seeded sample, are fully labelled; c_ref (the strongest
    seed-label model's mean cost: c_hat = c / c_ref) and the operating lambda
    (`bandits.operating_cost_weight`: the slope of the seed labels' single-model hull at the
    middle of their cost range) come from them alone;
  - the rest of the training split, shuffled by the seed, arrives in rounds of 20, 40, 80, ...
    queries (`bandits.round_sizes`; the last round what is left); each round is routed by the
    learner's deployed policy, only the chosen cell (outcome and cost) is revealed and logged
    with its propensity, then the learner updates from the seed labels and all logs so far;
  - every method sees the same seed labels, stream and features. `full_info` is told whole
    rows; its routing of each round (by the model fitted before it, so no query's own outcomes)
    is the regret reference.
Measured per method and seed: the realised utility y - lambda c_hat of every stream query
(`stream_utility_mean`: the mean over the stream, then over seeds), the cumulative regret
sum (u_full_info - u_method) over the stream, the test split's AIQ after the seed labels and
after each round (the learner's success estimates as a `baselines.ScoreRouter` curve scored by
`metrics.aiq` over the test single models' cost range, as the suite scores its baselines),
the final policy's routing shares on the test split (its mean deployed distribution) and the
models it never chose during the stream.
dr_coverage (DR_METHOD only), out of sample: the stream's rows are split by a fixed seeded
hash of their training row index (`fit_fold`) into an 80% fit fold and a 20% held-out fold. A
shadow copy of the learner (the same class, config, lambda and seed, copied before its first
update) is updated after each round on the seed labels and the fit fold's logged rows only;
the learner that routes still trains on every row. At each round after the first, the
shadow's doubly robust estimate on the held-out 20% of the rows logged so far
(`offpolicy.estimate`, reward y - lambda c_hat of the logged cell, q_hat = s - lambda c_hat
from the shadow's estimates) and its 95% bootstrap interval are set against its true utility
on those same held-out queries (every cell is known: mean over them of sum_m pi(m|x) (y(x, m)
- lambda c_hat(x, m))); a round whose held-out fold has fewer than DR_MIN_HELD rows is
skipped. dr_coverage = the share of such rounds, over seeds, whose interval covers it (null
where DR_METHOD is not run or no round is checked).

Writes DIR/online.json ({data set: {method: {final_aiq, final_aiq_mean, regret, regret_mean,
stream_utility_mean, never_tried, shares, tries_min}, dr_coverage}}; tries_min = each
model's fewest stream tries over the seeds), DIR/online_info.json (lambda, c_ref, rounds,
the per-round figures of every seed and `check_targets`' verdicts), DIR/online.md (the
tables: mean and 95% t-interval over seeds, and the targets) and DIR/regret.png,
DIR/aiq_by_round.png.

Scenarios (--scenario; without it nothing above changes): something changes under the
router during the stream, the same for every method (the stream, the seed labels and lambda
as above; `full_info` runs the same scenario and stays the regret reference). F is a
fraction of the stream: the event happens before the stream query at position floor(F n),
n = the stream's length. The round schedule restarts at the event (rounds of 20, 40, ...
up to it, then 20, 40, ... after it), so every method redeploys soon after it.
  new_model=NAME@F   NAME is absent until the event: every learner's column for it exists
                     from the start but `Learner.set_available` holds it back (no learner
                     can route to it), the seed labels and full_info's rows lack its cell.
                     At the event it joins with --new_model_labels=N labelled queries, a
                     seeded sample of the queries seen so far (seed labels and stream) whose
                     NAME cell (outcome and cost) is revealed, appended to the logs as label
                     rows (logged = -1); the learners update on them (not where N = 0: then
                     the exploration has to find it) and may route to NAME from then on.
                     full_info is told NAME's cell of every query seen so far.
  new_model=auto@F   NAME = the model with the largest full_info share among those cheaper
                     (mean training cost) than the strongest (highest training accuracy):
                     the share is full_info's test routing share (mean deployed
                     distribution) when fitted on every training cell at seed 0's c_ref and
                     lambda, i.e. full_info's final `shares` without a scenario.
  price_change=NAME*X@F   NAME's cost (`strongest`: the strongest model's) is multiplied by
                     X from the event on: the utility of routing there and the cost cell a
                     learner is told change; the learners are not told (their c_hat is the
                     mean of the cells revealed so far, before and after). c_ref and lambda
                     stay as the seed labels set them. Test AIQ after a round uses the test
                     costs in force after it. DR_METHOD and full_info also run on the same
                     streams with X = 1 (the counterfactual `scenario_targets` compares to).
  task_shift         the stream arrives ordered by task (the data's task labels; the tasks
                     in a seeded order, each task's queries in the seed's order), so the mix
                     of traffic changes under the router; the seed labels are the usual
                     sample of the whole training split.
Reported per method (online_info.json's `scenario`, online.md): the utility per round;
for new_model and price_change the share of routes to NAME per round (the realised choices:
the share of a round's queries routed there), its share over the stream after the event
(`share_after`) and in the last round (`share_last`), full_info's for reference, the
utility after the event, and `settle` = the round after the event (1 = the first) from
which every round's share is within SETTLE_TOL (0.05) of the last round's share, with
`settle_queries` = the stream queries after the event before that round (a share still
moving in the round before the last settles only at the last round; the targets are
`scenario_targets`'). online.json gains, per
data set, "new_model": {"name", "full_info_share", "share": {method: x}} (share = the share
of the stream after the join routed to NAME, mean over seeds; full_info_share = full_info's
`share`), "price_change": the same with "factor" (the share after the change), or
"task_shift": {"utility_by_task": {method: {task: mean utility of its stream queries}}};
DIR/share.png plots the share by round (new_model, price_change).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from entrorouter_jax import bandits, baselines, capability, features, metrics, offpolicy, paths
from entrorouter_jax.data import sources
from entrorouter_jax.suite_datasets import REPO, Dataset, chosen_datasets

FIRST_ROUND = 20
REFERENCE = 'full_info'
DR_METHOD = 'entrorouter'       # the method whose off-policy estimates dr_coverage checks
DR_BOOTSTRAP = 1000
DR_FIT_SHARE = 0.8              # the share of stream rows in the shadow learner's fit fold
DR_MIN_HELD = 10                # fewer held-out logged rows than this: the round is not checked
SETTLE_TOL = 0.05               # a scenario's share has settled once within this of its last
SCENARIO_FORMS = 'new_model=NAME@F, new_model=auto@F, price_change=NAME*X@F or task_shift'
NON_METHODS = ('dr_coverage', 'new_model', 'price_change', 'task_shift')   # online.json keys


# ================================================================ the data ===
@dataclasses.dataclass
class Table:
  """One split's full-information table in the recipe's feature space."""
  feats: np.ndarray          # float32[N, D]
  outcomes: np.ndarray       # float64[N, K], 0 where missing
  mask: np.ndarray           # bool[N, K]
  costs: np.ndarray          # float64[N, K], dollars (or the data set's unit)
  tasks: np.ndarray | None = None   # object[N]: the data's task labels (task_shift)


@dataclasses.dataclass
class Stream:
  """One data set and seed: the seed labels, the stream's order and its units."""
  train: Table
  test: Table
  model_names: list
  seed_rows: np.ndarray      # int[S]: the fully labelled training rows
  stream_rows: np.ndarray    # int[N - S]: the rest, in arrival order
  c_ref: float
  cost_weight: float
  cost_range: tuple          # the test single models' (min, max) mean cost: AIQ's range
  scenario: Scenario | None = None   # set by `apply_scenario`
  model: int = -1            # new_model / price_change: the model's column
  event: int = 0             # new_model / price_change: the stream position of the event
  join_rows: np.ndarray | None = None   # new_model: training rows labelled for it at the join
  task_order: list | None = None        # task_shift: the tasks in arrival order

  @property
  def cost_hat(self) -> np.ndarray:
    return self.train.costs / self.c_ref

  @property
  def new_model(self) -> int | None:
    """The column of the model that joins at `event` (new_model), else None."""
    new = self.scenario is not None and self.scenario.kind == 'new_model'
    return self.model if new else None

  def cost_hat_at(self, positions) -> np.ndarray:
    """c_hat float64[n, K] of the stream queries at `positions` as the stream prices them
    (price_change: its model's column times the factor from `event` on)."""
    positions = np.asarray(positions, np.int64)
    c_hat = self.cost_hat[self.stream_rows[positions]]
    if self.scenario is not None and self.scenario.kind == 'price_change':
      c_hat[positions >= self.event, self.model] *= self.scenario.factor
    return c_hat

  def rounds(self) -> list[int]:
    """The round sizes: `bandits.round_sizes` of the stream, restarted at the event where
    the scenario has one."""
    n = len(self.stream_rows)
    if self.scenario is None or not self.scenario.has_event:
      return bandits.round_sizes(n, FIRST_ROUND)
    return (bandits.round_sizes(self.event, FIRST_ROUND)
            + bandits.round_sizes(n - self.event, FIRST_ROUND))

  def test_costs(self, position: int, available) -> tuple[np.ndarray, tuple]:
    """(test costs float64[N, K], AIQ's cost range) in force at stream `position`, the range
    over the `available` models' single-model costs."""
    costs, priced = self.test.costs, False
    if (self.scenario is not None and self.scenario.kind == 'price_change'
        and position >= self.event):
      costs = costs.copy()
      costs[:, self.model] *= self.scenario.factor
      priced = True
    if not priced and np.all(available):
      return costs, self.cost_range
    cols = np.flatnonzero(available)
    single = metrics.single_models(self.test.outcomes[:, cols], self.test.mask[:, cols],
                                   costs[:, cols], [self.model_names[j] for j in cols])
    return costs, metrics.single_model_cost_range(single)


def apply_overrides(config, overrides: dict):
  """A copy of `config` with {"dotted.key": value} set (ml_collections' flattened update)."""
  config = copy.deepcopy(config)
  config.update_from_flattened_dict(dict(overrides))
  return config


def load_tables(config) -> tuple[Table, Table, list]:
  """(train, test, model names) of `config.data` in `config.anchor.space`'s features."""
  _, parts = sources.load_splits(config.data, ('train', 'test'))
  train, test = parts['train'], parts['test']
  space = features.make_space(config)
  train_feats = space.fit_transform(train.queries.tolist())
  test_feats = space.transform(test.queries.tolist())
  table = lambda d, f: Table(np.asarray(f, np.float32),
                             np.where(d.outcome_mask, d.outcomes, 0.0).astype(np.float64),
                             np.asarray(d.outcome_mask, bool), np.asarray(d.costs, np.float64),
                             np.asarray(d.tasks, object))
  return table(train, train_feats), table(test, test_feats), train.model_names


def make_stream(train: Table, test: Table, names, seed: int, seed_labels: int) -> Stream:
  """The seed labels (a sample seeded by `seed`), the stream order, c_ref and lambda."""
  n = len(train.feats)
  if not 2 <= seed_labels < n:
    raise ValueError(f'--seed_labels={seed_labels}; expected at least 2 and fewer than the '
                     f'{n} training queries')
  order = np.random.default_rng([seed, 0]).permutation(n)
  seed_rows, stream_rows = order[:seed_labels], order[seed_labels:]
  _, c_ref = capability.reference_cost(train.outcomes[seed_rows], train.mask[seed_rows],
                                       train.costs[seed_rows])
  lam = bandits.operating_cost_weight(train.outcomes[seed_rows], train.mask[seed_rows],
                                      train.costs[seed_rows] / c_ref)
  single = metrics.single_models(test.outcomes, test.mask, test.costs, names)
  return Stream(train, test, list(names), seed_rows, stream_rows, c_ref, lam,
                metrics.single_model_cost_range(single))


# ============================================================= scenarios ===
@dataclasses.dataclass(frozen=True)
class Scenario:
  """A --scenario (module docstring): what changes under the router during the stream."""
  spec: str                  # as given, for messages
  kind: str                  # 'new_model', 'price_change' or 'task_shift'
  model: str = ''            # NAME; 'auto' (new_model) or 'strongest' (price_change)
  fraction: float = 0.0      # F: the event comes before stream position floor(F n)
  factor: float = 1.0        # price_change: X
  labels: int = 0            # new_model: --new_model_labels

  @property
  def has_event(self) -> bool:
    return self.kind in ('new_model', 'price_change')


def parse_scenario(text: str, new_model_labels: int = 0) -> Scenario | None:
  """--scenario (with --new_model_labels) as a Scenario; None for ''. ValueError naming the
  flag, the value and the forms expected."""
  text = (text or '').strip()
  labels = new_model_labels
  if isinstance(labels, bool) or not isinstance(labels, int) or labels < 0:
    raise ValueError(f'--new_model_labels={labels!r}; expected a number of queries >= 0')
  if labels and not text.startswith('new_model='):
    raise ValueError(f'--new_model_labels={labels} with --scenario={text!r}; expected it only '
                     'with --scenario=new_model=NAME@F')
  if not text:
    return None

  def bad(why: str) -> ValueError:
    return ValueError(f'--scenario={text!r}: {why}; expected one of {SCENARIO_FORMS}')

  kind, sep, arg = text.partition('=')
  if kind == 'task_shift':
    if sep:
      raise bad('task_shift takes no value')
    return Scenario(text, 'task_shift')
  if kind not in ('new_model', 'price_change'):
    raise bad(f'unknown scenario {kind!r}')
  what, at, frac = arg.rpartition('@')
  if not (sep and at and what):
    raise bad(f'{kind} needs {"NAME" if kind == "new_model" else "NAME*X"}@F')
  try:
    fraction = float(frac)
  except ValueError:
    raise bad(f'F={frac!r} is not a number') from None
  if not 0.0 <= fraction < 1.0:
    raise bad(f'F={frac} is outside [0, 1) (a fraction of the stream)')
  if kind == 'new_model':
    return Scenario(text, kind, what, fraction, labels=labels)
  name, star, x = what.rpartition('*')
  if not (star and name):
    raise bad(f'price_change needs NAME*X@F, got {what!r} before @')
  try:
    factor = float(x)
  except ValueError:
    raise bad(f'X={x!r} is not a number') from None
  if not (math.isfinite(factor) and factor > 0):
    raise bad(f'X={x} is not a cost factor > 0')
  return Scenario(text, kind, name, fraction, factor)


def full_info_shares(config, train: Table, test: Table, names, seed_labels: int) -> np.ndarray:
  """float64[K]: full_info's test routing shares (its mean deployed distribution) when fitted
  on every cell of the training split, at seed 0's c_ref and lambda (new_model=auto's pick)."""
  stream = make_stream(train, test, names, 0, seed_labels)
  learner = bandits.make_learner(REFERENCE, len(names), stream.cost_weight, seed=0,
                                 config=config)
  learner.update(bandits.labelled_logs(train.feats, train.outcomes, train.mask,
                                       stream.cost_hat))
  return learner.policy(test.feats).mean(axis=0)


def resolve_scenario(scenario: Scenario, config, train: Table, test: Table, names,
                     seed_labels: int, dataset: str = '') -> tuple[int, dict]:
  """(the scenario's model column on this data set, -1 for task_shift; what
  online_info.json records of the choice). ValueError naming --scenario where the model is
  unknown, `auto` finds no model cheaper than the strongest, or task_shift finds one task."""
  where = f' on data set {dataset!r}' if dataset else ''
  if scenario.kind == 'task_shift':
    tasks = sorted(set(train.tasks.tolist())) if train.tasks is not None else []
    if len(tasks) < 2:
      raise ValueError(f'--scenario={scenario.spec}{where}: the training split has task labels '
                       f'{tasks}; expected two tasks or more to order the stream by')
    return -1, {'tasks': tasks}
  if scenario.kind == 'new_model' and len(names) < 2:
    raise ValueError(f'--scenario={scenario.spec}{where}: the pool has {len(names)} model; '
                     'expected two or more (one to route to before the new one joins)')
  strongest, _ = capability.reference_cost(train.outcomes, train.mask, train.costs)
  chosen = {'strongest': names[strongest]}
  if scenario.kind == 'new_model' and scenario.model == 'auto':
    shares = full_info_shares(config, train, test, names, seed_labels)
    cost = train.costs.mean(axis=0)
    cheaper = np.flatnonzero(cost < cost[strongest])
    if not cheaper.size:
      raise ValueError(f'--scenario={scenario.spec}{where}: no model is cheaper than the '
                       f'strongest, {names[strongest]}; expected one for auto to pick')
    model = int(cheaper[np.argmax(shares[cheaper])])
    chosen['full_info_shares'] = {n: float(v) for n, v in zip(names, shares)}
    chosen['cheaper_than_strongest'] = [names[j] for j in cheaper]
  elif scenario.kind == 'price_change' and scenario.model == 'strongest':
    model = strongest
  elif scenario.model in names:
    model = names.index(scenario.model)
  else:
    raise ValueError(f'--scenario={scenario.spec}{where}: model {scenario.model!r} is not in '
                     f'the pool; expected one of {names}')
  return model, {'model': names[model], **chosen}


def apply_scenario(stream: Stream, scenario: Scenario | None, model: int, seed: int) -> Stream:
  """`stream` under the scenario (itself where None): task_shift reorders the stream rows;
  new_model and price_change set the model and the event's position, new_model its labelled
  queries (a sample seeded by `seed` of those seen before the join)."""
  if scenario is None:
    return stream
  n = len(stream.stream_rows)
  if scenario.kind == 'task_shift':
    tasks = stream.train.tasks[stream.stream_rows]
    order = [str(t) for t in np.random.default_rng([seed, 6]).permutation(sorted(set(tasks)))]
    rank = {t: i for i, t in enumerate(order)}
    key = np.array([rank[str(t)] for t in tasks])
    return dataclasses.replace(stream, scenario=scenario,
                               stream_rows=stream.stream_rows[np.argsort(key, kind='stable')],
                               task_order=order)
  event = int(math.floor(scenario.fraction * n))
  join = None
  if scenario.kind == 'new_model':
    seen = np.concatenate([stream.seed_rows, stream.stream_rows[:event]])
    if scenario.labels > len(seen):
      raise ValueError(f'--new_model_labels={scenario.labels}; expected at most the '
                       f'{len(seen)} queries seen before the join (seed labels and '
                       f'{event} stream queries)')
    join = np.random.default_rng([seed, 5]).choice(seen, scenario.labels, replace=False)
  return dataclasses.replace(stream, scenario=scenario, model=model, event=event,
                             join_rows=join)


# =========================================================== one learner ===
def aiq_on_test(learner: bandits.Learner, stream: Stream, position: int = 0) -> float:
  """AIQ on the test split of the learner's success estimates' cost/quality curve, over the
  models it may route to, at the test costs in force at stream `position`
  (`Stream.test_costs`)."""
  s, c = learner.estimates(stream.test.feats)
  available = learner.available
  costs, cost_range = stream.test_costs(position, available)
  if available.all():
    _, choices = baselines.ScoreRouter(learner.name, s, c).choices()
  else:
    cols = np.flatnonzero(available)
    _, choices = baselines.ScoreRouter(learner.name, s[:, cols], c[:, cols]).choices()
    choices = [cols[ch] for ch in choices]
  cy, cc = metrics.chosen_tables(choices, stream.test.outcomes, stream.test.mask, costs)
  return metrics.aiq(cc.mean(axis=1), cy.mean(axis=1), cost_range)


def revealed(stream: Stream, rows, choice, full: bool, c_hat=None, hidden=None):
  """(outcomes, mask, cost_hat) of stream rows as the learner is told them: the chosen
  cell only (its outcome where the data set has one; cost_hat NaN elsewhere), or whole rows
  for a full-information learner (less the column `hidden`: a model not there yet).
  c_hat: the rows' c_hat as the stream prices them (default `stream.cost_hat[rows]`)."""
  y, mask = stream.train.outcomes[rows], stream.train.mask[rows]
  c_hat = stream.cost_hat[rows] if c_hat is None else np.asarray(c_hat, np.float64)
  if full:
    if hidden is not None:
      mask, c_hat = mask.copy(), c_hat.copy()
      mask[:, hidden] = False
      c_hat[:, hidden] = np.nan
    return y, mask, c_hat
  chosen = np.zeros_like(mask)
  chosen[np.arange(len(rows)), choice] = True
  return np.where(chosen, y, 0.0), chosen & mask, np.where(chosen, c_hat, np.nan)


def fit_fold(rows, seed: int) -> np.ndarray:
  """bool[n]: True where a training row index falls in the DR shadow's fit fold (about
  DR_FIT_SHARE of them), by a fixed splitmix64 hash of (row, seed); False = held out."""
  x = np.asarray(rows, np.int64).astype(np.uint64).reshape(-1)
  x = x + np.uint64((0x9E3779B97F4A7C15 * (int(seed) % 2 ** 32 + 1)) % 2 ** 64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < DR_FIT_SHARE


def subset_logs(logs: bandits.Logs, keep) -> bandits.Logs:
  """The rows of `logs` at positions `keep` (indices or a boolean mask), in order."""
  return bandits.Logs(*(getattr(logs, f.name)[keep] for f in dataclasses.fields(bandits.Logs)))


def dr_check(learner: bandits.Learner, stream: Stream, logs: bandits.Logs, rows,
             seed: int = 0, cost_hat=None) -> dict:
  """A policy judged on logged rows it was not trained on: `learner` is the simulator's
  shadow learner (fitted on the seed labels and the fit fold), `logs` the held-out 20% of the
  logged rows so far (`rows`: their training rows, in log order; any seed-label rows in `logs`
  are ignored): {'dr', 'ci95', 'true', 'covered', 'rows'}. DR is `offpolicy.estimate`'s on
  reward r = y - lambda c_hat (the logged cell) with q_hat = s - lambda c_hat (the learner's
  estimates); 'true' = mean over the rows of sum_m pi(m|x) (y(x, m) - lambda c_hat(x, m)) on
  the full table (unobserved outcomes count 0; cost_hat: the rows' c_hat as the stream
  priced them, default `stream.cost_hat[rows]`); 'rows' = how many rows were judged."""
  lam = stream.cost_weight
  feats, logged, y, c_hat, propensity = logs.stream()
  if len(rows) != len(logged):
    raise ValueError(f'dr_check: {len(rows)} training rows for {len(logged)} logged rows; '
                     'expected one per logged row')
  pi = learner.policy(feats)
  s, c_pred = learner.estimates(feats)
  est = offpolicy.estimate(pi, logged, propensity, y - lam * c_hat, s - lam * c_pred,
                           bootstrap=DR_BOOTSTRAP, seed=seed)['dr']
  c_full = stream.cost_hat[rows] if cost_hat is None else cost_hat
  full = stream.train.outcomes[rows] - lam * c_full
  true = float(np.mean(np.sum(pi * full, axis=1)))
  lo, hi = est['ci95']
  return {'dr': est['value'], 'ci95': [lo, hi], 'true': true,
          'covered': bool(lo <= true <= hi), 'rows': int(len(rows))}


def _told(position, fit) -> np.ndarray:
  """Indices of the log rows the DR shadow is told: those of the seed labels' queries
  (position -1) and of the stream queries in the fit fold (logged or labelled at a join)."""
  return np.flatnonzero((position < 0) | fit[np.maximum(position, 0)])


def _held(position, fit, logged) -> np.ndarray:
  """Indices of the logged rows held out of the DR shadow: stream queries outside the fit
  fold, as logged (not their label rows)."""
  return np.flatnonzero((logged >= 0) & (position >= 0) & ~fit[np.maximum(position, 0)])


def join_new_model(learner: bandits.Learner, stream: Stream, logs: bandits.Logs, position):
  """The new model joins (new_model at `stream.event`): `learner` may route to it from now on,
  and its cell of the labelled queries (`stream.join_rows`; for a full-information learner
  every query seen so far) is appended to the logs as label rows. Returns (logs, position,
  whether rows were appended); position = the stream position of each log row's query, -1
  for a seed label's."""
  learner.set_available(np.ones(len(stream.model_names), bool))
  if learner.full_information:
    rows = np.concatenate([stream.seed_rows, stream.stream_rows[:stream.event]])
  else:
    rows = stream.join_rows
  if rows is None or not len(rows):
    return logs, position, False
  train = stream.train
  column = np.arange(len(stream.model_names)) == stream.model
  logs = bandits.append(logs, train.feats[rows], train.outcomes[rows], train.mask[rows] & column,
                        np.where(column, stream.cost_hat[rows], np.nan),
                        np.full(len(rows), -1, np.int64), np.full(len(rows), np.nan))
  where = np.full(len(train.feats), -1, np.int64)
  where[stream.stream_rows] = np.arange(len(stream.stream_rows))
  return logs, np.concatenate([position, where[rows]]), True


def simulate(learner: bandits.Learner, stream: Stream, progress: str = '',
             dr: bool = False) -> dict:
  """Runs one learner over the stream: {'utility' float[n] per stream query, 'choice' int[n],
  'round_sizes', 'round_utility', 'aiq_by_round' (after the seed labels, then each round),
  'shares' float[K] (the final policy's mean deployed distribution on the test split),
  'dr_rounds' (with `dr`: `dr_check` of the shadow learner on the held-out fold before each
  round after the first whose held-out fold has DR_MIN_HELD rows or more, else empty),
  'test_shares' (under a scenario with an event: per round, the deployed policy's mean
  distribution on the test split, float[K]; else empty)}.
  With `dr`, a deep copy of `learner` taken before its first update (the shadow) is updated
  alongside it on the seed labels and the logged rows of `fit_fold(row, learner.seed)` only;
  where the shadow keeps the deployed distribution of the rows it is told (`pending`), it is
  given the routing learner's distribution on those rows.
  Under a scenario (`apply_scenario`) the rounds are `Stream.rounds`, costs
  `Stream.cost_hat_at`; new_model holds the model back until the event (the seed labels and
  full-information rows without its cell), then `join_new_model` (the learner and its shadow
  update where label rows were appended; the shadow is not told the label rows of queries
  outside its fit fold); a learner that routes to a model not available is a ValueError."""
  from tqdm import tqdm
  train, lam = stream.train, stream.cost_weight
  seed = stream.seed_rows
  new = stream.new_model
  seed_mask, seed_c_hat = train.mask[seed], stream.cost_hat[seed]
  if new is not None:                           # not there yet: nobody has seen its cells
    seed_mask = seed_mask.copy()
    seed_mask[:, new] = False
    seed_c_hat[:, new] = np.nan
    learner.set_available(np.arange(len(stream.model_names)) != new)
  logs = bandits.labelled_logs(train.feats[seed], train.outcomes[seed], seed_mask, seed_c_hat)
  position = np.full(len(seed), -1, np.int64)   # each log row's query's stream position
  shadow = copy.deepcopy(learner) if dr else None
  fit = fit_fold(stream.stream_rows, learner.seed) if dr else None
  learner.update(logs)
  if dr:
    shadow.update(logs)
  sizes = stream.rounds()
  aiq = [aiq_on_test(learner, stream, 0)]
  utility, choices, round_utility, dr_rounds, test_shares = [], [], [], [], []
  start = 0
  for size in tqdm(sizes, desc=progress or learner.name, leave=False, file=sys.stderr,
                   disable=None):
    if new is not None and start == stream.event:
      logs, position, added = join_new_model(learner, stream, logs, position)
      if added:
        learner.update(logs)
      if dr:
        shadow.set_available(learner.available)
        if added:
          shadow.update(subset_logs(logs, _told(position, fit)))
    if dr and start > 0:
      held = _held(position, fit, logs.logged)
      if len(held) >= DR_MIN_HELD:
        dr_rounds.append(dr_check(shadow, stream, subset_logs(logs, held),
                                  stream.stream_rows[position[held]], seed=len(dr_rounds),
                                  cost_hat=stream.cost_hat_at(position[held])))
    rows = stream.stream_rows[start:start + size]
    if stream.scenario is not None and stream.scenario.has_event:
      test_shares.append(learner.policy(stream.test.feats).mean(axis=0))
    choice, propensity = learner.deploy(train.feats[rows])
    choice = np.asarray(choice, np.int64)
    propensity = np.asarray(propensity, np.float64)
    if choice.shape != (size,) or propensity.shape != (size,) or not (
        np.all((propensity > 0) & (propensity <= 1))):
      raise ValueError(f'{learner.name}: deploy gave choices {choice.shape} and propensities '
                       f'{propensity.shape} (range {propensity.min()}..{propensity.max()}); '
                       f'expected ({size},) each, propensities in (0, 1]')
    if not learner.available[choice].all():
      bad = int(choice[~learner.available[choice]][0])
      raise ValueError(f'{learner.name}: deploy routed to {stream.model_names[bad]!r} in the '
                       f'round from stream position {start}, a model not available then')
    deployed = getattr(learner, 'pending', None)
    c_hat = stream.cost_hat_at(np.arange(start, start + size))
    u = (train.outcomes[rows, choice] - lam * c_hat[np.arange(size), choice])
    utility.append(u)
    choices.append(choice)
    round_utility.append(float(u.mean()))
    outcomes, mask, c_hat = revealed(stream, rows, choice, learner.full_information, c_hat,
                                     hidden=new if new is not None and start < stream.event
                                     else None)
    logs = bandits.append(logs, train.feats[rows], outcomes, mask, c_hat, choice, propensity)
    position = np.concatenate([position, np.arange(start, start + size)])
    learner.update(logs)
    if dr:
      in_fit = fit[start:start + size]
      if in_fit.any():
        if hasattr(shadow, 'pending') and deployed is not None:
          shadow.pending = np.asarray(deployed)[in_fit]
        shadow.update(subset_logs(logs, _told(position, fit)))
    start += size
    aiq.append(aiq_on_test(learner, stream, start))
  shares = learner.policy(stream.test.feats).mean(axis=0)
  return {'utility': np.concatenate(utility) if utility else np.zeros(0),
          'choice': np.concatenate(choices) if choices else np.zeros(0, np.int64),
          'round_sizes': sizes, 'round_utility': round_utility, 'aiq_by_round': aiq,
          'shares': shares, 'dr_rounds': dr_rounds, 'test_shares': test_shares}


def cumulative_regret(run: dict, reference: dict) -> list[float]:
  """sum over the stream so far of (u_reference - u_run), at the end of each round."""
  gap = np.cumsum(reference['utility'] - run['utility'])
  ends = np.cumsum(run['round_sizes']) - 1
  return [float(gap[e]) for e in ends]


# ============================================================ a data set ===
def run_dataset(config, ds: Dataset, seeds: int, seed_labels: int, methods: list[str],
                scenario: Scenario | None = None):
  """Every method over the seeds: (online.json's entry, online_info.json's entry)."""
  started = time.time()
  cfg = apply_overrides(config, {f'data.{k}': v for k, v in ds.data.items()})
  train, test, names = load_tables(cfg)
  model, chosen = -1, {}
  if scenario is not None:
    model, chosen = resolve_scenario(scenario, cfg, train, test, names, seed_labels, ds.name)
  runs = {m: [] for m in methods}
  info = {'about': ds.about, 'train': len(train.feats), 'test': len(test.feats),
          'models': names, 'seed_labels': seed_labels, 'seeds': [], 'methods': {}}
  order = [REFERENCE] + [m for m in methods if m != REFERENCE]
  streams, references = [], []
  unchanged = {m: [] for m in (DR_METHOD, REFERENCE) if m in order}   # price_change: X = 1
  for seed in range(seeds):
    stream = apply_scenario(make_stream(train, test, names, seed, seed_labels), scenario,
                            model, seed)
    streams.append(stream)
    seed_runs = {}
    for name in order:
      learner = bandits.make_learner(name, len(names), stream.cost_weight, seed=seed,
                                     config=cfg)
      seed_runs[name] = simulate(learner, stream, f'{ds.name} seed {seed} {name}',
                                 dr=name == DR_METHOD)
    if scenario is not None and scenario.kind == 'price_change':
      flat = dataclasses.replace(stream, scenario=dataclasses.replace(scenario, factor=1.0))
      for name in unchanged:
        learner = bandits.make_learner(name, len(names), stream.cost_weight, seed=seed,
                                       config=cfg)
        unchanged[name].append(simulate(learner, flat, f'{ds.name} seed {seed} {name} X=1'))
    reference = seed_runs[REFERENCE]
    references.append(reference)
    info['seeds'].append({'seed': seed, 'cost_weight': stream.cost_weight,
                          'c_ref': stream.c_ref, 'round_sizes': reference['round_sizes']})
    for name in methods:
      run = seed_runs[name]
      run['regret'] = cumulative_regret(run, reference)
      runs[name].append(run)
  entry = {}
  for name in methods:
    seed_runs = runs[name]
    final = [r['aiq_by_round'][-1] for r in seed_runs]
    regret = [r['regret'][-1] if r['regret'] else 0.0 for r in seed_runs]
    never = sorted({names[j] for r in seed_runs for j in range(len(names))
                    if not np.any(r['choice'] == j)}, key=names.index)
    shares = np.mean([r['shares'] for r in seed_runs], axis=0)
    tries = np.min([np.bincount(r['choice'], minlength=len(names)) for r in seed_runs], axis=0)
    entry[name] = {'final_aiq': final, 'final_aiq_mean': float(np.mean(final)),
                   'regret': regret, 'regret_mean': float(np.mean(regret)),
                   'stream_utility_mean': float(np.mean([r['utility'].mean()
                                                         for r in seed_runs])),
                   'never_tried': never,
                   'shares': {n: float(s) for n, s in zip(names, shares)},
                   'tries_min': {n: int(t) for n, t in zip(names, tries)}}
    info['methods'][name] = [{'round_utility': r['round_utility'], 'regret': r['regret'],
                              'aiq_by_round': r['aiq_by_round'],
                              'stream_utility': float(r['utility'].mean())} for r in seed_runs]
  checks = [c for r in runs.get(DR_METHOD, []) for c in r['dr_rounds']]
  entry['dr_coverage'] = (float(np.mean([c['covered'] for c in checks])) if checks else None)
  if DR_METHOD in runs:
    info['dr_rounds'] = [r['dr_rounds'] for r in runs[DR_METHOD]]
  info['targets'] = check_targets(entry)
  if scenario is not None:
    entry[scenario.kind], info['scenario'] = scenario_report(
        scenario, chosen, streams, {**runs, REFERENCE: references},
        unchanged if scenario.kind == 'price_change' else None)
  info['seconds'] = round(time.time() - started, 1)
  return entry, info


def settle_round(shares, tol: float = SETTLE_TOL) -> int | None:
  """The first round (1-based) from which every round's share is within `tol` of the last
  round's (len(shares) where only the last is); None for no rounds."""
  if not len(shares):
    return None
  r = len(shares)
  while r > 1 and abs(shares[r - 2] - shares[-1]) <= tol:
    r -= 1
  return r


def scenario_report(scenario: Scenario, chosen: dict, streams: list, runs: dict,
                    unchanged: dict | None = None) -> tuple[dict, dict]:
  """(online.json's scenario entry, online_info.json's) from every method's runs over the
  seeds (`streams`: each seed's stream; the module docstring says what is measured);
  `unchanged`: price_change's counterfactual runs of some methods on the same streams with
  X = 1 (`test_share_unchanged` per round)."""
  names = streams[0].model_names
  info = {'spec': scenario.spec, 'kind': scenario.kind, **chosen, 'methods': {}}
  if scenario.kind == 'task_shift':
    info['task_order'] = [s.task_order for s in streams]
    tasks_all = list(dict.fromkeys(t for s in streams for t in s.task_order))
    by_task = {}
    for method, seed_runs in runs.items():
      per_seed = []
      for stream, run in zip(streams, seed_runs):
        tasks = stream.train.tasks[stream.stream_rows]
        per_seed.append({t: float(run['utility'][tasks == t].mean()) for t in stream.task_order})
      info['methods'][method] = {'utility_by_task': per_seed,
                                 'round_utility': [r['round_utility'] for r in seed_runs]}
      by_task[method] = {t: float(np.mean([u[t] for u in per_seed if t in u]))
                         for t in tasks_all}
    return {'utility_by_task': by_task}, info

  j, event = streams[0].model, streams[0].event
  sizes = streams[0].rounds()
  ends = np.cumsum(sizes)
  before = int(np.sum(ends <= event))           # rounds routed before the event
  info.update(fraction=scenario.fraction, event=event, stream=len(streams[0].stream_rows),
              round_ends=ends.tolist(), rounds_before=before)
  if scenario.kind == 'new_model':
    info['labels'] = scenario.labels
  else:
    info['factor'] = scenario.factor
  for method, seed_runs in runs.items():
    rows = []
    for run in seed_runs:
      routed = run['choice'] == j
      by_round = [float(routed[e - n:e].mean()) for e, n in zip(ends, sizes)]
      after = by_round[before:]
      settle = settle_round(after)
      rows.append({'share_by_round': by_round,
                   'test_share_by_round': [float(t[j]) for t in run['test_shares']],
                   'share_after': float(routed[event:].mean()),
                   'share_last': by_round[-1],
                   'share_before': by_round[before - 1] if before else None,
                   'settle': settle,
                   'settle_queries': (int(sum(sizes[before:before + settle - 1]))
                                      if settle else None),
                   'utility_after': float(run['utility'][event:].mean()),
                   'round_utility': run['round_utility']})
    info['methods'][method] = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    if unchanged and unchanged.get(method):
      info['methods'][method]['test_share_unchanged'] = [
          [float(t[j]) for t in run['test_shares']] for run in unchanged[method]]
  mean = lambda method, key: float(np.mean(info['methods'][method][key]))
  entry = {'name': names[j]}
  if scenario.kind == 'price_change':
    entry['factor'] = scenario.factor
  entry['full_info_share'] = mean(REFERENCE, 'share_after') if REFERENCE in runs else None
  entry['share'] = {m: mean(m, 'share_after') for m in runs}
  info['targets'] = scenario_targets(scenario, info)
  return entry, info


def scenario_targets(scenario: Scenario, info: dict) -> dict:
  """The issue's scenario targets for DR_METHOD, each {'value', 'met', ...} (None where a
  method it needs was not run):
    new_model  half_share: DR_METHOD's last-round share of routes to the new model over
               full_info's (means over seeds), met at >= 0.5 (per seed alongside, and in how
               many seeds it is met: `seeds_met`); beats_greedy: DR_METHOD's
               utility after the join minus greedy's, paired by seed (mean and 95%
               t-interval), met where the mean is > 0 ('sure': the interval's lower end too);
    price_change  moves: the effect of the change on the share of the model in DR_METHOD's
               deployed policy on the test split (its mean probability there, so the query
               mix of a round does not move it) in the second round after the change: that
               share minus the same learner's on the same stream without the change (X = 1,
               `test_share_unchanged`; the same seed, so identical up to the change), mean
               over seeds (per seed, and `seeds_met`: the seeds where it moved at least
               SETTLE_TOL toward the model when it got cheaper, away when dearer); met where
               the mean did; `effect_last` the same in the last round, full_info's effect
               alongside, and `before_after` DR_METHOD's share in that round minus in the
               last round before the change (what the effect is not: traffic moves anyway)."""
  methods, out = info['methods'], {}
  me, full = methods.get(DR_METHOD), methods.get(REFERENCE)
  if scenario.kind == 'new_model':
    if me and full:
      ref = float(np.mean(full['share_last']))
      value = float(np.mean(me['share_last'])) / ref if ref > 0 else None
      per_seed = [a / b if b > 0 else None for a, b in zip(me['share_last'], full['share_last'])]
      out['half_share'] = {'value': value, 'share_last': float(np.mean(me['share_last'])),
                           'full_info_share_last': ref, 'per_seed': per_seed,
                           'seeds_met': sum(r is not None and r >= 0.5 for r in per_seed),
                           'met': bool(value is not None and value >= 0.5)}
    if me and methods.get('greedy'):
      gap = np.subtract(me['utility_after'], methods['greedy']['utility_after'])
      ci = t_interval(gap)
      out['beats_greedy'] = {'value': float(gap.mean()), 'per_seed': gap.tolist(), 'ci95': ci,
                             'met': bool(gap.mean() > 0),
                             'sure': bool(ci is not None and ci[0] > 0)}
  elif scenario.kind == 'price_change':
    toward = float(np.sign(1.0 - scenario.factor))
    rounds_after = len(info['round_ends']) - info['rounds_before']
    if me and me.get('test_share_unchanged') and rounds_after >= 2:
      second = info['rounds_before'] + 1

      def effect(m, at):
        if not m or not m.get('test_share_unchanged'):
          return None
        return [x[at] - y[at] for x, y in zip(m['test_share_by_round'],
                                              m['test_share_unchanged'])]

      moves = effect(me, second)
      fi = effect(full, second)
      out['moves'] = {'value': float(np.mean(moves)), 'per_seed': moves,
                      'seeds_met': sum(toward * m >= SETTLE_TOL for m in moves),
                      'effect_last': float(np.mean(effect(me, -1))),
                      'full_info': None if fi is None else float(np.mean(fi)),
                      'before_after': (float(np.mean([r[second] - r[second - 2] for r in
                                                      me['test_share_by_round']]))
                                       if info['rounds_before'] else None),
                      'met': bool(toward * np.mean(moves) >= SETTLE_TOL)}
  return out


CLASSIC = ('greedy', 'epsilon_greedy', 'linucb', 'thompson')


def check_targets(entry: dict) -> dict:
  """The issue's four targets for DR_METHOD on one data set, each {'value', 'met'} (None
  where a method it needs was not run):
    gap_closure   (final AIQ - seed_only's) / (full_info's - seed_only's), met at >= 0.9;
                  where that gap is under 0.005 AIQ, met when within 0.005 of full_info;
    stream        stream utility minus the best of CLASSIC's, met at >= -0.005;
    no_collapse   the fewest stream tries of a model full_info routes >= 2% of the test
                  split to (the minimum over seeds), met at >= 20;
    dr_coverage   met at >= 0.9."""
  out = {}
  me = entry.get(DR_METHOD)
  full, seed = entry.get(REFERENCE), entry.get('seed_only')
  if me and full and seed:
    gap = full['final_aiq_mean'] - seed['final_aiq_mean']
    if gap < 0.005:
      value = me['final_aiq_mean'] - full['final_aiq_mean']
      out['gap_closure'] = {'value': value, 'met': bool(value >= -0.005), 'small_gap': True}
    else:
      value = (me['final_aiq_mean'] - seed['final_aiq_mean']) / gap
      out['gap_closure'] = {'value': value, 'met': bool(value >= 0.9), 'small_gap': False}
  classic = [entry[m]['stream_utility_mean'] for m in CLASSIC if m in entry]
  if me and classic:
    value = me['stream_utility_mean'] - max(classic)
    out['stream'] = {'value': value, 'met': bool(value >= -0.005)}
  if me and full:
    needed = [n for n, share in full['shares'].items() if share >= 0.02]
    value = min(me['tries_min'][n] for n in needed) if needed else None
    out['no_collapse'] = {'value': value, 'models': needed,
                          'met': bool(value is None or value >= 20)}
  if entry.get('dr_coverage') is not None:
    out['dr_coverage'] = {'value': entry['dr_coverage'], 'met': bool(entry['dr_coverage'] >= 0.9)}
  return out


# ================================================================ tables ===
def t_interval(values) -> list[float] | None:
  """The 95% t-interval of the mean over seeds, [lo, hi]; None for one seed."""
  from scipy import stats
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return None
  half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
  return [float(v.mean() - half), float(v.mean() + half)]


def _fmt(values, digits: int = 4) -> str:
  ci = t_interval(values)
  mean = f'{np.mean(values):.{digits}f}'
  return mean if ci is None else f'{mean} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]'


def render(results: dict, infos: dict, command: str, seconds: float) -> str:
  """online.md: one table per data set, mean over seeds and its 95% t-interval."""
  lines = ['# The replay simulator', '', f'`{command}`; {seconds / 60:.1f} min.', '',
           'Each figure is the mean over seeds with its 95% t-interval over seeds in brackets '
           '(none with one seed). Regret is cumulative over the stream, against full_info\'s '
           'out-of-fold routing of the same stream; utility is y - lambda c / c_ref of the '
           'chosen cell; AIQ on the test split after the last round.', '']
  for name, entry in results.items():
    info = infos[name]
    lams = [s['cost_weight'] for s in info['seeds']]
    lines += [f'## {name}', '', f"{info['about']}. {info['train']} train / {info['test']} test "
              f"queries, {len(info['models'])} models, {info['seed_labels']} seed labels, "
              f"{len(lams)} seed(s), lambda {', '.join(f'{v:.4g}' for v in lams)}; "
              f"{info['seconds'] / 60:.1f} min.", '',
              '| method | final AIQ | regret | stream utility | never tried | top shares |',
              '|---|---|---|---|---|---|']
    for method, e in entry.items():
      if method in NON_METHODS:
        continue
      utility = [r['stream_utility'] for r in info['methods'][method]]
      top = sorted(e['shares'].items(), key=lambda kv: -kv[1])[:3]
      lines.append(f"| {method} | {_fmt(e['final_aiq'])} | {_fmt(e['regret'], 2)} | "
                   f"{_fmt(utility)} | {', '.join(e['never_tried']) or '-'} | "
                   f"{', '.join(f'{n} {s:.0%}' for n, s in top)} |")
    lines.append('')
    targets = info.get('targets', {})
    if targets:
      words = {'gap_closure': lambda t: (f"final AIQ {t['value']:+.4f} from full_info's (gap "
                                         "under 0.005)" if t['small_gap'] else
                                         f"closes {t['value']:.0%} of the seed_only-full_info "
                                         "AIQ gap (target 90%)"),
               'stream': lambda t: (f"stream utility {t['value']:+.4f} against the best of "
                                    f"{', '.join(CLASSIC)} (target >= -0.005)"),
               'no_collapse': lambda t: (f"fewest tries of a model full_info routes >= 2% to: "
                                         f"{t['value']} (target 20)"),
               'dr_coverage': lambda t: f"DR coverage {t['value']:.0%} (target 90%)"}
      lines += [f"Targets for {DR_METHOD}: " + '; '.join(
          f"{words[k](t)}: {'met' if t['met'] else 'NOT met'}" for k, t in targets.items()), '']
    if entry.get('dr_coverage') is not None:
      checks = sum(len(r) for r in info.get('dr_rounds', []))
      lines += [f"{DR_METHOD}'s DR 95% interval (a shadow learner fitted on the other 80%) "
                f"covered its true utility on the held-out 20% of the logged rows "
                f"in {entry['dr_coverage']:.0%} of {checks} rounds (dr_coverage).", '']
    if 'scenario' in info:
      lines += render_scenario(info['scenario'])
  return '\n'.join(lines)


def render_scenario(sc: dict) -> list[str]:
  """online.md's lines for a data set's scenario (online_info.json's `scenario`)."""
  methods = sc['methods']
  lines = [f"### Scenario `{sc['spec']}`", '']
  round_utility = {m: np.mean(v['round_utility'], axis=0) for m, v in methods.items()}
  if sc['kind'] == 'task_shift':
    tasks = list(dict.fromkeys(t for order in sc['task_order'] for t in order))
    lines += [f"The stream ordered by task (a seeded order; seed 0: "
              f"{', '.join(sc['task_order'][0])}). Mean "
              "utility of each task's stream queries, mean over seeds:", '',
              '| method | ' + ' | '.join(tasks) + ' |', '|---|' + '---:|' * len(tasks)]
    for m, v in methods.items():
      lines.append(f'| {m} | ' + ' | '.join(
          f"{np.mean([u[t] for u in v['utility_by_task'] if t in u]):.4f}" for t in tasks)
                   + ' |')
  else:
    what = ('joins' if sc['kind'] == 'new_model' else f"costs x{sc['factor']:g}")
    extra = (f" with {sc['labels']} labelled queries" if sc['kind'] == 'new_model' else '')
    b = sc['rounds_before']
    lines += [f"{sc['model']} {what} from stream query {sc['event']} of {sc['stream']}{extra}; "
              f"rounds restart there ({b} before, {len(sc['round_ends']) - b} after). Share = "
              f"the share of the queries routed to {sc['model']}; settles = the round after "
              f"the event from which every round's share is within {SETTLE_TOL} of the last "
              "round's (per seed; in brackets the queries after the event before it).", '',
              '| method | share after the event | last-round share | share in the round '
              'before | settles at round | utility after the event |',
              '|---|---:|---:|---:|---|---:|']
    for m, v in methods.items():
      before = ('-' if v['share_before'][0] is None else f"{np.mean(v['share_before']):.3f}")
      settle = ', '.join(f'{r} ({q})' for r, q in zip(v['settle'], v['settle_queries']))
      lines.append(f"| {m} | {_fmt(v['share_after'], 3)} | {np.mean(v['share_last']):.3f} | "
                   f"{before} | {settle} | {_fmt(v['utility_after'])} |")
    ends = sc['round_ends']
    for key, caption in (('share_by_round', f"Share of {sc['model']} by round (mean over seeds; "
                          "the round ending at that stream query; * = after the event):"),
                         ('test_share_by_round', f"The deployed policy's mean probability of "
                          f"{sc['model']} on the test split, by round (mean over seeds):")):
      lines += ['', caption, '',
                '| method | ' + ' | '.join(f"{e}{'*' if i >= b else ''}"
                                         for i, e in enumerate(ends)) + ' |',
                '|---|' + '---:|' * len(ends)]
      for m, v in methods.items():
        lines.append(f'| {m} | ' + ' | '.join(
            f'{x:.3f}' for x in np.mean(v[key], axis=0)) + ' |')
    for m, v in methods.items():
      if v.get('test_share_unchanged'):
        lines.append(f'| {m}, the same stream at X = 1 | ' + ' | '.join(
            f'{x:.3f}' for x in np.mean(v['test_share_unchanged'], axis=0)) + ' |')
  width = len(next(iter(round_utility.values()))) if round_utility else 0
  lines += ['', 'Utility by round (mean over seeds):', '',
            '| method | ' + ' | '.join(f'r{i + 1}' for i in range(width)) + ' |',
            '|---|' + '---:|' * width]
  for m, u in round_utility.items():
    lines.append(f'| {m} | ' + ' | '.join(f'{x:.4f}' for x in u) + ' |')
  words = {'half_share': lambda t: (
               f"last-round share of the new model {t['share_last']:.3f} against full_info's "
               f"{t['full_info_share_last']:.3f}: "
               + ('n/a' if t['value'] is None else f"{t['value']:.0%}")
               + f" (target >= 50%; {t['seeds_met']} of {len(t['per_seed'])} seeds)"),
           'beats_greedy': lambda t: (
               f"utility after the join minus greedy's, paired by seed: {t['value']:+.4f}"
               + (f" [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if t['ci95'] else '')
               + ' (target > 0)'),
           'moves': lambda t: (
               f"effect of the change on the deployed policy's test-split share of the model "
               f"in the second round after it (against the same stream at X = 1): "
               f"{t['value']:+.3f}, {t['seeds_met']} of {len(t['per_seed'])} seeds by "
               f"{SETTLE_TOL} or more (target: {SETTLE_TOL} toward the model where cheaper); "
               f"in the last round {t['effect_last']:+.3f}; full_info's in the second round "
               + ('-' if t['full_info'] is None else f"{t['full_info']:+.3f}"))}
  if sc.get('targets'):
    lines += ['', f"Targets for {DR_METHOD}: " + '; '.join(
        f"{words[k](t)}: {'met' if t['met'] else 'NOT met'}" for k, t in sc['targets'].items())]
  return lines + ['']


def plot(infos: dict, workdir: pathlib.Path) -> None:
  """regret.png (cumulative regret by logged queries) and aiq_by_round.png (test AIQ), one
  panel per data set, the mean over seeds per method."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  for key, filename, ylabel in (('regret', 'regret.png', 'cumulative regret'),
                                ('aiq_by_round', 'aiq_by_round.png', 'test AIQ')):
    fig, axes = plt.subplots(1, len(infos), figsize=(5 * len(infos), 4), squeeze=False)
    for ax, (name, info) in zip(axes[0], infos.items()):
      ends = np.cumsum(info['seeds'][0]['round_sizes']).tolist()
      x = ([0] + ends) if key == 'aiq_by_round' else ends
      for method, seed_runs in info['methods'].items():
        curves = [r[key] for r in seed_runs]
        if all(len(c) == len(x) for c in curves) and x:
          ax.plot(x, np.mean(curves, axis=0), marker='o', label=method)
      ax.set(title=name, xlabel='logged queries', ylabel=ylabel)
      if key == 'regret' or max(x, default=0) > 0:
        ax.set_xscale('symlog', linthresh=FIRST_ROUND)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / filename, dpi=100)
    plt.close(fig)
  scenarios = {n: i['scenario'] for n, i in infos.items()
               if i.get('scenario', {}).get('kind') in ('new_model', 'price_change')}
  if not scenarios:
    return
  fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False)
  for ax, (name, sc) in zip(axes[0], scenarios.items()):
    for method, v in sc['methods'].items():
      ax.plot(sc['round_ends'], np.mean(v['share_by_round'], axis=0), marker='o', label=method,
              **({'color': 'black', 'linewidth': 2.5} if method == REFERENCE else {}))
    ax.axvline(sc['event'], color='grey', linestyle='--')
    ax.set(xlabel='stream queries (round end; dashed: the event)',
           ylabel=f"share routed to {sc['model']}")
    ax.set_title(f"{name}\n{sc['spec']}", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / 'share.png', dpi=100)
  plt.close(fig)


# =================================================================== run ===
def run(config, workdir, datasets: list[Dataset], seeds: int = 3, seed_labels: int = 20,
        methods=None, command: str = 'python -m entrorouter_jax.online',
        scenario: Scenario | None = None) -> dict:
  """The simulator on every data set (under `scenario` where given); returns online.json's
  content (also written)."""
  methods = list(methods or bandits.LEARNERS)
  unknown = [m for m in methods if m not in bandits.LEARNERS]
  if unknown:
    raise ValueError(f'--methods: {unknown[0]!r} is unknown; expected names from '
                     f'{sorted(bandits.LEARNERS)}')
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}; expected >= 1')
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  results, infos = {}, {}
  for ds in datasets:
    results[ds.name], infos[ds.name] = run_dataset(config, ds, seeds, seed_labels, methods,
                                                   scenario)
    seconds = time.time() - started
    paths.write_atomic(workdir / 'online.json', json.dumps(results, indent=2) + '\n')
    paths.write_atomic(workdir / 'online_info.json',
                       json.dumps({'datasets': infos, 'command': command,
                                   'seconds': round(seconds, 1)}, indent=2) + '\n')
    paths.write_atomic(workdir / 'online.md', render(results, infos, command, seconds))
    plot(infos, workdir)
    for method, e in results[ds.name].items():
      if method not in NON_METHODS:
        print(f"online: {ds.name}: {method}: final AIQ {e['final_aiq_mean']:.4f}, regret "
              f"{e['regret_mean']:.2f}, stream utility {e['stream_utility_mean']:.4f}",
              flush=True)
    if scenario is not None:
      print(f'online: {ds.name}: {scenario.spec}: '
            f'{json.dumps(results[ds.name][scenario.kind])}', flush=True)
  print(f'online: {(time.time() - started) / 60:.1f} min wall time; tables in '
        f'{workdir / "online.md"}', flush=True)
  return results


# =================================================================== CLI ===
def main(argv):
  from absl import flags
  from entrorouter_jax import cli, logs
  FLAGS = flags.FLAGS
  del argv
  logs.show_progress_logs()
  try:
    scenario = parse_scenario(FLAGS.scenario, FLAGS.new_model_labels)
    datasets = chosen_datasets(FLAGS.datasets, FLAGS.pools)
    methods = [m.strip() for m in FLAGS.methods.split(',') if m.strip()] or None
    command = ' '.join(['python -m entrorouter_jax.online'] + sys.argv[1:])
    run(FLAGS.config, FLAGS.workdir, datasets, FLAGS.seeds, FLAGS.seed_labels, methods, command,
        scenario)
  except cli.user_errors() as e:
    if os.environ.get('ENTROROUTER_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'rl.py'),
                                  'The recipe (default configs/rl.py), for its feature space; '
                                  'override keys with --config.KEY=VALUE.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where online.json, online.md and the plots go.',
                      required=True)
  flags.DEFINE_integer('seeds', 3, 'Seeds per data set (seed labels, stream order, learners).')
  flags.DEFINE_integer('seed_labels', 20, 'Fully labelled training queries the learners start '
                       'from.')
  flags.DEFINE_string('datasets', '', 'NAME=FORMAT:PATH[,...]; default: ../shared/data.')
  flags.DEFINE_string('pools', '', 'NAME=POOL.yaml[,...]: prices for --datasets entries '
                      'whose files carry no costs.')
  flags.DEFINE_string('methods', '', 'Comma-separated learners (default: every one of '
                      'bandits.LEARNERS); full_info always runs as the regret reference.')
  flags.DEFINE_string('scenario', '', 'What changes during the stream: new_model=NAME@F, '
                      'new_model=auto@F, price_change=NAME*X@F (NAME may be "strongest") or '
                      'task_shift (F: a fraction of the stream); default: nothing.')
  flags.DEFINE_integer('new_model_labels', 0, 'With --scenario=new_model=...: the labelled '
                       'queries the new model joins with (0: none, exploration must find it).')
  app.run(main)
