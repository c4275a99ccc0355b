"""Evaluation of a trained router on a split (DIR/eval/results.json), or off-policy on
feedback logs (DIR/eval/offpolicy.json).

`router_results` turns the policy's distribution over models on a split into
the numbers METHOD.md defines (accuracy, cost, retained accuracy, cost saved,
oracle, single models, routing shares, entropy; for data that knows the true
P(correct), the expected utility against the uniform and Bayes-optimal policies).
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from entrorouter_jax import metrics
from entrorouter_jax.data.dataset import RoutingDataset


def router_results(data: RoutingDataset, probs: np.ndarray, *, strongest: int, c_ref: float,
                   cost_weight: float, dataset: str, split: str = 'test') -> dict:
  """results.json's content for the greedy router R(x) = argmax_m pi(m|x)."""
  names = data.model_names
  y, mask, costs = data.outcomes, data.outcome_mask, data.costs
  choice = np.argmax(probs, axis=1)
  singles = metrics.single_models(y, mask, costs, names)
  strong = singles[names[strongest]]
  router = metrics.route_accuracy_cost(choice, y, mask, costs)
  router.update(metrics.relative(router, strong))
  router['share'] = metrics.shares(choice, names)
  router['entropy'] = float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=1)))
  oracle = metrics.route_accuracy_cost(metrics.oracle_choice(y, mask, costs), y, mask, costs)
  oracle.update(metrics.relative(oracle, strong))
  results = {
      'dataset': dataset, 'split': split, 'models': names, 'strongest': names[strongest],
      'cost_weight': cost_weight, 'c_ref': c_ref,
      'router': router, 'oracle': oracle, 'single_models': singles,
  }
  if data.true_prob is not None:
    greedy = np.eye(len(names))[choice]
    results['expected_utility'] = metrics.utility_report(
        greedy, data.true_prob, costs / c_ref, cost_weight)
  return results


def write_results(workdir, results: dict, name: str = 'results.json'):
  from entrorouter_jax import paths
  path = paths.as_path(workdir) / 'eval' / name
  paths.write_atomic(path, json.dumps(results, indent=2) + '\n')
  return path


def summary(results: dict) -> str:
  """A few human-readable lines for the end of a run."""
  r = results['router']
  lines = [f"router on {results['dataset']}/{results['split']}: accuracy {r['accuracy']:.4f}, "
           f"cost {r['cost']:.3g} ({r['retained_accuracy']:.1%} of {results['strongest']}'s "
           f"accuracy at {r['cost_saved']:.1%} lower cost)"]
  if 'expected_utility' in results:
    u = results['expected_utility']
    lines.append(f"expected utility at lambda={results['cost_weight']}: router {u['router']:.4f}, "
                 f"Bayes-optimal {u['bayes_optimal']:.4f}, uniform {u['uniform']:.4f} -> "
                 f"{u['fraction_of_optimal']:.1%} of the way from uniform to Bayes-optimal")
  return '\n'.join(lines)


# ============================================================ the CLI ===
# python -m entrorouter_jax.evaluate --workdir=DIR [--split=test]

THRESHOLDS = np.concatenate([np.geomspace(1e-3, 0.5, 20), np.linspace(0.55, 1.0, 10)])


def router_curve(router, data: RoutingDataset, probs: np.ndarray, tables, feats=None) -> list[dict]:
  """The router's cost/quality curve: a lambda sweep for the utility head (argmax
  s - lambda c_bar, the same lambdas as the baselines) or a lambda-conditioned
  router, else a threshold sweep on pi.

  Threshold points are labelled t on the cheap side and 2 - t on the dear side
  (metrics.threshold_params), so the label grows from cheap to dear.
  """
  from entrorouter_jax import baselines
  from entrorouter_jax.policy import is_utility
  y, mask, costs = data.outcomes, data.outcome_mask, data.costs
  cfg = router.config.model
  if is_utility(router.config):
    success, c_bar = router.scores(data.queries.tolist(), tables, feats)
    return baselines.ScoreRouter('router', success, c_bar).curve(y, mask, costs)
  if cfg.lambda_conditioned:
    grid = np.unique(np.concatenate([[cfg.lambda_min], np.geomspace(
        max(cfg.lambda_min, 1e-3), cfg.lambda_max, 15)]))
    choices = [np.argmax(router.probs(data.queries.tolist(), lam, tables, feats), axis=1)
               for lam in grid]
    return metrics.curve_points(choices, y, mask, costs, grid.tolist(), 'lambda')
  choices = metrics.threshold_choices(probs, router.model_costs, THRESHOLDS)
  return metrics.curve_points(choices, y, mask, costs, metrics.threshold_params(THRESHOLDS),
                              'threshold')


def _two_model_report(entry: dict, strong: int, singles: dict, names) -> None:
  """APGR and CPT(20/50/80%) of a curve whose points carry each model's share."""
  if not all('shares' in p for p in entry['curve']):
    return
  acc_weak = singles[names[1 - strong]]['accuracy']
  acc_strong = singles[names[strong]]['accuracy']
  shares = [p['shares'][strong] for p in entry['curve']]
  accs = [p['accuracy'] for p in entry['curve']]
  s, g = metrics.pgr_curve(shares, accs, acc_weak, acc_strong)
  entry['apgr'] = metrics.apgr(shares, accs, acc_weak, acc_strong)
  entry['cpt'] = {f'{int(x * 100)}%': metrics.cpt(s, g, x) for x in (0.2, 0.5, 0.8)}


def evaluate_workdir(workdir, split: str = 'test') -> dict:
  """Everything `python -m entrorouter_jax.evaluate` writes, as a dict."""
  from entrorouter_jax import baselines, paths, router as router_lib
  from entrorouter_jax import capability, neighbours, workdir as workdir_lib
  from entrorouter_jax.data import sources

  workdir = paths.as_path(workdir)
  router = router_lib.load_router(workdir)
  config = router.config
  _, parts = sources.load_splits(config.data, ('train', split))
  train, data = parts['train'], parts[split]
  if train.model_names != router.model_names:
    raise router_lib.RouterError(f'{workdir}: the data now has models {train.model_names}, '
                                 f'the router was trained on {router.model_names}')
  stage0 = workdir_lib.read_stage0(workdir)
  if stage0 is None:
    raise router_lib.RouterError(f'{workdir}: {workdir_lib.STAGE0} is missing; expected the '
                                 'workdir of a finished training run')
  space = stage0.space
  # Stage 0 keeps both splits' embeddings (the same space, the same order); its training
  # table may hold more rows (the labelled queries of added models, add_model.py).
  stored = stage0.features
  train_feats = stored.get('train', stage0.train_feats)
  if train_feats is None or len(train_feats) != train.num_queries:
    train_feats = space.transform(train.queries.tolist())
  data_feats = stored.get(split)
  if data_feats is None or len(data_feats) != data.num_queries:
    data_feats = space.transform(data.queries.tolist())
  if split in stage0.tables:
    p_hat, c_bar = stage0.tables[split]['p_hat'], stage0.tables[split]['c_bar']
  elif router.columns is not None:   # one column per column of added_models.json
    p_hat, c_bar = router.knn_table().estimates(data_feats, data.tasks.tolist())
  else:
    p_hat, c_bar = capability.knn_estimates(
        train_feats, train.outcomes, train.outcome_mask, train.costs / router.c_ref,
        train.tasks.tolist(), query_feats=data_feats, query_tasks=data.tasks.tolist(),
        k=config.anchor.k, alpha=config.anchor.alpha, prior=config.anchor.prior,
        **neighbours.search_settings(config.anchor))

  lam = router.default_cost_weight
  probs = router.probs(data.queries.tolist(), tables=(p_hat, c_bar), feats=data_feats)
  results = router_results(data, probs, strongest=router.strongest, c_ref=router.c_ref,
                           cost_weight=lam, dataset=config.data.name, split=split)
  names = router.model_names
  curve = router_curve(router, data, probs, (p_hat, c_bar), data_feats)
  cost_range = metrics.single_model_cost_range(results['single_models'])
  results['curve'] = curve
  results['aiq'] = metrics.aiq([p['cost'] for p in curve], [p['accuracy'] for p in curve],
                               cost_range)
  results['router']['aiq'] = results['aiq']
  results['anchor_space'] = config.anchor.space
  results['baselines'] = baselines.evaluate_baselines(
      train, data, train_feats, data_feats, router.visible(p_hat), router.visible(c_bar),
      router.c_ref, lam,
      router_cost=results['router']['cost'], seed=config.seed,
      extra=other_space_routers(config, router.c_ref, train, data, seed=config.seed))

  if len(names) == 2:   # RouteLLM's two-model metrics on every curve
    entries = [results['router']] + [v for v in results['baselines'].values() if v.get('curve')]
    results['router']['curve'] = curve
    for entry in entries:
      _two_model_report(entry, router.strongest, results['single_models'], names)
    del results['router']['curve']
  return results


def other_space_routers(config, c_ref, train, data, *, seed=0) -> list:
  """knn/linear/mlp/ensemble in every space of `features.other_spaces`, named
  '<baseline>_<space>' (e.g. 'mlp_tfidf'), as ScoreRouters on `data`."""
  from entrorouter_jax import baselines, capability, features, neighbours
  routers = []
  for name, space in features.other_spaces(config):
    train_feats = space.fit_transform(train.queries.tolist())
    data_feats = space.transform(data.queries.tolist())
    p_hat, c_bar = capability.knn_estimates(
        train_feats, train.outcomes, train.outcome_mask, train.costs / c_ref,
        train.tasks.tolist(), query_feats=data_feats, query_tasks=data.tasks.tolist(),
        k=config.anchor.k, alpha=config.anchor.alpha, prior=config.anchor.prior,
        **neighbours.search_settings(config.anchor))
    routers += baselines.score_routers(train, train_feats, data_feats, p_hat, c_bar, c_ref,
                                       seed=seed, suffix=f'_{name}')
  return routers


# METHOD.md's headline operating point: the best curve point saving at least this
# share of the strongest model's cost (the paper reports 98.3% retained there).
HEADLINE_SAVED = 0.4825


def report_markdown(results: dict) -> str:
  """DIR/eval/report.md: the router against every baseline in one table."""
  r = results['router']
  two = 'apgr' in r
  head = '| router | accuracy | cost | retained | saved | AIQ |' + (' APGR | CPT(50%) |' if two else '')
  rule = '|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if two else '')
  strong = results['single_models'][results['strongest']]

  def row(name, e):
    rel = metrics.relative(e, strong)
    cells = [name, f"{e['accuracy']:.4f}", f"{e['cost']:.4g}", f"{rel['retained_accuracy']:.1%}",
             f"{rel['cost_saved']:.1%}", f"{e['aiq']:.4f}" if e.get('aiq') is not None else '-']
    if two:
      cells += [f"{e['apgr']:.4f}" if 'apgr' in e else '-',
                f"{e['cpt']['50%']:.1%}" if 'cpt' in e else '-']
    return '| ' + ' | '.join(cells) + ' |'

  lines = [f"# Router evaluation: {results['dataset']} / {results['split']}", '',
           f"lambda = {results['cost_weight']}; strongest model: {results['strongest']} "
           f"(accuracy {strong['accuracy']:.4f}, cost {strong['cost']:.4g}); AIQ over the single "
           'models\' cost range.', '', head, rule, row('**EntroRouter**', r)]
  for name, entry in results['baselines'].items():
    lines.append(row(name, entry))
  lines += ['', f'## Best point of each curve saving at least {HEADLINE_SAVED:.2%}', '',
            '| router | retained | saved |', '|---|---:|---:|']
  curves = [('**EntroRouter**', results['curve'])] + [
      (name, e['curve']) for name, e in results['baselines'].items() if e.get('curve')]
  for name, curve in curves:
    best = metrics.best_retained(curve, strong, HEADLINE_SAVED)
    lines.append(f"| {name} | {best['retained_accuracy']:.1%} | {best['cost_saved']:.1%} |"
                 if best else f'| {name} | - | - |')
  lines += ['', '## Routing shares', '', '| model | share |', '|---|---:|']
  lines += [f'| {m} | {v:.1%} |' for m, v in r['share'].items()]
  if 'expected_utility' in results:
    u = results['expected_utility']
    lines += ['', f"Expected utility: router {u['router']:.4f}, Bayes-optimal "
              f"{u['bayes_optimal']:.4f}, uniform {u['uniform']:.4f} "
              f"({u['fraction_of_optimal']:.1%} of the way from uniform to Bayes-optimal)."]
  lines += ['', '![cost/accuracy](curve.png)', '', '![shares](shares.png)', '',
            '![training](training.png)', '']
  return '\n'.join(lines)


def plot_all(results: dict, workdir) -> list:
  """curve.png, shares.png and training.png under DIR/eval/."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from entrorouter_jax import paths as paths_lib
  out = paths_lib.as_path(workdir) / 'eval'
  out.mkdir(parents=True, exist_ok=True)
  paths = []

  def save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=120)
    paths_lib.write_atomic(path, buf.getvalue())
    paths.append(path)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 5))
  colors = iter(['C0', 'C1', 'C2', 'C4', 'C5', 'C6', 'C8', 'C9'])   # C3 is the router's
  for name, entry in plotted_baselines(results['baselines']).items():
    hc, ha = metrics.convex_hull_curve([p['cost'] for p in entry['curve']],
                                       [p['accuracy'] for p in entry['curve']])
    color = 'k' if name == 'oracle' else ('C7' if name == 'random' else next(colors))
    ax.plot(hc, ha, '--', marker='.', color=color, label=f"{name} (AIQ {entry['aiq']:.3f})")
  for name, single in results['single_models'].items():
    ax.scatter(single['cost'], single['accuracy'], color='gray', s=15)
    ax.annotate(name.split('/')[-1], (single['cost'], single['accuracy']), fontsize=7)
  hc, ha = metrics.convex_hull_curve([p['cost'] for p in results['curve']],
                                     [p['accuracy'] for p in results['curve']])
  ax.plot(hc, ha, '-', marker='o', color='C3', lw=2, label=f"EntroRouter (AIQ {results['aiq']:.3f})")
  ax.scatter(results['router']['cost'], results['router']['accuracy'], marker='*', s=200,
             color='C3', zorder=5, label='EntroRouter at the trained lambda')
  ax.scatter(results['oracle']['cost'], results['oracle']['accuracy'], marker='^', s=80,
             color='k', label='oracle')
  ax.set_xscale('log')
  ax.set_xlabel('mean cost per query')
  ax.set_ylabel('accuracy')
  ax.set_title(f"{results['dataset']} / {results['split']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  save(fig, out / 'curve.png')

  fig, ax = plt.subplots(figsize=(7, 3.5))
  share = results['router']['share']
  ax.bar(range(len(share)), list(share.values()))
  ax.set_xticks(range(len(share)), [m.split('/')[-1] for m in share], rotation=30, ha='right',
                fontsize=7)
  ax.set_ylabel('routing share')
  fig.tight_layout()
  save(fig, out / 'shares.png')

  records = []
  metrics_file = paths_lib.as_path(workdir) / 'metrics.jsonl'
  if metrics_file.is_file():
    records = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  for ax, key in zip(axes, ('reward', 'entropy', 'kl_anchor')):
    for stage in ('sft', 'rl'):
      pts = [(r['step'], r[key]) for r in records if r['stage'] == stage and r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), label=stage)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  save(fig, out / 'training.png')
  return paths


def plotted_baselines(baselines: dict, most: int = 4) -> dict:
  """The curves worth a line in curve.png: the `most` best baselines by AIQ
  (every space), then random and the oracle; report.md lists them all."""
  curves = {n: e for n, e in baselines.items() if e.get('curve') and not n.startswith('single:')}
  learned = sorted((n for n in curves if n not in ('random', 'oracle', 'task_best')),
                   key=lambda n: -curves[n]['aiq'])[:most]
  return {n: curves[n] for n in learned + ['random', 'oracle'] if n in curves}


def save_evaluation(workdir, results: dict) -> tuple[dict, str, list]:
  """Writes results.json (keeping training's keys, e.g. train_seconds), report.md and the plots.

  A split other than test goes to results_<split>.json and report_<split>.md.

  Returns (the merged results, the report's Markdown, the PNG paths).
  """
  from entrorouter_jax import paths
  workdir = paths.as_path(workdir)
  previous = workdir / 'eval' / 'results.json'
  if results.get('split') == 'test' and previous.is_file():
    results = {**json.loads(previous.read_text()), **results}
  suffix = '' if results.get('split') == 'test' else f"_{results['split']}"
  write_results(workdir, results, f'results{suffix}.json')
  report = report_markdown(results)
  paths.write_atomic(workdir / 'eval' / f'report{suffix}.md', report)
  return results, report, plot_all(results, workdir)


# ============================================== off-policy evaluation ===
# python -m entrorouter_jax.evaluate --workdir=DIR --feedback=LOGS


def feedback_tables(router, queries: list, workdir) -> tuple[np.ndarray, np.ndarray, tuple, object]:
  """(success, c_bar, tables, feats) for logged queries: the predicted success float64[N, K]
  (the utility head's s, else Stage 0's kNN p_hat) and expected normalised cost c_bar
  (Stage 0's kNN), plus the (p_hat, c_bar) tables and features `router.probs` takes (None
  where the router reads neither)."""
  import dataclasses
  from entrorouter_jax import workdir as workdir_lib
  from entrorouter_jax.policy import is_utility
  knn = router if router.stage0 is not None else dataclasses.replace(
      router, stage0=workdir_lib.load_stage0(workdir))
  feats = knn.features(queries)
  p_hat, c_bar = knn.knn_table().estimates(feats)
  tables = (p_hat, c_bar) if router.needs_stage0 else None
  feats = feats if router.tokenizer is None else None
  p_hat, c_bar = router.visible(p_hat), router.visible(c_bar)
  success = router.scores(queries, tables, feats)[0] if is_utility(router.config) else p_hat
  return np.asarray(success, np.float64), np.asarray(c_bar, np.float64), tables, feats


def policy_on_log(router, queries: list, lam: np.ndarray, workdir):
  """(pi float64[N, K], success, c_bar) of `router` (trained in `workdir`) on logged queries,
  row i's pi at cost weight lam[i] (feedback_tables gives success and c_bar)."""
  success, c_bar, tables, feats = feedback_tables(router, queries, workdir)
  pi = np.zeros(success.shape)
  for value in np.unique(lam):
    at = np.flatnonzero(lam == value)
    part = None if tables is None else (tables[0][at], tables[1][at])
    pi[at] = router.probs([queries[i] for i in at], float(value), part,
                          None if feats is None else feats[at])
  return pi / pi.sum(axis=1, keepdims=True), success, c_bar


def offpolicy_results(router, data: RoutingDataset, workdir, *, bootstrap: int = 1000,
                      seed: int = 0, baseline=None) -> dict:
  """offpolicy.json's content: the router's policy evaluated on judged feedback rows.

  Each row's cost weight lambda is the log's `cost_weight` where it has one, else the
  router's operating one; reward r = score - lambda cost / c_ref, q_hat = s - lambda c_bar,
  pi = router.probs at that lambda. 'ips', 'snips' and 'dr' hold the router's estimated
  utility with a 95% bootstrap interval (offpolicy.estimate), 'dr' also its accuracy (r =
  score, q_hat = s) and cost (r = cost, q_hat = c_bar c_ref); 'logging' the realised means
  of the logged rows; 'improves' whether DR's lower end beats the logging utility;
  'cost_weight' the lambda of every row (None where rows differ). With `baseline`
  ((router, workdir) of the router the stage started from, e.g. the one that logged the
  rows), 'vs_init' holds the paired DR gain of this router over it (offpolicy.dr_gain, the
  same rows and q_hat): {'gain', 'lower' (one-sided 95% bound), 'improves': lower > 0}.
  """
  from entrorouter_jax import offpolicy, router as router_lib
  from entrorouter_jax.data.dataset import DataError
  where = data.source or data.name
  if data.model_names != router.model_names:
    raise router_lib.RouterError(f'{where}: the feedback has models {data.model_names}; '
                                 f'expected the router\'s {router.model_names}, in that order')
  propensity = getattr(data, 'propensities', None)
  if propensity is None:
    raise DataError(f'{where}: no propensity per row; expected feedback logs with a '
                    '`propensity` column (pi_b(model | query))')
  logged = np.asarray(data.logged_models(), np.int64)   # one judged cell per row
  rows = np.arange(data.num_queries)
  propensity = np.asarray(propensity, np.float64)
  score = np.asarray(data.outcomes, np.float64)[rows, logged]
  cost = np.asarray(data.costs, np.float64)[rows, logged]
  queries = data.queries.tolist()

  lam = np.full(len(rows), router.default_cost_weight)
  own = getattr(data, 'cost_weights', None)
  if own is not None:
    own = np.asarray(own, np.float64)
    lam = np.where(np.isfinite(own), own, lam)
  pi, success, c_bar = policy_on_log(router, queries, lam, workdir)

  reward = score - lam * cost / router.c_ref
  q_hat = success - lam[:, None] * c_bar
  est = offpolicy.estimate(pi, logged, propensity, reward, q_hat, bootstrap=bootstrap, seed=seed)
  logging = {'utility': float(np.mean(reward)), 'accuracy': float(np.mean(score)),
             'cost': float(np.mean(cost))}
  dr = {'utility': est['dr']['value'], 'ci95': est['dr']['ci95'],
        'accuracy': offpolicy.dr(pi, logged, propensity, score, success),
        'cost': offpolicy.dr(pi, logged, propensity, cost, c_bar * router.c_ref)}
  out = {'ips': {'utility': est['ips']['value'], 'ci95': est['ips']['ci95']},
         'snips': {'utility': est['snips']['value'], 'ci95': est['snips']['ci95']},
         'dr': dr, 'logging': logging,
         'improves': bool(dr['ci95'][0] > logging['utility']),
         'rows': int(len(rows)),
         'cost_weight': float(lam[0]) if np.all(lam == lam[0]) else None}
  if baseline is not None:
    router0, workdir0 = baseline
    if router0.model_names != router.model_names:
      raise router_lib.RouterError(f'the baseline router has models {router0.model_names}; '
                                   f'expected this router\'s {router.model_names}')
    pi0 = policy_on_log(router0, queries, lam, workdir0)[0]
    gain = offpolicy.dr_gain(pi, pi0, logged, propensity, reward, q_hat, bootstrap=bootstrap,
                             seed=seed)
    out['vs_init'] = {'gain': gain['value'], 'lower': gain['lower'],
                      'improves': bool(gain['lower'] > 0)}
  return out


def evaluate_feedback(workdir, files) -> tuple[dict, RoutingDataset]:
  """Reads the feedback logs `files` (paths, or one comma-separated string) for the router in
  `workdir` and evaluates its policy on them: (offpolicy_results, the logs' dataset)."""
  from entrorouter_jax import paths, router as router_lib
  from entrorouter_jax.data import readers
  from entrorouter_jax.data.dataset import DataError
  if isinstance(files, str):
    files = [f.strip() for f in files.split(',') if f.strip()]
  if not files:
    raise DataError('--feedback names no file; expected one or more feedback logs, '
                    'comma-separated')
  workdir = paths.as_path(workdir)
  router = router_lib.load_router(workdir)
  data = readers.read_feedback(files, models=router.model_names)
  return offpolicy_results(router, data, workdir), data


def feedback_summary(results: dict, notes=()) -> str:
  """A few human-readable lines on offpolicy.json's content."""
  lam = results['cost_weight']
  lam = f'lambda = {lam:g}' if lam is not None else 'each row\'s own lambda'
  interval = lambda e: f"{e['utility']:.4f} [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}]"
  log, dr = results['logging'], results['dr']
  lines = [*notes,
           f"off-policy evaluation on {results['rows']} judged feedback rows ({lam}):",
           f"  logging policy (realised): utility {log['utility']:.4f}, accuracy "
           f"{log['accuracy']:.4f}, cost {log['cost']:.4g}",
           f"  router (DR): utility {interval(dr)}, accuracy {dr['accuracy']:.4f}, "
           f"cost {dr['cost']:.4g}",
           f"  router (IPS): utility {interval(results['ips'])}; "
           f"(SNIPS): utility {interval(results['snips'])}",
           f"  improves on the logging policy: {'yes' if results['improves'] else 'no'} "
           f"(DR's lower 95% end {dr['ci95'][0]:.4f} vs {log['utility']:.4f})"]
  if 'vs_init' in results:
    v = results['vs_init']
    lines.append(f"  improves on the router it started from: {'yes' if v['improves'] else 'no'} "
                 f"(paired DR gain {v['gain']:+.4f}, one-sided 95% lower bound {v['lower']:+.4f})")
  return '\n'.join(lines)


def main(argv):
  from absl import flags
  from entrorouter_jax import logs, router as router_lib
  from entrorouter_jax.data.dataset import DataError
  logs.show_progress_logs()
  del argv
  FLAGS = flags.FLAGS
  from entrorouter_jax import paths
  workdir = paths.as_path(FLAGS.workdir)
  if FLAGS.feedback is not None:
    try:
      results, data = evaluate_feedback(workdir, FLAGS.feedback)
    except (router_lib.RouterError, DataError, FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    path = write_results(workdir, results, 'offpolicy.json')
    print(feedback_summary(results, data.notes))
    print(f'written: {path}')
    return
  try:
    results = evaluate_workdir(workdir, FLAGS.split)
  except (router_lib.RouterError, DataError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  results, _, _ = save_evaluation(workdir, results)
  print(summary(results))
  print(f"AIQ: router {results['aiq']:.4f}; " + ', '.join(
      f"{k} {v['aiq']:.4f}" for k, v in results['baselines'].items()
      if v.get('aiq') is not None and not k.startswith('single:')))
  print(f'report: {workdir / "eval" / "report.md"}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Workdir of a finished training run.', required=True)
  flags.DEFINE_string('split', 'test', 'Split to evaluate on.')
  flags.DEFINE_string('feedback', None, 'Feedback logs (comma-separated): evaluate the router '
                      'off-policy on them and write eval/offpolicy.json instead.')
  app.run(main)
