"""The replay simulator: a full-information data set becomes a stream of traffic on which
bandit learners route, see only the cell they chose, and redeploy (METHOD.md, "Learning from
feedback": the replay protocol).

  python -m entrorouter_jax.online --workdir=DIR [--seeds=3] [--seed_labels=20]
      [--datasets=NAME=FORMAT:PATH,...] [--pools=NAME=POOL.yaml] [--methods=a,b]
      [--config.KEY=VALUE ...]

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


# ================================================================ the data ===
@dataclasses.dataclass
class Table:
  """One split's full-information table in the recipe's feature space."""
  feats: np.ndarray          # float32[N, D]
  outcomes: np.ndarray       # float64[N, K], 0 where missing
  mask: np.ndarray           # bool[N, K]
  costs: np.ndarray          # float64[N, K], dollars (or the data set's unit)


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

  @property
  def cost_hat(self) -> np.ndarray:
    return self.train.costs / self.c_ref


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
                             np.asarray(d.outcome_mask, bool), np.asarray(d.costs, np.float64))
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


# =========================================================== one learner ===
def aiq_on_test(learner: bandits.Learner, stream: Stream) -> float:
  """AIQ on the test split of the learner's success estimates' cost/quality curve."""
  s, c = learner.estimates(stream.test.feats)
  _, choices = baselines.ScoreRouter(learner.name, s, c).choices()
  cy, cc = metrics.chosen_tables(choices, stream.test.outcomes, stream.test.mask,
                                 stream.test.costs)
  return metrics.aiq(cc.mean(axis=1), cy.mean(axis=1), stream.cost_range)


def revealed(stream: Stream, rows, choice, full: bool):
  """(outcomes, mask, cost_hat) of stream rows as the learner is told them: the chosen
  cell only (its outcome where the data set has one; cost_hat NaN elsewhere), or whole rows
  for a full-information learner."""
  y, mask, c_hat = stream.train.outcomes[rows], stream.train.mask[rows], stream.cost_hat[rows]
  if full:
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
             seed: int = 0) -> dict:
  """A policy judged on logged rows it was not trained on: `learner` is the simulator's
  shadow learner (fitted on the seed labels and the fit fold), `logs` the held-out 20% of the
  logged rows so far (`rows`: their training rows, in log order; any seed-label rows in `logs`
  are ignored): {'dr', 'ci95', 'true', 'covered', 'rows'}. DR is `offpolicy.estimate`'s on
  reward r = y - lambda c_hat (the logged cell) with q_hat = s - lambda c_hat (the learner's
  estimates); 'true' = mean over the rows of sum_m pi(m|x) (y(x, m) - lambda c_hat(x, m)) on
  the full table (unobserved outcomes count 0); 'rows' = how many rows were judged."""
  lam = stream.cost_weight
  feats, logged, y, c_hat, propensity = logs.stream()
  if len(rows) != len(logged):
    raise ValueError(f'dr_check: {len(rows)} training rows for {len(logged)} logged rows; '
                     'expected one per logged row')
  pi = learner.policy(feats)
  s, c_pred = learner.estimates(feats)
  est = offpolicy.estimate(pi, logged, propensity, y - lam * c_hat, s - lam * c_pred,
                           bootstrap=DR_BOOTSTRAP, seed=seed)['dr']
  full = stream.train.outcomes[rows] - lam * stream.cost_hat[rows]
  true = float(np.mean(np.sum(pi * full, axis=1)))
  lo, hi = est['ci95']
  return {'dr': est['value'], 'ci95': [lo, hi], 'true': true,
          'covered': bool(lo <= true <= hi), 'rows': int(len(rows))}


def simulate(learner: bandits.Learner, stream: Stream, progress: str = '',
             dr: bool = False) -> dict:
  """Runs one learner over the stream: {'utility' float[n] per stream query, 'choice' int[n],
  'round_sizes', 'round_utility', 'aiq_by_round' (after the seed labels, then each round),
  'shares' float[K] (the final policy's mean deployed distribution on the test split),
  'dr_rounds' (with `dr`: `dr_check` of the shadow learner on the held-out fold before each
  round after the first whose held-out fold has DR_MIN_HELD rows or more, else empty)}.
  With `dr`, a deep copy of `learner` taken before its first update (the shadow) is updated
  alongside it on the seed labels and the logged rows of `fit_fold(row, learner.seed)` only;
  where the shadow keeps the deployed distribution of the rows it is told (`pending`), it is
  given the routing learner's distribution on those rows."""
  from tqdm import tqdm
  train, lam = stream.train, stream.cost_weight
  seed = stream.seed_rows
  logs = bandits.labelled_logs(train.feats[seed], train.outcomes[seed], train.mask[seed],
                               stream.cost_hat[seed])
  shadow = copy.deepcopy(learner) if dr else None
  fit = fit_fold(stream.stream_rows, learner.seed) if dr else None
  learner.update(logs)
  if dr:
    shadow.update(logs)
  sizes = bandits.round_sizes(len(stream.stream_rows), FIRST_ROUND)
  aiq = [aiq_on_test(learner, stream)]
  utility, choices, round_utility, dr_rounds = [], [], [], []
  start = 0
  for size in tqdm(sizes, desc=progress or learner.name, leave=False, file=sys.stderr,
                   disable=None):
    if dr and start > 0:
      held = np.flatnonzero(~fit[:start])
      if len(held) >= DR_MIN_HELD:
        dr_rounds.append(dr_check(shadow, stream, subset_logs(logs, len(seed) + held),
                                  stream.stream_rows[held], seed=len(dr_rounds)))
    rows = stream.stream_rows[start:start + size]
    choice, propensity = learner.deploy(train.feats[rows])
    choice = np.asarray(choice, np.int64)
    propensity = np.asarray(propensity, np.float64)
    if choice.shape != (size,) or propensity.shape != (size,) or not (
        np.all((propensity > 0) & (propensity <= 1))):
      raise ValueError(f'{learner.name}: deploy gave choices {choice.shape} and propensities '
                       f'{propensity.shape} (range {propensity.min()}..{propensity.max()}); '
                       f'expected ({size},) each, propensities in (0, 1]')
    deployed = getattr(learner, 'pending', None)
    u = (train.outcomes[rows, choice] - lam * stream.cost_hat[rows, choice])
    utility.append(u)
    choices.append(choice)
    round_utility.append(float(u.mean()))
    outcomes, mask, c_hat = revealed(stream, rows, choice, learner.full_information)
    logs = bandits.append(logs, train.feats[rows], outcomes, mask, c_hat, choice, propensity)
    learner.update(logs)
    if dr:
      in_fit = fit[start:start + size]
      if in_fit.any():
        if hasattr(shadow, 'pending') and deployed is not None:
          shadow.pending = np.asarray(deployed)[in_fit]
        told = len(seed) + np.flatnonzero(fit[:start + size])
        shadow.update(subset_logs(logs, np.concatenate([np.arange(len(seed)), told])))
    start += size
    aiq.append(aiq_on_test(learner, stream))
  shares = learner.policy(stream.test.feats).mean(axis=0)
  return {'utility': np.concatenate(utility) if utility else np.zeros(0),
          'choice': np.concatenate(choices) if choices else np.zeros(0, np.int64),
          'round_sizes': sizes, 'round_utility': round_utility, 'aiq_by_round': aiq,
          'shares': shares, 'dr_rounds': dr_rounds}


def cumulative_regret(run: dict, reference: dict) -> list[float]:
  """sum over the stream so far of (u_reference - u_run), at the end of each round."""
  gap = np.cumsum(reference['utility'] - run['utility'])
  ends = np.cumsum(run['round_sizes']) - 1
  return [float(gap[e]) for e in ends]


# ============================================================ a data set ===
def run_dataset(config, ds: Dataset, seeds: int, seed_labels: int, methods: list[str]):
  """Every method over the seeds: (online.json's entry, online_info.json's entry)."""
  started = time.time()
  cfg = apply_overrides(config, {f'data.{k}': v for k, v in ds.data.items()})
  train, test, names = load_tables(cfg)
  runs = {m: [] for m in methods}
  info = {'about': ds.about, 'train': len(train.feats), 'test': len(test.feats),
          'models': names, 'seed_labels': seed_labels, 'seeds': [], 'methods': {}}
  order = [REFERENCE] + [m for m in methods if m != REFERENCE]
  for seed in range(seeds):
    stream = make_stream(train, test, names, seed, seed_labels)
    seed_runs = {}
    for name in order:
      learner = bandits.make_learner(name, len(names), stream.cost_weight, seed=seed,
                                     config=cfg)
      seed_runs[name] = simulate(learner, stream, f'{ds.name} seed {seed} {name}',
                                 dr=name == DR_METHOD)
    reference = seed_runs[REFERENCE]
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
  info['seconds'] = round(time.time() - started, 1)
  return entry, info


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
      if method == 'dr_coverage':
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
  return '\n'.join(lines)


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


# =================================================================== run ===
def run(config, workdir, datasets: list[Dataset], seeds: int = 3, seed_labels: int = 20,
        methods=None, command: str = 'python -m entrorouter_jax.online') -> dict:
  """The simulator on every data set; returns online.json's content (also written)."""
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
    results[ds.name], infos[ds.name] = run_dataset(config, ds, seeds, seed_labels, methods)
    seconds = time.time() - started
    paths.write_atomic(workdir / 'online.json', json.dumps(results, indent=2) + '\n')
    paths.write_atomic(workdir / 'online_info.json',
                       json.dumps({'datasets': infos, 'command': command,
                                   'seconds': round(seconds, 1)}, indent=2) + '\n')
    paths.write_atomic(workdir / 'online.md', render(results, infos, command, seconds))
    plot(infos, workdir)
    for method, e in results[ds.name].items():
      if method != 'dr_coverage':
        print(f"online: {ds.name}: {method}: final AIQ {e['final_aiq_mean']:.4f}, regret "
              f"{e['regret_mean']:.2f}, stream utility {e['stream_utility_mean']:.4f}",
              flush=True)
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
    datasets = chosen_datasets(FLAGS.datasets, FLAGS.pools)
    methods = [m.strip() for m in FLAGS.methods.split(',') if m.strip()] or None
    command = ' '.join(['python -m entrorouter_jax.online'] + sys.argv[1:])
    run(FLAGS.config, FLAGS.workdir, datasets, FLAGS.seeds, FLAGS.seed_labels, methods, command)
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
  app.run(main)
