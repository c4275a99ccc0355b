"""The synthetic world, TFDS builders, tokenizer, splits and grain pipeline."""

import pickle
import time

import ml_collections
import numpy as np
import pytest

from conftest import shared_path
from configs import common
from entrorouter_jax.data import pipeline, sources, splits, synthetic, tokenizer
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.data.tfds_base import read_split


def data_config(tmp_path, **overrides) -> ml_collections.ConfigDict:
  cfg = common.get_base_config().data
  cfg.data_dir = str(tmp_path / 'tfds')
  cfg.synthetic.update(num_train=300, num_validation=40, num_test=60)
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------- synthetic ---
def test_synthetic_world_has_the_promised_structure():
  data = synthetic.generate(seed=0, num_train=3000, num_validation=100, num_test=100)
  names = data.model_names
  assert data.num_models >= 6 and len(set(data.tasks.tolist())) >= 6
  prices = np.array([m.price_out for m in data.models])
  assert prices.max() / prices.min() >= 100
  tp = data.true_prob
  frontier = names.index('frontier')
  # The dearest model is the frontier model.
  assert np.argmax(prices) == frontier
  # A cheap specialist beats the dearest model on its own domain.
  math_rows = data.tasks == 'math'
  spec = names.index('math-specialist')
  assert tp[math_rows, spec].mean() > tp[math_rows, frontier].mean()
  assert prices[spec] < prices[frontier] / 100
  # Queries that only the dearest model solves (in probability).
  others = np.delete(tp, frontier, axis=1)
  only = (tp[:, frontier] > 0.6) & (others.max(axis=1) < 0.25)
  assert only.sum() > 50
  # The text carries the domain (via the subtopic) and the difficulty.
  for q, task in zip(data.queries[:200], data.tasks[:200]):
    assert any(topic in q for topic in synthetic.DOMAINS[task])
    assert any(level in q for level in synthetic.LEVELS)
  # Costs are tokens x price: the frontier model is the dearest on every query.
  assert (data.costs.argmax(axis=1) == frontier).all()


def test_synthetic_is_deterministic_in_its_seed():
  a = synthetic.generate(seed=3, num_train=50, num_validation=5, num_test=5)
  b = synthetic.generate(seed=3, num_train=50, num_validation=5, num_test=5)
  c = synthetic.generate(seed=4, num_train=50, num_validation=5, num_test=5)
  np.testing.assert_array_equal(a.outcomes, b.outcomes)
  assert a.queries.tolist() == b.queries.tolist()
  assert a.queries.tolist() != c.queries.tolist()


def test_synthetic_default_sizes():
  cfg = common.get_base_config().data.synthetic
  assert (cfg.num_train, cfg.num_validation, cfg.num_test) == (20_000, 2_000, 2_000)


# ------------------------------------------------------------------ TFDS ---
def test_tfds_round_trip_synthetic(tmp_path):
  cfg = data_config(tmp_path)
  builder = sources.prepare(cfg)
  assert set(builder.info.splits) == {'train', 'validation', 'test'}
  expected = synthetic.generate(0, 300, 40, 60)
  for split in ('train', 'test'):
    got = read_split(builder, split)
    want = expected.split(split)
    assert got.model_names == want.model_names
    assert got.ids.tolist() == want.ids.tolist()
    assert got.queries.tolist() == want.queries.tolist()
    np.testing.assert_array_equal(got.outcomes, want.outcomes)
    np.testing.assert_array_equal(got.outcome_mask, want.outcome_mask)
    np.testing.assert_allclose(got.costs, want.costs)
    np.testing.assert_allclose(got.true_prob, want.true_prob)
  # Prepared once: a second prepare reuses the files.
  again = sources.prepare(cfg)
  assert again.data_dir == builder.data_dir


def test_tfds_routing_files_wide_csv(tmp_path):
  csv = tmp_path / 'table.csv'
  csv.write_text('id,prompt,a,b,a|total_cost,b|total_cost,split\n'
                 'q1,hello there,1,0,0.1,1.0,train\n'
                 'q2,general kenobi,0,1,0.1,1.0,train\n'
                 'q3,how are you,,1,0.2,2.0,test\n')
  cfg = data_config(tmp_path, name='routing_files', files=str(csv), format='wide')
  _, parts = sources.load_splits(cfg, ('train', 'test'))
  assert parts['train'].num_queries == 2 and parts['test'].num_queries == 1
  assert parts['test'].outcome_mask.tolist() == [[False, True]]
  np.testing.assert_allclose(parts['test'].costs, [[0.2, 2.0]])
  # Selecting models by name, and a name that is absent.
  cfg.models = 'b'
  _, parts = sources.load_splits(cfg, ('train',))
  assert parts['train'].model_names == ['b']
  cfg.models = 'b,zzz'
  with pytest.raises(DataError, match='zzz'):
    sources.load_splits(cfg, ('train',))


# The features every fully labelled builder has written from the start: prepared
# folders of these builders must stay readable, so they must not change.
FULLY_LABELLED_FEATURES = {
    'index': ('Tensor', 'int64', ()), 'id': ('Text', 'object', ()),
    'query': ('Text', 'object', ()), 'task': ('Text', 'object', ()),
    'outcomes': ('Tensor', 'float32', (None,)), 'outcome_mask': ('Tensor', 'bool', (None,)),
    'costs': ('Tensor', 'float32', (None,)), 'true_prob': ('Tensor', 'float32', (None,))}


def _feature_spec(builder) -> dict:
  """{name: (feature class, numpy dtype, shape)} of a builder's features."""
  f = builder.info.features
  return {k: (type(f[k]).__name__, np.dtype(f[k].np_dtype).name, f[k].shape) for k in f.keys()}


def test_fully_labelled_features_and_batches_are_unchanged(tmp_path):
  csv = tmp_path / 'table.csv'
  csv.write_text('id,prompt,a,b,a|total_cost,b|total_cost,split\n'
                 + ''.join(f'q{i},query {i},1,0,0.1,1.0,train\n' for i in range(6))
                 + 'q9,last one,,1,0.2,2.0,test\n')
  wide = sources.prepare(data_config(tmp_path, name='routing_files', files=str(csv),
                                     format='wide'))
  synth = sources.prepare(data_config(tmp_path))
  for builder in (wide, synth):
    assert _feature_spec(builder) == FULLY_LABELLED_FEATURES, builder.name
    source = builder.as_data_source(split='train')
    assert set(source[0]) == set(FULLY_LABELLED_FEATURES), builder.name
    data = read_split(builder, 'train')
    assert data.propensities is None and data.cost_weights is None
    assert pipeline.feedback_tables(data) == {}
    batch = next(iter(pipeline.make_dataset(source, pipeline.Featurize(None, 8),
                                            global_batch_size=4, seed=0)))
    assert set(batch) == {'index', 'outcomes', 'outcome_mask', 'costs'}, builder.name
  assert wide.builder_config.name.startswith('wide_') and str(wide.version) == '1.0.0'


def test_tfds_routing_files_missing_file_and_bad_format(tmp_path):
  cfg = data_config(tmp_path, name='routing_files', files=str(tmp_path / 'nope.csv'))
  with pytest.raises(DataError, match='nope.csv'):
    sources.prepare(cfg)
  cfg = data_config(tmp_path, name='routing_files', files=str(tmp_path), format='xml')
  with pytest.raises(DataError, match='xml'):
    sources.prepare(cfg)


def test_tfds_empty_split_is_an_error(tmp_path):
  csv = tmp_path / 'table.csv'
  csv.write_text('id,prompt,a,a|total_cost,split\nq1,hi,1,0.1,train\n')
  cfg = data_config(tmp_path, name='routing_files', files=str(csv), format='wide')
  with pytest.raises(DataError, match="'test'"):
    sources.load_splits(cfg, ('train', 'test'))


def test_tfds_routerbench_from_manual_dir(tmp_path):
  manual = shared_path('routerbench')
  cfg = data_config(tmp_path, name='routerbench', manual_dir=str(manual))
  _, parts = sources.load_splits(cfg, ('train', 'test'))
  assert parts['train'].num_queries == 1039 + 299 + 887
  assert parts['test'].num_queries == 445 + 128 + 380
  assert parts['train'].num_models == 11
  masked = (~parts['train'].outcome_mask).sum() + (~parts['test'].outcome_mask).sum()
  assert masked == 154


# ------------------------------------------------------------- tokenizer ---
@pytest.fixture(scope='module')
def tok():
  data = synthetic.generate(0, 2000, 10, 10)
  return tokenizer.train_tokenizer(data.queries.tolist(), vocab_size=500)


def test_tokenizer_round_trip_and_padding(tok):
  text = 'Please answer this basic question about algebra. Consider case number 7 with 3 parts.'
  ids, mask = tok.encode(text, 128)
  assert ids.dtype == np.int32 and mask.dtype == bool
  assert mask.sum() == len(tok.tokenize(text))
  assert (ids[~mask] == tokenizer.PAD_ID).all() and (ids[mask] != tokenizer.PAD_ID).all()
  assert tok.decode(ids) == text


def test_tokenizer_truncation_sides(tok):
  text = 'Please answer this basic question about algebra. Consider case number 7 with 3 parts.'
  full = tok.tokenize(text)
  right, _ = tok.encode(text, 5, 'right')
  left, _ = tok.encode(text, 5, 'left')
  assert right.tolist() == full[:5] and left.tolist() == full[-5:]
  with pytest.raises(ValueError, match='truncate'):
    tok.encode(text, 5, 'middle')


def test_tokenizer_save_load_and_pickle(tok, tmp_path):
  tok.save(tmp_path / 't.model')
  loaded = tokenizer.Tokenizer.load(tmp_path / 't.model')
  clone = pickle.loads(pickle.dumps(tok))
  text = 'an expert problem on recursion'
  assert loaded.tokenize(text) == tok.tokenize(text) == clone.tokenize(text)
  cached = tokenizer.load_or_train(tmp_path / 't.model', ['unused'], 100)
  assert cached.vocab_size == tok.vocab_size
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tokenizer.Tokenizer.load(tmp_path / 'missing.model')


# ---------------------------------------------------------------- splits ---
def test_seeded_split_is_stable_under_reordering():
  ids = [f'q{i}' for i in range(2000)]
  a = dict(zip(ids, splits.split_by_id(ids, seed=1)))
  rev = ids[::-1]
  b = dict(zip(rev, splits.split_by_id(rev, seed=1)))
  assert a == b
  counts = {s: sum(v == s for v in a.values()) for s in ('train', 'validation', 'test')}
  assert 1500 < counts['train'] < 1700 and 150 < counts['test'] < 250
  other = dict(zip(ids, splits.split_by_id(ids, seed=2)))
  assert other != a


# -------------------------------------------------------------- pipeline ---
@pytest.fixture(scope='module')
def prepared(tmp_path_factory, tok):
  cfg = data_config(tmp_path_factory.mktemp('pipe'))
  builder = sources.prepare(cfg)
  return builder.as_data_source(split='train'), tok


def _batches(source, tok, n, seed=0, process_index=0, process_count=1, batch=30, extras=None):
  ds = pipeline.make_dataset(source, pipeline.Featurize(tok, 16, extras=extras),
                             global_batch_size=batch, seed=seed,
                             process_index=process_index, process_count=process_count)
  it = iter(ds)
  return [next(it) for _ in range(n)], it


def test_pipeline_same_seed_same_batches(prepared):
  source, tok = prepared
  a, _ = _batches(source, tok, 4, seed=5)
  b, _ = _batches(source, tok, 4, seed=5)
  c, _ = _batches(source, tok, 4, seed=6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any((x['index'] != z['index']).any() for x, z in zip(a, c))
  assert a[0]['tokens'].shape == (30, 16) and a[0]['outcomes'].shape == (30, 7)


def test_pipeline_iterator_state_restores(prepared):
  source, tok = prepared
  _, it = _batches(source, tok, 3)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  _, fresh = _batches(source, tok, 0)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(2)]
  for x, y in zip(want, got):
    np.testing.assert_array_equal(x['index'], y['index'])


class _CountingFeaturize(pipeline.Featurize):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.calls = 0

  def map(self, record):
    self.calls += 1
    return super().map(record)


def test_pipeline_prepares_only_a_few_batches_ahead(prepared):
  """data.prefetch batches ahead (plus one per thread in flight), not grain's
  default of hundreds, which would tokenize most of a short stage up front."""
  source, tok = prepared
  featurize = _CountingFeaturize(tok, 16)
  it = iter(pipeline.make_dataset(source, featurize, global_batch_size=10, seed=0, prefetch=3,
                                  read_threads=2))
  next(it)
  time.sleep(1.0)
  assert 10 < featurize.calls <= 10 * (1 + 3 + 2), featurize.calls
  with pytest.raises(ValueError, match='data.prefetch=0'):
    pipeline.read_options(prefetch=0)


def test_pipeline_two_processes_cover_each_query_once_per_epoch(prepared):
  source, tok = prepared
  n = len(source)       # 300 queries; each process holds 150, batches of 15 per process
  seen = []
  for p in range(2):
    batches, _ = _batches(source, tok, 10, process_index=p, process_count=2)
    seen.append(np.concatenate([b['index'] for b in batches]))
  assert len(set(seen[0]) & set(seen[1])) == 0
  assert sorted(np.concatenate(seen).tolist()) == list(range(n))


def test_pipeline_attaches_extras_by_index(prepared):
  source, tok = prepared
  table = np.arange(len(source) * 2, dtype=np.float32).reshape(-1, 2)
  (batch,), _ = _batches(source, tok, 1, extras={'p_hat': table})
  np.testing.assert_array_equal(batch['p_hat'], table[batch['index']])


def test_pipeline_rejects_batch_larger_than_shard(prepared):
  source, tok = prepared
  with pytest.raises(ValueError, match='fewer than the global batch'):
    _batches(source, tok, 1, batch=1000)


def test_to_global_places_every_array_on_the_batch_sharding():
  import jax
  from entrorouter_jax import sharding
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  batch_sh = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  n = 4 * sharding.batch_divisor(mesh)
  batch = {'features': rng.normal(size=(n, 3)).astype(np.float32),
           'outcome_mask': rng.random((n, 2)) < 0.5, 'fold': np.arange(n, dtype=np.int32)}
  out = pipeline.to_global(batch, batch_sh)
  assert set(out) == set(batch)
  for key, value in batch.items():
    assert isinstance(out[key], jax.Array) and out[key].sharding == batch_sh, key
    assert out[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(out[key]), value)
