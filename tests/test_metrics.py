"""Curve metrics of entrorouter_jax.metrics against hand-computed values."""

import math

import numpy as np
import pytest

from entrorouter_jax import metrics


# ------------------------------------------------------------------ hull ---
def test_hull_drops_dominated_and_below_points():
  costs = [3, 1, 2, 4, 5, 6, 1]
  accs = [0.6, 0.5, 0.4, 0.8, 0.8, 0.9, 0.3]
  # (1, .3): same cost as (1, .5), less accurate -> dropped.
  # (2, .4): below the cheaper (1, .5) -> non-monotone, dropped.
  # (5, .8): no better than the cheaper (4, .8) -> dropped.
  # (3, .6): the chord (1, .5)-(4, .8) is at .7 there -> below, dropped.
  # (4, .8) stays: chord (1, .5)-(6, .9) is at .5 + 3 * .08 = .74 < .8 there.
  hc, ha = metrics.convex_hull_curve(costs, accs)
  np.testing.assert_allclose(hc, [1, 4, 6])
  np.testing.assert_allclose(ha, [0.5, 0.8, 0.9])


def test_hull_drops_collinear_and_keeps_single_point():
  hc, ha = metrics.convex_hull_curve([0, 1, 2], [0.0, 0.5, 1.0])  # exact binary fractions
  np.testing.assert_array_equal(hc, [0, 2])
  np.testing.assert_array_equal(ha, [0.0, 1.0])
  hc, ha = metrics.convex_hull_curve([2.0], [0.3])
  np.testing.assert_array_equal(hc, [2.0])
  np.testing.assert_array_equal(ha, [0.3])
  # A decreasing set keeps only its cheapest point.
  hc, ha = metrics.convex_hull_curve([1, 2, 3], [0.9, 0.5, 0.1])
  np.testing.assert_array_equal(hc, [1])
  np.testing.assert_array_equal(ha, [0.9])


def test_hull_rejects_bad_input():
  with pytest.raises(ValueError):
    metrics.convex_hull_curve([], [])
  with pytest.raises(ValueError):
    metrics.convex_hull_curve([1, 2], [0.5])
  with pytest.raises(ValueError):
    metrics.convex_hull_curve([1, np.nan], [0.5, 0.6])


# ------------------------------------------------------------------- AIQ ---
def test_aiq_flat_line():
  # Hull = the single point (0, .7) (the dearer (1, .7) adds nothing): .7 everywhere.
  assert metrics.aiq([0, 1], [0.7, 0.7], (0, 2)) == pytest.approx(0.7)


def test_aiq_step():
  # 0 on [0, 1), .6 on [1, 4]: area 3 * .6 = 1.8, / 4 = .45.
  assert metrics.aiq([1], [0.6], (0, 4)) == pytest.approx(0.45)


def test_aiq_two_segments():
  # (0, .2)-(1, .6): area (.2 + .6) / 2 * 1 = .4; (1, .6)-(3, .8): (.6 + .8) / 2 * 2 = 1.4.
  # Total 1.8 over a range of 3 -> .6.
  assert metrics.aiq([0, 1, 3], [0.2, 0.6, 0.8], (0, 3)) == pytest.approx(0.6)


def test_aiq_zero_left_of_first_point_and_flat_right_of_last():
  # [0, 1]: 0 (no point that cheap); [1, 2]: (.4 + .8) / 2 = .6; [2, 4]: flat .8 -> 1.6.
  # (2.2) / 4 = .55.
  assert metrics.aiq([1, 2], [0.4, 0.8], (0, 4)) == pytest.approx(0.55)


def test_aiq_points_outside_range_shape_the_curve():
  # Hull (0, .2), (1, .6), (3, .8) clipped to [.5, 2]: values .4 at .5, .6 at 1, .7 at 2.
  # Area (.4 + .6) / 2 * .5 + (.6 + .7) / 2 * 1 = .25 + .65 = .9; / 1.5 = .6.
  assert metrics.aiq([0, 1, 3], [0.2, 0.6, 0.8], (0.5, 2)) == pytest.approx(0.6)
  # A point dearer than the whole range earns nothing.
  assert metrics.aiq([5], [0.9], (0, 4)) == 0.0
  # A point cheaper than the whole range earns its accuracy everywhere.
  assert metrics.aiq([0.1], [0.9], (1, 4)) == pytest.approx(0.9)


def test_aiq_degenerate_and_bad_range():
  assert metrics.aiq([0, 2], [0.2, 0.6], (1, 1)) == pytest.approx(0.4)
  assert metrics.aiq([2], [0.6], (1, 1)) == 0.0
  with pytest.raises(ValueError):
    metrics.aiq([1], [0.5], (2, 1))


def test_single_model_cost_range_and_curve_points():
  singles = {'a': {'accuracy': 0.5, 'cost': 2.0}, 'b': {'accuracy': 0.9, 'cost': 5.0},
             'c': {'accuracy': 0.6, 'cost': 1.0}}
  assert metrics.single_model_cost_range(singles) == (1.0, 5.0)
  outcomes = np.array([[1.0, 0.0], [0.0, 1.0]])
  mask = np.array([[True, True], [True, False]])
  costs = np.array([[1.0, 3.0], [2.0, 5.0]])
  points = metrics.curve_points([np.array([0, 0]), np.array([1, 1])], outcomes, mask, costs,
                                [0.0, 2.0], 'lambda')
  # Rule 2's second query is unobserved -> counts as a failure.
  assert points == [{'lambda': 0.0, 'accuracy': 0.5, 'cost': 1.5, 'shares': [1.0, 0.0]},
                    {'lambda': 2.0, 'accuracy': 0.0, 'cost': 4.0, 'shares': [0.0, 1.0]}]
  with pytest.raises(ValueError):
    metrics.curve_points([np.array([0, 0])], outcomes, mask, costs, [0.0, 1.0], 'lambda')


# ------------------------------------------------------------ thresholds ---
PROBS = np.array([[0.1, 0.6, 0.3],
                  [0.0, 0.2, 0.8],
                  [0.7, 0.1, 0.2]])
MODEL_COSTS = np.array([1.0, 2.0, 3.0])


def test_threshold_one_is_argmax():
  rules = metrics.threshold_choices(PROBS, MODEL_COSTS, [1.0])
  assert len(rules) == 2
  for rule in rules:
    np.testing.assert_array_equal(rule, np.argmax(PROBS, axis=1))


def test_threshold_sides_and_order():
  rules = metrics.threshold_choices(PROBS, MODEL_COSTS, [1.0, 0.01, 0.5])
  # Sorted thresholds .01, .5, 1: cheap side ascending, then dear side descending.
  # t = .01: row 0 all eligible; row 1 model 0 has no mass (0 < .008); row 2 all.
  # t = .5: row 0 p >= .3 -> {1, 2}; row 1 p >= .4 -> {2}; row 2 p >= .35 -> {0}.
  expected = [
      [0, 1, 0],  # cheap, t = .01: cheapest with nonzero mass
      [1, 2, 0],  # cheap, t = .5
      [1, 2, 0],  # cheap, t = 1 (argmax)
      [1, 2, 0],  # dear, t = 1 (argmax)
      [2, 2, 0],  # dear, t = .5
      [2, 2, 2],  # dear, t = .01
  ]
  assert len(rules) == 6
  for rule, exp in zip(rules, expected):
    np.testing.assert_array_equal(rule, exp)
  assert metrics.threshold_params([1.0, 0.01, 0.5]) == [0.01, 0.5, 1.0, 1.0, 1.5, 1.99]


def test_threshold_ties():
  # Equal costs: the higher probability wins; equal max probabilities at t = 1:
  # the cheapest / dearest of the tied models.
  rules = metrics.threshold_choices(np.array([[0.3, 0.5, 0.2]]), [1.0, 1.0, 3.0], [0.1])
  assert rules[0][0] == 1 and rules[1][0] == 2
  rules = metrics.threshold_choices(np.array([[0.4, 0.4, 0.2]]), [2.0, 1.0, 3.0], [1.0])
  assert rules[0][0] == 1 and rules[1][0] == 0
  with pytest.raises(ValueError):
    metrics.threshold_choices(PROBS, MODEL_COSTS, [0.0])
  with pytest.raises(ValueError):
    metrics.threshold_choices(PROBS, MODEL_COSTS[:2], [0.5])


# ------------------------------------------------------------- PGR etc. ---
def test_pgr():
  assert metrics.pgr(0.7, 0.5, 0.9) == pytest.approx(0.5)
  np.testing.assert_allclose(metrics.pgr(np.array([0.5, 0.9, 1.0]), 0.5, 0.9), [0, 1, 1.25])
  assert math.isnan(metrics.pgr(0.7, 0.5, 0.5))


def test_apgr_straight_line_and_early_saturation():
  shares = [0.25, 0.5, 0.75]
  accs = [0.6, 0.7, 0.8]  # weak .5, strong .9: PGR = share
  assert metrics.apgr(shares, accs, 0.5, 0.9) == pytest.approx(0.5)
  # No points at all: the endpoints' straight line.
  assert metrics.apgr([], [], 0.5, 0.9) == pytest.approx(0.5)
  # PGR 1 at share .5, then flat: .5 * .5 / 2 + .5 * 1 = .75.
  assert metrics.apgr([0.5], [0.9], 0.5, 0.9) == pytest.approx(0.75)


def test_pgr_curve_running_max():
  # PGR .6 at .2 and .3 at .4 (the latter lifted to .6).
  s, v = metrics.pgr_curve([0.4, 0.2], [0.62, 0.74], 0.5, 0.9)
  np.testing.assert_allclose(s, [0, 0.2, 0.4, 1])
  np.testing.assert_allclose(v, [0, 0.6, 0.6, 1])
  # Area: .2 * .6 / 2 = .06; .2 * .6 = .12; .6 * (.6 + 1) / 2 = .48 -> .66.
  assert metrics.apgr([0.4, 0.2], [0.62, 0.74], 0.5, 0.9) == pytest.approx(0.66)


def test_cpt():
  s, v = [0, 0.2, 0.4, 1], [0, 0.6, 0.6, 1]
  assert metrics.cpt(s, v, 0.0) == 0.0
  assert metrics.cpt(s, v, 0.3) == pytest.approx(0.1)   # halfway up the first segment
  assert metrics.cpt(s, v, 0.6) == pytest.approx(0.2)   # first share reaching .6
  assert metrics.cpt(s, v, 0.8) == pytest.approx(0.7)   # .4 + (.2 / .4) * .6
  assert metrics.cpt(s, v, 1.0) == pytest.approx(1.0)
  # Never reached.
  assert math.isnan(metrics.cpt([0.1, 0.5], [0.2, 0.4], 0.5))
  # Unsorted, non-monotone input is sorted and lifted first: (0, 0), (.2, .6), (.4, .6 <- .3).
  assert metrics.cpt([0.4, 0.0, 0.2], [0.3, 0.0, 0.6], 0.6) == pytest.approx(0.2)


# --------------------------------------------------------------- random ---
def test_random_at_matched_cost():
  singles = {'a': {'accuracy': 0.5, 'cost': 1.0}, 'b': {'accuracy': 0.6, 'cost': 2.0},
             'c': {'accuracy': 0.9, 'cost': 4.0}, 'd': {'accuracy': 0.8, 'cost': 5.0}}
  # Hull a-c (b is below the chord, .5 + .4 / 3 = .633 at cost 2; d is dominated).
  r = metrics.random_at_matched_cost(singles, 2.0)
  assert r['accuracy'] == pytest.approx(0.5 + 0.4 / 3) and r['cost'] == 2.0
  assert metrics.random_at_matched_cost(singles, 3.0)['accuracy'] == pytest.approx(0.5 + 0.8 / 3)
  low = metrics.random_at_matched_cost(singles, 0.5)
  assert low == {'accuracy': 0.5, 'cost': 1.0, 'matched_cost': 0.5}
  high = metrics.random_at_matched_cost(singles, 10.0)
  assert high == {'accuracy': 0.9, 'cost': 4.0, 'matched_cost': 10.0}


def test_best_retained_at_a_cost_saving_bar():
  strong = {'accuracy': 0.8, 'cost': 10.0}
  curve = [{'accuracy': 0.8, 'cost': 10.0},    # saves 0%
           {'accuracy': 0.78, 'cost': 6.0},    # saves 40%: below the bar
           {'accuracy': 0.76, 'cost': 5.0},    # saves 50%: 95% retained
           {'accuracy': 0.76, 'cost': 4.0},    # saves 60%: same accuracy, cheaper -> chosen
           {'accuracy': 0.60, 'cost': 1.0}]
  best = metrics.best_retained(curve, strong, 0.4825)
  assert best['retained_accuracy'] == pytest.approx(0.95)
  assert best['cost_saved'] == pytest.approx(0.6)
  assert metrics.best_retained(curve[:2], strong, 0.4825) is None


# ------------------------------------------------------------- bootstrap ---
def test_bootstrap_counts_are_draws_with_replacement():
  counts = metrics.bootstrap_counts(7, 50, seed=3)
  assert counts.shape == (50, 7)
  np.testing.assert_array_equal(counts.sum(axis=1), 7)       # n draws per replicate
  assert np.all(counts >= 0) and np.all(counts == np.round(counts))
  np.testing.assert_array_equal(counts, metrics.bootstrap_counts(7, 50, seed=3))
  assert not np.array_equal(counts, metrics.bootstrap_counts(7, 50, seed=4))


def test_chosen_tables_mask_missing_outcomes():
  y = np.array([[1.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
  mask = np.array([[True, True], [True, True], [False, True]])
  c = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  cy, cc = metrics.chosen_tables([np.array([0, 1, 0]), np.array([1, 1, 1])], y, mask, c)
  np.testing.assert_array_equal(cy, [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(cc, [[1.0, 4.0, 5.0], [2.0, 4.0, 6.0]])


def test_bootstrap_aiq_equals_aiq_of_each_resample():
  rng = np.random.default_rng(0)
  n, k = 40, 3
  y = (rng.random((n, k)) < [0.3, 0.6, 0.9]).astype(float)
  mask = np.ones((n, k), bool)
  c = rng.random((n, k)) * [1.0, 3.0, 9.0]
  curve = [rng.integers(0, k, n) for _ in range(5)]
  singles = [np.full(n, j) for j in range(k)]
  cy, cc = metrics.chosen_tables(curve, y, mask, c)
  sy, sc = metrics.chosen_tables(singles, y, mask, c)
  counts = metrics.bootstrap_counts(n, 20, seed=1)
  got = metrics.bootstrap_aiq(cy, cc, sy, sc, counts)
  draws = np.random.default_rng(1)
  for b in range(20):
    rows = draws.integers(0, n, n)                  # the same draws bootstrap_counts made
    np.testing.assert_array_equal(np.bincount(rows, minlength=n), counts[b])
    acc = [y[rows, ch[rows]].mean() for ch in curve]
    cost = [c[rows, ch[rows]].mean() for ch in curve]
    single_cost = c[rows].mean(axis=0)
    want = metrics.aiq(cost, acc, (single_cost.min(), single_cost.max()))
    assert got[b] == pytest.approx(want, rel=1e-6)


def test_interval_is_the_central_percentiles():
  values = np.arange(1001, dtype=float)
  assert metrics.interval(values) == pytest.approx([25.0, 975.0])
  assert metrics.interval(values, 0.5) == pytest.approx([250.0, 750.0])
