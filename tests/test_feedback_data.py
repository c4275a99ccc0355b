"""Feedback logs as routing data: `readers.read_feedback` (one observed cell per row,
propensities, cost weights, estimated costs of the cells never logged) and the
per-row fields of `RoutingDataset` (subset, select_models, validate, logged_models)."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from entrorouter_jax.data import readers
from entrorouter_jax.data.dataset import DataError, ModelInfo
from entrorouter_jax.data.splits import DEFAULT_FRACTIONS, split_by_id

HEADER = 'id,query,model,score,cost,propensity,cost_weight,task,policy\n'
ROWS = [  # id, query, model, score, cost, propensity, cost_weight, task, policy
    ('q1', 'what is 2+2?', 'small', '1', '0.001', '0.7', '0.5', 'math', 'v1'),
    ('q2', 'write a poem about the sea', 'big', '0.5', '0.02', '0.3', '', 'poetry', 'v1'),
    ('q3', 'not judged yet', 'small', '', '0.002', '0.6', '', 'chat', 'v2'),
    ('q4', 'capital of France?', 'big', '0', '0.03', '0.25', '1', 'geo', 'v2'),
    ('q5', 'sort a list in Python', 'small', '0.75', '0.004', '0.9', '0', 'code', 'v2'),
]
JUDGED = [r for r in ROWS if r[3]]
POOL = [ModelInfo('small', 0.1, 0.2), ModelInfo('big', 10.0, 30.0),
        ModelInfo('mid', 1.0, 2.0), ModelInfo('unpriced')]


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


def csv_log(tmp_path, rows=ROWS, header=HEADER, name='log.csv'):
  return write(tmp_path, name, header + ''.join(','.join(r) + '\n' for r in rows))


def raises(fn, *fragments):
  """Calls fn, expects DataError, and checks every fragment is in its message."""
  with pytest.raises(DataError) as e:
    fn()
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))
  return str(e.value)


def expected_cells(names, rows):
  """NumPy reference: the mask, outcomes and logged costs a log of `rows` gives."""
  n, k = len(rows), len(names)
  logged = np.array([names.index(r[2]) for r in rows])
  mask = np.zeros((n, k), bool)
  mask[np.arange(n), logged] = True
  outcomes = np.zeros((n, k))
  outcomes[np.arange(n), logged] = [float(r[3]) for r in rows]
  return logged, mask, outcomes, np.array([float(r[4]) for r in rows])


# ---------------------------------------------------------------- round trips


def test_csv_log_without_pool(tmp_path):
  d = readers.read_feedback(csv_log(tmp_path))
  names = ['big', 'small']   # the models of the log, sorted
  logged, mask, outcomes, cost = expected_cells(names, JUDGED)
  assert d.name == 'feedback' and d.model_names == names
  assert d.ids.tolist() == [r[0] for r in JUDGED]
  assert d.tasks.tolist() == [r[7] for r in JUDGED]
  np.testing.assert_array_equal(d.outcome_mask, mask)
  np.testing.assert_allclose(d.outcomes, outcomes)
  np.testing.assert_array_equal(d.logged_models(), logged)
  assert d.logged_models().dtype == np.int64
  assert d.propensities.dtype == np.float64 and d.cost_weights.dtype == np.float64
  np.testing.assert_array_equal(d.propensities, [float(r[5]) for r in JUDGED])
  np.testing.assert_array_equal(d.cost_weights, [0.5, np.nan, 1.0, 0.0])
  # No prices: a cell that was not logged costs the model's mean logged cost
  # (over the judged rows).
  mean = np.array([cost[logged == j].mean() for j in range(2)])
  want = np.where(mask, cost[:, None], mean[None, :])
  np.testing.assert_allclose(d.costs, want, rtol=1e-6)
  np.testing.assert_array_equal(d.splits, split_by_id(d.ids.tolist(), 0, DEFAULT_FRACTIONS))
  assert any(n.startswith('1 of 5 rows have an empty score') and 'log.csv, row 3' in n
             for n in d.notes), d.notes
  assert any("'v1': 2, 'v2': 2" in n for n in d.notes), d.notes
  assert any('cost of big, small where a query was not routed to them = their mean logged cost'
             in n for n in d.notes), d.notes


def test_jsonl_log_with_pool_estimates_unlogged_costs(tmp_path):
  records = [dict(id=r[0], query=r[1], model=r[2], score=float(r[3]) if r[3] else None,
                  cost=float(r[4]), propensity=float(r[5]), split='test' if i % 2 else 'train')
             for i, r in enumerate(ROWS)]
  records[0]['score'] = True
  path = write(tmp_path, 'log.jsonl', '\n'.join(json.dumps(r) for r in records))
  d = readers.read_feedback(path, pool=POOL)
  names = [m.name for m in POOL]   # the pool's models, in its order
  logged, mask, outcomes, cost = expected_cells(names, JUDGED)
  assert d.model_names == names and d.models[1] == POOL[1]
  assert d.splits.tolist() == ['train', 'test', 'test', 'train']   # rows 1, 2, 4, 5
  np.testing.assert_array_equal(d.outcome_mask, mask)
  np.testing.assert_allclose(d.outcomes, outcomes)
  assert np.isnan(d.cost_weights).all()
  # NumPy reference of the estimates: input tokens ceil(len / 4); the answer
  # tokens each logged cost implies, averaged per model (pooled for a priced
  # model never logged), at least 0; an unpriced model: the mean logged cost.
  tin = np.ceil(np.array([len(r[1]) for r in JUDGED]) / 4)
  pin = np.array([m.price_in or 0.0 for m in POOL])
  pout = np.array([m.price_out or 1.0 for m in POOL])
  implied = (cost * 1e6 - tin * pin[logged]) / pout[logged]
  answer = np.array([implied[logged == j].mean() if (logged == j).any() else implied.mean()
                     for j in range(len(POOL))])
  answer = np.maximum(answer, 0.0)
  want = (tin[:, None] * pin[None, :] + answer[None, :] * pout[None, :]) / 1e6
  want[:, 3] = cost.mean()
  want[mask] = cost
  np.testing.assert_allclose(d.costs, want, rtol=1e-6)
  assert not d.outcome_mask[:, 2:].any()   # the estimated cells are never observed
  assert any('1 of 5 rows have an empty score' in n for n in d.notes)
  assert any('output tokens of small, big where a query was not routed' in n for n in d.notes)
  assert any('output tokens of mid, never logged' in n for n in d.notes)
  assert any('cost of unpriced, never logged, = the mean of all logged costs' in n
             for n in d.notes), d.notes


def test_parquet_log_and_several_files(tmp_path):
  frame = pd.DataFrame(ROWS[3:], columns=HEADER.strip().split(','))
  frame['score'] = [0.0, 0.75]
  frame['cost'] = [0.03, 0.004]
  frame['propensity'] = [0.25, 0.9]
  frame.to_parquet(tmp_path / 'b.parquet')
  d = readers.read_feedback([csv_log(tmp_path, ROWS[:3]), tmp_path / 'b.parquet'],
                            models=['small', 'big'])
  logged, mask, outcomes, _ = expected_cells(['small', 'big'], JUDGED)
  assert d.ids.tolist() == ['q1', 'q2', 'q4', 'q5'] and d.model_names == ['small', 'big']
  np.testing.assert_array_equal(d.outcome_mask, mask)
  np.testing.assert_allclose(d.outcomes, outcomes)
  np.testing.assert_array_equal(d.propensities, [0.7, 0.3, 0.25, 0.9])


def test_load_routing_files_reads_feedback(tmp_path):
  pool = write(tmp_path, 'pool.yaml', '- {name: small, price_in: 0.1, price_out: 0.2}\n'
                                      '- {name: big, price_in: 10, price_out: 30}\n')
  path = csv_log(tmp_path)
  assert 'feedback' in readers.FORMATS
  d = readers.load_routing_files(str(path), 'feedback', pool=str(pool), split_seed=3)
  assert d.model_names == ['small', 'big'] and d.num_queries == 4
  np.testing.assert_array_equal(d.splits, split_by_id(d.ids.tolist(), 3, DEFAULT_FRACTIONS))
  np.testing.assert_array_equal(d.propensities, [0.7, 0.3, 0.25, 0.9])
  raises(lambda: readers.load_routing_files([path], 'feedback', query_column='q'),
         "['query_column']", 'split_seed')


# ---------------------------------------------------------------- bad logs


def replace_cell(rows, row, column, value):
  """`rows` with one cell changed (row 1-based, column by header name)."""
  j = HEADER.strip().split(',').index(column)
  out = [list(r) for r in rows]
  out[row - 1][j] = value
  return out


@pytest.mark.parametrize('row, column, value, options, fragments', [
    (2, 'propensity', '0', {}, ["column 'propensity'", 'propensity 0.0 is outside (0, 1]']),
    (4, 'propensity', '1.5', {}, ["column 'propensity'", '1.5 is outside (0, 1]']),
    (3, 'propensity', '', {}, ["column 'propensity'", 'propensity is empty', '(0, 1]']),
    (1, 'propensity', 'often', {}, ["column 'propensity'", "'often' is not a number"]),
    (5, 'model', 'huge', dict(pool=POOL), ["column 'model'", "'huge' is not in the pool",
                                          str([m.name for m in POOL])]),
    (2, 'model', 'big', dict(models=['small']), ["'big' is not in models=", "['small']"]),
    (4, 'score', '1.5', {}, ["column 'score'", 'outcome 1.5 is outside [0, 1]']),
    (2, 'cost', '-0.1', {}, ["column 'cost'", 'cost -0.1 is negative', '>= 0']),
    (3, 'cost', '', {}, ["column 'cost'", 'cost is empty', '>= 0']),
    (1, 'cost_weight', '-1', {}, ["column 'cost_weight'", 'cost weight -1.0', '>= 0']),
    (5, 'id', 'q2', {}, ["column 'id'", "id 'q2' repeats", 'log.csv, row 2', 'unique ids']),
])
def test_bad_cells_name_file_row_column_and_value(tmp_path, row, column, value, options,
                                                   fragments):
  path = csv_log(tmp_path, replace_cell(ROWS, row, column, value))
  raises(lambda: readers.read_feedback(path, **options), f'log.csv: row {row}', *fragments)


def test_duplicate_id_across_files(tmp_path):
  a = csv_log(tmp_path, ROWS[:2], name='a.csv')
  b = csv_log(tmp_path, [ROWS[2], ROWS[0]], name='b.csv')
  raises(lambda: readers.read_feedback([a, b]), "b.csv: row 2, column 'id'", "id 'q1'",
         'a.csv, row 1')


def test_no_judged_row_and_missing_column(tmp_path):
  path = csv_log(tmp_path, [replace_cell(ROWS, i, 'score', '')[i - 1] for i in (1, 2)])
  raises(lambda: readers.read_feedback(path), 'log.csv', 'none of the 2 rows has a score',
         'at least one judged row')
  path = write(tmp_path, 'nop.csv', 'id,query,model,score,cost\nq1,hi,a,1,0.1\n')
  raises(lambda: readers.read_feedback(path), 'nop.csv', 'no propensity column',
         "['propensity']")


# ---------------------------------------------------------------- dataset fields


@pytest.fixture
def logged(tmp_path):
  return readers.read_feedback(csv_log(tmp_path))   # models big, small; rows q1 q2 q4 q5


def test_subset_split_and_select_models_carry_the_row_fields(logged):
  d = logged.subset(np.array([3, 0]))
  assert d.ids.tolist() == ['q5', 'q1']
  np.testing.assert_array_equal(d.propensities, [0.9, 0.7])
  np.testing.assert_array_equal(d.cost_weights, [0.0, 0.5])
  s = logged.split(logged.splits[0])
  np.testing.assert_array_equal(s.propensities, logged.propensities[logged.splits == s.splits[0]])
  # Dropping 'big' keeps every row and its propensity; big's rows observe nothing.
  small = logged.select_models(['small'])
  np.testing.assert_array_equal(small.propensities, logged.propensities)
  np.testing.assert_array_equal(small.cost_weights, logged.cost_weights)
  np.testing.assert_array_equal(small.outcome_mask[:, 0], [True, False, False, True])
  raises(small.logged_models, "query 'q2' has 0 observed outcomes", 'exactly one', '2 rows')


def test_logged_models_rejects_a_fully_labelled_row(logged):
  full = dataclasses.replace(logged, outcome_mask=np.ones_like(logged.outcome_mask))
  raises(full.logged_models, "query 'q1' has 2 observed outcomes ['big', 'small']",
         'exactly one')


@pytest.mark.parametrize('field, value, fragments', [
    ('propensities', [0.7, 0.0, 0.25, 0.9], ["query 'q2'", 'propensity 0.0', '(0, 1]']),
    ('propensities', [0.7, 0.3, 1.2, 0.9], ["query 'q4'", 'propensity 1.2', '(0, 1]']),
    ('propensities', [0.7, 0.3, 0.25, np.nan], ["query 'q5'", 'propensity nan']),
    ('propensities', [0.7, 0.3, 0.25], ['propensities has shape (3,)', 'expected (4,)']),
    ('cost_weights', [0.5, np.nan, -1.0, 0.0], ["query 'q4'", 'cost weight -1.0', '>= 0']),
])
def test_validate_checks_the_row_fields(logged, field, value, fragments):
  bad = dataclasses.replace(logged, **{field: np.array(value)})
  raises(bad.validate, 'log.csv', *fragments)
