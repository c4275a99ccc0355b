"""Stage 0 of ../shared/METHOD.md: offline capability estimates (NumPy).

For every query x and model m of the pool (K models):
  p_hat(m|x)  estimated success of m on x: mean observed outcome of m on the k
              nearest training queries (cosine similarity in a TF-IDF -> SVD
              space), shrunk toward m's task-level (or global) mean with a Beta
              prior of strength alpha,
                p_hat = (sum_{observed nbrs} y + alpha * prior) / (n_observed + alpha);
  c_bar(m|x)  mean normalised cost c_hat = c / c_ref over the same k neighbours.
On the training split the estimates are leave-one-out: a training query's own
row (its label and its weight in the priors) never enters its own estimate, so
the Stage-1/2 anchor never sees the label it is later trained against.

Shapes: N training queries, Nq queries, K models, D feature dims.
  outcomes   float[N, K] in [0, 1]; outcome_mask bool[N, K] (False = missing)
  costs      float[N, K] >= 0, always known
  tasks      sequence[N] of task names (None / '' / NaN = unknown), or None
  feats      float32[N, D], rows L2-normalised (so dot product = cosine)
Choices (METHOD.md marks them as ours): k, alpha, the prior ('task' or
'global'), the space (TF-IDF word 1-2 grams -> dim-d SVD; features.py holds
the spaces). The neighbours themselves are found by entrorouter_jax.neighbours.
"""

from __future__ import annotations

import math

import numpy as np

from entrorouter_jax import features
from entrorouter_jax import neighbours as knn_search
# Re-exported: stage0.pkl files pickle capability.TfidfSpace, and callers reach
# the search through this module.
from entrorouter_jax.features import TfidfSpace
from entrorouter_jax.neighbours import (
    EXACT_MAX_ROWS, SEARCHES, IvfIndex, exact_neighbours, half_precision_error, ivf_cells,
    neighbours, screened_neighbours, search_settings, spherical_kmeans)

__all__ = ['PRIORS', 'reference_cost', 'knn_estimates', 'KnnTable', 'capability_estimates',
           'TfidfSpace', 'EXACT_MAX_ROWS', 'SEARCHES', 'IvfIndex', 'exact_neighbours',
           'half_precision_error', 'ivf_cells', 'neighbours', 'screened_neighbours',
           'search_settings', 'spherical_kmeans']

PRIORS = ('task', 'global')
_RESERVED = ('strongest', 'c_ref', 'space', 'train_feats', 'train', 'query_feats')


# ------------------------------------------------------------ reference ---
def reference_cost(outcomes, outcome_mask, costs) -> tuple[int, float]:
  """The strongest model on this (training) split and its mean cost c_ref.

  outcomes float[N, K], outcome_mask bool[N, K], costs float[N, K].
  Strongest = highest mean outcome over its observed cells (ties: lowest
  index); models with no observed outcome cannot be the strongest.
  c_ref = the strongest model's mean cost over all N rows (costs are always
  known), the unit of c_hat = c / c_ref.
  Returns (strongest: int, c_ref: float).
  """
  y = np.asarray(outcomes, dtype=np.float64)
  mask = np.asarray(outcome_mask, dtype=bool)
  c = np.asarray(costs, dtype=np.float64)
  if y.ndim != 2 or mask.shape != y.shape or c.shape != y.shape:
    raise ValueError(f'outcomes {y.shape}, outcome_mask {mask.shape} and costs {c.shape} '
                     'must all be [N, K]')
  counts = mask.sum(axis=0)
  if not counts.any():
    raise ValueError('no observed outcome at all: cannot tell which model is the strongest')
  sums = np.where(mask, y, 0.0).sum(axis=0)
  means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
  strongest = int(np.argmax(means))
  c_ref = float(c[:, strongest].mean())
  if not math.isfinite(c_ref) or c_ref <= 0:
    raise ValueError(
        f'c_ref = {c_ref} for the strongest model (index {strongest}): its mean training '
        'cost must be finite and > 0, since costs are normalised as c_hat = c / c_ref '
        '(lambda in "accuracy points per strongest-model cost"). A zero-cost strongest '
        'model means the costs are missing or zero-filled for it; fix the cost table.')
  return strongest, c_ref



def _task_ids(tasks, n: int, vocab: dict | None = None):
  """Task names[n] -> (int[n] ids, vocab); unknown (None, '', NaN, or not in
  a given vocab) -> -1."""
  if tasks is None:
    keys = [''] * n
  else:
    keys = ['' if t is None or (isinstance(t, float) and math.isnan(t)) else str(t)
            for t in tasks]
    if len(keys) != n:
      raise ValueError(f'{len(keys)} task names for {n} rows')
  if vocab is None:
    vocab = {name: i for i, name in enumerate(sorted(set(keys) - {''}))}
  return np.array([vocab.get(key, -1) for key in keys], dtype=np.int64), vocab


def _safe_div(num, den, fallback):
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), fallback)


def knn_estimates(train_feats, train_outcomes, train_mask, train_cost_hat, train_tasks, *,
                  query_feats=None, query_tasks=None, k: int = 50, alpha: float = 5.0,
                  prior: str = 'task', search: str = 'exact',
                  nprobe: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """kNN capability estimates p_hat, c_bar: float32[Nq, K] each.

  train_feats float[N, D] (L2-normalised rows), train_outcomes float[N, K],
  train_mask bool[N, K], train_cost_hat float[N, K], train_tasks [N] or None.
  query_feats float[Nq, D] and query_tasks [Nq] (or None: task unknown).
  query_feats=None: the queries are the N training rows, leave-one-out (a
  row is never its own neighbour, and its outcome is left out of its priors).

  Neighbours: the k most cosine-similar training rows (k clipped to the rows
  available; ties to the lowest index), found by `neighbours(..., search,
  nprobe)` (entrorouter_jax.neighbours). For each model m:
    p_hat = (sum of observed neighbour outcomes + alpha * prior(m))
            / (n observed neighbours + alpha),
  so a model with no observed neighbour gets exactly its prior. prior(m) is
  m's mean observed training outcome within the query's task ('task'; the
  global mean where the task is unknown or has no observed outcome of m) or
  over all training rows ('global'). A model never observed at all gets the
  mean of all observed outcomes as its global prior.
  c_bar = mean of train_cost_hat over the k neighbours (m's training mean if
  there is no neighbour at all, i.e. N = 1 in leave-one-out).
  """
  if query_feats is None and query_tasks is not None:
    raise ValueError('query_tasks given without query_feats (leave-one-out uses train_tasks)')
  table = KnnTable(train_feats, train_outcomes, train_mask, train_cost_hat, train_tasks, k=k,
                   alpha=alpha, prior=prior, search=search, nprobe=nprobe)
  if query_feats is None:
    return table.leave_one_out()
  return table.estimates(query_feats, query_tasks)


class KnnTable:
  """The training side of `knn_estimates`, checked and prepared once: what
  routing keeps to estimate new queries without redoing it per call (the
  float64 tables, the priors' sums and, for ivf, the k-means cells).

  `exact_search`: a callable (q float32[b, D], k) -> int[b, k] returning what
  `neighbours.exact_neighbours(q, train_feats, k)` does, which the exact search
  of `estimates` then uses instead (routing passes one that screens on the
  JAX device: router.device_neighbours)."""

  def __init__(self, train_feats, train_outcomes, train_mask, train_cost_hat, train_tasks, *,
               k: int = 50, alpha: float = 5.0, prior: str = 'task', search: str = 'exact',
               nprobe: int = 8, exact_search=None):
    if prior not in PRIORS:
      raise ValueError(f'prior must be one of {PRIORS}, got {prior!r}')
    if alpha < 0 or not math.isfinite(alpha):
      raise ValueError(f'alpha must be finite and >= 0, got {alpha}')
    if k < 1:
      raise ValueError(f'k must be >= 1, got {k}')
    x = np.ascontiguousarray(train_feats, dtype=np.float32)
    y = np.asarray(train_outcomes, dtype=np.float64)
    mask = np.asarray(train_mask, dtype=bool)
    cost = np.asarray(train_cost_hat, dtype=np.float64)
    n, num_models = y.shape
    if x.ndim != 2 or len(x) != n or mask.shape != y.shape or cost.shape != y.shape:
      raise ValueError(f'train_feats {x.shape}, train_outcomes {y.shape}, train_mask '
                       f'{mask.shape}, train_cost_hat {cost.shape}: expected [N, D] and [N, K]')
    if n == 0:
      raise ValueError('no training rows')
    if not np.isfinite(x).all():
      raise ValueError('features must be finite')
    # Per training row, side by side so that a neighbour list is gathered once:
    # observed outcomes (missing cells contribute nothing to any sum), the
    # observation mask and the normalised costs.
    self.per_row = np.concatenate([np.where(mask, y, 0.0), mask, cost], axis=1)
    self.y_obs, self.m_obs, self.cost = np.split(self.per_row, 3, axis=1)
    if not (np.isfinite(self.y_obs).all() and np.isfinite(cost).all()):
      raise ValueError('observed outcomes and all costs must be finite')
    self.x, self.n, self.num_models = x, n, num_models
    self.k, self.alpha, self.prior = k, alpha, prior
    self.search = knn_search.resolve_search(search, nprobe, n)
    self.nprobe = nprobe
    self.exact_search = exact_search
    self.all_sum, self.all_cnt = self.y_obs.sum(axis=0), self.m_obs.sum(axis=0)
    self.cost_mean = self.cost.mean(axis=0)   # c_bar without neighbours (k = 0)
    if prior == 'task':
      self.train_ids, self.vocab = _task_ids(train_tasks, n)
      self.t_sum = np.zeros((len(self.vocab) + 1, num_models))  # last row: unknown task
      self.t_cnt = np.zeros_like(self.t_sum)
      np.add.at(self.t_sum, self.train_ids, self.y_obs)  # id -1 lands on the unknown row
      np.add.at(self.t_cnt, self.train_ids, self.m_obs)
      self.t_sum[-1] = self.t_cnt[-1] = 0.0  # an unknown task pools nothing: the global mean
    self._index = None

  def _priors(self, num_q, own_sum, own_cnt, q_ids):
    """prior(m) float[Nq, K], each query's own cell (leave-one-out) taken out."""
    # A model never observed falls back to the mean of every observed cell (0.5 if none).
    pooled = _safe_div(self.all_sum.sum() - own_sum.sum(axis=1, keepdims=True),
                       self.all_cnt.sum() - own_cnt.sum(axis=1, keepdims=True), 0.5)
    glob = _safe_div(self.all_sum - own_sum, self.all_cnt - own_cnt, pooled)
    glob = np.broadcast_to(glob, (num_q, self.num_models))
    if self.prior == 'task':
      return _safe_div(self.t_sum[q_ids] - own_sum, self.t_cnt[q_ids] - own_cnt, glob)
    return glob

  def _tables(self, idx_all, prior_hat, num_q):
    """(p_hat, c_bar) float32[Nq, K] from the neighbours int[Nq, k] (None: none)."""
    nbr_sum = np.zeros((num_q, self.num_models))
    nbr_cnt = np.zeros((num_q, self.num_models))
    c_bar = np.broadcast_to(self.cost_mean, (num_q, self.num_models)).copy()
    if idx_all is not None:
      chunk = max(1, knn_search.BLOCK_CELLS // (idx_all.shape[1] * self.per_row.shape[1]))
      for start in range(0, num_q, chunk):
        idx = idx_all[start:start + chunk]
        sums = self.per_row[idx].sum(axis=1)
        nbr_sum[start:start + chunk], nbr_cnt[start:start + chunk], cost_sum = np.split(
            sums, 3, axis=1)
        c_bar[start:start + chunk] = cost_sum / idx.shape[1]
    # alpha = 0 with no observed neighbour would be 0/0: fall back to the prior.
    p_hat = _safe_div(nbr_sum + self.alpha * prior_hat, nbr_cnt + self.alpha, prior_hat)
    return p_hat.astype(np.float32), c_bar.astype(np.float32)

  def leave_one_out(self) -> tuple[np.ndarray, np.ndarray]:
    """(p_hat, c_bar) of every training row, none its own neighbour."""
    q_ids = self.train_ids if self.prior == 'task' else None
    prior_hat = self._priors(self.n, self.y_obs, self.m_obs, q_ids)
    k_eff = min(self.k, self.n - 1)
    idx = (knn_search.neighbours(self.x, self.x, k_eff, True, self.search, self.nprobe)
           if k_eff else None)
    return self._tables(idx, prior_hat, self.n)

  def estimates(self, query_feats, query_tasks=None) -> tuple[np.ndarray, np.ndarray]:
    """(p_hat, c_bar) of new queries float[Nq, D] (tasks [Nq] or None: unknown)."""
    q = np.ascontiguousarray(query_feats, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != self.x.shape[1]:
      raise ValueError(f'query_feats {q.shape} do not match train_feats {self.x.shape}')
    if not np.isfinite(q).all():
      raise ValueError('features must be finite')
    num_q = len(q)
    q_ids = (_task_ids(query_tasks, num_q, self.vocab)[0] if self.prior == 'task' else None)
    zeros = np.zeros((1, self.num_models))
    prior_hat = self._priors(num_q, zeros, zeros, q_ids)
    k_eff = min(self.k, self.n)
    if self.search == 'exact':
      idx = (knn_search.exact_neighbours(q, self.x, k_eff) if self.exact_search is None
             else self.exact_search(q, k_eff))
    else:
      if self._index is None:
        self._index = knn_search.IvfIndex(self.x, self.nprobe)
      idx = self._index.search(q, k_eff)
    return self._tables(idx, prior_hat, num_q)


# --------------------------------------------------------------- wrapper ---
def capability_estimates(train_texts, train_outcomes, train_mask, train_costs, train_tasks,
                         query_sets: dict, *, k: int = 50, alpha: float = 5.0,
                         prior: str = 'task', dim: int = 256, min_df: int | float = 2,
                         space=None, search: str = 'exact', nprobe: int = 8) -> dict:
  """Stage 0 end to end on raw costs.

  query_sets: {name: (texts[Nq], tasks[Nq] or None)}.
  space: the neighbour space, anything with fit(texts) / transform(texts) ->
  unit rows (e.g. backbones.BackboneSpace); None = TfidfSpace(dim, min_df).
  Returns {'strongest': int, 'c_ref': float, 'space': the fitted space,
           'train_feats': the training texts in that space, float32[N, dim],
           'train': (p_hat, c_bar) leave-one-out, float32[N, K] each,
           'query_feats': {name: that query set in the space, float32[Nq, dim]},
           name: (p_hat, c_bar) float32[Nq, K] each, for every query set}.
  c_bar is in units of c_ref (c_hat = train_costs / c_ref).
  """
  clash = set(query_sets) & set(_RESERVED)
  if clash:
    raise ValueError(f'query set names {sorted(clash)} are reserved: {_RESERVED}')
  strongest, c_ref = reference_cost(train_outcomes, train_mask, train_costs)
  c_hat = np.asarray(train_costs, dtype=np.float64) / c_ref
  space = (space or features.TfidfSpace(dim=dim, min_df=min_df)).fit(train_texts)
  train_feats = space.transform(train_texts)
  common = dict(k=k, alpha=alpha, prior=prior, search=search, nprobe=nprobe)
  out = {'strongest': strongest, 'c_ref': c_ref, 'space': space, 'train_feats': train_feats,
         'train': knn_estimates(train_feats, train_outcomes, train_mask, c_hat, train_tasks,
                                **common)}
  out['query_feats'] = {}
  for name, (texts, tasks) in query_sets.items():
    feats = out['query_feats'][name] = space.transform(texts)
    out[name] = knn_estimates(train_feats, train_outcomes, train_mask, c_hat, train_tasks,
                              query_feats=feats, query_tasks=tasks, **common)
  return out
