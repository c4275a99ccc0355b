"""Models added to a trained router without retraining it, and models hidden from it.

`python -m entrorouter_jax.add_model` (add_model.py) writes a copy of a router's
workdir whose added_models.json (`workdir.AddedModels`) lists the router's
columns: the network's K0 outputs, then one column per added model. Routing
(`Columns.route`) computes every column's predicted success s(x, m) and takes
Stage 0's kNN c_bar(x, m) for all of them, then routes over the columns not
removed with the utility head itself,

  pi(m|x) = softmax((s(x, m) - lambda c_bar(x, m)) / T)   (T: the network's learned one),

so removing a model renormalises pi over the rest, and an added model competes
on the same terms as the trained ones. The network and its checkpoint are untouched.

The success model of an added model A, from N labelled queries x_i with scores
y_i in [0, 1] (`fit_success`): a logistic regression on the router's own frozen
parts,

  s_A(x) = sigmoid(b + sum_m beta_m logit s(x, m) + w . phi(x)),

over the pool's predicted success s(x, m) (the K models routed when A was
added) and Stage 0's query features phi(x) (unit rows), with a Gaussian prior
centred on what the pool says before any label: b = 0, w = 0 and beta_m = 1/K,
the pool's average model on the logit scale (which queries the pool finds
hard). So with few labels s_A is that average, its level shifted by b; the
labels move it further (beta reweighs the pool, w learns where A differs on
the query space). The prior's standard deviations (sigma_b, sigma_beta,
sigma_w: the prior std of each term's logit is about sigma_b, sigma_beta
|logit s|, sigma_w, as rows of phi have norm 1) are chosen by empirical Bayes on
the grid SIGMA_GRID: the tightest prior whose Laplace evidence (`log_evidence`)
is within a Bayes factor of 3 of the best (`fit_success`); the fit is the
posterior mode (MAP), by Newton's method (`fit_logistic_map`). Scores may be
fractional: the likelihood is the binary cross-entropy, as in the dense loss of
training. (On RouterBench, fitting each model the full router sends >= 5% of
its queries to from 20 or 100 of its training labels with the others held
out, two other choices had a larger mean log loss on its other training
labels: beta centred on the pool models priced like A, and the largest
evidence instead of the tightest prior near it.)

Expected cost (`cost_profile`, `cost_level`): c_hat(x, m) = a_m g(x), a model's
price level a_m (its mean normalised cost) times the query's cost profile g(x)
(how long its answers run, shared by the pool), so g(x) = sum_m c_hat(x, m) /
sum_m a_m over the pool, and the added model's level is the ratio estimate
a_A = sum_i c_hat_i / sum_i g(x_i) over its labelled queries (c_hat_i = its cost
there / c_ref: given, or tokens x its prices). In Stage 0's training table its
column's cost is a_A g(x) on every row, so the kNN's c_bar(x, A) is a
neighbourhood mean like every other model's.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np

_P_CLIP = 1e-4   # as policy.py: logit s of a success estimate within [1e-4, 1 - 1e-4]

# (sigma_b, sigma_beta, sigma_w): the prior scales empirical Bayes chooses among.
SIGMA_GRID = tuple(itertools.product((0.5, 2.0), (0.01, 0.03, 0.1, 0.3, 1.0),
                                      (0.1, 0.3, 1.0, 3.0, 10.0)))


# ------------------------------------------------------------------- cost ---
def cost_profile(c_hat, pool_costs) -> np.ndarray:
  """g(x) float64[N]: each query's cost profile, sum_m c_hat(x, m) / sum_m a_m, from the
  pool's normalised costs c_hat float[N, K] (Stage 0's c_bar for new queries) and
  price levels a_m = pool_costs float[K] (over training rows its mean is 1)."""
  c = np.asarray(c_hat, np.float64)
  total = float(np.sum(pool_costs))
  return c.sum(axis=1) / total if total > 0 else np.ones(len(c))


def cost_level(c_hat, profile) -> float:
  """a = sum_i c_hat_i / sum_i g(x_i): the price level of a model whose normalised costs
  on N queries are c_hat float[N] (ratio estimate of c_hat = a g(x))."""
  c, g = np.asarray(c_hat, np.float64), np.asarray(profile, np.float64)
  return float(c.sum() / g.sum()) if g.sum() > 0 else float(c.mean())


# ---------------------------------------------------- MAP logistic regression ---
def _sigmoid(f):
  return 0.5 * (1.0 + np.tanh(0.5 * f))


def _logit(p):
  p = np.clip(np.asarray(p, np.float64), _P_CLIP, 1.0 - _P_CLIP)
  return np.log(p) - np.log1p(-p)


def map_objective(theta, design, scores, prior_mean, prior_precision) -> float:
  """The negative log posterior, up to a constant: sum_i BCE(y_i, sigmoid(u_i . theta)) +
  1/2 sum_j P_j (theta_j - theta0_j)^2, for design u float[N, d], scores y float[N] in
  [0, 1], prior mean theta0 float[d] and diagonal precision P float[d] > 0."""
  f = design @ theta
  d = theta - prior_mean
  return float(np.sum(np.logaddexp(0.0, f) - scores * f) + 0.5 * np.sum(prior_precision * d * d))


def fit_logistic_map(design, scores, prior_mean, prior_precision, *, dual=None,
                     max_iter: int = 100, tol: float = 1e-10):
  """The posterior mode of logistic regression with a Gaussian prior: theta float64[d]
  minimising `map_objective` (strictly convex), by Newton's method with backtracking.

  With N < d rows (few labels, many features; `dual` None) the Newton steps run in
  N dimensions: theta = theta0 + P^-1 u^T alpha, f = u theta = m + K alpha with
  m = u theta0 and K = u P^-1 u^T, so the objective is sum_i BCE(y_i, f_i) +
  1/2 alpha^T K alpha and each step solves B = I + W^1/2 K W^1/2 (W = diag p (1 - p)),
  as for a Gaussian process's Laplace mode (Rasmussen and Williams, Algorithm 3.1);
  otherwise in d dimensions. Both find the same mode.

  Returns (theta, the objective there, log det H - sum_j log P_j), H the Hessian at the
  mode, u^T W u + diag(P) (by Sylvester's identity equal to log det B).
  """
  u = np.asarray(design, np.float64)
  y = np.asarray(scores, np.float64)
  mean = np.asarray(prior_mean, np.float64)
  prec = np.asarray(prior_precision, np.float64)
  n, d = u.shape
  if dual is None:
    dual = n < d
  if dual:
    scaled = u / prec                # u P^-1
    kernel = scaled @ u.T            # K, [N, N]
    offset = u @ mean                # m
    eye = np.eye(n)

    def objective(a):
      f = offset + kernel @ a
      return float(np.sum(np.logaddexp(0.0, f) - y * f) + 0.5 * a @ kernel @ a)

    def b_matrix(a):
      p = _sigmoid(offset + kernel @ a)
      sw = np.sqrt(p * (1.0 - p))
      return p, sw, eye + sw[:, None] * kernel * sw[None, :]

    alpha = np.zeros(n)
    obj = objective(alpha)
    for _ in range(max_iter):
      p, sw, b = b_matrix(alpha)
      rhs = sw * sw * (kernel @ alpha) + (y - p)
      newton = rhs - sw * np.linalg.solve(b, sw * (kernel @ rhs))   # (I + W K)^-1 rhs
      step = newton - alpha
      decrement = float(-(kernel @ (p - y + alpha)) @ step)
      alpha, obj = _backtrack(objective, alpha, obj, step, decrement)
      if decrement / 2 <= tol:   # that step was the last one needed
        break
    theta = mean + scaled.T @ alpha
    logdet = 2.0 * np.sum(np.log(np.diag(np.linalg.cholesky(b_matrix(alpha)[2]))))
    return theta, obj, float(logdet)

  def objective(t):
    return map_objective(t, u, y, mean, prec)

  def hessian(t):
    p = _sigmoid(u @ t)
    return (u.T * (p * (1.0 - p))) @ u + np.diag(prec)

  theta = mean.copy()
  obj = objective(theta)
  for _ in range(max_iter):
    grad = u.T @ (_sigmoid(u @ theta) - y) + prec * (theta - mean)
    step = -np.linalg.solve(hessian(theta), grad)
    decrement = float(-grad @ step)
    theta, obj = _backtrack(objective, theta, obj, step, decrement)
    if decrement / 2 <= tol:
      break
  logdet = 2.0 * np.sum(np.log(np.diag(np.linalg.cholesky(hessian(theta))))) - np.sum(np.log(prec))
  return theta, obj, float(logdet)


def _backtrack(objective, x, value, step, decrement):
  """(x + t step, its objective) for the first t = 1, 1/2, ... that decreases the
  objective by at least t decrement / 4 (Armijo)."""
  t = 1.0
  while True:
    new = x + t * step
    new_value = objective(new)
    if new_value <= value - 0.25 * t * decrement or t < 1e-12:
      return new, new_value
    t /= 2


def log_evidence(objective: float, logdet: float) -> float:
  """Laplace's approximation of log p(y | prior) at the mode: -objective - 1/2 (log det H
  - sum_j log P_j) (`fit_logistic_map`'s values; the 2 pi terms cancel)."""
  return float(-objective - 0.5 * logdet)


# ----------------------------------------------------- an added model's success ---
@dataclasses.dataclass
class SuccessModel:
  """An added model's column: s(x) = sigmoid(intercept + pool_weights . logit s(x, inputs)
  + feature_weights . phi(x)). `inputs` are the column indices whose success feeds it
  (the models routed when it was added); `info` says how it was fitted (prior, labels, cost)."""
  name: str
  column: int
  inputs: list
  intercept: float
  pool_weights: list
  feature_weights: list
  info: dict = dataclasses.field(default_factory=dict)

  def predict(self, success, feats) -> np.ndarray:
    """s float64[N] from every column's success float[N, C] (its inputs filled) and
    Stage 0's features float[N, D]."""
    f = (self.intercept + _logit(np.asarray(success)[:, self.inputs]) @ np.asarray(
        self.pool_weights, np.float64) + np.asarray(feats, np.float64) @ np.asarray(
            self.feature_weights, np.float64))
    return _sigmoid(f)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> 'SuccessModel':
    return cls(**data)


def design_matrix(pool_success, feats) -> np.ndarray:
  """u float64[N, 1 + K + D]: [1, logit s(x, m) for the K pool models, phi(x)]."""
  s = _logit(pool_success)
  return np.concatenate([np.ones((len(s), 1)), s, np.asarray(feats, np.float64)], axis=1)


def fit_success(pool_success, feats, scores, prior_weights, grid=SIGMA_GRID) -> dict:
  """The added model's success model from N labels: the MAP fit at the prior scales of
  `grid` that empirical Bayes keeps (module docstring): of the grid points whose Laplace
  evidence is within log 3 of the largest (a Bayes factor under 3, "not worth more than
  a bare mention" on Jeffreys' scale), the one whose prior is tightest on these queries
  (the least mean prior variance of the logit, sigma_b^2 + sigma_beta^2 |logit s|^2 +
  sigma_w^2 |phi|^2), so a few labels move the prior only as far as they clearly support.

  pool_success float[N, K] (the router's s(x_i, m)), feats float[N, D] (Stage 0's
  phi(x_i)), scores float[N] in [0, 1], prior_weights float[K] (beta's prior mean).
  Returns {'intercept', 'pool_weights' float[K], 'feature_weights' float[D],
  'sigma': (sigma_b, sigma_beta, sigma_w), 'log_evidence', 'evidence_grid':
  [[sigma_b, sigma_beta, sigma_w, log evidence], ...]}."""
  u = design_matrix(pool_success, feats)
  y = np.asarray(scores, np.float64)
  k = np.asarray(pool_success).shape[1]
  mean = np.concatenate([[0.0], np.asarray(prior_weights, np.float64),
                         np.zeros(u.shape[1] - 1 - k)])
  spread = [1.0, float(np.mean(np.sum(u[:, 1:1 + k] ** 2, axis=1))),
            float(np.mean(np.sum(u[:, 1 + k:] ** 2, axis=1)))]
  fits = []
  for sigmas in grid:
    prec = np.concatenate([[sigmas[0] ** -2], np.full(k, sigmas[1] ** -2),
                           np.full(u.shape[1] - 1 - k, sigmas[2] ** -2)])
    theta, obj, logdet = fit_logistic_map(u, y, mean, prec)
    fits.append((log_evidence(obj, logdet), tuple(float(v) for v in sigmas), theta))
  top = max(f[0] for f in fits)
  evidence, sigmas, theta = min(
      (f for f in fits if f[0] >= top - np.log(3.0)),
      key=lambda f: sum(sd * sd * w for sd, w in zip(f[1], spread)))
  return {'intercept': float(theta[0]), 'pool_weights': theta[1:1 + k],
          'feature_weights': theta[1 + k:], 'sigma': sigmas, 'log_evidence': float(evidence),
          'evidence_grid': [[*f[1], f[0]] for f in fits]}


# ------------------------------------------------------------------ routing ---
@dataclasses.dataclass
class Columns:
  """What routing adds after the network's outputs (`workdir.AddedModels` and the
  success models of its added columns) and the network's learned temperature T."""
  record: object                 # workdir.AddedModels
  models: list                   # SuccessModel per added column, in column order
  temperature: float

  @classmethod
  def make(cls, record, temperature: float) -> 'Columns':
    models = sorted((SuccessModel.from_dict(m) for m in record.added), key=lambda m: m.column)
    return cls(record=record, models=models, temperature=float(temperature))

  @property
  def network_columns(self) -> int:
    return len(self.record.network_models)

  @property
  def visible(self) -> list[int]:
    return self.record.visible

  def success(self, network_success, feats) -> np.ndarray:
    """s(x, m) of every column, float64[N, C]: the network's, then each added model's."""
    s = np.zeros((len(network_success), len(self.record.columns)))
    s[:, :self.network_columns] = network_success
    for model in self.models:
      s[:, model.column] = model.predict(s, feats)
    return s

  def route(self, network_success, c_bar, cost_weight, feats) -> dict:
    """{'probs', 'success', 'c_bar'} float32[N, K] over the routed columns from the
    network's success float[N, K0], Stage 0's c_bar float[N, C] of every column, lambda
    (scalar or float[N]) and Stage 0's features float[N, D]."""
    s = self.success(network_success, feats)[:, self.visible]
    c = np.asarray(c_bar, np.float64)[:, self.visible]
    lam = np.broadcast_to(np.asarray(cost_weight, np.float64).reshape(-1), (len(s),))
    logits = (s - lam[:, None] * c) / self.temperature
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return {'probs': probs.astype(np.float32), 'success': s.astype(np.float32),
            'c_bar': c.astype(np.float32)}


def strongest_visible(record, outcomes, mask) -> int:
  """router.json's strongest (an index into the routed models): the network's strongest
  where it is routed, else the routed column with the highest mean observed outcome in
  Stage 0's training table (outcomes, mask [N, C])."""
  visible = record.visible
  if record.network_strongest in visible:
    return visible.index(record.network_strongest)
  y = np.where(mask, outcomes, 0.0)[:, visible].sum(axis=0)
  n = np.asarray(mask)[:, visible].sum(axis=0)
  return int(np.argmax(np.where(n > 0, y / np.maximum(n, 1), -np.inf)))

