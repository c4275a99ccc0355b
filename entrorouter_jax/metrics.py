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
