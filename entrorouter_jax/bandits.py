"""Contextual-bandit learners for the replay simulator (`online.py`, METHOD.md "Learning from
feedback"): each routes a round of queries, is told only the cell it chose, and redeploys.

The interface (`Learner`), shared by every method the simulator runs:
  Learner(num_models, cost_weight, seed=0, config=None)
      cost_weight = the stream's operating lambda (costs in c_hat = c / c_ref units);
      config = the recipe (learners that need it read it; the classic ones do not).
  update(logs)        learn from `Logs`: the seed labels and every row logged so far
                      (logs only grow, by appending rows: learners may warm-start)
  policy(feats)       the deployed distribution pi_b(m | x), float64[N, K]
  deploy(feats)       (choice int[N], propensity float64[N]) drawn from `policy` on the
                      learner's own seeded generator; propensity[i] = policy[i, choice[i]]
  estimates(feats)    (success float64[N, K], c_pred float64[N, K]): what the learner
                      believes, scored as a `baselines.ScoreRouter` cost/quality curve

The learners (`LEARNERS`), each with its one parameter fixed by a rule, the same on every
data set (never tuned per data set):
  greedy          the recipe-family success predictor (`baselines.fit_success_model`, MLP,
                  masked BCE on the observed cells) refitted on all logs each round; routes
                  by argmax s(x, m) - lambda c_hat(m), no exploration (propensity 1).
  epsilon_greedy  greedy's predictor; pi = (1 - eps) onehot(argmax) + eps / K, the deployed
                  router's own exploring mixture (`router.explore_distribution`);
                  EPSILON = 0.05.
  linucb          per model a ridge regression of the outcome on [x, 1] (A_m = I + sum x x^T,
                  b_m = sum x y, theta_m = A_m^-1 b_m); routes by argmax theta_m . x +
                  alpha sqrt(x^T A_m^-1 x) - lambda c_hat(m) (propensity 1); LINUCB_ALPHA = 1
                  (Li et al. 2010's default).
  thompson        linear-Gaussian Thompson sampling (Agrawal and Goyal 2013): the same A_m,
                  b_m; theta_m ~ N(A_m^-1 b_m, v^2 A_m^-1), so the sampled success of m on x is
                  N(mu_m . x, v^2 x^T A_m^-1 x); THOMPSON_V = 0.5, the sub-Gaussian scale of an
                  outcome in [0, 1]. Its policy is pi(m | x) = the share of THOMPSON_DRAWS
                  posterior draws in which m has the highest sampled s - lambda c_hat (draws
                  seeded by the learner's seed and update count), and the choice is drawn from
                  that pi: the logged propensity is exactly the probability the choice had.
  seed_only       greedy fitted on the seed labels alone, never updated.
  full_info       greedy's predictor on every cell of every query seen so far: the simulator
                  reveals whole rows to it (`full_information = True`); the upper bound, and
                  its routing of each round (fitted before the round) is the regret reference.
Costs: c_hat(m) = m's mean observed c_hat so far (seed labels and logged cells), for every
learner. A model with no observed cell is scored from its prior: success 0.5 (the predictor's
base rate) or the linear models' prior mean 0, and the mean cost of all observed cells.
"""

from __future__ import annotations

import dataclasses
import math
import numpy as np

from entrorouter_jax import baselines, metrics
from entrorouter_jax.router import draw, explore_distribution

EPSILON = 0.05
LINUCB_ALPHA = 1.0
THOMPSON_V = 0.5
THOMPSON_DRAWS = 512
RIDGE = 1.0                 # A_m = RIDGE * I + sum x x^T (the prior of both linear learners)


# ------------------------------------------------------------------ logs ---
@dataclasses.dataclass(frozen=True)
class Logs:
  """What a learner is told: the seed labels (every cell) and the logged stream rows (one
  cell each: the model the deployed policy chose), in arrival order.

  feats float32[N, D]; outcomes float64[N, K] (0 where not revealed); mask bool[N, K]
  (True = revealed); cost_hat float64[N, K] (c / c_ref; NaN where not revealed);
  logged int64[N] (the chosen model, -1 on a seed label); propensity float64[N]
  (pi_b(logged | x), NaN on a seed label).
  """
  feats: np.ndarray
  outcomes: np.ndarray
  mask: np.ndarray
  cost_hat: np.ndarray
  logged: np.ndarray
  propensity: np.ndarray

  @property
  def num_rows(self) -> int:
    return len(self.logged)

  def stream(self):
    """The logged rows as (feats, chosen model, outcome, cost_hat, propensity), each [n]."""
    rows = np.flatnonzero(self.logged >= 0)
    chosen = self.logged[rows]
    return (self.feats[rows], chosen, self.outcomes[rows, chosen], self.cost_hat[rows, chosen],
            self.propensity[rows])

  def mean_costs(self) -> np.ndarray:
    """float64[K]: each model's mean revealed c_hat (the mean over all revealed cells for a
    model with none)."""
    seen = ~np.isnan(self.cost_hat)
    total = np.where(seen, self.cost_hat, 0.0)
    overall = total.sum() / max(seen.sum(), 1)
    counts = seen.sum(axis=0)
    return np.where(counts > 0, total.sum(axis=0) / np.maximum(counts, 1), overall)


def labelled_logs(feats, outcomes, outcome_mask, cost_hat) -> Logs:
  """Logs of fully labelled rows (the seed labels): every cell revealed, logged = -1."""
  mask = np.asarray(outcome_mask, bool)
  n = len(mask)
  return Logs(np.asarray(feats, np.float32), np.where(mask, outcomes, 0.0).astype(np.float64),
              mask, np.asarray(cost_hat, np.float64).copy(), np.full(n, -1, np.int64),
              np.full(n, np.nan))


def append(logs: Logs, feats, outcomes, mask, cost_hat, logged, propensity) -> Logs:
  """`logs` with rows added at the end; outcomes are kept where `mask` is True, cost_hat as
  given (NaN where not revealed)."""
  mask = np.asarray(mask, bool)
  return Logs(np.concatenate([logs.feats, np.asarray(feats, np.float32)]),
              np.concatenate([logs.outcomes, np.where(mask, outcomes, 0.0)]),
              np.concatenate([logs.mask, mask]),
              np.concatenate([logs.cost_hat, np.asarray(cost_hat, np.float64)]),
              np.concatenate([logs.logged, np.asarray(logged, np.int64)]),
              np.concatenate([logs.propensity, np.asarray(propensity, np.float64)]))


# --------------------------------------------------------------- learners ---
class Learner:
  """The interface (module docstring). Subclasses define `update` and `estimates`; the
  default `policy` is deterministic: argmax of estimates' s - lambda c_pred
  (`baselines.route`'s tie rule)."""

  name = 'learner'
  full_information = False      # True: the simulator reveals whole rows (full_info only)

  def __init__(self, num_models: int, cost_weight: float, seed: int = 0, config=None):
    if num_models < 1:
      raise ValueError(f'{self.name}: num_models={num_models}; expected >= 1')
    if not (math.isfinite(cost_weight) and cost_weight >= 0):
      raise ValueError(f'{self.name}: cost_weight={cost_weight}; expected a number >= 0')
    self.num_models = int(num_models)
    self.cost_weight = float(cost_weight)
    self.seed = int(seed)
    self.config = config
    self.rng = np.random.default_rng([self.seed, 1])
    self.updates = 0

  def update(self, logs: Logs) -> None:
    raise NotImplementedError

  def estimates(self, feats) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def policy(self, feats) -> np.ndarray:
    s, c = self.estimates(feats)
    return _onehot(baselines.route(s, c, self.cost_weight), self.num_models)

  def deploy(self, feats) -> tuple[np.ndarray, np.ndarray]:
    dist = self.policy(feats)
    choice = draw(dist, self.rng)
    return choice, dist[np.arange(len(choice)), choice]


def _onehot(choice, k: int) -> np.ndarray:
  out = np.zeros((len(choice), k))
  out[np.arange(len(choice)), choice] = 1.0
  return out


class Greedy(Learner):
  """The success predictor on the observed cells, argmax s - lambda c_hat, no exploration."""

  name = 'greedy'
  fit_config = baselines.MLP

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.params = None
    self.costs = None
    self.fit = {}

  def _rows(self, logs: Logs) -> Logs:
    return logs

  def update(self, logs: Logs) -> None:
    logs = self._rows(logs)
    self.costs = logs.mean_costs()
    self.params, self.fit = baselines.fit_success_model(
        logs.feats, logs.outcomes, logs.mask, config=self.fit_config,
        seed=self.seed * 1000 + self.updates)
    self.updates += 1

  def estimates(self, feats):
    if self.params is None:
      raise RuntimeError(f'{self.name}: estimates before the first update')
    s = baselines.predict_success(self.params, feats).astype(np.float64)
    return s, np.broadcast_to(self.costs, s.shape).copy()


class SeedOnly(Greedy):
  """Greedy on the seed labels alone (the rows with logged = -1), fitted once."""

  name = 'seed_only'

  def update(self, logs: Logs) -> None:
    if self.params is None:
      seed = logs.logged < 0
      super().update(Logs(*(getattr(logs, f.name)[seed] for f in dataclasses.fields(Logs))))


class FullInfo(Greedy):
  """Greedy's predictor on every cell of every query seen so far (whole rows revealed)."""

  name = 'full_info'
  full_information = True


class EpsilonGreedy(Greedy):
  """Greedy's predictor, explored: (1 - EPSILON) onehot(argmax) + EPSILON / K."""

  name = 'epsilon_greedy'
  epsilon = EPSILON

  def policy(self, feats) -> np.ndarray:
    greedy = super().policy(feats)
    return explore_distribution(greedy, np.ones(self.num_models, bool), self.epsilon)


class _Linear(Learner):
  """Per-model ridge statistics on [x, 1], accumulated row by row as the logs grow:
  A_m = RIDGE I + sum x x^T, b_m = sum x y over the revealed cells of m."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.a = None
    self.b = None
    self.seen = 0
    self.costs = None

  def update(self, logs: Logs) -> None:
    x = _with_bias(logs.feats[self.seen:])
    if self.a is None:
      d = x.shape[1]
      self.a = np.repeat(RIDGE * np.eye(d)[None], self.num_models, axis=0)
      self.b = np.zeros((self.num_models, d))
    mask = logs.mask[self.seen:].astype(np.float64)
    y = logs.outcomes[self.seen:]
    for m in range(self.num_models):
      xm = x * mask[:, m:m + 1]
      self.a[m] += xm.T @ x
      self.b[m] += xm.T @ y[:, m]
    self.a_inv = np.linalg.inv(self.a)
    self.theta = np.einsum('kde,ke->kd', self.a_inv, self.b)
    self.costs = logs.mean_costs()
    self.seen = logs.num_rows
    self.updates += 1

  def mean_and_width(self, feats) -> tuple[np.ndarray, np.ndarray]:
    """(theta_m . x, sqrt(x^T A_m^-1 x)): float64[N, K] each."""
    if self.a is None:
      raise RuntimeError(f'{self.name}: estimates before the first update')
    x = _with_bias(feats)
    mean = x @ self.theta.T
    quad = np.einsum('nd,kde,ne->nk', x, self.a_inv, x, optimize=True)
    return mean, np.sqrt(np.maximum(quad, 0.0))

  def estimates(self, feats):
    mean, _ = self.mean_and_width(feats)
    return mean, np.broadcast_to(self.costs, mean.shape).copy()


def _with_bias(feats) -> np.ndarray:
  x = np.asarray(feats, np.float64)
  return np.concatenate([x, np.ones((len(x), 1))], axis=1)


class LinUCB(_Linear):
  """argmax theta_m . x + LINUCB_ALPHA sqrt(x^T A_m^-1 x) - lambda c_hat(m); propensity 1."""

  name = 'linucb'
  alpha = LINUCB_ALPHA

  def ucb(self, feats) -> np.ndarray:
    mean, width = self.mean_and_width(feats)
    return mean + self.alpha * width

  def policy(self, feats) -> np.ndarray:
    ucb = self.ucb(feats)
    return _onehot(baselines.route(ucb, np.broadcast_to(self.costs, ucb.shape),
                                   self.cost_weight), self.num_models)


class Thompson(_Linear):
  """Linear-Gaussian Thompson sampling; pi = the share of THOMPSON_DRAWS posterior draws in
  which each model is best (see the module docstring)."""

  name = 'thompson'
  v = THOMPSON_V
  draws = THOMPSON_DRAWS

  def policy(self, feats) -> np.ndarray:
    mean, width = self.mean_and_width(feats)
    utility = mean - self.cost_weight * self.costs[None, :]
    rng = np.random.default_rng([self.seed, 2, self.updates])
    n, k = mean.shape
    counts = np.zeros((n, k))
    chunk = max(1, 2 ** 20 // (self.draws * k))
    for start in range(0, n, chunk):
      rows = slice(start, start + chunk)
      z = utility[rows] + self.v * width[rows] * rng.standard_normal(
          (self.draws,) + utility[rows].shape)
      best = np.argmax(z, axis=2)                                  # [S, n]
      for m in range(k):
        counts[rows, m] = (best == m).sum(axis=0)
    return counts / self.draws


LEARNERS = {cls.name: cls for cls in (Greedy, EpsilonGreedy, LinUCB, Thompson, SeedOnly,
                                      FullInfo)}


def make_learner(name: str, num_models: int, cost_weight: float, seed: int = 0,
                 config=None) -> Learner:
  """A learner of LEARNERS by name; ValueError naming the known ones otherwise."""
  if name not in LEARNERS:
    raise ValueError(f'learner {name!r} is unknown; expected one of {sorted(LEARNERS)}')
  return LEARNERS[name](num_models, cost_weight, seed=seed, config=config)


# ---------------------------------------------------------- round schedule ---
def round_sizes(n: int, first: int = 20) -> list[int]:
  """The stream's rounds: first, 2 first, 4 first, ... logged queries, the last round what is
  left (so the sizes sum to n)."""
  if n < 0 or first < 1:
    raise ValueError(f'round_sizes(n={n}, first={first}): expected n >= 0 and first >= 1')
  sizes, size = [], first
  while n > 0:
    sizes.append(min(size, n))
    n -= sizes[-1]
    size *= 2
  return sizes


def operating_cost_weight(outcomes, outcome_mask, cost_hat) -> float:
  """The stream's lambda from the seed labels alone (the same rule on every data set): the
  slope of the seed labels' single-model hull (`metrics.convex_hull_curve` of each model's
  mean c_hat and mean outcome) at the middle of the single models' cost range, i.e. the
  lambda at which the best single model by y - lambda c_hat steps across that middle;
  0 where the hull ends at or before the middle (the most accurate model is that cheap).

  outcomes, cost_hat float[S, K], outcome_mask bool[S, K] (unobserved outcomes count 0).
  """
  y = np.where(outcome_mask, outcomes, 0.0)
  acc = y.mean(axis=0)
  cost = np.asarray(cost_hat, np.float64).mean(axis=0)
  mid = 0.5 * (cost.min() + cost.max())
  hull_c, hull_a = metrics.convex_hull_curve(cost, acc)
  right = np.flatnonzero(hull_c > mid)
  if right.size == 0 or right[0] == 0:
    return 0.0
  j = right[0]
  return float((hull_a[j] - hull_a[j - 1]) / (hull_c[j] - hull_c[j - 1]))
