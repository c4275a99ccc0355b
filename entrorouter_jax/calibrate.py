"""Budget calibration: the cost weight that hits a budget on your own traffic.

  python -m entrorouter_jax.calibrate --workdir=DIR --queries=traffic.jsonl --target_cost=0.002
  python -m entrorouter_jax.calibrate --workdir=DIR --queries=traffic.jsonl --strong_share=0.2

The queries file is JSON lines ({"query": ...} or {"prompt": ...}), a sample
of the traffic the router will see. For each cost weight lambda on a grid
(a threshold for routers that lambda does not move), the router routes the
sample, and its expected accuracy and cost there are estimated from what it
knows of each query: the predicted success s(x, m) of the utility head (Stage
0's kNN estimate p_hat otherwise) and Stage 0's expected cost c_bar(x, m)
times c_ref (dollars per query, as in the training data). Of the settings
that meet the target (expected dollars per query at most --target_cost, or at
most --strong_share of the queries on the strongest model), the one with the
highest expected accuracy is kept. It is printed and stored in
DIR/calibration.json, which `route` and `serve` then use by default (an
explicit --cost_weight or --threshold still wins). --dry_run prints without
storing.

The estimates are the router's own; the realised accuracy and cost on live
traffic will differ where the traffic differs from the training data.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Optional

import numpy as np
from absl import app, flags

from entrorouter_jax import paths, route as route_lib, router as router_lib
from entrorouter_jax import workdir as workdir_lib
from entrorouter_jax.policy import is_utility

FLAGS = flags.FLAGS
GRID_POINTS = 200


def estimates(router: router_lib.Router, workdir, queries) -> tuple[np.ndarray, np.ndarray]:
  """(success, c_bar) float[N, K]: what the router expects of each model on each query."""
  if is_utility(router.config):
    return tuple(np.asarray(a, np.float64) for a in router.scores(queries))
  if router.stage0 is None:   # routing does not read Stage 0; its estimates do
    router.stage0 = workdir_lib.load_stage0(workdir)
  p_hat, c_bar = router.knn_table().estimates(router.features(queries))
  return np.asarray(p_hat, np.float64), np.asarray(c_bar, np.float64)


def settings_grid(router: router_lib.Router, success, c_bar) -> tuple[str, list[float]]:
  """('cost_weight', lambdas) for routers that lambda moves, else ('threshold', values)."""
  if router.moves_with_cost_weight:
    # Past this lambda every query goes to its cheapest model.
    gap_s = success.max(axis=1) - success.min(axis=1)
    gap_c = np.maximum(c_bar.max(axis=1) - c_bar.min(axis=1), 1e-12)
    top = float(max(np.max(gap_s / gap_c) * 1.05, 1e-6))
    grid = np.concatenate([[0.0], np.geomspace(top * 1e-4, top, GRID_POINTS - 1)])
    return 'cost_weight', [float(v) for v in grid]
  return 'threshold', [float(v) for v in np.linspace(1.0, 0.005, GRID_POINTS)]


def sweep(router: router_lib.Router, queries, success, c_bar) -> list[dict]:
  """One point per setting: {'cost_weight' | 'threshold', 'accuracy', 'cost_per_query',
  'strong_share', 'shares'} (expected, on these queries)."""
  knob, grid = settings_grid(router, success, c_bar)
  rows = np.arange(len(queries))
  probs_at_default = None
  points = []
  for value in grid:
    if knob == 'cost_weight' and is_utility(router.config):
      choice = np.argmax(success - value * c_bar, axis=1)
    elif knob == 'cost_weight':
      choice = np.argmax(router.probs(queries, value), axis=1)
    else:
      if probs_at_default is None:
        probs_at_default = router.probs(queries)
      choice, _ = router_lib.choose(probs_at_default, router.model_costs, threshold=value)
    shares = np.bincount(choice, minlength=len(router.model_names)) / len(choice)
    points.append({knob: value, 'accuracy': float(success[rows, choice].mean()),
                   'cost_per_query': float(c_bar[rows, choice].mean() * router.c_ref),
                   'strong_share': float(shares[router.strongest]),
                   'shares': {n: float(v) for n, v in zip(router.model_names, shares)}})
  return points


def pick(points: list[dict], target_cost: Optional[float] = None,
         strong_share: Optional[float] = None) -> dict:
  """The most accurate point meeting the target (ties: the cheaper one)."""
  if (target_cost is None) == (strong_share is None):
    raise router_lib.RouterError('give exactly one of --target_cost=USD_PER_QUERY and '
                                 '--strong_share=F')
  if target_cost is not None:
    if not np.isfinite(target_cost) or target_cost <= 0:
      raise router_lib.RouterError(f'--target_cost={target_cost}; expected dollars per query > 0')
    key, limit, flag, least_is = ('cost_per_query', target_cost, '--target_cost',
                                  'the cheapest it can reach is ${:.6g} per query')
  else:
    if not 0.0 <= strong_share <= 1.0:
      raise router_lib.RouterError(f'--strong_share={strong_share}; expected a fraction in [0, 1]')
    key, limit, flag, least_is = ('strong_share', strong_share, '--strong_share',
                                  'the least it sends to the strongest model is {:.4f}')
  ok = [p for p in points if p[key] <= limit]
  if not ok:
    least = least_is.format(min(p[key] for p in points))
    raise router_lib.RouterError(f'{flag}={limit:g} is below what this router can reach on '
                                 f'these queries ({least}); expected a target >= that')
  return max(ok, key=lambda p: (p['accuracy'], -p['cost_per_query']))


def calibrate(workdir, queries: list[str], target_cost: Optional[float] = None,
              strong_share: Optional[float] = None, source: str = '',
              store: bool = True) -> dict:
  """Picks and (with `store`) writes DIR/calibration.json; returns its content."""
  if not queries:
    raise router_lib.RouterError(f'{source or "the queries"}: no queries; expected a sample '
                                 'of traffic, one JSON line each')
  router = router_lib.load_router(workdir)
  success, c_bar = estimates(router, workdir, queries)
  points = sweep(router, queries, success, c_bar)
  best = pick(points, target_cost, strong_share)
  knob = 'cost_weight' if 'cost_weight' in best else 'threshold'
  strongest_only = {'accuracy': float(success[:, router.strongest].mean()),
                    'cost_per_query': float(c_bar[:, router.strongest].mean() * router.c_ref)}
  result = {
      knob: best[knob],
      'target': ({'cost_per_query': target_cost} if target_cost is not None
                 else {'strong_share': strong_share}),
      'expected': {k: best[k] for k in ('accuracy', 'cost_per_query', 'strong_share', 'shares')},
      'strongest_model': {'name': router.model_names[router.strongest], **strongest_only},
      'queries': {'file': source, 'count': len(queries)},
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  if store:
    workdir_lib.write_calibration(workdir, result)
  return result


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  from entrorouter_jax import logs
  logs.show_progress_logs()
  try:
    _, queries = route_lib.read_queries(paths.as_path(FLAGS.queries))
    result = calibrate(FLAGS.workdir, queries, FLAGS.target_cost, FLAGS.strong_share,
                       source=FLAGS.queries, store=not FLAGS.dry_run)
  except (router_lib.RouterError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  knob = 'cost_weight' if 'cost_weight' in result else 'threshold'
  e, s = result['expected'], result['strongest_model']
  print(f"calibrated {knob} = {result[knob]:.6g} on {result['queries']['count']} queries: "
        f"expected accuracy {e['accuracy']:.4f} at ${e['cost_per_query']:.6g} per query, "
        f"{e['strong_share']:.1%} on {s['name']} (that model alone: accuracy "
        f"{s['accuracy']:.4f} at ${s['cost_per_query']:.6g})", file=sys.stderr)
  if not FLAGS.dry_run:
    print(f'stored in {paths.as_path(FLAGS.workdir) / workdir_lib.CALIBRATION}; route and serve '
          'use it by default', file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of a finished training run.', required=True)
  flags.DEFINE_string('queries', None, 'JSON-lines sample of traffic ({"query": ...}).',
                      required=True)
  flags.DEFINE_float('target_cost', None, 'Expected dollars per query to stay within.')
  flags.DEFINE_float('strong_share', None, 'Largest share of queries on the strongest model.')
  flags.DEFINE_bool('dry_run', False, 'Print the calibration without storing it.')
  app.run(main)
