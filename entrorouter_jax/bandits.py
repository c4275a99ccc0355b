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
  set_available(mask) which models may be routed to from the next deploy on (bool[K]; all
                      at the start): the simulator's new-model scenario holds a model back
                      until it joins. Every model's column exists from the start; `policy`
                      gives an unavailable model probability 0 (the argmax, the exploration
                      and entrorouter's softmax run over the available models only)

The learners (`LEARNERS`), each with its one parameter fixed, the same on every data set
(never tuned per data set). The classic learners' parameters are the best, by mean stream
utility over the four shared data sets (3 seeds, the default features), of a grid: EPSILON
in {0.02, 0.05, 0.1}, LINUCB_ALPHA in {0.05, 0.1, 0.25, 0.5, 1}, THOMPSON_V in {0.05, 0.1,
0.25, 0.5}; so the baselines are at their best on the shared sets, which can only flatter
them there. (Li et al. 2010's alpha = 1 and v = 0.5, the sub-Gaussian scale of an outcome
in [0, 1], explored far too much on 640-dimensional features; the grid was run by a script
not yet in the repository.)
  greedy          the recipe-family success predictor (`baselines.fit_success_model`, MLP,
                  masked BCE on the observed cells) refitted on all logs each round; routes
                  by argmax s(x, m) - lambda c_hat(m), no exploration (propensity 1).
  epsilon_greedy  greedy's predictor; pi = (1 - eps) onehot(argmax) + eps / K, the deployed
                  router's own exploring mixture (`router.explore_distribution`);
                  EPSILON = 0.05.
  linucb          per model a ridge regression of the outcome on [x, 1] (A_m = I + sum x x^T,
                  b_m = sum x y, theta_m = A_m^-1 b_m); routes by argmax theta_m . x +
                  alpha sqrt(x^T A_m^-1 x) - lambda c_hat(m) (propensity 1);
                  LINUCB_ALPHA = 0.05.
  thompson        linear-Gaussian Thompson sampling (Agrawal and Goyal 2013): the same A_m,
                  b_m; theta_m ~ N(A_m^-1 b_m, v^2 A_m^-1), so the sampled success of m on x is
                  N(mu_m . x, v^2 x^T A_m^-1 x); THOMPSON_V = 0.05. Its policy is
                  pi(m | x) = the share of THOMPSON_DRAWS posterior draws in which m has the
                  highest sampled s - lambda c_hat (draws seeded by the learner's seed and
                  update count), and the choice is drawn from that pi: the logged propensity
                  is exactly the probability the choice had.
  seed_only       greedy fitted on the seed labels alone, never updated.
  entrorouter     the recipe's learning-from-feedback stage run online (`EntroRouterLearner`):
                  greedy's success head s; the policy pi = softmax((s - lambda c_hat) / T
                  + g(x)), g a linear correction trained each round on the doubly robust
                  surrogate (clipped ratio) with the KL trust region around the policy that
                  logged each row and the capability anchor softmax((s - lambda c_hat) / T),
                  kept only where its DR gain on held-out logs is surely positive;
                  T set by the entropy controller (a target contracting to the floor
                  rl.entropy_floor); deployed as (1 - eps) pi + eps / K, eps = rl.explore
                  (0.02).
  entrorouter_no_anchor   the same with beta = 0 (no KL to the logging policy or to the
                  capability anchor).
  entrorouter_no_entropy  the same with no entropy control: T learned by the gradient, no
                  floor, no exploration (eps = 0).
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
LINUCB_ALPHA = 0.05
THOMPSON_V = 0.05
THOMPSON_DRAWS = 512
RIDGE = 1.0                 # A_m = RIDGE * I + sum x x^T (the prior of both linear learners)
ENTRO_EXPLORE = 0.02        # entrorouter's deployed eps (config rl.explore overrides it)
ENTRO_BATCH = 128           # logged rows per optax step (sampled with replacement)
ENTRO_LR = 1e-2             # Adam's learning rate of entrorouter's policy head
ENTRO_STEPS = (50, 400)     # steps per update: 50 + logged rows / 4, capped at 400
ENTRO_TEMPERATURE = 0.02    # T of the first deployment (config: rl.explore_temperature)
ENTRO_BISECTIONS = 30       # the entropy controller's bisection steps on log T
GATE_FOLDS = 5              # every 5th logged row is held out of g's training, for the gate
GATE_MIN_HELD = 20          # fewer held-out rows than this: g is not kept


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
    self.available = np.ones(self.num_models, bool)

  def set_available(self, available) -> None:
    """Routes only among the models where `available` (bool[K], at least one True) from the
    next `policy` / `deploy` on."""
    available = np.asarray(available)
    if available.shape != (self.num_models,) or available.dtype != bool or not available.any():
      raise ValueError(f'{self.name}: set_available({available.tolist()!r}); expected '
                       f'{self.num_models} booleans, at least one True')
    self.available = available.copy()

  def update(self, logs: Logs) -> None:
    raise NotImplementedError

  def estimates(self, feats) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def policy(self, feats) -> np.ndarray:
    s, c = self.estimates(feats)
    return _onehot(_route(s, c, self.cost_weight, self.available), self.num_models)

  def deploy(self, feats) -> tuple[np.ndarray, np.ndarray]:
    dist = self.policy(feats)
    choice = draw(dist, self.rng)
    return choice, dist[np.arange(len(choice)), choice]


def _onehot(choice, k: int) -> np.ndarray:
  out = np.zeros((len(choice), k))
  out[np.arange(len(choice)), choice] = 1.0
  return out


def _route(scores, c_pred, cost_weight: float, available) -> np.ndarray:
  """`baselines.route` (its tie rule) over the `available` models only: int[N] model
  indices of the full pool."""
  if available.all():
    return baselines.route(scores, c_pred, cost_weight)
  cols = np.flatnonzero(available)
  return cols[baselines.route(np.asarray(scores)[:, cols], np.asarray(c_pred)[:, cols],
                              cost_weight)]


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

  def cell_weights(self, logs: Logs):
    """Each observed cell's weight in the success head's BCE (None: all 1)."""
    return None

  def update(self, logs: Logs) -> None:
    logs = self._rows(logs)
    self.costs = logs.mean_costs()
    self.params, self.fit = baselines.fit_success_model(
        logs.feats, logs.outcomes, logs.mask, config=self.fit_config,
        seed=self.seed * 1000 + self.updates, cell_weights=self.cell_weights(logs))
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
    return explore_distribution(greedy, self.available, self.epsilon)


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
    quad = np.stack([np.sum((x @ a_inv) * x, axis=1) for a_inv in self.a_inv], axis=1)
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
    return _onehot(_route(ucb, np.broadcast_to(self.costs, ucb.shape), self.cost_weight,
                          self.available), self.num_models)


class Thompson(_Linear):
  """Linear-Gaussian Thompson sampling; pi = the share of THOMPSON_DRAWS posterior draws in
  which each model is best (see the module docstring)."""

  name = 'thompson'
  v = THOMPSON_V
  draws = THOMPSON_DRAWS

  def policy(self, feats) -> np.ndarray:
    mean, width = self.mean_and_width(feats)
    utility = mean - self.cost_weight * self.costs[None, :]
    if not self.available.all():                       # never the best where unavailable
      utility = np.where(self.available[None, :], utility, -np.inf)
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
_RL_DEFAULTS = dict(clip_eps=0.2, w_max=20.0, beta_start=0.1, beta_end=0.01, entropy_min=0.1,
                    entropy_floor=0.1, num_steps=600, entropy_schedule='linear')
_LOG_FLOOR = 1e-30          # log pi_b of a cell the deployed policy gave (numerically) no mass
_UNAVAILABLE = -1e9         # added to the logit of a model that cannot be chosen (set_available)
_LOG_T_RANGE = (math.log(1e-4), math.log(10.0))   # the controller keeps T inside this


def _build_head(dim: int, k: int, temperature: float, seed: int):
  """The policy head: a linear correction g(x) = W x + b ([D] -> [K], zero at the start) and
  a log T (used where T is learned, i.e. without entropy control)."""
  import jax.numpy as jnp
  from flax import nnx

  class PolicyHead(nnx.Module):
    def __init__(self, rngs):
      self.correction = nnx.Linear(dim, k, kernel_init=nnx.initializers.zeros, rngs=rngs)
      self.log_temperature = nnx.Param(jnp.asarray(math.log(temperature), jnp.float32))

    def __call__(self, x, utility, log_t):
      return utility / jnp.exp(log_t) + self.correction(x)

  return PolicyHead(nnx.Rngs(params=seed))


def _softmax(z) -> np.ndarray:
  z = np.asarray(z, np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


class EntroRouterLearner(Greedy):
  """The recipe's learning from feedback (METHOD.md) as an online learner on the
  simulator's frozen features.

  Success head: greedy's predictor (`baselines.fit_success_model` on the observed cells,
  refitted on all logs each round); q(x, m) = s(x, m) - lambda c_hat(m) is held fixed inside
  the policy's objective, as METHOD.md's surrogate has it. METHOD.md's (choice) of 1 / p
  cell weights (`ipw`, min(1 / p, rl.w_max)) is off: on the four shared sets it made the head
  noisier and the stream utility lower (set `ipw = True` to compare).
  Policy: pi = softmax(q / T + g(x)), g a linear correction head (Flax NNX, zero at the
  start, so pi starts as the utility head's softmax at T = ENTRO_TEMPERATURE, or config
  rl.explore_temperature).
  update(logs), on every logged row so far: ENTRO_STEPS Adam steps (50 + logged rows / 4,
  capped at 400; learning rate ENTRO_LR) of `objectives.offpolicy_loss`: the doubly robust
  surrogate with its ratio to the logging policy clipped at 1 +- rl.clip_eps, the Soft
  Anchor beta (KL(pi || pi_b) + KL(pi || A)), pi_b = the distribution deployed when the row
  was logged and A = softmax(q / T) the capability estimates' anchor (METHOD.md's Stage-0
  anchor with the success head for p_hat and tau_A = T; it holds g near 0), beta from
  rl.beta_start to rl.beta_end over rl.num_steps steps counted across rounds, and
  -alpha H(pi) with alpha = T.
  Entropy control: T is the controlled variable. Before and after each update's steps,
  T is set (bisection on log T) so that pi's mean entropy over the logged queries is H*_t,
  `schedules.entropy_target_with_floor` (from H_0, the first deployment's entropy on the
  first logged queries, to rl.entropy_min over rl.num_steps steps counted across rounds,
  never below rl.entropy_floor). softmax(q / T) maximises sum_m pi q + T H(pi), which is
  why alpha = T: at g = 0 the direct term and the entropy term balance, so g moves only
  where the observed residuals (the clipped correction term) or the anchor ask it to, and T
  alone sets how much the policy explores, whatever the scale of q. Without entropy control
  (`entrorouter_no_entropy`) T is learned by the gradient with alpha = 0.
  Conservative update (METHOD.md's choice: deploy only where DR's lower end beats the
  policy in place): g is trained on the logged rows but every GATE_FOLDS-th (by position in
  the log), and kept only where `offpolicy.dr_gain` of pi over pi with g = 0 on those
  held-out rows has a one-sided 95% lower bound above 0; otherwise g is set back to 0 (and
  with fewer than GATE_MIN_HELD held-out rows it always is). `gate` holds the verdict.
  policy(feats): (1 - eps) pi + eps / K (`router.explore_distribution`, as `Router.sample`),
  eps = config rl.explore if set, else ENTRO_EXPLORE.
  Models held back (`set_available`): pi, the anchor and the exploration run over the
  available models (their logits get _UNAVAILABLE); each logged row is judged over the
  models available when it was logged (the surrogate, both KL terms and the entropy on that
  row), so a model that joins later is not pulled toward the 0 mass pi_b gave it before it
  existed; the entropy controller and the gate look at the models available now.
  Shapes never change, so the step is compiled once per learner (twice where some model
  is held back).
  """

  name = 'entrorouter'
  anchor = True               # False: beta = 0
  entropy_control = True      # False: T learned by the gradient, no floor, eps = 0
  ipw = False                 # True: success head weighted by min(1 / p, rl.w_max)
  conservative = True         # g trained on 4/5 of the logged rows, kept where DR says so

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    rl = self.config.get('rl', {}) if self.config is not None else {}
    self.rl = {key: rl.get(key, default) for key, default in _RL_DEFAULTS.items()}
    self.temperature0 = float(rl.get('explore_temperature', ENTRO_TEMPERATURE))
    if not self.temperature0 > 0:
      raise ValueError(f'{self.name}: rl.explore_temperature={self.temperature0}; expected > 0')
    self.log_t = math.log(self.temperature0)
    self.epsilon = float(rl.get('explore', ENTRO_EXPLORE)) if self.entropy_control else 0.0
    if not 0.0 <= self.epsilon < 1.0:
      raise ValueError(f'{self.name}: rl.explore={self.epsilon}; expected a share in [0, 1)')
    self.h0 = None
    self.step = 0
    self.built = False
    self.behaviour = np.zeros((0, self.num_models))    # log pi_b per logged row, in order
    self.row_available = np.zeros((0, self.num_models), bool)   # per row: set_available then
    self.pending = None                                 # the last deployed distribution
    self.seen = 0
    self.batch_rng = np.random.default_rng([self.seed, 3])
    self.history = []                                   # per update: its last step's metrics
    self.gate = None                                    # the last update's `_gate` verdict

  # ---- the jitted step ---------------------------------------------------
  def _init(self, dim: int) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from entrorouter_jax import objectives

    self.dim = dim
    head = _build_head(dim, self.num_models, self.temperature0, self.seed)
    optimizer = nnx.Optimizer(head, optax.adam(ENTRO_LR), wrt=nnx.Param)
    self.graphdef, self.state = nnx.split((head, optimizer))
    lam = np.float32(self.cost_weight)
    clip_eps = float(self.rl['clip_eps'])
    learn_t = not self.entropy_control

    def log_temperature(m, log_t):
      return m.log_temperature[...] if learn_t else log_t

    def loss_fn(m, batch, beta, log_t):
      logits = m(batch['x'], batch['q'], log_temperature(m, log_t))
      cost_weight = jnp.full((logits.shape[0],), lam)
      # alpha = T: softmax(q / T) maximises sum pi q + T H(pi), so g = 0 is where the direct
      # term and the entropy term balance and g moves only for the residuals and the anchor.
      alpha = 0.0 if learn_t else jnp.exp(log_t)
      # The Soft Anchor of the capability estimates: A = softmax(q / T) (METHOD.md's
      # A ~ exp((p_hat - lambda c_bar) / tau_A), with the success head for p_hat).
      anchor_logits = batch['q'] / jnp.exp(log_t)
      if 'unavailable' in batch:      # only models that could be chosen when the row was logged
        logits = logits + batch['unavailable']
        anchor_logits = anchor_logits + batch['unavailable']
      log_anchor = jax.nn.log_softmax(anchor_logits, axis=-1)
      return objectives.offpolicy_loss(
          logits, batch['success_logits'], batch, cost_weight,
          log_behaviour=batch['log_behaviour'], beta=beta, alpha=alpha,
          clip_eps=clip_eps, log_anchor=log_anchor, beta_anchor=beta)

    def step(state, batch, beta, log_t):
      head, optimizer = nnx.merge(self.graphdef, state)
      (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(head, batch, beta, log_t)
      optimizer.update(head, grads)
      return nnx.state((head, optimizer)), metrics

    def forward(state, x, q, log_t, unavailable):
      head, _ = nnx.merge(self.graphdef, state)
      logits = head(x, q, log_temperature(head, log_t))
      if unavailable is not None:
        logits = logits + unavailable
      return jax.nn.softmax(logits, axis=-1)

    self._step = jax.jit(step)
    self._forward = jax.jit(forward)
    self._loss = jax.jit(lambda state, batch, beta, log_t: loss_fn(
        nnx.merge(self.graphdef, state)[0], batch, beta, log_t)[0])
    self._correction = jax.jit(
        lambda state, x: nnx.merge(self.graphdef, state)[0].correction(x))
    self._learned_log_t = jax.jit(
        lambda state: nnx.merge(self.graphdef, state)[0].log_temperature[...])

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
    self.row_available = np.concatenate(
        [self.row_available, np.broadcast_to(self.available, (len(new), k))])
    self.seen = logs.num_rows

  def cell_weights(self, logs: Logs):
    """min(1 / p, rl.w_max) on each logged cell, 1 on the seed labels (METHOD.md: the models
    the logging policy seldom chose are not under-represented)."""
    if not self.ipw:
      return None
    p = np.where(logs.logged >= 0, logs.propensity, 1.0)
    return np.broadcast_to(np.minimum(1.0 / p, self.rl['w_max'])[:, None], logs.mask.shape)

  def _utility(self, feats) -> tuple[np.ndarray, np.ndarray]:
    """(q = s - lambda c_hat, logit s), float32[N, K] each, from the success head."""
    s, c = Greedy.estimates(self, feats)
    s = np.clip(s, 1e-6, 1 - 1e-6)
    return ((s - self.cost_weight * c).astype(np.float32),
            np.log(s / (1 - s)).astype(np.float32))

  def batch(self, logs: Logs, rows, q, success_logits) -> dict:
    """One step's inputs (numpy, fixed shapes): ENTRO_BATCH of the logged `rows` (drawn with
    replacement); q and success_logits are float32[N, K] over all rows of `logs`. Where a
    drawn row was logged with some model unavailable, 'unavailable' float32[B, K] holds
    _UNAVAILABLE on those cells (0 elsewhere)."""
    pick = rows[self.batch_rng.integers(0, len(rows), ENTRO_BATCH)]
    f32 = lambda v: np.asarray(v, np.float32)
    batch = {'x': f32(logs.feats[pick]), 'q': q[pick], 'success_logits': success_logits[pick],
             'outcomes': f32(logs.outcomes[pick]), 'outcome_mask': logs.mask[pick],
             'cost_hat': f32(np.nan_to_num(logs.cost_hat[pick], nan=0.0)),
             'c_bar': f32(np.broadcast_to(self.costs, (ENTRO_BATCH, self.num_models))),
             'logged': logs.logged[pick].astype(np.int32),
             'propensity': f32(logs.propensity[pick]),
             'log_behaviour': f32(self.behaviour[pick])}
    available = self.row_available[pick]
    if not available.all():
      batch['unavailable'] = np.where(available, 0.0, _UNAVAILABLE).astype(np.float32)
    return batch

  def _unavailable(self) -> np.ndarray | None:
    """float32[K]: _UNAVAILABLE where a model is unavailable now, 0 elsewhere; None where
    every model is available."""
    if self.available.all():
      return None
    return np.where(self.available, 0.0, _UNAVAILABLE).astype(np.float32)

  def _prepare(self, logs: Logs) -> None:
    """Builds the head on the first logs; records the new rows' log pi_b."""
    if not self.built:
      self._init(logs.feats.shape[1])
      self.built = True
    if logs.num_rows > self.seen:
      self._record_behaviour(logs)

  def loss(self, logs: Logs, rows: int = 1024, beta=None) -> float:
    """The policy objective on a fixed sample of `rows` logged rows of `logs` (for checks),
    at `beta` (default: the current one) and the current success head and T."""
    self._prepare(logs)
    stream = np.flatnonzero(logs.logged >= 0)
    if not stream.size:
      raise ValueError(f'{self.name}: loss() needs logged rows; the logs hold only seed labels')
    beta = self._beta() if beta is None else np.float32(beta)
    q, logits = self._utility(logs.feats)
    saved, self.batch_rng = self.batch_rng, np.random.default_rng([self.seed, 4])
    batches = max(1, rows // ENTRO_BATCH)
    total = sum(float(self._loss(self.state, self.batch(logs, stream, q, logits), beta,
                                 np.float32(self.log_t))) for _ in range(batches))
    self.batch_rng = saved
    return total / batches

  def _beta(self) -> np.float32:
    if not self.anchor:
      return np.float32(0.0)
    rl = self.rl
    fraction = max(0.0, 1.0 - self.step / max(rl['num_steps'], 1))
    if rl['entropy_schedule'] == 'cosine':
      fraction = 0.5 * (1.0 + math.cos(math.pi * (1.0 - fraction)))
    return np.float32(rl['beta_end'] + (rl['beta_start'] - rl['beta_end']) * fraction)

  def entropy_target(self) -> float:
    """H*_t at the current step (`schedules.entropy_target_with_floor`)."""
    from entrorouter_jax import schedules
    rl = self.rl
    return float(schedules.entropy_target_with_floor(
        self.step, rl['num_steps'], self.h0, rl['entropy_min'], rl['entropy_floor'],
        rl['entropy_schedule']))

  def _gate(self, logs: Logs, held, q) -> dict:
    """The conservative update: keeps the trained correction g only where
    `offpolicy.dr_gain` of pi (with g) over pi with g = 0, on the `held` logged rows (not
    trained on), has a one-sided 95% lower bound above 0; else sets g back to 0."""
    from entrorouter_jax import offpolicy
    if held.size < GATE_MIN_HELD:
      gain = {'value': None, 'lower': None}
    else:
      x = logs.feats[held]
      logged = logs.logged[held]
      reward = (logs.outcomes[held, logged]
                - self.cost_weight * logs.cost_hat[held, logged])
      with_g = self.policy(x)
      without_g = explore_distribution(_softmax(q[held] / self.temperature()),
                                       self.available, self.epsilon)
      gain = offpolicy.dr_gain(with_g, without_g, logged, logs.propensity[held], reward,
                               np.asarray(q[held], np.float64), seed=self.updates)
    kept = gain['lower'] is not None and gain['lower'] > 0
    if not kept:
      self._zero_correction()
    return {**gain, 'kept': bool(kept), 'held': int(held.size)}

  def _zero_correction(self) -> None:
    import jax.numpy as jnp
    from flax import nnx
    head, optimizer = nnx.merge(self.graphdef, self.state)
    head.correction.kernel.value = jnp.zeros_like(head.correction.kernel.value)
    head.correction.bias.value = jnp.zeros_like(head.correction.bias.value)
    self.state = nnx.state((head, optimizer))

  def train_policy(self, logs: Logs, steps: int, q=None, logits=None, beta=None,
                   rows=None) -> dict:
    """`steps` Adam steps of the policy objective on the logged rows of `logs` (or on
    `rows`, indices of logged rows) at the current T (beta: the schedule's unless given);
    returns the last step's metrics."""
    if q is None:
      q, logits = self._utility(logs.feats)
    stream = np.flatnonzero(logs.logged >= 0) if rows is None else np.asarray(rows)
    metrics = {}
    for _ in range(steps):
      batch = self.batch(logs, stream, q, logits)
      b = self._beta() if beta is None else np.float32(beta)
      self.state, metrics = self._step(self.state, batch, b, np.float32(self.log_t))
      self.step += 1
    return metrics

  def _control_temperature(self, feats, q) -> None:
    """The entropy controller: sets T so that pi's mean entropy over the logged queries is
    H*_t (bisection on log T within _LOG_T_RANGE; a bound where H*_t is out of reach). H_0 is
    the entropy of the first deployment's pi on the first logged queries."""
    g = np.asarray(self._correction(self.state, np.asarray(feats, np.float32)), np.float64)
    if self._unavailable() is not None:
      g = g + self._unavailable()
    q = np.asarray(q, np.float64)

    def mean_entropy(log_t):
      p = _softmax(q / math.exp(log_t) + g)
      return float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-300)), axis=1)))

    if self.h0 is None:
      self.h0 = mean_entropy(self.log_t)
    target = self.entropy_target()
    lo, hi = _LOG_T_RANGE
    if mean_entropy(lo) >= target:
      self.log_t = lo
    elif mean_entropy(hi) <= target:
      self.log_t = hi
    else:
      for _ in range(ENTRO_BISECTIONS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_entropy(mid) < target else (lo, mid)
      self.log_t = 0.5 * (lo + hi)

  # ---- the interface -----------------------------------------------------
  def update(self, logs: Logs) -> None:
    super().update(logs)                          # the success head and the costs
    self._prepare(logs)
    stream = np.flatnonzero(logs.logged >= 0)
    if not stream.size:
      return
    q, logits = self._utility(logs.feats)
    if self.entropy_control:
      self._control_temperature(logs.feats[stream], q[stream])
    held = stream[stream % GATE_FOLDS == GATE_FOLDS - 1] if self.conservative else stream[:0]
    fit = np.setdiff1d(stream, held) if held.size else stream
    metrics = self.train_policy(logs, self.num_steps(logs), q, logits, rows=fit)
    if self.conservative:
      self.gate = self._gate(logs, held, q)
    if self.entropy_control:
      self._control_temperature(logs.feats[stream], q[stream])
    if not self.entropy_control:
      self.log_t = float(self._learned_log_t(self.state))
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics['temperature'] = self.temperature()
    metrics['gate'] = self.gate
    self.history.append(metrics)

  def temperature(self) -> float:
    """The policy's T (the controller's, or the learned one without entropy control)."""
    return math.exp(self.log_t)

  def greedy_policy(self, feats) -> np.ndarray:
    """pi = softmax(q / T + g(x)), float64[N, K] (no exploration)."""
    if not self.built:
      raise RuntimeError(f'{self.name}: policy before the first update')
    q, _ = self._utility(feats)
    pi = self._forward(self.state, np.asarray(feats, np.float32), q, np.float32(self.log_t),
                       self._unavailable())
    pi = np.asarray(pi, np.float64)
    return pi / pi.sum(axis=1, keepdims=True)

  def policy(self, feats) -> np.ndarray:
    return explore_distribution(self.greedy_policy(feats), self.available, self.epsilon)

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
