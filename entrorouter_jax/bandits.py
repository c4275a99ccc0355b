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
  entrorouter     the recipe's learning-from-feedback stage run online (`EntroRouterLearner`):
                  a success head s(x, m) and the utility-head policy
                  pi = softmax((s - lambda c_hat) / T), T learned, trained each round on the
                  weighted success loss plus the doubly robust surrogate with the KL trust
                  region around the policy that logged each row and the entropy floor;
                  deployed as (1 - eps) pi + eps / K, ENTRO_EXPLORE = 0.02.
  entrorouter_no_anchor   the same with beta = 0 (no KL to the logging policy).
  entrorouter_no_entropy  the same with no entropy control, no floor and no exploration
                  (alpha = 0, eps = 0).
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
ENTRO_EXPLORE = 0.02        # entrorouter's deployed eps (config rl.explore overrides it)
ENTRO_BATCH = 128           # rows per optax step (sampled with replacement, fixed shape)
ENTRO_LR = 1e-3             # Adam's learning rate of entrorouter's network
ENTRO_STEPS = (50, 400)     # steps per update: 50 + logged rows / 4, capped at 400
ENTRO_HIDDEN = 64           # hidden width without a config (config: model.hidden)


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


# ---------------------------------------------------------- entrorouter ---
_RL_DEFAULTS = dict(clip_eps=0.2, w_max=20.0, entropy_floor=0.1, beta_start=0.1, beta_end=0.01,
                    entropy_min=0.1, entropy_lr=0.5, num_steps=600, dense_weight=1.0,
                    entropy_schedule='linear', alpha_init=0.0)
_LOG_FLOOR = 1e-30          # log pi_b of a cell the deployed policy gave (numerically) no mass


def _build_net(dim: int, hidden: int, k: int, temperature: float, seed: int):
  """An NNX MLP [D] -> hidden (ReLU) -> [K] success logits, with a learned log T."""
  import jax.numpy as jnp
  from flax import nnx

  class UtilityMLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
      self.out = nnx.Linear(hidden, k, rngs=rngs)
      self.log_temperature = nnx.Param(jnp.asarray(math.log(temperature), jnp.float32))

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

    def temperature(self):
      return jnp.exp(self.log_temperature[...])

  return UtilityMLP(nnx.Rngs(params=seed))


class EntroRouterLearner(Learner):
  """The recipe's learning from feedback (METHOD.md; `steps.offpolicy_update`) as an online
  learner on the simulator's frozen features.

  Network: a small Flax NNX MLP (one member, hidden width config.model.hidden, ENTRO_HIDDEN
  without a config) giving the success logits f(x, m), s = sigmoid(f), and the utility-head
  policy pi = softmax((s - lambda c_hat) / T) at the stream's lambda, T learned (from
  config.model.temperature); c_hat(m) = the mean observed cost (`Logs.mean_costs`). It takes
  the recipe's loss functions, not the recipe's `RouterModel` (whose member folds and Stage-0
  tables the simulator has no use for).
  update(logs): 50 + (logged rows) / 4 Adam steps (capped at 400; ENTRO_STEPS), warm-started
  from the previous round's parameters and optimiser; each step draws ENTRO_BATCH rows of all
  rows (seed labels with propensity 1 on every cell, logged rows on their cell) for
  `objectives.weighted_success_loss` (weights min(1 / p, rl.w_max), times rl.dense_weight) and
  ENTRO_BATCH logged rows for `objectives.offpolicy_loss` (ratio clipped at 1 +- rl.clip_eps,
  KL to log pi_b = the distribution deployed when the row was logged, beta from the
  rl.beta_start -> rl.beta_end schedule over rl.num_steps steps counted across rounds), then
  alpha by `schedules.dual_ascent` toward `schedules.entropy_target_with_floor` (H_0 the
  policy's entropy at its first policy step, never below rl.entropy_floor). Shapes never
  change, so the step is compiled once per learner.
  policy(feats): (1 - eps) pi + eps / K (`router.explore_distribution`, as `Router.sample`),
  eps = config rl.explore if set, else ENTRO_EXPLORE.
  """

  name = 'entrorouter'
  anchor = True               # False: beta = 0
  entropy_control = True      # False: alpha = 0, no floor, eps = 0

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    rl = self.config.get('rl', {}) if self.config is not None else {}
    self.rl = {key: rl.get(key, default) for key, default in _RL_DEFAULTS.items()}
    model_cfg = self.config.get('model', {}) if self.config is not None else {}
    self.hidden = int(model_cfg.get('hidden', ENTRO_HIDDEN) or ENTRO_HIDDEN)
    self.temperature0 = float(model_cfg.get('temperature', 0.1))
    self.epsilon = float(rl.get('explore', ENTRO_EXPLORE)) if self.entropy_control else 0.0
    if not 0.0 <= self.epsilon < 1.0:
      raise ValueError(f'{self.name}: rl.explore={self.epsilon}; expected a share in [0, 1)')
    self.alpha = float(self.rl['alpha_init']) if self.entropy_control else 0.0
    self.h0 = None
    self.step = 0
    self.built = False
    self.costs = None
    self.behaviour = np.zeros((0, self.num_models))    # log pi_b per logged row, in order
    self.pending = None                                 # the last deployed distribution
    self.seen = 0
    self.batch_rng = np.random.default_rng([self.seed, 3])
    self.history = []                                   # per update: its last step's metrics

  # ---- the jitted step ---------------------------------------------------
  def _init(self, dim: int) -> None:
    import jax
    import optax
    from flax import nnx
    from entrorouter_jax import objectives

    self.dim = dim
    model = _build_net(dim, self.hidden, self.num_models, self.temperature0, self.seed)
    optimizer = nnx.Optimizer(model, optax.adam(ENTRO_LR), wrt=nnx.Param)
    self.graphdef, self.state = nnx.split((model, optimizer))
    lam = np.float32(self.cost_weight)
    rl = self.rl

    def loss_fn(m, batch, beta, alpha, policy_on):
      f_all = m(batch['x_all'])
      success, _ = objectives.weighted_success_loss(
          f_all, batch['y_all'], batch['mask_all'], batch['p_all'], rl['w_max'])
      f = m(batch['x'])
      logits = (jax.nn.sigmoid(f) - lam * batch['c_bar']) / m.temperature()
      cost_weight = jax.numpy.full((f.shape[0],), lam)
      pg, metrics = objectives.offpolicy_loss(
          logits, f, batch, cost_weight, log_behaviour=batch['log_behaviour'], beta=beta,
          alpha=alpha, clip_eps=rl['clip_eps'])
      loss = rl['dense_weight'] * success + policy_on * pg
      metrics.update(loss=loss, success_loss=success, policy_loss=pg)
      return loss, metrics

    def step(state, batch, beta, alpha, policy_on):
      model, optimizer = nnx.merge(self.graphdef, state)
      (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
          model, batch, beta, alpha, policy_on)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), metrics

    def forward(state, x):
      model, _ = nnx.merge(self.graphdef, state)
      return jax.nn.sigmoid(model(x)), model.temperature()

    self._step = jax.jit(step)
    self._forward = jax.jit(forward)
    self._loss = jax.jit(lambda state, batch, beta, alpha, on: loss_fn(
        nnx.merge(self.graphdef, state)[0], batch, beta, alpha, on))

  def num_steps(self, logs: Logs) -> int:
    """Optax steps of one update: 50 + logged rows / 4, capped at 400 (ENTRO_STEPS)."""
    low, high = ENTRO_STEPS
    return int(min(high, low + int(np.sum(logs.logged >= 0)) // 4))

  def _record_behaviour(self, logs: Logs) -> None:
    """Appends log pi_b of the rows logged since the last update (the deployed distribution)."""
    new = logs.logged[self.seen:]
    k = self.num_models
    rows = np.full((len(new), k), math.log(1.0 / k))
    stream = np.flatnonzero(new >= 0)
    if stream.size:
      if self.pending is None or len(self.pending) != stream.size:
        got = None if self.pending is None else len(self.pending)
        raise RuntimeError(f'{self.name}: {stream.size} new logged rows but the last deploy '
                           f'routed {got}; expected one deploy per logged round')
      rows[stream] = np.log(np.maximum(self.pending, _LOG_FLOOR))
      self.pending = None
    self.behaviour = np.concatenate([self.behaviour, rows])
    self.seen = logs.num_rows

  def batch(self, logs: Logs, all_rows, stream_rows) -> dict:
    """One step's inputs (numpy, fixed shapes): ENTRO_BATCH of `all_rows` for the success
    loss and of `stream_rows` (all rows where none is logged yet) for the policy loss."""
    k = self.num_models
    prop = np.where(logs.logged >= 0, logs.propensity, 1.0)
    logged = np.maximum(logs.logged, 0)
    cost = np.nan_to_num(logs.cost_hat, nan=0.0)
    a = all_rows[self.batch_rng.integers(0, len(all_rows), ENTRO_BATCH)]
    b = stream_rows[self.batch_rng.integers(0, len(stream_rows), ENTRO_BATCH)]
    f32 = lambda v: np.asarray(v, np.float32)
    return {'x_all': f32(logs.feats[a]), 'y_all': f32(logs.outcomes[a]),
            'mask_all': logs.mask[a], 'p_all': f32(prop[a]),
            'x': f32(logs.feats[b]), 'outcomes': f32(logs.outcomes[b]),
            'outcome_mask': logs.mask[b], 'cost_hat': f32(cost[b]),
            'c_bar': f32(np.broadcast_to(self.costs, (ENTRO_BATCH, k))),
            'logged': logged[b].astype(np.int32), 'propensity': f32(prop[b]),
            'log_behaviour': f32(self.behaviour[b])}

  def _prepare(self, logs: Logs) -> None:
    """Builds the network on the first logs, records the new rows' log pi_b and the costs."""
    if not self.built:
      self._init(logs.feats.shape[1])
      self.built = True
    if logs.num_rows > self.seen:
      self._record_behaviour(logs)
    self.costs = logs.mean_costs()

  def loss(self, logs: Logs, rows: int = 1024, beta=None, alpha=None) -> float:
    """The update's objective on a fixed sample of `rows` rows of `logs` (for checks): success
    loss plus, where rows are logged, the policy loss at `beta` and `alpha` (default: the
    current ones)."""
    self._prepare(logs)
    beta = self._beta() if beta is None else np.float32(beta)
    alpha = np.float32(self.alpha if alpha is None else alpha)
    saved = self.batch_rng
    self.batch_rng = np.random.default_rng([self.seed, 4])
    all_rows = np.arange(logs.num_rows)
    stream = np.flatnonzero(logs.logged >= 0)
    total = 0.0
    for _ in range(max(1, rows // ENTRO_BATCH)):
      batch = self.batch(logs, all_rows, stream if stream.size else all_rows)
      value, _ = self._loss(self.state, batch, beta, alpha, np.float32(stream.size > 0))
      total += float(value)
    self.batch_rng = saved
    return total / max(1, rows // ENTRO_BATCH)

  def _beta(self) -> np.float32:
    from entrorouter_jax import schedules
    if not self.anchor:
      return np.float32(0.0)
    rl = self.rl
    return np.float32(schedules.interpolate(rl['beta_start'], rl['beta_end'], self.step,
                                            rl['num_steps'], rl['entropy_schedule']))

  # ---- the interface -----------------------------------------------------
  def update(self, logs: Logs) -> None:
    from entrorouter_jax import schedules
    self._prepare(logs)
    all_rows = np.arange(logs.num_rows)
    stream = np.flatnonzero(logs.logged >= 0)
    policy_on = np.float32(stream.size > 0)
    rl = self.rl
    metrics = {}
    for _ in range(self.num_steps(logs)):
      batch = self.batch(logs, all_rows, stream if stream.size else all_rows)
      self.state, metrics = self._step(self.state, batch, self._beta(), np.float32(self.alpha),
                                       policy_on)
      if stream.size:
        self.step += 1
        if self.entropy_control:
          h = float(metrics['entropy'])
          if self.h0 is None:
            self.h0 = h
          target = schedules.entropy_target_with_floor(
              self.step, rl['num_steps'], self.h0, rl['entropy_min'], rl['entropy_floor'],
              rl['entropy_schedule'])
          self.alpha = float(schedules.dual_ascent(self.alpha, target, h, rl['entropy_lr']))
    self.history.append({k: float(v) for k, v in metrics.items()})
    self.updates += 1

  def estimates(self, feats):
    if not self.built:
      raise RuntimeError(f'{self.name}: estimates before the first update')
    s, _ = self._forward(self.state, np.asarray(feats, np.float32))
    s = np.asarray(s, np.float64)
    return s, np.broadcast_to(self.costs, s.shape).copy()

  def temperature(self) -> float:
    """The utility head's learned T."""
    return float(self._forward(self.state, np.zeros((1, self.dim), np.float32))[1])

  def greedy_policy(self, feats) -> np.ndarray:
    """pi = softmax((s - lambda c_hat) / T), float64[N, K] (no exploration)."""
    s, _ = self.estimates(feats)
    z = (s - self.cost_weight * self.costs[None, :]) / self.temperature()
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)

  def policy(self, feats) -> np.ndarray:
    if not self.built:
      raise RuntimeError(f'{self.name}: policy before the first update')
    return explore_distribution(self.greedy_policy(feats), np.ones(self.num_models, bool),
                                self.epsilon)

  def deploy(self, feats):
    dist = self.policy(feats)
    choice = draw(dist, self.rng)
    self.pending = dist
    return choice, dist[np.arange(len(choice)), choice]


class EntroRouterNoAnchor(EntroRouterLearner):
  """entrorouter with beta = 0: no KL to the policy that logged the rows."""

  name = 'entrorouter_no_anchor'
  anchor = False


class EntroRouterNoEntropy(EntroRouterLearner):
  """entrorouter with no entropy control: alpha = 0, no floor, no exploration (eps = 0)."""

  name = 'entrorouter_no_entropy'
  entropy_control = False


LEARNERS = {cls.name: cls for cls in (Greedy, EpsilonGreedy, LinUCB, Thompson, SeedOnly,
                                      FullInfo, EntroRouterLearner, EntroRouterNoAnchor,
                                      EntroRouterNoEntropy)}


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
