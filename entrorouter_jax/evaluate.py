"""Evaluation of a trained router on a split: DIR/eval/results.json.

`router_results` turns the policy's distribution over models on a split into
the numbers METHOD.md defines (accuracy, cost, retained accuracy, cost saved,
oracle, single models, routing shares, entropy; for data that knows the true
P(correct), the expected utility against the uniform and Bayes-optimal policies).
"""

from __future__ import annotations

import json
import pathlib

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


def write_results(workdir, results: dict) -> pathlib.Path:
  path = pathlib.Path(workdir) / 'eval' / 'results.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2) + '\n')
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
