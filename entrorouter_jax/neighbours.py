"""Nearest-neighbour search over unit rows (cosine similarity = dot product), NumPy only.

Stage 0 (capability.py) and routing (router.device_neighbours, which screens
on the JAX device and finishes here) find each query's k most similar training
rows by one of:
  exact_neighbours     blocked exact search, ties to the lowest index;
  screened_neighbours  exact neighbours from an approximate screen, proven with
                       half_precision_error's bound (else exact);
  IvfIndex             approximate: exact among the rows of the spherical
                       k-means cells nearest each query's;
  neighbours           one entry point: 'exact', 'ivf' or 'auto' (exact up to
                       EXACT_MAX_ROWS training rows), with leave-one-out.
Shapes: q float32[Nq, D] queries, x float32[N, D] training rows (unit norm);
results int[Nq, k] training-row indices.
"""

from __future__ import annotations

import math

import numpy as np

SEARCHES = ('auto', 'exact', 'ivf')
# search='auto' stays exact up to this many training rows (exact leave-one-out costs N^2).
EXACT_MAX_ROWS = 50_000
# Cap on the similarity block (queries x training rows) held at once: a few
# arrays of that size (similarities, a mask, at worst candidate indices).
BLOCK_CELLS = 1 << 24
_MAX_CHUNK = 1024


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
  chunk = max(1, min(_MAX_CHUNK, BLOCK_CELLS // n))
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
  chunk = max(1, BLOCK_CELLS // max(1, len(centroids)))
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
  chunk = max(1, BLOCK_CELLS // max(1, len(centroids)))
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
  the group's blocks that probe it, instead of once per block (a few large
  matmuls run faster than many small ones). The candidates and results are the
  same.
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
      if pending and (len(pending) == group or cells_held + held > BLOCK_CELLS):
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


def resolve_search(search: str, nprobe: int, n: int) -> str:
  """'exact' or 'ivf': the search `search` means for n training rows (checked)."""
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
  if resolve_search(search, nprobe, len(x)) == 'exact':
    return _exact_neighbours(q, x, k, loo)
  return _ivf_neighbours(q, x, k, loo, nprobe)


def search_settings(anchor) -> dict:
  """{'search', 'nprobe'} from a config's `anchor` block (older configs: exact)."""
  return {'search': anchor.get('search', 'exact'), 'nprobe': int(anchor.get('nprobe', 8))}
