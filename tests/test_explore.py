"""Routing with exploration: Router.sample's mixture, its draws and propensities, and
`route --explore` (the tiny default-recipe router of conftest's `serve_workdir`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from entrorouter_jax import route, router as router_lib

ENV = dict(os.environ, JAX_PLATFORMS='cpu')
QUERIES = ['Prove that the sum of two even numbers is even.',
           'Write a Python function that reverses a list.',
           'Can my landlord keep the deposit for normal wear and tear?',
           'What is 17 times 23?', 'Give a basic level explanation of algebra.']


@pytest.fixture(scope='module')
def router(serve_workdir):
  return router_lib.load_router(serve_workdir)


def mixture(pi, served, eps):
  """NumPy reference: (1 - eps) pi renormalised over the served models + eps / K' on them."""
  pi = np.asarray(pi, np.float64)
  served = np.asarray(served, bool)
  ref = np.zeros_like(pi)
  for i in range(len(pi)):
    on = pi[i, served] / pi[i, served].sum()
    ref[i, served] = (1 - eps) * on + eps / served.sum()
  return ref


def repeated(router, query, n):
  """(queries, tables, feats) of one query repeated n times, its features computed once."""
  feats = router.features([query])
  p_hat, c_bar = router.anchor_tables([query], feats)
  tile = lambda a: np.repeat(np.asarray(a), n, axis=0)
  return [query] * n, (tile(p_hat), tile(c_bar)), tile(feats)


def within_binomial_bound(counts, p, n, sigmas=5.0):
  """Per cell: |count - n p| <= sigmas sd of Binomial(n, p) + 1."""
  return np.abs(counts - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


def served_subset(router):
  """Two served models: the cheapest and the dearest, as names and as a mask."""
  names = router.model_names
  picks = sorted({int(np.argmin(router.model_costs)), int(np.argmax(router.model_costs))})
  mask = np.zeros(len(names), bool)
  mask[picks] = True
  return [names[i] for i in picks], mask


@pytest.mark.parametrize('explore', [None, 0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize('subset', ['all', 'names', 'mask'])
def test_sample_dist_and_propensity_are_the_mixture(router, explore, subset):
  names, mask = served_subset(router)
  served = {'all': None, 'names': names, 'mask': mask}[subset]
  mask = np.ones(len(router.model_names), bool) if subset == 'all' else mask
  choice, propensity, dist = router.sample(QUERIES, explore=explore, seed=3, served=served)
  ref = mixture(router.probs(QUERIES), mask, 0.0 if explore is None else explore)
  np.testing.assert_allclose(dist, ref, rtol=1e-12, atol=1e-15)
  assert choice.shape == propensity.shape == (len(QUERIES),)
  assert dist.shape == (len(QUERIES), len(router.model_names))
  np.testing.assert_array_equal(propensity, dist[np.arange(len(QUERIES)), choice])
  assert mask[choice].all() and (propensity > 0).all() and (propensity <= 1).all()
  np.testing.assert_allclose(dist.sum(1), 1.0, atol=1e-12)


def test_sample_at_a_cost_weight_mixes_that_pi(router):
  _, _, dist = router.sample(QUERIES, explore=0.2, cost_weight=2.0)
  np.testing.assert_allclose(dist, mixture(router.probs(QUERIES, 2.0), np.ones(
      len(router.model_names), bool), 0.2), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('explore', [0.0, 0.3, 1.0])
def test_choice_frequencies_of_one_query_match_dist(router, explore):
  n = 20000
  queries, tables, feats = repeated(router, QUERIES[1], n)
  choice, propensity, dist = router.sample(queries, explore=explore, seed=11, tables=tables,
                                           feats=feats)
  p = dist[0]
  np.testing.assert_array_equal(dist, np.broadcast_to(p, dist.shape))
  counts = np.bincount(choice, minlength=len(p))
  assert within_binomial_bound(counts, p, n).all(), (counts, n * p)
  np.testing.assert_array_equal(propensity, p[choice])
  # The bound has the power to reject the other policies in play (where they differ).
  k = len(p)
  for other in (mixture(router.probs(QUERIES[1:2]), np.ones(k, bool), 0.0)[0],
                np.full(k, 1.0 / k), np.eye(k)[int(np.argmax(p))]):
    if np.abs(other - p).max() > 0.05:
      assert not within_binomial_bound(counts, other, n).all()


def test_explore_zero_is_pi_and_one_is_uniform_over_served(router):
  names, mask = served_subset(router)
  pi = router.probs(QUERIES).astype(np.float64)
  _, _, at_none = router.sample(QUERIES)
  _, _, at_zero = router.sample(QUERIES, explore=0.0)
  np.testing.assert_array_equal(at_none, at_zero)
  np.testing.assert_allclose(at_zero, pi / pi.sum(1, keepdims=True), rtol=1e-12)
  _, propensity, uniform = router.sample(QUERIES, explore=1.0, served=names)
  np.testing.assert_array_equal(uniform, np.broadcast_to(mask / mask.sum(), uniform.shape))
  np.testing.assert_array_equal(propensity, np.full(len(QUERIES), 1.0 / mask.sum()))


def test_unserved_models_are_never_chosen(router):
  n = 5000
  queries, tables, feats = repeated(router, QUERIES[0], n)
  favourite = int(np.argmax(router.probs(QUERIES[:1])[0]))
  mask = np.ones(len(router.model_names), bool)
  mask[favourite] = False
  for explore in (None, 0.0, 0.5):
    choice, propensity, dist = router.sample(queries, explore=explore, seed=5, served=mask,
                                             tables=tables, feats=feats)
    assert (choice != favourite).all() and (dist[:, favourite] == 0).all()
    assert set(np.unique(choice)) <= set(np.flatnonzero(mask))
  other = (favourite + 1) % len(router.model_names)
  for served in ([router.model_names[other]], np.array([router.model_names[other]])):
    choice, propensity, _ = router.sample(QUERIES, explore=0.0, served=served)
    np.testing.assert_array_equal(choice, np.full(len(QUERIES), other))
    np.testing.assert_array_equal(propensity, np.ones(len(QUERIES)))


def test_same_seed_same_choices(router):
  queries, tables, feats = repeated(router, QUERIES[2], 2000)
  run = lambda seed: router.sample(queries, explore=0.5, seed=seed, tables=tables,
                                   feats=feats)[0]
  np.testing.assert_array_equal(run(7), run(7))
  assert (run(7) != run(8)).any()
  one = router.sample(queries, explore=0.5, seed=np.random.default_rng(7), tables=tables,
                      feats=feats)[0]
  np.testing.assert_array_equal(one, run(7))


def test_draw_against_inverse_cdf_reference():
  rng = np.random.default_rng(0)
  dist = rng.dirichlet(np.ones(6), size=3000)
  dist[:, [0, 3]] = 0.0
  dist /= dist.sum(1, keepdims=True)
  u = np.random.default_rng(42).random(len(dist))
  ref = np.array([int(np.searchsorted(np.cumsum(row), ui * row.sum(), side='right'))
                  for row, ui in zip(dist, u)])
  got = router_lib.draw(dist, np.random.default_rng(42))
  np.testing.assert_array_equal(got, ref)
  assert not np.isin(got, [0, 3]).any()


class FixedUniforms:
  """A stand-in Generator whose random(n) returns the given values."""

  def __init__(self, values):
    self.values = np.asarray(values, np.float64)

  def random(self, n):
    assert n == len(self.values)
    return self.values


def test_draw_never_lands_on_a_zero_cell_at_the_edges():
  dist = np.array([[0.0, 0.5, 0.0, 0.5, 0.0]] * 3)
  got = router_lib.draw(dist, FixedUniforms([0.0, 0.5, 1.0]))
  np.testing.assert_array_equal(got, [1, 3, 3])


def test_batches_on_one_generator_draw_as_one_call():
  dist = np.random.default_rng(1).dirichlet(np.ones(4), size=100)
  whole = router_lib.draw(dist, np.random.default_rng(9))
  rng = np.random.default_rng(9)
  parts = np.concatenate([router_lib.draw(dist[a:a + 7], rng) for a in range(0, 100, 7)])
  np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize('kwargs, message', [
    (dict(explore=-0.1), 'explore is -0.1; expected a number in [0, 1]'),
    (dict(explore=1.5), 'explore is 1.5; expected a number in [0, 1]'),
    (dict(explore=float('nan')), 'explore is nan; expected a number in [0, 1]'),
    (dict(explore=True), 'explore is True; expected a number in [0, 1]'),
    (dict(explore='0.1'), "explore is '0.1'; expected a number in [0, 1]"),
    (dict(served=[]), 'served serves no model'),
    (dict(served=['no-such-model']), "served: 'no-such-model' is not in the pool"),
    (dict(served=np.zeros(1, bool)), 'expected a bool mask of shape'),
    (dict(served=np.ones(3, float)), 'expected a bool mask of shape'),
    (dict(served=3), 'served is an array of int64 with shape ()'),
    (dict(seed=-1), 'seed is -1; expected an integer >= 0'),
    (dict(seed=1.5), 'seed is 1.5; expected an integer >= 0'),
    (dict(cost_weight=-1.0), 'cost_weight is -1.0; expected a finite number >= 0'),
])
def test_sample_errors(router, kwargs, message):
  with pytest.raises(router_lib.RouterError) as e:
    router.sample(QUERIES[:1], **kwargs)
  assert message in str(e.value)


def test_sample_errors_on_an_all_false_mask(router):
  with pytest.raises(router_lib.RouterError, match='served serves no model'):
    router.sample(QUERIES[:1], served=np.zeros(len(router.model_names), bool))


def test_explore_distribution_puts_uniform_mass_where_pi_misses_the_served_models():
  pi = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
  served = np.array([False, True, True])
  got = router_lib.explore_distribution(pi, served, 0.2)
  np.testing.assert_allclose(got, [[0.0, 0.5, 0.5], [0.0, 0.8 * 0.375 + 0.1, 0.8 * 0.625 + 0.1]])


def run_route(*args):
  return subprocess.run([sys.executable, '-m', 'entrorouter_jax.route', *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)


def test_route_cli_explore_prints_model_and_propensity(router, serve_workdir):
  query = QUERIES[3]
  out = run_route(f'--workdir={serve_workdir}', '--explore=0.25', '--seed=4', query)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert set(result) == {'model', 'probability', 'fallback', 'distribution', 'propensity',
                         'explore'}
  names = router.model_names
  pi = np.array([result['distribution'][n] for n in names])
  k = names.index(result['model'])
  assert result['explore'] == 0.25 and result['fallback'] is False
  assert result['probability'] == pi[k]
  assert result['propensity'] == pytest.approx(0.75 * pi[k] / pi.sum() + 0.25 / len(names),
                                               rel=1e-12)
  choice, propensity, _ = router.sample([query], explore=0.25, seed=4)
  assert names[choice[0]] == result['model']
  assert propensity[0] == pytest.approx(result['propensity'], rel=1e-6)


def test_route_cli_explore_file_writes_model_and_propensity(router, serve_workdir, tmp_path):
  queries = tmp_path / 'q.jsonl'
  queries.write_text('\n'.join(json.dumps({'id': f'x{i}', 'query': q})
                               for i, q in enumerate(QUERIES)))
  out_path = tmp_path / 'routes.jsonl'
  names, mask = served_subset(router)
  out = run_route(f'--workdir={serve_workdir}', '--explore=0.5', '--seed=2',
                  f'--served={",".join(names)}', f'--input={queries}', f'--output={out_path}')
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in out_path.read_text().splitlines()]
  assert [r['id'] for r in rows] == [f'x{i}' for i in range(len(QUERIES))]
  ref = mixture(router.probs(QUERIES), mask, 0.5)
  for row, want in zip(rows, ref):
    assert row['model'] in names and row['explore'] == 0.5
    assert row['propensity'] == pytest.approx(want[router.model_names.index(row['model'])],
                                              rel=1e-6)
  one_batch = tmp_path / 'one.jsonl'
  by_one = tmp_path / 'by_one.jsonl'
  for path, size in ((one_batch, 256), (by_one, 1)):
    route.route_file(router, queries, path, batch_size=size, explore=0.5, seed=2, served=names)
  assert one_batch.read_text() == by_one.read_text()
  assert [json.loads(l)['model'] for l in one_batch.read_text().splitlines()] == [
      r['model'] for r in rows]


def test_route_records_without_explore_are_unchanged(router):
  base = route.route_records(router, QUERIES)
  assert all(set(r) == {'model', 'probability', 'fallback', 'distribution'} for r in base)
  probs = router.probs(QUERIES)
  assert [r['model'] for r in base] == [router.model_names[i] for i in probs.argmax(1)]


@pytest.mark.parametrize('knobs, message', [
    (dict(explore=0.1, threshold=0.5), '--threshold=0.5 does not combine with --explore'),
    (dict(explore=0.1, fallback_model='x'), '--fallback_model=x does not combine'),
    (dict(explore=2.0), '--explore is 2.0; expected a number in [0, 1]'),
    (dict(explore=0.1, served=['nope']), "--served: 'nope' is not in the pool"),
    (dict(served=['nope']), '--served needs --explore'),
    (dict(explore=0.1, seed=-3), '--seed is -3; expected an integer >= 0'),
])
def test_route_records_explore_errors(router, knobs, message):
  with pytest.raises(router_lib.RouterError) as e:
    route.route_records(router, QUERIES[:1], **knobs)
  assert message in str(e.value)


def test_route_cli_explore_bad_flag(serve_workdir):
  out = run_route(f'--workdir={serve_workdir}', '--explore=1.5', 'hello')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert '--explore is 1.5; expected a number in [0, 1]' in out.stderr
