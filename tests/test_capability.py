"""Stage-0 capability estimates against a plain NumPy reference."""

import pickle

import numpy as np
import pytest

from entrorouter_jax.capability import capability_estimates, knn_estimates, reference_cost
from entrorouter_jax.features import TfidfSpace

TASKS = ['a', 'b', 'c', '', None]


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(seed=0, n=40, num_models=4, dim=8, num_q=15):
  """Random table with ~30% missing outcomes; task 'b' never observes model 3."""
  rng = np.random.default_rng(seed)
  tasks = [TASKS[i] for i in rng.integers(0, len(TASKS), n)]
  mask = rng.random((n, num_models)) > 0.3
  mask[[t == 'b' for t in tasks], 3] = False
  return dict(
      feats=_unit(rng.normal(size=(n, dim))).astype(np.float32),
      outcomes=rng.random((n, num_models)).round(2),
      mask=mask,
      cost=rng.random((n, num_models)) * 3,
      tasks=tasks,
      query_feats=_unit(rng.normal(size=(num_q, dim))).astype(np.float32),
      query_tasks=[['a', 'b', 'z', '', None][i] for i in rng.integers(0, 5, num_q)])


def _mean(values):
  return sum(values) / len(values)


def _reference(d, *, loo, k, alpha, prior):
  """Double loop over queries and models with explicit neighbour and prior sets."""
  x, y, mask, cost, tasks = d['feats'], d['outcomes'], d['mask'], d['cost'], d['tasks']
  n, num_models = y.shape
  queries = x if loo else d['query_feats']
  q_tasks = tasks if loo else d['query_tasks']
  p_hat = np.zeros((len(queries), num_models))
  c_bar = np.zeros((len(queries), num_models))
  for i, qf in enumerate(queries):
    others = [j for j in range(n) if not (loo and j == i)]
    sims = {j: float(np.dot(qf.astype(np.float64), x[j])) for j in others}
    nbrs = sorted(others, key=lambda j: -sims[j])[:k]
    task = q_tasks[i]
    for m in range(num_models):
      obs_all = [y[j, m] for j in others if mask[j, m]]
      if obs_all:
        glob = _mean(obs_all)
      else:
        glob = _mean([y[j, mm] for j in others for mm in range(num_models) if mask[j, mm]])
      pri = glob
      if prior == 'task' and task not in ('', None):
        obs_task = [y[j, m] for j in others if mask[j, m] and tasks[j] == task]
        if obs_task:
          pri = _mean(obs_task)
      obs = [y[j, m] for j in nbrs if mask[j, m]]
      if obs or alpha > 0:
        p_hat[i, m] = (sum(obs) + alpha * pri) / (len(obs) + alpha)
      else:
        p_hat[i, m] = pri
      c_bar[i, m] = _mean([cost[j, m] for j in nbrs]) if nbrs else 0.0
  return p_hat, c_bar


def _estimate(d, *, loo, **kw):
  extra = {} if loo else dict(query_feats=d['query_feats'], query_tasks=d['query_tasks'])
  return knn_estimates(d['feats'], d['outcomes'], d['mask'], d['cost'], d['tasks'],
                       **extra, **kw)


@pytest.mark.parametrize('prior', ['task', 'global'])
@pytest.mark.parametrize('loo', [True, False])
@pytest.mark.parametrize('k', [1, 7, 1000])
def test_matches_reference(prior, loo, k):
  d = _data(seed=k)
  p_hat, c_bar = _estimate(d, loo=loo, k=k, alpha=3.0, prior=prior)
  ref_p, ref_c = _reference(d, loo=loo, k=k, alpha=3.0, prior=prior)
  n_q = len(d['feats']) if loo else len(d['query_feats'])
  assert p_hat.shape == c_bar.shape == (n_q, 4)
  assert p_hat.dtype == c_bar.dtype == np.float32
  np.testing.assert_allclose(p_hat, ref_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c_bar, ref_c, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_matter(monkeypatch):
  from entrorouter_jax import neighbours
  d = _data(seed=3, n=60, num_q=25)
  want = _estimate(d, loo=True, k=5, alpha=2.0, prior='task')
  monkeypatch.setattr(neighbours, '_MAX_CHUNK', 7)
  got = _estimate(d, loo=True, k=5, alpha=2.0, prior='task')
  np.testing.assert_array_equal(want[0], got[0])
  np.testing.assert_array_equal(want[1], got[1])


@pytest.mark.parametrize('prior', ['task', 'global'])
def test_leave_one_out_never_uses_own_label(prior):
  d = _data(seed=5)
  d['mask'][:] = True
  before, _ = _estimate(d, loo=True, k=5, alpha=2.0, prior=prior)
  i = 11
  d['outcomes'][i] = (d['outcomes'][i] + 0.37) % 1.0
  after, _ = _estimate(d, loo=True, k=5, alpha=2.0, prior=prior)
  np.testing.assert_array_equal(before[i], after[i])
  # ...but it does move the rows that have row i among their neighbours.
  sims = d['feats'] @ d['feats'].T
  np.fill_diagonal(sims, -np.inf)
  uses_i = [j for j in range(len(sims)) if i in np.argsort(-sims[j])[:5]]
  assert uses_i
  for j in uses_i:
    assert np.all(np.abs(after[j] - before[j]) > 1e-4)


def test_alpha_limits():
  d = _data(seed=7)
  # alpha -> infinity: the prior alone (the reference with no neighbour weight).
  big, _ = _estimate(d, loo=False, k=5, alpha=1e9, prior='task')
  ref_prior, _ = _reference(d, loo=False, k=0, alpha=1.0, prior='task')
  np.testing.assert_allclose(big, ref_prior, atol=1e-6)
  # alpha = 0: the mean observed outcome of the neighbours (the prior if none observed).
  zero, _ = _estimate(d, loo=False, k=5, alpha=0.0, prior='task')
  sims = d['query_feats'] @ d['feats'].T
  for i in range(len(sims)):
    nbrs = np.argsort(-sims[i])[:5]
    for m in range(4):
      obs = d['mask'][nbrs, m]
      want = d['outcomes'][nbrs, m][obs].mean() if obs.any() else ref_prior[i, m]
      assert zero[i, m] == pytest.approx(want, abs=1e-6)


def test_model_without_observed_neighbours_gets_its_prior():
  d = _data(seed=9)
  d['mask'][:, 2] = False
  d['mask'][:3, 2] = True  # only three observed rows of model 2 in all
  p_hat, _ = _estimate(d, loo=False, k=1, alpha=4.0, prior='global')
  sims = d['query_feats'] @ d['feats'].T
  nearest = sims.argmax(axis=1)
  glob = d['outcomes'][:3, 2].mean()
  far = nearest >= 3
  assert far.any()
  np.testing.assert_allclose(p_hat[far, 2], glob, atol=1e-6)


def test_c_bar_is_neighbour_mean_of_costs():
  d = _data(seed=4)
  d['mask'][:] = False  # costs do not depend on outcomes being observed
  _, c_bar = _estimate(d, loo=False, k=6, alpha=1.0, prior='global')
  sims = d['query_feats'] @ d['feats'].T
  for i in range(len(sims)):
    np.testing.assert_allclose(c_bar[i], d['cost'][np.argsort(-sims[i])[:6]].mean(axis=0),
                               rtol=1e-6)


def test_ties_go_to_lowest_index():
  n = 10
  feats = np.tile(_unit(np.ones((1, 4))), (n, 1)).astype(np.float32)  # all identical
  cost = np.arange(n, dtype=float)[:, None].repeat(2, axis=1)
  args = (feats, np.zeros((n, 2)), np.ones((n, 2), bool), cost, None)
  _, c_loo = knn_estimates(*args, k=3)
  assert c_loo[0, 0] == pytest.approx(2.0)  # rows 1, 2, 3
  assert c_loo[5, 0] == pytest.approx(1.0)  # rows 0, 1, 2
  _, c_q = knn_estimates(*args, query_feats=feats[:2], k=3)
  np.testing.assert_allclose(c_q, 1.0)


def test_top_k_large_rows_and_ties():
  """The candidate-filtered top-k (rows of >= 32k entries) equals a stable sort."""
  from entrorouter_jax.neighbours import _top_k
  rng = np.random.default_rng(1)
  train = _unit(rng.normal(size=(3000, 16))).astype(np.float32)
  train[1500:1600] = train[7]  # 101 exact duplicates: ties straddle the k-th value
  queries = np.concatenate([train[[7, 8, 2999]], _unit(rng.normal(size=(20, 16)))])
  queries = np.concatenate([queries, np.zeros((1, 16))]).astype(np.float32)  # all-tied row
  sims = queries @ train.T
  for k in (1, 20, 150):
    want = np.sort(np.argsort(-sims, axis=1, kind='stable')[:, :k], axis=1)
    np.testing.assert_array_equal(_top_k(sims.copy(), k), want)


def test_half_precision_error_bounds_float16_products():
  """Similarities of float16 copies, summed in float32, stay within the bound
  of exact ones (float64), for unit vectors and for tiny (subnormal) entries;
  and the bound is tight enough to screen with (about 2^-10)."""
  from entrorouter_jax.neighbours import half_precision_error
  rng = np.random.default_rng(3)
  for dim in (8, 640):
    bound = half_precision_error(dim)
    assert 2.0 ** -10 < bound < 1.1e-3
    q = _unit(rng.normal(size=(50, dim)))
    x = _unit(rng.normal(size=(400, dim)))
    x[:40, :dim // 2] *= 1e-4   # entries below float16's normal range (6.1e-5)
    x = _unit(x)
    q[:5] *= rng.random((5, 1))                                     # norms below 1
    approx = q.astype(np.float16).astype(np.float32) @ x.astype(np.float16).astype(np.float32).T
    assert np.abs(approx - q @ x.T).max() <= bound


def test_screened_neighbours_are_exact_from_any_screen_within_its_error():
  """Whatever a screen's errors (up to eps either way) and however many rows it
  keeps, the reranked neighbours are the exact ones (ties to the lowest index)."""
  from entrorouter_jax.neighbours import _exact_neighbours, screened_neighbours
  rng = np.random.default_rng(4)
  x = _unit(rng.normal(size=(500, 12))).astype(np.float32)
  x[100:110] = x[3]                                  # exact ties straddling the k-th
  q = np.concatenate([x[[3, 4]] + 0.01, _unit(rng.normal(size=(30, 12)))]).astype(np.float32)
  sims = q.astype(np.float64) @ x.T.astype(np.float64)
  for eps, width, k in ((1e-3, 40, 10), (0.05, 40, 10), (1e-3, 500, 10), (1e-3, 12, 12)):
    noisy = sims + rng.uniform(-eps, eps, sims.shape)
    idx = np.argsort(-noisy, axis=1, kind='stable')[:, :width]
    vals = np.take_along_axis(noisy, idx, 1)
    np.testing.assert_array_equal(screened_neighbours(q, x, vals, idx, k, eps),
                                  _exact_neighbours(q, x, k, False))


def test_reference_cost():
  y = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0], [0, 1, 1]], float)
  mask = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 0], [0, 0, 1]], bool)
  cost = np.array([[1, 2, 3], [1, 2, 5], [1, 2, 4], [1, 2, 4]], float)
  # Masked means 1, 2/3, 1 (a tie: lowest index); unmasked they would be 0.5, 0.75, 0.75.
  assert reference_cost(y, mask, cost) == (0, 1.0)
  y[0, 0] = 0.0  # model 0 drops to 1/2: model 2 wins, c_ref = its mean cost over all rows
  assert reference_cost(y, mask, cost) == (2, 4.0)
  cost[:, 2] = 0.0
  with pytest.raises(ValueError, match='c_ref'):
    reference_cost(y, mask, cost)


TEXTS = [
    'what is the capital city of france',
    'write a python function that reverses a linked list',
    'solve for x in the equation 3x plus 5 equals 20',
    'which planet in the solar system is known as the red planet',
    'translate the sentence good morning into spanish',
    'how many legs does a spider have',
    'write a python function that sorts a list of integers',
    'what is the boiling point of water at sea level',
]
NEAR = [
    'what is the capital city of france please',
    'write a python function that reverses a linked list quickly',
    'solve for x in the equation 3x plus 5 equals 21',
    'which planet in our solar system is known as the red planet',
]


def test_tfidf_space_deterministic_and_picklable():
  corpus = TEXTS + NEAR
  a = TfidfSpace(dim=256, min_df=1).fit(corpus)
  b = TfidfSpace(dim=256, min_df=1).fit(corpus)
  za, zb = a.transform(corpus), b.transform(corpus)
  assert za.dtype == np.float32 and za.shape == (len(corpus), a.dim_)
  assert a.dim_ == len(corpus)  # clipped to the number of texts
  np.testing.assert_array_equal(za, zb)
  np.testing.assert_allclose(np.linalg.norm(za, axis=1), 1.0, atol=1e-5)
  c = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(c.transform(corpus), za)
  # Unknown words only: the zero vector.
  assert not np.any(a.transform(['zzzz qqqq']))


def test_near_duplicates_are_nearest_neighbours():
  corpus = TEXTS + NEAR
  space = TfidfSpace(dim=8, min_df=1).fit(corpus)
  z = space.transform(corpus)
  sims = z @ z.T
  np.fill_diagonal(sims, -np.inf)
  for j in range(len(NEAR)):
    assert sims[j].argmax() == len(TEXTS) + j
    assert sims[len(TEXTS) + j].argmax() == j


def test_capability_estimates_wrapper():
  rng = np.random.default_rng(0)
  texts = TEXTS * 3
  n = len(texts)
  y = (rng.random((n, 3)) > 0.4).astype(float)
  y[:, 1] = 1.0  # model 1 is the strongest
  mask = np.ones((n, 3), bool)
  costs = rng.random((n, 3)) + 0.5
  tasks = ['qa'] * n
  out = capability_estimates(texts, y, mask, costs, tasks, {'test': (NEAR, None)},
                             k=4, alpha=2.0, prior='task', dim=16, min_df=1)
  assert out['strongest'] == 1
  assert out['c_ref'] == pytest.approx(costs[:, 1].mean())
  assert isinstance(out['space'], TfidfSpace)
  assert out['train'][0].shape == (n, 3) and out['test'][1].shape == (len(NEAR), 3)
  # c_bar is in units of c_ref.
  feats = out['space'].transform(texts)
  want_p, want_c = knn_estimates(feats, y, mask, costs / out['c_ref'], tasks, k=4, alpha=2.0)
  np.testing.assert_allclose(out['train'][0], want_p)
  np.testing.assert_allclose(out['train'][1], want_c)
  with pytest.raises(ValueError, match='reserved'):
    capability_estimates(texts, y, mask, costs, tasks, {'train': (NEAR, None)}, k=4,
                         alpha=2.0, prior='task', dim=16, min_df=1)


# ---------------------------------------------------- approximate search ---
def _clustered(n, dim=16, clusters=30, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim))
  return _unit(centers[rng.integers(0, clusters, n)]
               + 0.4 * rng.normal(size=(n, dim))).astype(np.float32)


def _on_grid(x):
  """x rounded to a 1/16 grid: every dot product is then exact in float32,
  whatever order a matmul kernel sums in, so equal rows tie exactly."""
  return np.round(x * 16) / 16


def _recall(exact, approx):
  return np.mean([len(np.intersect1d(e, a)) / len(e) for e, a in zip(exact, approx)])


@pytest.mark.parametrize('loo', [True, False])
def test_ivf_search_finds_the_exact_neighbours(loo):
  from entrorouter_jax import neighbours
  x = _clustered(3000)
  q = x if loo else _clustered(200, seed=1)
  exact = neighbours.neighbours(q, x, 20, loo, 'exact')
  approx = neighbours.neighbours(q, x, 20, loo, 'ivf', nprobe=8)
  assert approx.shape == exact.shape == (len(q), 20)
  assert all(len(np.unique(row)) == 20 for row in approx)       # no repeats
  assert ((approx >= 0) & (approx < len(x))).all()
  if loo:
    assert not (approx == np.arange(len(x))[:, None]).any()    # never itself
  assert _recall(exact, approx) > 0.9
  # Probing every cell is exact (up to ties: these features have none).
  cells = neighbours.ivf_cells(len(x))
  everything = neighbours.neighbours(q, x, 20, loo, 'ivf', nprobe=cells)
  np.testing.assert_array_equal(np.sort(everything, 1), np.sort(exact, 1))


@pytest.mark.parametrize('loo', [True, False])
def test_ivf_search_is_the_same_whatever_the_grouping_of_blocks(loo, monkeypatch):
  # Scoring cell by cell across a group of blocks (and the memory cap that
  # closes a group early) must give each block exactly what it gets alone.
  # Grid features: dot products are exact whatever the matmul shape.
  from entrorouter_jax import neighbours
  x = _on_grid(_clustered(1500, seed=3))
  q = x if loo else _on_grid(_clustered(300, seed=4))
  cells = neighbours.ivf_cells(len(x))
  centroids = neighbours.spherical_kmeans(x, cells)
  probes = neighbours._top_cells(q, centroids, 3)
  index = neighbours.IvfIndex(x, 3, centroids, x_cell=probes[1] if loo else None)
  alone = index.search(q, 10, loo, probes, block=8, group=1)
  for group in (2, 5, 64):
    np.testing.assert_array_equal(index.search(q, 10, loo, probes, block=8, group=group), alone)
  monkeypatch.setattr(neighbours, 'BLOCK_CELLS', 8 * 400)   # a group closes every block or two
  np.testing.assert_array_equal(index.search(q, 10, loo, probes, block=8, group=64), alone)
  if loo:
    assert not (alone == np.arange(len(x))[:, None]).any()


@pytest.mark.parametrize('loo', [True, False])
def test_ivf_search_breaks_ties_between_duplicates_like_exact(loo):
  # Duplicated rows tie; probing every cell must then return exact's
  # neighbours, the lowest index first. Grid features, so that twins tie
  # exactly although the two searches use matmuls of different shapes.
  from entrorouter_jax import neighbours
  base = _on_grid(_clustered(400, seed=6))
  x = np.concatenate([base, base[:150], base[:60]])   # rows with 1 or 2 twins
  q = x if loo else np.concatenate([base[:30], _on_grid(_clustered(30, seed=7))])
  exact = neighbours.neighbours(q, x, 12, loo, 'exact')
  everything = neighbours.neighbours(q, x, 12, loo, 'ivf', nprobe=neighbours.ivf_cells(len(x)))
  np.testing.assert_array_equal(np.sort(everything, 1), np.sort(exact, 1))


def test_ivf_estimates_are_close_to_exact_and_auto_switches(monkeypatch):
  from entrorouter_jax import neighbours
  x = _clustered(2000, seed=2)
  rng = np.random.default_rng(0)
  y = (rng.random((2000, 3)) < (0.3 + 0.4 * (x[:, :3] > 0))).astype(np.float64)
  args = (x, y, np.ones_like(y, bool), rng.random((2000, 3)), None)
  exact = knn_estimates(*args, k=20, prior='global', search='exact')
  approx = knn_estimates(*args, k=20, prior='global', search='ivf', nprobe=8)
  assert np.abs(approx[0] - exact[0]).mean() < 0.01
  # auto: exact up to EXACT_MAX_ROWS training rows, the approximate search above.
  auto = knn_estimates(*args, k=20, prior='global', search='auto')
  np.testing.assert_array_equal(auto[0], exact[0])
  monkeypatch.setattr(neighbours, 'EXACT_MAX_ROWS', 1000)
  auto = knn_estimates(*args, k=20, prior='global', search='auto', nprobe=8)
  np.testing.assert_array_equal(auto[0], approx[0])


def test_ivf_search_with_fewer_rows_than_k_falls_back_to_exact():
  from entrorouter_jax import neighbours
  x = _clustered(70, seed=3)   # 2 cells of ~35 rows; k = 60 needs both
  exact = neighbours.neighbours(x[:5], x, 60, False, 'exact')
  approx = neighbours.neighbours(x[:5], x, 60, False, 'ivf', nprobe=1)
  np.testing.assert_array_equal(np.sort(approx, 1), np.sort(exact, 1))


def test_search_settings_are_checked():
  from entrorouter_jax import neighbours
  x = _clustered(50)
  with pytest.raises(ValueError, match="search must be one of"):
    neighbours.neighbours(x, x, 5, True, 'faiss')
  with pytest.raises(ValueError, match='nprobe must be >= 1'):
    neighbours.neighbours(x, x, 5, True, 'ivf', nprobe=0)


@pytest.mark.parametrize('search', ['exact', 'ivf'])
def test_knn_table_prepared_once_gives_the_same_estimates(search, monkeypatch):
  from entrorouter_jax import capability, neighbours
  x = _clustered(1500, seed=4)
  rng = np.random.default_rng(1)
  y = (rng.random((1500, 3)) < 0.5).astype(np.float64)
  mask = rng.random((1500, 3)) < 0.9
  cost = rng.random((1500, 3))
  tasks = [f't{i % 3}' for i in range(1500)]
  q = _clustered(40, seed=5)
  table = capability.KnnTable(x, y, mask, cost, tasks, k=15, prior='task', search=search,
                              nprobe=4)
  built = []
  real_index = neighbours.IvfIndex
  monkeypatch.setattr(neighbours, 'IvfIndex',
                      lambda *a, **kw: built.append(1) or real_index(*a, **kw))
  for rows in (slice(0, 1), slice(0, 40), slice(5, 9)):
    want = knn_estimates(x, y, mask, cost, tasks, query_feats=q[rows],
                         query_tasks=['t1'] * len(q[rows]), k=15, prior='task', search=search,
                         nprobe=4)
    got = table.estimates(q[rows], ['t1'] * len(q[rows]))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  # The table's own cells are built once; each knn_estimates call builds its own.
  assert len(built) == (4 if search == 'ivf' else 0)
  np.testing.assert_array_equal(table.leave_one_out()[0],
                                knn_estimates(x, y, mask, cost, tasks, k=15, prior='task',
                                              search=search, nprobe=4)[0])
  with pytest.raises(ValueError, match='do not match'):
    table.estimates(q[:, :5])


def test_tfidf_projection_matches_the_svd_and_is_not_pickled():
  corpus = TEXTS + NEAR
  space = TfidfSpace(dim=8, min_df=1).fit(corpus)
  z = space.transform(corpus)
  ref = space.svd_.transform(space.tfidf_.transform(corpus))
  ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
  assert '_basis' not in pickle.loads(pickle.dumps(space)).__dict__


def test_spaces_pickled_under_their_former_module_still_load():
  """stage0.pkl files name capability.TfidfSpace; that name stays an alias."""
  space = TfidfSpace(dim=4, min_df=1).fit(['add two numbers', 'two numbers sum', 'sum the list',
                                           'the list sorted'])
  data = pickle.dumps(space, protocol=2)
  assert b'entrorouter_jax.features\nTfidfSpace' in data
  old = pickle.loads(data.replace(b'entrorouter_jax.features\n', b'entrorouter_jax.capability\n'))
  assert isinstance(old, TfidfSpace)
  np.testing.assert_array_equal(old.transform(['two numbers']), space.transform(['two numbers']))
