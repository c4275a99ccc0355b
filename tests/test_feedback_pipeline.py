"""Feedback logs through the training input path: the `routing_files` builder in format
'feedback' (per-example propensity and cost weight), `sources.load_splits` back to
`RoutingDataset`s, and the grain pipeline's batches (records and in-memory tables)."""

import ml_collections
import numpy as np
import pytest

from configs import common
from entrorouter_jax.data import pipeline, readers, sources
from entrorouter_jax.data.dataset import DataError
from entrorouter_jax.datasets.routing_files import routing_files

MODELS = ['big', 'mid', 'small']
HEADER = 'id,query,model,score,cost,propensity,cost_weight,split\n'
# id, query, model, score ('' = not judged), cost, propensity, cost_weight ('' = none), split
ROWS = [(f'q{i:02d}', f'query number {i} about topic {i % 3}', MODELS[i % 3],
         '' if i % 7 == 3 else str(round((i % 5) / 4, 2)), str(0.001 * (i + 1)),
         str(round(0.1 + 0.85 * ((i * 37) % 11) / 10, 3)),
         '' if i % 4 == 1 else str(0.25 * (i % 3)), 'test' if i % 5 == 4 else 'train')
        for i in range(30)]


def write_log(tmp_path, rows=ROWS):
  path = tmp_path / 'log.csv'
  path.write_text(HEADER + ''.join(','.join(r) + '\n' for r in rows))
  return path


def feedback_config(tmp_path, files, fmt='feedback') -> ml_collections.ConfigDict:
  cfg = common.get_base_config().data
  cfg.update(name='routing_files', files=str(files), format=fmt,
             data_dir=str(tmp_path / 'tfds'))
  return cfg


def reference(split):
  """NumPy reference from ROWS: the judged rows of `split`, by id: logged column, score,
  cost, propensity and cost weight (NaN where empty), in float64."""
  rows = [r for r in ROWS if r[3] and r[7] == split]
  return {r[0]: (MODELS.index(r[2]), float(r[3]), float(r[4]), float(r[5]),
                 float(r[6]) if r[6] else np.nan) for r in rows}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('feedback')
  builder, parts = sources.load_splits(feedback_config(tmp, write_log(tmp)), ('train', 'test'))
  return builder, parts


def test_load_splits_restores_propensities_cost_weights_and_logged_cells(prepared):
  _, parts = prepared
  for split in ('train', 'test'):
    data, want = parts[split], reference(split)
    assert data.model_names == MODELS
    assert sorted(data.ids.tolist()) == sorted(want)
    n = data.num_queries
    logged = np.array([want[i][0] for i in data.ids])
    mask = np.zeros((n, len(MODELS)), bool)
    mask[np.arange(n), logged] = True
    np.testing.assert_array_equal(data.outcome_mask, mask)
    np.testing.assert_array_equal(data.logged_models(), logged)
    np.testing.assert_allclose(data.outcomes[np.arange(n), logged],
                               [want[i][1] for i in data.ids], rtol=1e-6)
    np.testing.assert_allclose(data.costs[np.arange(n), logged],
                               [want[i][2] for i in data.ids], rtol=1e-6)
    assert data.propensities.dtype == np.float64 and data.cost_weights.dtype == np.float64
    np.testing.assert_allclose(data.propensities, [want[i][3] for i in data.ids], rtol=1e-6)
    weights = np.array([want[i][4] for i in data.ids])
    assert np.isnan(weights).any() and not np.isnan(weights).all()
    np.testing.assert_array_equal(np.isnan(data.cost_weights), np.isnan(weights))
    np.testing.assert_allclose(data.cost_weights, weights, rtol=1e-6)
    data.validate()


def test_prepared_splits_match_the_reader(prepared):
  builder, parts = prepared
  direct = readers.load_routing_files([builder.builder_config.files[0]], 'feedback')
  for split in ('train', 'test'):
    want = direct.split(split)
    order = np.argsort(want.ids)
    got = parts[split].subset(np.argsort(parts[split].ids))
    assert got.ids.tolist() == want.ids[order].tolist()
    np.testing.assert_allclose(got.propensities, want.propensities[order], rtol=1e-6)
    np.testing.assert_allclose(got.cost_weights, want.cost_weights[order], rtol=1e-6)
    np.testing.assert_allclose(got.costs, want.costs[order], rtol=1e-6)
  assert any('empty score' in note for note in parts['train'].notes)


def test_feedback_builder_declares_the_two_features(prepared):
  builder, _ = prepared
  features = builder.info.features
  assert set(features.keys()) == {'index', 'id', 'query', 'task', 'outcomes', 'outcome_mask',
                                  'costs', 'true_prob', 'propensity', 'cost_weight'}
  for name in ('propensity', 'cost_weight'):
    assert features[name].np_dtype == np.float32 and features[name].shape == ()
  assert builder.builder_config.name.startswith('feedback_')


def test_pipeline_batches_carry_the_rows_propensity_and_cost_weight(prepared):
  builder, parts = prepared
  train = parts['train']
  source = builder.as_data_source(split='train')
  ds = pipeline.make_dataset(source, pipeline.Featurize(None, 16), global_batch_size=8, seed=3)
  it = iter(ds)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {'index', 'outcomes', 'outcome_mask', 'costs', 'propensity',
                          'cost_weight'}
    assert batch['propensity'].dtype == np.float32 and batch['propensity'].shape == (8,)
    want = reference('train')
    ids = train.ids[batch['index']]
    np.testing.assert_allclose(batch['propensity'], [want[i][3] for i in ids], rtol=1e-6)
    np.testing.assert_allclose(batch['cost_weight'], [want[i][4] for i in ids], rtol=1e-6)
    np.testing.assert_array_equal(batch['outcome_mask'].argmax(axis=1),
                                  [want[i][0] for i in ids])


def test_table_batches_carry_the_rows_propensity_and_cost_weight(prepared):
  _, parts = prepared
  train = parts['train']
  tables = dict(outcomes=train.outcomes, **pipeline.feedback_tables(train))
  assert set(tables) == {'outcomes', 'propensity', 'cost_weight'}
  batch = next(iter(pipeline.make_table_dataset(tables, global_batch_size=8, seed=1)))
  rows = batch['index']
  assert batch['propensity'].dtype == np.float32 and batch['cost_weight'].dtype == np.float32
  np.testing.assert_array_equal(batch['propensity'], train.propensities[rows].astype(np.float32))
  np.testing.assert_array_equal(batch['cost_weight'], train.cost_weights[rows].astype(np.float32))


def test_to_global_places_the_feedback_entries_on_the_batch_sharding():
  import jax
  from entrorouter_jax import sharding
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  batch_sh = sharding.batch_sharding(mesh)
  n = 4 * sharding.batch_divisor(mesh)
  batch = {'propensity': np.linspace(0.1, 1.0, n, dtype=np.float32),
           'cost_weight': np.where(np.arange(n) % 2, np.nan, 0.5).astype(np.float32)}
  out = pipeline.to_global(batch, batch_sh)
  for key, value in batch.items():
    assert isinstance(out[key], jax.Array) and out[key].sharding == batch_sh, key
    np.testing.assert_array_equal(np.asarray(out[key]), value)


def test_builder_and_data_must_agree_on_feedback(tmp_path, monkeypatch):
  log = write_log(tmp_path)
  wide = tmp_path / 'wide.csv'
  wide.write_text('id,prompt,a,a|total_cost,split\nq1,hi,1,0.1,train\nq2,ho,0,0.1,test\n')
  fully_labelled = readers.load_routing_files([wide], 'wide')
  feedback = readers.load_routing_files([log], 'feedback')
  monkeypatch.setattr(routing_files.readers, 'load_routing_files',
                      lambda *a, **k: fully_labelled)
  with pytest.raises(DataError, match="no propensities.*feature 'propensity'"):
    sources.prepare(feedback_config(tmp_path, log))
  monkeypatch.setattr(routing_files.readers, 'load_routing_files', lambda *a, **k: feedback)
  with pytest.raises(DataError, match='has propensities.*expected fully labelled data'):
    sources.prepare(feedback_config(tmp_path, wide, fmt='wide'))


def test_feedback_is_a_data_format():
  assert 'feedback' in sources.FORMATS
  assert set(sources.FORMATS) == set(readers.FORMATS)
