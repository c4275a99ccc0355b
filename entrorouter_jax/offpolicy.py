"""Off-policy evaluation of a candidate policy on logged feedback (METHOD.md, "Learning
from feedback"). NumPy only, pure functions.

A log holds N rows; on row i the logging policy pi_b chose the model a_i with probability
p_i = pi_b(a_i | x_i) in (0, 1] and the reward r_i of that one answer was observed. For a
candidate policy pi[N, K] and a model's reward predictions q_hat[N, K]:

  rho_i = pi(a_i | x_i) / p_i                       (importance ratio)
  IPS   = mean(rho r)
  SNIPS = sum(rho r) / sum(rho)                     (0 where every rho is 0)
  DR    = mean(sum_m pi(m | x) q_hat(x, m) + rho (r - q_hat(x, a)))

`estimate` adds 95% percentile bootstrap intervals over logged rows, the three estimators
read off the same resampled rows.
"""

from __future__ import annotations

import numpy as np

# Rows of pi must sum to 1 within this (float32 softmax outputs sum to 1 within ~1e-6).
SUM_TOLERANCE = 1e-4
# Bootstrap replicates are drawn in blocks of at most this many row indices.
_BLOCK = 1 << 22


def _describe(array) -> str:
  return f'shape {np.shape(array)}'


def check_inputs(pi, logged, propensity, reward, q_hat=None) -> tuple:
  """The inputs as float64 / int64 arrays, or ValueError naming the argument, the row,
  the value and what was expected."""
  pi = np.asarray(pi, np.float64)
  if pi.ndim != 2 or pi.shape[0] == 0 or pi.shape[1] == 0:
    raise ValueError(f'pi has {_describe(pi)}; expected [N, K] with N >= 1 rows and K >= 1 '
                     'models')
  n, k = pi.shape
  bad = ~np.isfinite(pi) | (pi < 0)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(f'pi row {i}, model {j} is {float(pi[i, j])!r}; expected a probability '
                     '>= 0')
  sums = pi.sum(axis=1)
  off = np.abs(sums - 1.0) > SUM_TOLERANCE
  if off.any():
    i = int(np.argmax(off))
    raise ValueError(f'pi row {i} sums to {float(sums[i])!r}; expected 1 (within '
                     f'{SUM_TOLERANCE})')
  logged_in = np.asarray(logged)
  if logged_in.shape != (n,):
    raise ValueError(f'logged has {_describe(logged_in)}; expected ({n},), one model per row')
  if logged_in.dtype.kind not in 'iu':
    raise ValueError(f'logged has dtype {logged_in.dtype}; expected integer model indices')
  logged = logged_in.astype(np.int64)
  bad = (logged < 0) | (logged >= k)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f'logged row {i} is {logged[i]}; expected a model index in [0, {k})')
  propensity = np.asarray(propensity, np.float64)
  if propensity.shape != (n,):
    raise ValueError(f'propensity has {_describe(propensity)}; expected ({n},)')
  bad = ~np.isfinite(propensity) | (propensity <= 0) | (propensity > 1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f'propensity row {i} is {float(propensity[i])!r}; expected a probability in '
                     '(0, 1]')
  reward = np.asarray(reward, np.float64)
  if reward.shape != (n,):
    raise ValueError(f'reward has {_describe(reward)}; expected ({n},)')
  bad = ~np.isfinite(reward)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f'reward row {i} is {float(reward[i])!r}; expected a finite number')
  if q_hat is not None:
    q_hat = np.asarray(q_hat, np.float64)
    if q_hat.shape != (n, k):
      raise ValueError(f'q_hat has {_describe(q_hat)}; expected ({n}, {k}) like pi')
    bad = ~np.isfinite(q_hat)
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise ValueError(f'q_hat row {i}, model {j} is {float(q_hat[i, j])!r}; expected a '
                       'finite number')
  return pi, logged, propensity, reward, q_hat


def ratios(pi, logged, propensity) -> np.ndarray:
  """rho = pi(a | x) / p per row: float64[N] (inputs already checked)."""
  return np.take_along_axis(pi, logged[:, None], axis=1)[:, 0] / propensity


def dr_terms(pi, logged, propensity, reward, q_hat) -> np.ndarray:
  """DR's per-row terms sum_m pi(m|x) q_hat(x, m) + rho (r - q_hat(x, a)): float64[N]
  (inputs already checked); DR is their mean."""
  q_logged = np.take_along_axis(q_hat, logged[:, None], axis=1)[:, 0]
  return np.sum(pi * q_hat, axis=1) + ratios(pi, logged, propensity) * (reward - q_logged)


def _snips(weighted_sum, ratio_sum):
  """sum(rho r) / sum(rho), 0 where sum(rho) is 0 (then every rho r is 0 too)."""
  safe = np.where(ratio_sum > 0, ratio_sum, 1.0)
  return np.where(ratio_sum > 0, weighted_sum / safe, 0.0)


def ips(pi, logged, propensity, reward) -> float:
  """IPS = mean(rho r)."""
  pi, logged, propensity, reward, _ = check_inputs(pi, logged, propensity, reward)
  return float(np.mean(ratios(pi, logged, propensity) * reward))


def snips(pi, logged, propensity, reward) -> float:
  """SNIPS = sum(rho r) / sum(rho) (0 where pi gives every logged model probability 0)."""
  pi, logged, propensity, reward, _ = check_inputs(pi, logged, propensity, reward)
  rho = ratios(pi, logged, propensity)
  return float(_snips(np.sum(rho * reward), np.sum(rho)))


def dr(pi, logged, propensity, reward, q_hat) -> float:
  """DR = mean(sum_m pi(m|x) q_hat(x, m) + rho (r - q_hat(x, a)))."""
  if q_hat is None:
    raise ValueError('q_hat is None; expected reward predictions float[N, K]')
  checked = check_inputs(pi, logged, propensity, reward, q_hat)
  return float(np.mean(dr_terms(*checked)))


def bootstrap_rows(n: int, replicates: int, seed: int = 0):
  """The resampled row indices int64[b, n] of `replicates` bootstrap replicates (n draws
  with replacement each), yielded in blocks; the same for a given (n, replicates, seed)."""
  rng = np.random.default_rng(seed)
  block = max(1, _BLOCK // n)
  for start in range(0, replicates, block):
    yield rng.integers(0, n, (min(block, replicates - start), n))


def estimate(pi, logged, propensity, reward, q_hat, *, bootstrap: int = 1000,
             seed: int = 0) -> dict:
  """IPS, SNIPS and DR of the policy pi on the logged rows, each as {'value', 'ci95'}.

  pi float[N, K] (rows summing to 1), logged int[N] (the logged model), propensity float[N]
  in (0, 1] (pi_b(logged | x)), reward float[N] (observed), q_hat float[N, K] (predicted
  rewards of every model). 'ci95' = [lo, hi] is the central 95% percentile interval of
  `bootstrap` replicates over logged rows, seeded by `seed`; the three estimators share each
  replicate's rows, so their intervals are paired.
  """
  if q_hat is None:
    raise ValueError('q_hat is None; expected reward predictions float[N, K]')
  if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 1:
    raise ValueError(f'bootstrap is {bootstrap!r}; expected a whole number of replicates >= 1')
  pi, logged, propensity, reward, q_hat = check_inputs(pi, logged, propensity, reward, q_hat)
  rho = ratios(pi, logged, propensity)
  weighted = rho * reward
  terms = dr_terms(pi, logged, propensity, reward, q_hat)
  reps = {'ips': [], 'snips': [], 'dr': []}
  for rows in bootstrap_rows(len(rho), int(bootstrap), seed):
    w = weighted[rows].sum(axis=1)
    reps['ips'].append(w / rows.shape[1])
    reps['snips'].append(_snips(w, rho[rows].sum(axis=1)))
    reps['dr'].append(terms[rows].mean(axis=1))
  values = {'ips': float(np.mean(weighted)),
            'snips': float(_snips(weighted.sum(), rho.sum())),
            'dr': float(np.mean(terms))}
  out = {}
  for name, value in values.items():
    lo, hi = np.percentile(np.concatenate(reps[name]), [2.5, 97.5])
    out[name] = {'value': value, 'ci95': [float(lo), float(hi)]}
  return out


def dr_gain(pi_new, pi_old, logged, propensity, reward, q_hat, *, bootstrap: int = 1000,
            seed: int = 0, level: float = 0.95) -> dict:
  """DR of pi_new minus DR of pi_old on the same logged rows, paired row by row:
  {'value': mean(d), 'lower': the one-sided `level` lower bound of mean(d), i.e. the
  (1 - level) percentile of `bootstrap` replicates over rows}, d = the rows' DR terms under
  pi_new minus under pi_old. A conservative update deploys pi_new only where 'lower' > 0
  (METHOD.md: deploy only where DR's lower end beats the policy in place)."""
  if not 0.0 < level < 1.0:
    raise ValueError(f'level is {level!r}; expected a confidence level in (0, 1)')
  checked_new = check_inputs(pi_new, logged, propensity, reward, q_hat)
  checked_old = check_inputs(pi_old, logged, propensity, reward, q_hat)
  d = dr_terms(*checked_new) - dr_terms(*checked_old)
  means = np.concatenate([d[rows].mean(axis=1) for rows in
                          bootstrap_rows(len(d), int(bootstrap), seed)])
  return {'value': float(d.mean()), 'lower': float(np.percentile(means, 100 * (1 - level)))}
