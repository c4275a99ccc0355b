"""Stage 0 of ../shared/METHOD.md: offline capability estimates (NumPy + scikit-learn).

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
'global'), the space (TF-IDF word 1-2 grams -> dim-d SVD).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from threadpoolctl import threadpool_limits

PRIORS = ('task', 'global')
SEARCHES = ('auto', 'exact', 'ivf')
# search='auto' stays exact up to this many training rows (exact costs N^2 in
# leave-one-out: seconds at 10k rows on two CPU cores, hours at 1M).
EXACT_MAX_ROWS = 50_000
# Cap on the similarity block (queries x training rows) held at once: a few
# arrays of that size (similarities, a mask, at worst candidate indices).
_BLOCK_CELLS = 1 << 24
_MAX_CHUNK = 1024
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


# -------------------------------------------------------------- features ---
class TfidfSpace:
  """Query texts -> float32[N, dim] unit vectors: TF-IDF (word 1-2 grams,
  sublinear tf) followed by a truncated SVD (LSA) and L2 normalisation.

  dim is clipped to min(dim, n_training_texts, vocabulary size); the fitted
  width is `self.dim_`. Deterministic (fixed random_state) and picklable.
  Texts with no known term map to the zero vector (similar to nothing).
  """

  def __init__(self, dim: int = 256, min_df: int | float = 2, max_features: int = 50_000,
               random_state: int = 0):
    self.dim = dim
    self.min_df = min_df
    self.max_features = max_features
    self.random_state = random_state

  def fit(self, texts) -> 'TfidfSpace':
    """Fit the vocabulary, idf weights and SVD basis on training texts[N]."""
    texts = list(texts)
    self._basis = None
    self.tfidf_ = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=self.min_df,
                                  max_features=self.max_features, dtype=np.float32)
    x = self.tfidf_.fit_transform(texts)
    n, n_terms = x.shape
    if n_terms < 2:
      raise ValueError(f'TF-IDF vocabulary has {n_terms} term(s) (min_df={self.min_df}, '
                       f'{n} texts): need at least 2; lower min_df or give more texts')
    # More components than rows or terms would be empty directions.
    self.dim_ = int(min(self.dim, n, n_terms))
    self.svd_ = TruncatedSVD(n_components=self.dim_, algorithm='randomized',
                             random_state=self.random_state)
    # One BLAS thread: as fast as two on an idle 2-core machine (~2.5 s for
    # 20k texts), but ~6x faster when another process is busy on the cores
    # (spinning BLAS threads of the tall-skinny randomized-SVD products).
    with threadpool_limits(limits=1, user_api='blas'):
      self.svd_.fit(x)
    return self

  def transform(self, texts) -> np.ndarray:
    """texts[Nq] -> float32[Nq, dim_] rows of unit norm (zero rows stay zero)."""
    if not hasattr(self, 'svd_'):
      raise RuntimeError('TfidfSpace.transform called before fit')
    if getattr(self, '_basis', None) is None:
      # The SVD's projection as a C-ordered [terms, dim] matrix: a sparse row
      # times it is much faster than svd_.transform's product with the
      # transposed (Fortran-ordered) view, and gives the same numbers.
      self._basis = np.ascontiguousarray(self.svd_.components_.T)
    z = np.asarray(self.tfidf_.transform(list(texts)) @ self._basis, dtype=np.float32)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norms, 1e-12)

  def fit_transform(self, texts) -> np.ndarray:
    texts = list(texts)
    return self.fit(texts).transform(texts)

  def __getstate__(self):   # the basis is derived: rebuilt on first use, not pickled
    return {k: v for k, v in self.__dict__.items() if k != '_basis'}


# ------------------------------------------------------------ neighbours ---
def _top_k(sims: np.ndarray, k: int, labels: np.ndarray | None = None) -> np.ndarray:
  """Column indices int[b, k] (ascending) of the k largest entries of each row of sims[b, N].

  Ties at the k-th value go to the lowest label (labels int[N], distinct; by
  default the column index), so the set is fully determined by the
  similarities and labels (duplicate texts tie exactly).
  """
  b, n = sims.shape
  # Candidates: entries >= the k-th largest of every 8th column, a lower bound
  # on the row's k-th largest that leaves ~8k per row (all N at worst, e.g. an
  # all-tied row). Partitioning whole rows instead costs ~3x more.
  stride = 8 if n >= 32 * k else 1
  sub = sims[:, ::stride]
  bound = np.partition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k, None]
  flat = np.flatnonzero(sims >= bound)  # row-major: rows, then columns, ascending
  rows, cols = np.divmod(flat, n)
  vals = sims.ravel()[flat]
  counts = np.bincount(rows, minlength=b)  # >= k in every row
  starts = np.cumsum(counts) - counts
  # The exact k-th largest among each row's candidates (rows padded with -inf).
  cand = np.full((b, int(counts.max())), -np.inf, dtype=sims.dtype)
  cand[rows, np.arange(len(flat)) - starts[rows]] = vals
  kth = np.partition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k]
  keep = vals > kth[rows]
  # Fill each row up to k with its tied candidates, lowest label first.
  need = k - np.bincount(rows, weights=keep, minlength=b).astype(np.int64)
  tied = np.flatnonzero(vals == kth[rows])
  tied = tied[np.lexsort((cols[tied] if labels is None else labels[cols[tied]], rows[tied]))]
  tied_rows = rows[tied]
  rank = np.arange(len(tied)) - np.searchsorted(tied_rows, tied_rows)  # 0-based within the row
  keep[tied[rank < need[tied_rows]]] = True
  return cols[keep].reshape(b, k)


def _exact_neighbours(q, x, k: int, loo: bool, similarities=None) -> np.ndarray:
  """int[Nq, k]: the exact k most similar training rows of each query (blocked).
  `similarities(q_block) -> float32[b, N]` computes q_block @ x.T elsewhere
  (router.device_neighbours, on the JAX device); default NumPy's."""
  n = len(x)
  out = np.empty((len(q), k), np.int64)
  chunk = max(1, min(_MAX_CHUNK, _BLOCK_CELLS // n))
  for start in range(0, len(q), chunk):
    stop = min(start + chunk, len(q))
    # [b, N] cosine similarities
    sims = q[start:stop] @ x.T if similarities is None else similarities(q[start:stop])
    if loo:
      rows = np.arange(stop - start)
      sims[rows, start + rows] = -np.inf
    out[start:stop] = _top_k(sims, k)
  return out


def exact_neighbours(q, x, k: int, similarities=None) -> np.ndarray:
  """int[Nq, k]: the exact k nearest training rows x[N, D] of each query q[Nq, D]
  (ties to the lowest index), q @ x.T by `similarities` (see _exact_neighbours)."""
  return _exact_neighbours(q, x, k, False, similarities)


def half_precision_error(dim: int) -> float:
  """The most fl16(q) . fl16(x), summed in float32, can differ from q . x for
  vectors of dimension `dim` with |q|, |x| <= 1 (what `screened_neighbours`
  allows between a screen's similarity and the exact one).

  Rounding to float16 moves each entry v by at most u |v| + a (u = 2^-11, the
  unit roundoff; a = 2^-25, half the subnormal spacing), so with
  |q|_1, |x|_1 <= sqrt(dim) the products differ by at most
  (2u + u^2) + 2 a (1 + u) sqrt(dim) + dim a^2 in all; the float16 products
  are exact in float32, and summing dim of them in any order adds at most
  gamma_dim = dim 2^-24 / (1 - dim 2^-24) times their absolute sum, itself
  <= (1 + u)^2 (1 + a sqrt(dim))^2. Overflow cannot happen at norm <= 1.
  """
  u, a, root = 2.0 ** -11, 2.0 ** -25, math.sqrt(dim)
  gamma = dim * 2.0 ** -24 / (1.0 - dim * 2.0 ** -24)
  return ((2 * u + u * u) + 2 * a * (1 + u) * root + dim * a * a
          + gamma * (1 + u) ** 2 * (1 + a * root) ** 2)


def screened_neighbours(q, x, vals, idx, k: int, eps: float, similarities=None) -> np.ndarray:
  """int[Nq, k]: `_exact_neighbours(q, x, k, loo=False)` from a screen.

  The screen (router.device_neighbours) gives each query the `w` >= k
  training rows of highest approximate similarity, vals float[Nq, w]
  (descending) at indices idx int[Nq, w], each within `eps` of the exact
  similarity (scaled per query: only the order within a row matters). Every
  true neighbour then screens at least vals[:, k-1] - 2 eps: the k rows
  screened highest are exactly >= vals[:, k-1] - eps, so the true k-th is too,
  and a row screened below that floor is exactly below the k-th. Where the
  screen reaches below the floor (or holds all N rows), the rows above it are
  reranked by their exact similarity (ties to the lowest index, as exact
  search); any other query falls back to the exact search (by `similarities`,
  see _exact_neighbours).
  """
  vals, idx = np.asarray(vals, np.float64), np.asarray(idx, np.int64)
  num_q, w = idx.shape
  floor = vals[:, k - 1] - 2 * eps
  proven = (vals[:, w - 1] < floor) | (w == len(x))
  out = np.empty((num_q, k), np.int64)
  for r in np.flatnonzero(proven):
    cand = np.sort(idx[r, vals[r] >= floor[r]])
    sims = np.einsum('cd,d->c', x[cand], q[r])   # no BLAS: its threads would spin after
    out[r] = cand[_top_k(sims[None], k)[0]]
  rest = np.flatnonzero(~proven)
  if len(rest):
    out[rest] = _exact_neighbours(q[rest], x, k, False, similarities)
  return out


def ivf_cells(n: int) -> int:
  """k-means cells of the approximate search for n training rows: ~2 sqrt(n),
  at least 32 rows per cell on average."""
  return int(max(1, min(round(2 * math.sqrt(n)), n // 32)))


def _nearest_cell(x, centroids) -> np.ndarray:
  """int[N]: the most similar centroid of each row (blocked matmul)."""
  out = np.empty(len(x), np.int64)
  chunk = max(1, _BLOCK_CELLS // max(1, len(centroids)))
  for start in range(0, len(x), chunk):
    out[start:start + chunk] = np.argmax(x[start:start + chunk] @ centroids.T, axis=1)
  return out


def spherical_kmeans(x, cells: int, iters: int = 6, sample: int = 64, seed: int = 0):
  """float32[cells, D] unit centroids from a few Lloyd steps (cosine) on a seeded
  sample of `sample` rows per cell; an emptied cell keeps its centroid."""
  rng = np.random.default_rng(seed)
  n = len(x)
  rows = x[np.sort(rng.choice(n, min(n, cells * sample), replace=False))]
  centroids = rows[np.sort(rng.choice(len(rows), cells, replace=False))].copy()
  for _ in range(iters):
    assign = _nearest_cell(rows, centroids)
    order = np.argsort(assign, kind='stable')
    used, starts = np.unique(assign[order], return_index=True)
    sums = np.add.reduceat(rows[order], starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids[used] = sums / np.maximum(norms, 1e-12)
  return centroids


def _top_cells(q, centroids, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
  """(int[Nq, nprobe] each query's `nprobe` most similar centroids, in no
  particular order; int[Nq] the most similar one), one blocked matmul."""
  top = np.empty((len(q), nprobe), np.int64)
  best = np.empty(len(q), np.int64)
  chunk = max(1, _BLOCK_CELLS // max(1, len(centroids)))
  for start in range(0, len(q), chunk):
    sims = q[start:start + chunk] @ centroids.T
    top[start:start + chunk] = np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe]
    best[start:start + chunk] = np.argmax(sims, axis=1)
  return top, best


class IvfIndex:
  """The training side of the approximate search, built once: spherical k-means
  cells over the rows and the rows sorted by cell.

  The training rows are split into ivf_cells(N) cells; each query's candidates
  are the rows of its `nprobe` most similar cells. Queries are taken `block` at
  a time in cell order (neighbouring queries probe mostly the same cells) and
  every query of a block is scored against the union of the block's cells (a
  superset of its own), so the work is ~N_q x N x (a few) nprobe / cells dot
  products instead of N_q x N. A true neighbour is missed only when it lies
  outside the probed cells; benchmarks/run.py measures the recall against
  exact. A block whose cells hold fewer than k + 1 rows is searched exactly.

  The dot products are taken cell by cell for `group` consecutive blocks at a
  time: each cell's rows are read once and scored in one matmul against all of
  the group's blocks that probe it, instead of once per block (on CPU, a
  32-row matmul streaming a cell from memory runs at a fraction of the rate of
  a few-hundred-row one). The candidates and results are the same.
  """

  def __init__(self, x, nprobe: int, centroids=None, x_cell=None):
    self.x = x
    self.cells = ivf_cells(len(x))
    self.nprobe = min(int(nprobe), self.cells)
    self.centroids = spherical_kmeans(x, self.cells) if centroids is None else centroids
    self.x_cell = _nearest_cell(x, self.centroids) if x_cell is None else x_cell
    self.by_cell = np.argsort(self.x_cell, kind='stable')
    self.x_sorted = x[self.by_cell]   # each cell's rows contiguous: matmuls on views, no gathers
    self.bounds = np.searchsorted(self.x_cell[self.by_cell], np.arange(self.cells + 1))
    self.sizes = np.diff(self.bounds)
    self.rank = np.empty(len(x), np.int64)  # row i sits at x_sorted[rank[i]]
    self.rank[self.by_cell] = np.arange(len(x))

  def search(self, q, k: int, loo: bool = False, probes=None, block: int = 32,
             group: int = 16) -> np.ndarray:
    """int[Nq, k] (each row ascending); `loo`: q is the training rows, none its
    own neighbour. `probes`: _top_cells(q, ...) where the caller has it already."""
    probes, q_cell = probes if probes is not None else _top_cells(q, self.centroids,
                                                                  self.nprobe)
    order = np.argsort(q_cell, kind='stable')
    out = np.empty((len(q), k), np.int64)
    pending, cells_held = [], 0
    for start in range(0, len(q), block):
      rows = np.sort(order[start:start + block])
      probe = np.unique(probes[rows])
      candidates = int(self.sizes[probe].sum())
      if candidates < k + 1:
        probe, candidates = np.arange(self.cells), len(self.x)
      held = len(rows) * candidates
      if pending and (len(pending) == group or cells_held + held > _BLOCK_CELLS):
        self._search_group(q, pending, k, loo, out)
        pending, cells_held = [], 0
      pending.append((rows, probe))
      cells_held += held
    if pending:
      self._search_group(q, pending, k, loo, out)
    return out

  def _search_group(self, q, blocks, k: int, loo: bool, out) -> None:
    """Fills out[rows] for a group of (rows, probed cells) blocks."""
    sizes, bounds = self.sizes, self.bounds
    lengths = np.array([len(rows) for rows, _ in blocks])
    first_row = np.cumsum(lengths) - lengths   # each block's first row in qg
    qg = q[np.concatenate([rows for rows, _ in blocks])]
    # sims[b][:, offsets[b][i]:...] holds block b's scores against its i-th cell.
    sims = [np.empty((len(rows), int(sizes[p].sum())), np.float32) for rows, p in blocks]
    offsets = [np.cumsum(sizes[p]) - sizes[p] for _, p in blocks]
    # (cell, block, position of the cell in the block's list), grouped by cell.
    cell = np.concatenate([p for _, p in blocks])
    blk = np.repeat(np.arange(len(blocks)), [len(p) for _, p in blocks])
    pos = np.concatenate([np.arange(len(p)) for _, p in blocks])
    by = np.argsort(cell, kind='stable')
    cell, blk, pos = cell[by], blk[by], pos[by]
    cuts = np.flatnonzero(np.diff(cell)) + 1
    for j, c_blk, c_pos in zip(cell[np.r_[0, cuts]], np.split(blk, cuts), np.split(pos, cuts)):
      if sizes[j] == 0:
        continue
      if c_blk[-1] - c_blk[0] + 1 == len(c_blk):   # consecutive blocks: a view of qg
        qj = qg[first_row[c_blk[0]]:first_row[c_blk[-1]] + lengths[c_blk[-1]]]
      else:
        qj = qg[np.concatenate([np.arange(first_row[b], first_row[b] + lengths[b])
                                for b in c_blk])]
      scores = qj @ self.x_sorted[bounds[j]:bounds[j + 1]].T
      row = 0
      for b, i in zip(c_blk, c_pos):
        col = offsets[b][i]
        sims[b][:, col:col + sizes[j]] = scores[row:row + lengths[b]]
        row += lengths[b]
    for (rows, probe), sb, off in zip(blocks, sims, offsets):
      cand = np.concatenate([self.by_cell[bounds[j]:bounds[j + 1]] for j in probe])
      if loo:  # a row is never its own neighbour (where its cell is probed)
        own = self.x_cell[rows]
        at = np.minimum(np.searchsorted(probe, own), len(probe) - 1)
        hit = np.flatnonzero(probe[at] == own)
        sb[hit, (off[at] + self.rank[rows] - bounds[own])[hit]] = -np.inf
      # Ties go to the lowest training index, as in exact search.
      out[rows] = np.sort(cand[_top_k(sb, k, labels=cand)], axis=1)


def _ivf_neighbours(q, x, k: int, loo: bool, nprobe: int) -> np.ndarray:
  """int[Nq, k]: approximate neighbours, exact among a candidate set (IvfIndex)."""
  if not loo:
    return IvfIndex(x, nprobe).search(q, k)
  cells = ivf_cells(len(x))
  centroids = spherical_kmeans(x, cells)
  probes = _top_cells(x, centroids, min(int(nprobe), cells))
  return IvfIndex(x, nprobe, centroids, x_cell=probes[1]).search(x, k, loo=True, probes=probes)


def _resolve_search(search: str, nprobe: int, n: int) -> str:
  if search not in SEARCHES:
    raise ValueError(f'search must be one of {SEARCHES}, got {search!r}')
  if nprobe < 1:
    raise ValueError(f'nprobe must be >= 1, got {nprobe}')
  if search == 'auto':
    return 'exact' if n <= EXACT_MAX_ROWS else 'ivf'
  return search


def neighbours(q, x, k: int, loo: bool, search: str = 'auto', nprobe: int = 8) -> np.ndarray:
  """int[Nq, k] training-row indices of each query's k nearest neighbours.

  search: 'exact' (ties to the lowest index), 'ivf' (approximate: exact within
  the k-means cells nearest each query's, see IvfIndex), or 'auto'
  (exact up to EXACT_MAX_ROWS training rows, ivf above).
  """
  if _resolve_search(search, nprobe, len(x)) == 'exact':
    return _exact_neighbours(q, x, k, loo)
  return _ivf_neighbours(q, x, k, loo, nprobe)


def search_settings(anchor) -> dict:
  """{'search', 'nprobe'} from a config's `anchor` block (older configs: exact)."""
  return {'search': anchor.get('search', 'exact'), 'nprobe': int(anchor.get('nprobe', 8))}


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
  nprobe)`. For each model m:
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
  `_exact_neighbours(q, train_feats, k, False)` does, which the exact search
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
    self.search = _resolve_search(search, nprobe, n)
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
      chunk = max(1, _BLOCK_CELLS // (idx_all.shape[1] * self.per_row.shape[1]))
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
    idx = neighbours(self.x, self.x, k_eff, True, self.search, self.nprobe) if k_eff else None
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
      idx = (_exact_neighbours(q, self.x, k_eff, False) if self.exact_search is None
             else self.exact_search(q, k_eff))
    else:
      if self._index is None:
        self._index = IvfIndex(self.x, self.nprobe)
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
  space = (space or TfidfSpace(dim=dim, min_df=min_df)).fit(train_texts)
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
