"""Baseline routers on the Stage-0 features (METHOD.md, "Evaluation": baselines).

All baselines see the same query representation as the Stage-0 anchor (the
`features.TfidfSpace` features of the training and evaluated splits), so
the comparison with the policy is about the router, not the features.

A score router holds, for every evaluated query x and model m of the pool (K
models), a predicted success score(x, m) and a predicted normalised cost
c_pred(x, m) (units of c_ref, c_hat = c / c_ref). For a cost weight lambda it
routes by maximising the predicted utility

    R_lambda(x) = argmax_m score(x, m) - lambda * c_pred(x, m)

(exact ties: the lower c_pred, then the lower index), and its cost/quality
curve is the sweep of lambda over `lambda_grid`: LAMBDA_GRID plus, where
needed, a tail of larger values up to twice the lambda past which every query
goes to its cheapest predicted model, so every curve runs from lambda = 0 to
"all to the cheapest".

  knn       score = p_hat, c_pred = c_bar (capability.knn_estimates on the
            evaluated split; no leave-one-out there).
  linear    score = sigmoid of a linear map of the features, one output per
            model: multi-label logistic regression on the training split.
  mlp       the same with one hidden layer of 256 GELU units.
  ensemble  score = the mean of knn's and mlp's scores, c_pred = c_bar (the
            neighbours' per-query cost, which routes better than the mean cost).
  task_best (a reference, like the oracle: it reads each query's task label)
            score = each model's mean training outcome on the query's task,
            c_pred = its mean training c_hat there.
For linear and mlp, c_pred(x, m) = m's mean c_hat over the training split, as
in RouterBench and RouteLLM.

Training of linear / mlp (JAX + optax, deterministic given the seed): binary
cross-entropy on the observed cells only (masked; outcomes may be fractional
in [0, 1]), AdamW, minibatches of ~256 rows reshuffled every epoch. 10% of
the training rows (a seeded random subset) are held out; after every epoch
the held-out BCE is measured, training stops after `patience` epochs without
improvement (or at `max_epochs`), and the parameters of the best epoch are
kept (no refit on the held-out rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from entrorouter_jax import metrics
from entrorouter_jax.data.dataset import RoutingDataset

# lambda in "accuracy points per strongest-model cost" (costs are c_hat = c / c_ref).
LAMBDA_GRID = (0.0,) + tuple(float(v) for v in np.geomspace(1e-3, 100.0, 40))
_TAIL_POINTS = 8


# ---------------------------------------------------------- score routers ---
def route(scores, c_pred, cost_weight: float) -> np.ndarray:
  """argmax_m scores - cost_weight * c_pred, per row: int[N].

  scores, c_pred: float[N, K]. Exact ties go to the lower c_pred, then to the
  lower model index.
  """
  s = np.asarray(scores, dtype=np.float64)
  c = np.asarray(c_pred, dtype=np.float64)
  u = s - float(cost_weight) * c
  best = u == u.max(axis=1, keepdims=True)
  return np.argmin(np.where(best, c, np.inf), axis=1)


def all_cheapest_lambda(scores, c_pred) -> float:
  """The lambda past which `route` sends every query to its cheapest predicted
  model (cheapest c_pred; among equally cheap ones the best scored): the
  largest (score(x, m) - score(x, m0)) / (c_pred(x, m) - c_pred(x, m0)) over
  queries x and dearer models m, 0 if none is positive."""
  s = np.asarray(scores, dtype=np.float64)
  c = np.asarray(c_pred, dtype=np.float64)
  cheap = np.min(c, axis=1, keepdims=True)
  s0 = np.max(np.where(c == cheap, s, -np.inf), axis=1, keepdims=True)
  dearer = c > cheap
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = np.where(dearer, (s - s0) / np.where(dearer, c - cheap, 1.0), 0.0)
  return float(max(0.0, ratio.max())) if ratio.size else 0.0


def lambda_grid(scores, c_pred, base=LAMBDA_GRID) -> list[float]:
  """Sorted lambdas for a curve: `base` (which should contain 0) plus, if its
  largest value does not yet send every query to its cheapest predicted
  model, geometrically spaced values up to 2 x `all_cheapest_lambda`."""
  grid = sorted(float(v) for v in base)
  top = all_cheapest_lambda(scores, c_pred)
  if top >= grid[-1]:
    start = max(grid[-1], 1e-3)
    grid += [float(v) for v in np.geomspace(start, 2.0 * top, _TAIL_POINTS + 1)[1:]]
  return grid


def spread_lambdas(scores, c_pred, outcomes, outcome_mask, cost_hat, num: int = 9) -> list[float]:
  """Lambdas at which routing by argmax scores - lambda c_pred costs evenly spaced
  amounts: for each of `num` costs evenly spaced from the cheapest to the dearest
  single model's mean cost_hat on these queries, the lambda of `lambda_grid`
  whose routing cost is closest; sorted, without repeats.

  scores, c_pred, outcomes, cost_hat float[N, K]; outcome_mask bool[N, K]. Used
  on the training split's kNN estimates (leave-one-out) to pick the lambdas the
  utility head trains on: AIQ weighs the cost range evenly, so should they.
  """
  grid = lambda_grid(scores, c_pred)
  costs = np.array([metrics.route_accuracy_cost(route(scores, c_pred, lam), outcomes,
                                                outcome_mask, cost_hat)['cost'] for lam in grid])
  single = np.asarray(cost_hat, np.float64).mean(axis=0)
  targets = np.linspace(single.min(), single.max(), num)
  return sorted({float(grid[int(np.argmin(np.abs(costs - t)))]) for t in targets})


@dataclasses.dataclass
class ScoreRouter:
  """A baseline: scores and c_pred float[N, K] on the evaluated queries.

  `fit` holds training details for learned routers ({'best_epoch',
  'epochs_run', 'heldout_bce'}), else {}.
  """
  name: str
  scores: np.ndarray
  c_pred: np.ndarray
  fit: dict = dataclasses.field(default_factory=dict)

  def choice(self, cost_weight: float) -> np.ndarray:
    return route(self.scores, self.c_pred, cost_weight)

  def lambdas(self, base=LAMBDA_GRID) -> list[float]:
    return lambda_grid(self.scores, self.c_pred, base)

  def choices(self, base=LAMBDA_GRID) -> tuple[list[float], list[np.ndarray]]:
    """(lambdas ascending, the routing choice int[N] at each): the curve's points."""
    grid = self.lambdas(base)
    return grid, [self.choice(lam) for lam in grid]

  def curve(self, outcomes, outcome_mask, costs, base=LAMBDA_GRID) -> list[dict]:
    """[{'lambda', 'accuracy', 'cost', 'shares'}] over `lambdas(base)`, lambda
    ascending; accuracy and cost measured with the given [N, K] tables;
    shares: list[K] of the fraction of queries routed to each model."""
    grid, choices = self.choices(base)
    return metrics.curve_points(choices, outcomes, outcome_mask, costs, grid, 'lambda')


def knn_router(p_hat, c_bar) -> ScoreRouter:
  """score = p_hat, c_pred = c_bar: Stage-0 kNN estimates float[N, K] on the
  evaluated split (not leave-one-out), c_bar in c_hat units."""
  return ScoreRouter('knn', np.asarray(p_hat, dtype=np.float64),
                     np.asarray(c_bar, dtype=np.float64))


# ------------------------------------------------ learned success models ---
@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Training of a success model (see the module docstring).

  hidden: width of the GELU hidden layer; 0 = linear (logistic regression).
  """
  hidden: int = 256
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  batch_size: int = 256
  max_epochs: int = 100
  patience: int = 5
  holdout: float = 0.1


LINEAR = FitConfig(hidden=0, learning_rate=3e-2, weight_decay=1e-4, max_epochs=200)
MLP = FitConfig(hidden=256, learning_rate=1e-3, weight_decay=1e-2)


def _init(key, dim: int, num_models: int, hidden: int, bias0):
  if hidden == 0:
    return {'w': jnp.zeros((dim, num_models), jnp.float32), 'b': bias0}
  k1, k2 = jax.random.split(key)
  return {
      'w1': jax.random.normal(k1, (dim, hidden), jnp.float32) / math.sqrt(dim),
      'b1': jnp.zeros((hidden,), jnp.float32),
      'w2': jax.random.normal(k2, (hidden, num_models), jnp.float32) * (0.1 / math.sqrt(hidden)),
      'b2': bias0,
  }


def _logits(params, x):
  if 'w' in params:
    return x @ params['w'] + params['b']
  h = jax.nn.gelu(x @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


def _bce(params, x, y, m):
  """BCE over the observed cells, weighted by m (1.0 or a cell weight where observed, 0.0
  missing): sum(m * bce) / sum(m) (0 where nothing is observed)."""
  cell = optax.sigmoid_binary_cross_entropy(_logits(params, x), y)
  return jnp.sum(jnp.where(m > 0, cell * m, 0.0)) / jnp.maximum(jnp.sum(m), 1e-9)


@functools.partial(jax.jit, static_argnames=('tx',))
def _epoch(params, opt_state, x, y, m, batches, tx):
  """One pass over batches int[B, b] of row indices."""
  grad_fn = jax.value_and_grad(_bce)

  def step(carry, rows):
    params, opt_state = carry
    _, grads = grad_fn(params, x[rows], y[rows], m[rows])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
  return params, opt_state


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, weight_decay: float):
  # Cached: the same transformation object lets `_epoch` reuse its compilation.
  return optax.adamw(learning_rate, weight_decay=weight_decay)


_eval_bce = jax.jit(_bce)
_predict = jax.jit(lambda params, x: jax.nn.sigmoid(_logits(params, x)))


def fit_success_model(feats, outcomes, outcome_mask, *, config: FitConfig = MLP,
                      seed: int = 0, cell_weights=None) -> tuple[dict, dict]:
  """Trains P(success | x, m) on float[N, D] features and [N, K] outcomes/mask.

  cell_weights float[N, K] (> 0 where observed; default 1): each observed cell's weight in
  the BCE, the held-out one included (e.g. inverse propensities on logged feedback).

  Returns (params, info): params a pytree for `predict_success`; info =
  {'best_epoch', 'epochs_run', 'heldout_bce'} (best_epoch counts from 1; 0
  means the initial parameters, i.e. per-model base rates for the linear
  model, were never beaten).
  """
  x = np.asarray(feats, dtype=np.float32)
  y = np.asarray(outcomes, dtype=np.float32)
  mask = np.asarray(outcome_mask, dtype=bool)
  n, num_models = y.shape
  if x.ndim != 2 or len(x) != n or mask.shape != y.shape:
    raise ValueError(f'feats {x.shape}, outcomes {y.shape}, outcome_mask {mask.shape}: '
                     'expected [N, D] and [N, K]')
  if n < 2:
    raise ValueError(f'need at least 2 training rows, got {n}')
  y = np.where(mask, y, 0.0).astype(np.float32)  # missing cells: any finite value
  m = mask.astype(np.float32)
  if cell_weights is not None:
    w = np.asarray(cell_weights, np.float64)
    if w.shape != mask.shape or not np.all(np.isfinite(w[mask]) & (w[mask] > 0)):
      raise ValueError(f'cell_weights {w.shape}: expected {mask.shape}, finite and > 0 on '
                       'every observed cell')
    m = np.where(mask, w, 0.0).astype(np.float32)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  n_hold = min(max(1, int(round(config.holdout * n))), n - 1)
  hold, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
  x_fit, y_fit, m_fit = jnp.asarray(x[fit]), jnp.asarray(y[fit]), jnp.asarray(m[fit])
  x_hold, y_hold, m_hold = jnp.asarray(x[hold]), jnp.asarray(y[hold]), jnp.asarray(m[hold])

  # Output bias at each model's observed base rate (0.5 if never observed).
  counts = m[fit].sum(axis=0)
  rate = np.where(counts > 0, (y[fit] * m[fit]).sum(axis=0) / np.where(counts > 0, counts, 1),
                  0.5)
  rate = np.clip(rate, 1e-3, 1 - 1e-3)
  bias0 = jnp.asarray(np.log(rate / (1 - rate)), jnp.float32)
  params = _init(jax.random.key(seed), x.shape[1], num_models, config.hidden, bias0)
  tx = _optimizer(config.learning_rate, config.weight_decay)
  opt_state = tx.init(params)

  n_fit = len(fit)
  num_batches = max(1, -(-n_fit // config.batch_size))
  batch = n_fit // num_batches  # < num_batches rows left out of each epoch
  best = (float(_eval_bce(params, x_hold, y_hold, m_hold)), 0, params)
  epoch, waited = 0, 0
  for epoch in range(1, config.max_epochs + 1):
    rows = rng.permutation(n_fit)[:num_batches * batch].reshape(num_batches, batch)
    params, opt_state = _epoch(params, opt_state, x_fit, y_fit, m_fit, jnp.asarray(rows), tx)
    loss = float(_eval_bce(params, x_hold, y_hold, m_hold))
    if loss < best[0]:
      best, waited = (loss, epoch, params), 0
    else:
      waited += 1
      if waited >= config.patience:
        break
  return best[2], {'best_epoch': best[1], 'epochs_run': epoch, 'heldout_bce': best[0]}


def predict_success(params, feats) -> np.ndarray:
  """P(success | x, m): float32[N, K] for float[N, D] features."""
  return np.asarray(_predict(params, jnp.asarray(np.asarray(feats, dtype=np.float32))))


def _learned_router(name, config, train_feats, train_outcomes, train_mask, train_cost_hat,
                    test_feats, seed):
  params, info = fit_success_model(train_feats, train_outcomes, train_mask, config=config,
                                   seed=seed)
  scores = predict_success(params, test_feats).astype(np.float64)
  c_mean = np.asarray(train_cost_hat, dtype=np.float64).mean(axis=0)
  return ScoreRouter(name, scores, np.broadcast_to(c_mean, scores.shape).copy(), info)


def linear_router(train_feats, train_outcomes, train_mask, train_cost_hat, test_feats, *,
                  seed: int = 0, config: FitConfig = LINEAR) -> ScoreRouter:
  """Multi-label logistic regression on the training split; c_pred = each
  model's mean training c_hat. train_* are [N, D] / [N, K]; test_feats [Nq, D]."""
  return _learned_router('linear', config, train_feats, train_outcomes, train_mask,
                         train_cost_hat, test_feats, seed)


def mlp_router(train_feats, train_outcomes, train_mask, train_cost_hat, test_feats, *,
               seed: int = 0, config: FitConfig = MLP) -> ScoreRouter:
  """As `linear_router` with one hidden layer of 256 GELU units."""
  return _learned_router('mlp', config, train_feats, train_outcomes, train_mask,
                         train_cost_hat, test_feats, seed)


def ensemble_router(knn: ScoreRouter, mlp: ScoreRouter) -> ScoreRouter:
  """score = mean of the kNN and MLP success estimates, c_pred = the kNN's c_bar."""
  return ScoreRouter('ensemble', (knn.scores + mlp.scores) / 2.0, knn.c_pred)


def task_best_router(train: RoutingDataset, test: RoutingDataset, c_ref: float):
  """The reference that reads task labels: on each test query, every model's mean
  training outcome and mean c_hat on that query's task (the global means for a
  task absent from training). None when the training split has no task labels."""
  train_tasks = np.asarray(train.tasks.tolist(), dtype=object)
  if not any(t for t in train_tasks):
    return None
  y = np.where(train.outcome_mask, train.outcomes, 0.0)
  m = train.outcome_mask.astype(np.float64)
  c = np.asarray(train.costs, np.float64) / float(c_ref)
  glob_s = y.sum(0) / np.maximum(m.sum(0), 1)
  glob_c = c.mean(0)
  scores = np.broadcast_to(glob_s, test.outcomes.shape).copy()
  c_pred = np.broadcast_to(glob_c, test.outcomes.shape).copy()
  test_tasks = np.asarray(test.tasks.tolist(), dtype=object)
  for task in set(train_tasks.tolist()) - {''}:
    rows, q = train_tasks == task, test_tasks == task
    if q.any():
      counts = m[rows].sum(0)
      scores[q] = np.where(counts > 0, y[rows].sum(0) / np.maximum(counts, 1), glob_s)
      c_pred[q] = c[rows].mean(0)
  return ScoreRouter('task_best', scores, c_pred)


def oracle_router(data: RoutingDataset, c_ref: float) -> ScoreRouter:
  """The reference that reads the outcomes: score = the observed outcome (-1
  where unobserved, so never preferred), c_pred = the true c_hat. At lambda = 0
  it routes each query to the cheapest model with the highest outcome (METHOD.md's
  oracle); larger lambdas trace its cost/quality curve down to all-cheapest."""
  scores = np.where(data.outcome_mask, np.asarray(data.outcomes, np.float64), -1.0)
  return ScoreRouter('oracle', scores, np.asarray(data.costs, np.float64) / float(c_ref))


def score_routers(train: RoutingDataset, train_feats, test_feats, test_p_hat, test_c_bar,
                  c_ref: float, *, seed: int = 0, suffix: str = '') -> list[ScoreRouter]:
  """knn, linear, mlp and ensemble on one feature space (names + `suffix`)."""
  train_cost_hat = np.asarray(train.costs, dtype=np.float64) / float(c_ref)
  knn = knn_router(test_p_hat, test_c_bar)
  fit = (train_feats, train.outcomes, train.outcome_mask, train_cost_hat, test_feats)
  lin = linear_router(*fit, seed=seed)
  mlp = mlp_router(*fit, seed=seed)
  routers = [knn, lin, mlp, ensemble_router(knn, mlp)]
  for r in routers:
    r.name += suffix
  return routers


def score_entry(router: ScoreRouter, data: RoutingDataset, cost_weight: float,
                cost_range) -> dict:
  """{'accuracy', 'cost' (at cost_weight), 'aiq', 'curve'} (+ 'fit') of a router on `data`."""
  y, mask, costs = data.outcomes, data.outcome_mask, data.costs
  entry = metrics.route_accuracy_cost(router.choice(cost_weight), y, mask, costs)
  curve = router.curve(y, mask, costs)
  entry['aiq'] = metrics.aiq([p['cost'] for p in curve], [p['accuracy'] for p in curve],
                             cost_range)
  entry['curve'] = curve
  if router.fit:
    entry['fit'] = dict(router.fit)
  return entry


# -------------------------------------------------------------- the table ---
def evaluate_baselines(train: RoutingDataset, test: RoutingDataset, train_feats, test_feats,
                       test_p_hat, test_c_bar, c_ref: float, cost_weight: float,
                       router_cost: float, *, seed: int = 0, extra=()) -> dict:
  """Every baseline on the `test` split.

  train_feats float[N, D], test_feats float[Nq, D]: the Stage-0 features
  (TfidfSpace) of the two splits; test_p_hat, test_c_bar float[Nq, K]: the
  Stage-0 kNN estimates on the test split (c_bar in c_hat units); c_ref: the
  cost unit (c_hat = c / c_ref, training split's strongest model);
  cost_weight: the lambda of the reported operating point; router_cost: the
  mean cost (dollars) the random router is matched to (e.g. the evaluated
  router's cost on this split).

  Returns {name: entry}; costs in dollars, AIQs over
  `metrics.single_model_cost_range` of the test split's single models:
    'knn', 'linear', 'mlp', 'ensemble' (and 'task_best' where the data has
        tasks, and every ScoreRouter in `extra`): {'accuracy', 'cost' (at
        cost_weight), 'aiq', 'curve': [{'lambda', 'accuracy', 'cost', 'shares'},
        ...] (lambda ascending; shares = list[K] of routing fractions by model
        index)}; linear/mlp also 'fit' (see `fit_success_model`);
    'random': `metrics.random_at_matched_cost` at router_cost ({'accuracy',
        'cost', 'matched_cost'}), 'aiq' and 'curve' = the single models'
        convex hull points [{'model', 'accuracy', 'cost'}];
    'oracle': {'accuracy', 'cost' (its lambda = 0 point: the cheapest model
        with the highest outcome), 'aiq', 'curve'} (`oracle_router`);
    'single:<name>': {'accuracy', 'cost', 'aiq'} for every model.
  """
  if train.model_names != test.model_names:
    raise ValueError(f'train models {train.model_names} != test models {test.model_names}')
  names = test.model_names
  y, mask, costs = test.outcomes, test.outcome_mask, test.costs
  singles = metrics.single_models(y, mask, costs, names)
  cost_range = metrics.single_model_cost_range(singles)
  routers = score_routers(train, train_feats, test_feats, test_p_hat, test_c_bar, c_ref,
                          seed=seed) + list(extra)
  task_best = task_best_router(train, test, c_ref)
  if task_best is not None:
    routers.append(task_best)
  out = {r.name: score_entry(r, test, cost_weight, cost_range) for r in routers}

  single_c = [singles[n]['cost'] for n in names]
  single_a = [singles[n]['accuracy'] for n in names]
  hull_c, hull_a = metrics.convex_hull_curve(single_c, single_a)
  hull = []
  for c, a in zip(hull_c, hull_a):
    # The model at this hull point (several at one point: the first in pool order).
    j = next(j for j in range(len(names)) if single_c[j] == c and single_a[j] == a)
    hull.append({'model': names[j], 'accuracy': float(a), 'cost': float(c)})
  random = metrics.random_at_matched_cost(singles, router_cost)
  random['aiq'] = metrics.aiq(single_c, single_a, cost_range)
  random['curve'] = hull
  out['random'] = random

  out['oracle'] = score_entry(oracle_router(test, c_ref), test, 0.0, cost_range)
  for n in names:
    entry = dict(singles[n])
    entry['aiq'] = metrics.aiq([entry['cost']], [entry['accuracy']], cost_range)
    out[f'single:{n}'] = entry
  return out
