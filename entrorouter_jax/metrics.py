"""Routing metrics (METHOD.md, "Evaluation"). NumPy only, pure functions.

A routing rule is an integer array choice[N] of model indices; outcomes,
outcome_mask and costs are [N, K]. Missing outcomes count as failures (0):
an unobserved answer cannot be credited.
"""

from __future__ import annotations

import numpy as np


def _take(table, choice):
  return np.take_along_axis(table, choice[:, None], axis=1)[:, 0]


def route_accuracy_cost(choice, outcomes, outcome_mask, costs) -> dict:
  """accuracy = mean y(x, R(x)), cost = mean c(x, R(x))."""
  y = np.where(outcome_mask, outcomes, 0.0)
  return {'accuracy': float(np.mean(_take(y, choice))),
          'cost': float(np.mean(_take(costs, choice)))}


def single_models(outcomes, outcome_mask, costs, names) -> dict:
  """{name: {accuracy, cost}} for always routing to one model."""
  n = len(outcomes)
  return {name: route_accuracy_cost(np.full(n, j), outcomes, outcome_mask, costs)
          for j, name in enumerate(names)}


def oracle_choice(outcomes, outcome_mask, costs) -> np.ndarray:
  """The cheapest model with the highest outcome on each query."""
  y = np.where(outcome_mask, outcomes, -np.inf)
  best = np.max(y, axis=1, keepdims=True)
  cost = np.where(y == best, costs, np.inf)
  return np.argmin(cost, axis=1)


def relative(router: dict, strongest: dict) -> dict:
  """retained accuracy = acc(R) / acc(strongest); cost saved = 1 - cost(R) / cost(strongest)."""
  return {
      'retained_accuracy': router['accuracy'] / strongest['accuracy'] if strongest['accuracy'] else float('nan'),
      'cost_saved': 1.0 - router['cost'] / strongest['cost'] if strongest['cost'] else float('nan'),
  }


def best_retained(curve, strongest: dict, min_saved: float):
  """The point of `curve` ([{'accuracy', 'cost'}, ...]) keeping the most accuracy among
  those saving at least `min_saved` of the strongest model's cost (ties: the cheaper):
  {'retained_accuracy', 'cost_saved'}, or None when no point saves that much."""
  points = [relative(p, strongest) for p in curve]
  points = [p for p in points if p['cost_saved'] >= min_saved]
  if not points:
    return None
  return max(points, key=lambda p: (p['retained_accuracy'], p['cost_saved']))


def shares(choice, names) -> dict:
  counts = np.bincount(choice, minlength=len(names)) / max(len(choice), 1)
  return {name: float(c) for name, c in zip(names, counts)}


def expected_utility(policy, true_prob, cost_hat, cost_weight: float) -> float:
  """E_x sum_m pi(m|x) (P(correct|x, m) - lambda c_hat(x, m)) for a policy [N, K]."""
  return float(np.mean(np.sum(policy * (true_prob - cost_weight * cost_hat), axis=1)))


def utility_report(policy, true_prob, cost_hat, cost_weight: float) -> dict:
  """The router's expected utility against the uniform and Bayes-optimal policies.

  `fraction_of_optimal` = (router - uniform) / (bayes_optimal - uniform):
  0 is the uniform policy, 1 the Bayes-optimal one.
  """
  u = true_prob - cost_weight * cost_hat
  router = expected_utility(policy, true_prob, cost_hat, cost_weight)
  bayes = float(np.mean(np.max(u, axis=1)))
  uniform = float(np.mean(np.mean(u, axis=1)))
  return {'router': router, 'bayes_optimal': bayes, 'uniform': uniform,
          'fraction_of_optimal': (router - uniform) / (bayes - uniform)}


# ------------------------------------------------------- cost/quality curves ---
def convex_hull_curve(costs, accuracies) -> tuple[np.ndarray, np.ndarray]:
  """The non-decreasing upper convex hull of (cost, accuracy) points.

  costs, accuracies: float[P] (P >= 1), finite. Returns (hull_costs, hull_accs),
  float64[H] each, sorted by strictly increasing cost and strictly increasing
  accuracy. Steps:
    1. sort by cost; of several points at one cost keep the most accurate;
    2. keep only the points whose accuracy is strictly higher than that of
       every cheaper point (a dearer point that is no better is dominated);
    3. keep the upper concave hull of those: a point on or below the segment
       between its neighbours on the hull is dropped (collinear points add
       nothing to the curve).
  The cheapest (best among the cheapest) point always stays, as does the most
  accurate (cheapest among the most accurate) one.
  """
  c = np.asarray(costs, dtype=np.float64).reshape(-1)
  a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
  if c.shape != a.shape:
    raise ValueError(f'costs {c.shape} and accuracies {a.shape} must have the same length')
  if c.size == 0:
    raise ValueError('convex_hull_curve needs at least one point')
  if not (np.isfinite(c).all() and np.isfinite(a).all()):
    raise ValueError('costs and accuracies must be finite')
  order = np.lexsort((-a, c))  # by cost, then the most accurate first
  kept_c, kept_a = [], []
  for ci, ai in zip(c[order], a[order]):
    if kept_a and ai <= kept_a[-1]:
      continue  # no better than a cheaper (or equally cheap) point
    kept_c.append(ci)
    kept_a.append(ai)
  hull_c, hull_a = [], []
  for ci, ai in zip(kept_c, kept_a):
    # Pop the last hull point while it lies on or below the chord from the one
    # before it to the new point (a non-left turn of the upper chain).
    while len(hull_c) >= 2:
      c1, a1, c2, a2 = hull_c[-2], hull_a[-2], hull_c[-1], hull_a[-1]
      if (c2 - c1) * (ai - a1) - (a2 - a1) * (ci - c1) >= 0:
        hull_c.pop()
        hull_a.pop()
      else:
        break
    hull_c.append(ci)
    hull_a.append(ai)
  return np.array(hull_c), np.array(hull_a)


def _hull_value(hull_c, hull_a, cost, below):
  """The hull curve at `cost`: `below` left of its first point, linear between
  points, flat right of its last point."""
  if cost < hull_c[0]:
    return float(below)
  return float(np.interp(cost, hull_c, hull_a))


def aiq(costs, accuracies, cost_range) -> float:
  """RouterBench's Average Improvement in Quality of a set of (cost, accuracy) points.

  costs, accuracies: float[P]; cost_range = (c_lo, c_hi), the same for every
  router compared (see `single_model_cost_range`). The curve is the
  `convex_hull_curve` of all the points (points outside the range still shape
  it), linear between hull points, flat right of the last hull point, and 0
  left of the first one: a router that cannot reach a cost gets no credit
  there (our choice; RouterBench starts every curve in range). A single point
  is therefore a step 0 -> its accuracy at its cost.
  Returns the area under that curve over [c_lo, c_hi] divided by (c_hi - c_lo),
  i.e. the curve's mean accuracy over the range; with c_lo == c_hi, the curve's
  value at c_lo.
  """
  lo, hi = (float(v) for v in cost_range)
  if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
    raise ValueError(f'cost_range must be finite with c_lo <= c_hi, got {cost_range}')
  hull_c, hull_a = convex_hull_curve(costs, accuracies)
  if hi == lo:
    return _hull_value(hull_c, hull_a, lo, 0.0)
  # Breakpoints in the range; on every piece between two of them the curve is
  # linear (the jump at the first hull point is itself a breakpoint).
  xs = np.unique(np.concatenate([[lo, hi], hull_c[(hull_c > lo) & (hull_c < hi)]]))
  area = 0.0
  for x0, x1 in zip(xs[:-1], xs[1:]):
    if x1 <= hull_c[0]:
      continue  # left of the first point: 0
    y0, y1 = np.interp([x0, x1], hull_c, hull_a)  # x0 >= hull_c[0] here
    area += 0.5 * (y0 + y1) * (x1 - x0)
  return float(area / (hi - lo))


def single_model_cost_range(single_models: dict) -> tuple[float, float]:
  """(min, max) of the single models' mean costs: the AIQ cost range.

  single_models: {name: {'accuracy', 'cost'}} as returned by `single_models`.
  """
  if not single_models:
    raise ValueError('no single models')
  cost = [float(v['cost']) for v in single_models.values()]
  return min(cost), max(cost)


def curve_points(choices, outcomes, outcome_mask, costs, params, param_name: str) -> list[dict]:
  """One {param_name: value, 'accuracy', 'cost', 'shares'} per routing rule.

  choices: list of int[N] routing rules; params: list of the same length (the
  knob value, e.g. lambda or a threshold, of each rule); outcomes,
  outcome_mask, costs: [N, K]. Uses `route_accuracy_cost`. shares: list[K],
  the fraction of queries routed to each model (by model index).
  """
  if len(choices) != len(params):
    raise ValueError(f'{len(choices)} routing rules but {len(params)} parameter values')
  points = []
  for choice, value in zip(choices, params):
    point = {param_name: float(value)}
    point.update(route_accuracy_cost(np.asarray(choice), outcomes, outcome_mask, costs))
    point['shares'] = (np.bincount(choice, minlength=costs.shape[1]) / len(choice)).tolist()
    points.append(point)
  return points


def threshold_choices(probs, model_costs, thresholds) -> list[np.ndarray]:
  """Routing rules along a cost/quality knob for a policy that is not lambda-conditioned.

  probs float[N, K] (pi(m|x)); model_costs float[K] (e.g. each model's mean
  training cost); thresholds: values t in (0, 1]. For threshold t the models
  eligible for x are those with pi(m|x) >= t * max_m pi(m|x):
    cheap side: the cheapest eligible model (by model_costs),
    dear side:  the dearest eligible model.
  Ties in model_costs go to the higher pi(m|x), then the lower index. At
  t = 1 only the argmax is eligible, so both sides are argmax_m pi(m|x) (when
  several models share the maximal probability, the cheapest / dearest of them).
  As t -> 0 the cheap side tends to the cheapest model with nonzero mass and
  the dear side to the dearest.

  Returns 2T rules int[N] (T = len(thresholds)), in the order of a sweep from
  cheap to dear: the cheap side for t ascending (t_min ... 1), then the dear
  side for t descending (1 ... t_min). `threshold_params(thresholds)` gives
  the matching knob values (t, then 2 - t).
  """
  p = np.asarray(probs, dtype=np.float64)
  mc = np.asarray(model_costs, dtype=np.float64).reshape(-1)
  if p.ndim != 2 or mc.shape != (p.shape[1],):
    raise ValueError(f'probs {p.shape} must be [N, K] and model_costs {mc.shape} [K]')
  ts = np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1))
  if ts.size == 0 or not ((ts > 0) & (ts <= 1)).all():
    raise ValueError(f'thresholds must be non-empty and in (0, 1], got {thresholds}')
  num_models = p.shape[1]
  top = np.max(p, axis=1, keepdims=True)
  idx = np.arange(num_models)
  cheap, dear = [], []
  for t in ts:
    eligible = p >= t * top
    # Cheapest: minimise (cost, -pi, index); dearest: maximise (cost, pi, -index).
    key_c = np.where(eligible, mc[None, :], np.inf)
    best_c = key_c == key_c.min(axis=1, keepdims=True)
    pc = np.where(best_c, p, -np.inf)
    cheap.append(np.argmax(np.where(best_c & (pc == pc.max(axis=1, keepdims=True)),
                                    num_models - idx, 0), axis=1))
    key_d = np.where(eligible, mc[None, :], -np.inf)
    best_d = key_d == key_d.max(axis=1, keepdims=True)
    pd = np.where(best_d, p, -np.inf)
    dear.append(np.argmax(np.where(best_d & (pd == pd.max(axis=1, keepdims=True)),
                                   num_models - idx, 0), axis=1))
  return cheap + dear[::-1]


def threshold_params(thresholds) -> list[float]:
  """Knob values for the rules of `threshold_choices`, increasing from cheap to dear:
  t for the cheap side (t ascending), 2 - t for the dear side (t descending)."""
  ts = np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1))
  return [float(t) for t in ts] + [float(2.0 - t) for t in ts[::-1]]


# --------------------------------------------------- two-model (RouteLLM) ---
def pgr(acc, acc_weak, acc_strong):
  """Performance Gap Recovered = (acc - acc_weak) / (acc_strong - acc_weak).

  Scalars or arrays; nan where acc_strong == acc_weak.
  """
  gap = np.asarray(acc_strong, dtype=np.float64) - acc_weak
  num = np.asarray(acc, dtype=np.float64) - acc_weak
  with np.errstate(divide='ignore', invalid='ignore'):
    out = np.where(gap != 0, num / np.where(gap != 0, gap, 1.0), np.nan)
  return float(out) if out.ndim == 0 else out


def _running_max_curve(shares, values):
  s = np.asarray(shares, dtype=np.float64).reshape(-1)
  v = np.asarray(values, dtype=np.float64).reshape(-1)
  if s.shape != v.shape:
    raise ValueError(f'shares {s.shape} and PGR values {v.shape} must have the same length')
  order = np.lexsort((v, s))  # by share, then PGR ascending (a vertical jump)
  return s[order], np.maximum.accumulate(v[order]) if v.size else v


def pgr_curve(strong_shares, accuracies, acc_weak, acc_strong) -> tuple[np.ndarray, np.ndarray]:
  """PGR as a function of the share of calls to the strong model.

  strong_shares, accuracies: float[P], one operating point of a two-model
  router each. Returns (shares, pgr) float64[P + 2]: the points plus the
  endpoints (0, 0) (all weak) and (1, 1) (all strong), sorted by share, with
  PGR replaced by its running maximum. The share is read as a budget (at
  most this share of strong calls): a router may always use an operating
  point that spends fewer strong calls than allowed, so the best PGR within a
  budget never falls as the budget grows. This is RouteLLM's convention.
  """
  values = pgr(np.asarray(accuracies, dtype=np.float64), acc_weak, acc_strong)
  s = np.concatenate([[0.0], np.asarray(strong_shares, dtype=np.float64).reshape(-1), [1.0]])
  v = np.concatenate([[0.0], np.atleast_1d(values), [1.0]])
  return _running_max_curve(s, v)


def apgr(strong_shares, accuracies, acc_weak, acc_strong) -> float:
  """Average PGR: the area under `pgr_curve` over share in [0, 1] (trapezoid
  on its sorted points). 0.5 for a random router (the straight line from
  (0, 0) to (1, 1))."""
  s, v = pgr_curve(strong_shares, accuracies, acc_weak, acc_strong)
  inside = (s >= 0) & (s <= 1)
  return float(np.trapezoid(v[inside], s[inside]))


def cpt(shares, pgr_values, x: float) -> float:
  """Call-Performance Threshold: the strong-call share needed to reach PGR = x.

  shares, pgr_values: a PGR curve, e.g. from `pgr_curve` (sorted by share and
  made non-decreasing here in the same way if not already). The curve is
  linear between its points; the answer is the smallest share where it
  reaches x (np.interp on the segment that first crosses x), e.g. x = 0.2,
  0.5, 0.8. nan if the curve never reaches x.
  """
  s, v = _running_max_curve(shares, pgr_values)
  if v.size == 0 or not v.max() >= x:
    return float('nan')
  i = int(np.argmax(v >= x))  # the first point at or above x
  if i == 0:
    return float(s[0])
  return float(np.interp(x, v[i - 1:i + 1], s[i - 1:i + 1]))


# ------------------------------------------------------------- random router ---
def random_at_matched_cost(single_models: dict, cost: float) -> dict:
  """A random router mixing single models, at a given mean cost.

  single_models: {name: {'accuracy', 'cost'}} (see `single_models`). Mixing
  two models at random per query interpolates their accuracy and cost, so
  the best random router within a mean-cost budget is the single models'
  `convex_hull_curve` at that budget: flat right of its last point, and the
  cheapest model's accuracy if the budget is below the cheapest model.
  Returns {'accuracy', 'cost', 'matched_cost'}: 'cost' is the mixture's own
  mean cost (the budget clipped to the hull's cost span: a mixture cannot go
  below the cheapest model, nor gains by going past the last hull point);
  'matched_cost' is the budget asked for.
  """
  if not single_models:
    raise ValueError('no single models')
  hull_c, hull_a = convex_hull_curve([v['cost'] for v in single_models.values()],
                                     [v['accuracy'] for v in single_models.values()])
  cost = float(cost)
  return {'accuracy': _hull_value(hull_c, hull_a, cost, hull_a[0]),
          'cost': float(np.clip(cost, hull_c[0], hull_c[-1])),
          'matched_cost': cost}


# ------------------------------------------------------------- bootstrap ---
def bootstrap_counts(n: int, replicates: int, seed: int = 0) -> np.ndarray:
  """float32[replicates, n]: how often each of n test queries is drawn in each
  bootstrap replicate (n draws with replacement). The same matrix for every
  router compared makes the intervals paired."""
  rng = np.random.default_rng(seed)
  counts = np.zeros((replicates, n), np.float32)
  for b in range(replicates):
    counts[b] = np.bincount(rng.integers(0, n, n), minlength=n)
  return counts


def chosen_tables(choices, outcomes, outcome_mask, costs) -> tuple[np.ndarray, np.ndarray]:
  """Per curve point and query, the outcome (0 where missing) and the cost of the
  chosen model: float64[P, N] each, for P routing rules int[N]."""
  y = np.where(outcome_mask, outcomes, 0.0)
  take = lambda table: np.stack([_take(table, np.asarray(c)) for c in choices])
  return take(y), take(np.asarray(costs, np.float64))


def bootstrap_aiq(curve_y, curve_c, single_y, single_c, counts) -> np.ndarray:
  """AIQ of one router in each bootstrap replicate: float64[B].

  curve_y, curve_c float[P, N]: the router's curve points' per-query outcome and
  cost (`chosen_tables`); single_y, single_c float[K, N]: the same for each
  single model (they set each replicate's cost range); counts float[B, N]
  (`bootstrap_counts`). Each replicate's points are count-weighted means,
  scored by `aiq` over that replicate's single-model cost range.
  """
  n = counts.shape[1]
  acc, cost = counts @ curve_y.T / n, counts @ curve_c.T / n          # [B, P]
  s_cost = counts @ single_c.T / n                                     # [B, K]
  return np.array([aiq(cost[b], acc[b], (s_cost[b].min(), s_cost[b].max()))
                   for b in range(len(counts))])


def interval(values, level: float = 0.95) -> list[float]:
  """The central percentile interval of bootstrap values: [lo, hi]."""
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(np.asarray(values, np.float64), [tail, 100 - tail])
  return [float(lo), float(hi)]
