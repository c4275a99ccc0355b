"""Readers: the real routing files in ../shared/data, and small synthetic files
for every kind of bad input (each must name the file, row/column and value)."""

import collections
import csv
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from entrorouter_jax.data import readers
from entrorouter_jax.data.dataset import DataError, ModelInfo

ROUTERBENCH_MODELS = [
    'WizardLM/WizardLM-13B-V1.2', 'claude-instant-v1', 'claude-v1', 'claude-v2',
    'gpt-3.5-turbo-1106', 'gpt-4-1106-preview', 'meta/code-llama-instruct-34b-chat',
    'meta/llama-2-70b-chat', 'mistralai/mistral-7b-chat', 'mistralai/mixtral-8x7b-chat',
    'zero-one-ai/Yi-34B-Chat']
ROUTERDC_MODELS = [
    'mistralai/Mistral-7B-v0.1', 'meta-math/MetaMath-Mistral-7B',
    'itpossible/Chinese-Mistral-7B-v0.1', 'HuggingFaceH4/zephyr-7b-beta',
    'cognitivecomputations/dolphin-2.6-mistral-7b', 'meta-llama/Meta-Llama-3-8B',
    'cognitivecomputations/dolphin-2.9-llama3-8b']
MIXTRAL, GPT4 = 'mistralai/Mixtral-8x7B-Instruct-v0.1', 'gpt-4-1106-preview'
POOL_FILE = readers.__file__.rsplit('/entrorouter_jax/', 1)[0] + '/configs/pools/routellm.yaml'


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


def row_of(data, id_):
  return int(np.flatnonzero(data.ids == id_)[0])


# ---------------------------------------------------------------- real data


@pytest.fixture(scope='module')
def routerbench():
  return readers.read_wide(shared_path('routerbench', 'routerbench_subset_scores_costs.csv'))


def test_routerbench_shape_mask_and_splits(routerbench):
  d = routerbench
  assert (d.num_queries, d.num_models) == (3178, 11)
  assert d.model_names == ROUTERBENCH_MODELS
  assert (~d.outcome_mask).sum() == 154
  counts = collections.Counter(zip(d.splits.tolist(), d.tasks.tolist()))
  assert counts == {('train', 'arc-challenge'): 1039, ('train', 'mbpp'): 299,
                    ('train', 'winogrande'): 887, ('test', 'arc-challenge'): 445,
                    ('test', 'mbpp'): 128, ('test', 'winogrande'): 380}
  assert (d.costs > 0).all()


def test_routerbench_known_cells(routerbench):
  # Looked up by hand in the CSV.
  d, col = routerbench, ROUTERBENCH_MODELS.index
  i = row_of(d, 'arc-challenge.test.1')
  assert d.outcomes[i, col('gpt-4-1106-preview')] == 1.0
  assert d.costs[i, col('gpt-4-1106-preview')] == pytest.approx(0.00519, rel=1e-6)
  assert d.costs[i, col('mistralai/mistral-7b-chat')] == pytest.approx(0.0001036, rel=1e-6)
  i = row_of(d, 'mbpp.dev.29')
  assert d.costs[i, col('gpt-4-1106-preview')] == pytest.approx(0.01366, rel=1e-6)
  assert d.splits[i] == 'test'


def test_routerbench_reused_sample_ids_are_separate_queries(routerbench):
  # 14 sample_ids label two rows each: a prompt and the same prompt doubled,
  # answered by complementary models (1 + 10 empty outcome cells per pair).
  d, gpt35 = routerbench, ROUTERBENCH_MODELS.index('gpt-3.5-turbo-1106')
  rows = [i for i, x in enumerate(d.ids) if x.startswith('arc-challenge.val.136#')]
  assert len(rows) == 2
  by_len = sorted(rows, key=lambda i: len(d.queries[i]))
  single, doubled = by_len
  assert (len(d.queries[single]), len(d.queries[doubled])) == (1942, 3884)
  assert (d.splits[single], d.splits[doubled]) == ('test', 'train')
  assert not d.outcome_mask[single, gpt35] and d.outcome_mask[single].sum() == 10
  assert d.outcomes[doubled, gpt35] == 1.0 and d.outcome_mask[doubled].sum() == 1
  assert d.costs[doubled, gpt35] == pytest.approx(0.00095, rel=1e-6)
  assert sum('#' in x for x in d.ids) == 28
  assert any('14 ids label more than one query text' in n for n in d.notes)


def routerdc_pool(tmp_path):
  lines = [f'{m}: {{price_in: 0.2, price_out: 0.4}}' for m in ROUTERDC_MODELS]
  return write(tmp_path, 'pool7.yaml', '\n'.join(lines) + '\n')


def test_routerdc_files(tmp_path):
  files = [shared_path('routerdc7', f) for f in
           ('gsm8k-train.json', 'arc_challenge_test.json', 'mbpp.json')]
  d = readers.read_routerdc(files, pool=routerdc_pool(tmp_path))
  assert (d.num_queries, d.model_names) == (1852, ROUTERDC_MODELS)
  assert collections.Counter(zip(d.splits.tolist(), d.tasks.tolist())) == {
      ('train', 'gsm8k'): 1000, ('test', 'arc_challenge'): 352, ('ood', 'mbpp'): 500}
  assert d.outcome_mask.all()
  i = row_of(d, 'gsm8k-train/3')
  assert d.outcomes[i, 3] == pytest.approx(0.6)      # zephyr-7b-beta
  assert d.outcomes[i, 2] == pytest.approx(0.9)      # Chinese-Mistral-7B
  assert d.outcomes[row_of(d, 'mbpp/0'), 1] == pytest.approx(0.4)
  expected = (math.ceil(len(d.queries[i]) / 4) * 0.2 + 256 * 0.4) / 1e6
  assert d.costs[i] == pytest.approx(np.full(7, expected), rel=1e-6)
  assert len(d.notes) == 1
  assert 'ceil(len(query) / 4)' in d.notes[0] and 'output tokens assumed to be 256' in d.notes[0]
  assert d.source == ', '.join(str(f) for f in files)


def test_routerdc_without_pool_says_to_give_one():
  path = shared_path('routerdc7', 'mbpp.json')
  with pytest.raises(DataError, match='pool') as e:
    readers.read_routerdc([path])
  assert 'mbpp.json' in str(e.value)


@pytest.fixture(scope='module')
def routellm():
  return readers.read_routellm(
      [shared_path('routellm', 'mmlu_responses'), shared_path('routellm', 'gsm8k')],
      pool=POOL_FILE)


def test_routellm_counts_and_accuracy(routellm):
  d = routellm
  assert d.model_names == [MIXTRAL, GPT4]
  assert d.models[1] == ModelInfo(GPT4, 10.0, 30.0)
  mmlu = np.array([t.startswith('mmlu_') for t in d.tasks])
  assert len(set(d.tasks[mmlu].tolist())) == 57
  # 14,042 MMLU rows; 27 prompts appear twice in their subject with the same
  # outcomes (college_physics 11, high_school_psychology 11, ...) and are kept once.
  assert mmlu.sum() == 14042 - 27
  assert any('27 repeated rows' in n for n in d.notes)
  assert (d.tasks == 'gsm8k').sum() == 1319
  assert d.outcome_mask.all()
  acc = d.outcomes[mmlu].mean(0)
  assert acc == pytest.approx([0.681, 0.806], abs=0.001)
  assert d.outcomes[d.tasks == 'gsm8k'].mean(0) == pytest.approx([0.638, 0.857], abs=0.001)
  assert set(d.splits.tolist()) == {'train', 'validation', 'test'}


def test_routellm_gsm8k_costs_count_response_tokens(routellm):
  path = shared_path('routellm', 'gsm8k', 'gsm8k_responses.csv')
  with open(path, newline='') as f:
    first = next(csv.DictReader(f))
  i = row_of(routellm, 'gsm8k/' + readers._sha1(first['prompt'])[:16])
  tokens_in = math.ceil(len(first['prompt']) / 4)
  tokens_out = math.ceil(len(first[GPT4 + '_response']) / 4)
  assert routellm.costs[i, 1] == pytest.approx((tokens_in * 10 + tokens_out * 30) / 1e6, rel=1e-6)
  assert any('ceil(len(<model>_response) / 4)' in n for n in routellm.notes)


# ---------------------------------------------------------------- wide, synthetic


WIDE = """id,prompt,task,a,b,a|total_cost,b|total_cost
q1,What is 2+2?,math,1,0,0.01,0.001
q2,Name a colour.,chat,True,,0.02,0.002
q3,NA,chat,False,1.0,0.03,0.003
"""


def test_wide_csv_masks_empty_cells_and_reads_booleans(tmp_path):
  d = readers.read_wide(write(tmp_path, 'w.csv', WIDE))
  assert d.ids.tolist() == ['q1', 'q2', 'q3'] and d.model_names == ['a', 'b']
  assert d.queries[2] == 'NA'                      # text, not a missing value
  np.testing.assert_array_equal(d.outcomes, [[1, 0], [1, 0], [0, 1]])
  np.testing.assert_array_equal(d.outcome_mask, [[1, 1], [1, 0], [1, 1]])
  np.testing.assert_allclose(d.costs, [[0.01, 0.001], [0.02, 0.002], [0.03, 0.003]], rtol=1e-6)
  assert d.tasks.tolist() == ['math', 'chat', 'chat']
  assert set(d.splits.tolist()) <= {'train', 'validation', 'test'}


def test_wide_jsonl_parquet_and_several_files(tmp_path):
  frame = pd.read_csv(write(tmp_path, 'w.csv', WIDE), keep_default_na=False)
  frame.iloc[:2].to_json(tmp_path / 'w.jsonl', orient='records', lines=True)
  frame.iloc[2:].to_parquet(tmp_path / 'w.parquet')
  d = readers.read_wide([tmp_path / 'w.jsonl', tmp_path / 'w.parquet'], models=['b', 'a'])
  assert d.ids.tolist() == ['q1', 'q2', 'q3'] and d.model_names == ['b', 'a']
  np.testing.assert_array_equal(d.outcome_mask, [[1, 1], [0, 1], [1, 1]])
  assert d.outcomes[2].tolist() == [1, 0]


def test_wide_costs_from_tokens_and_from_estimates(tmp_path):
  path = write(tmp_path, 'w.csv', 'query,a,b,a|input_tokens,a|output_tokens\n'
                                  'abcdefghi,1,0,100,10\n')
  pool = [ModelInfo('a', 1.0, 2.0), ModelInfo('b', 3.0, 5.0)]
  d = readers.read_wide(path, pool=pool, assumed_output_tokens=100)
  assert d.costs[0, 0] == pytest.approx((100 * 1 + 10 * 2) / 1e6)
  assert d.costs[0, 1] == pytest.approx((3 * 3 + 100 * 5) / 1e6)   # ceil(9 / 4) = 3
  assert d.models[0] == pool[0]
  estimated = [n for n in d.notes if 'ceil(len(query) / 4)' in n]
  assert len(estimated) == 1 and 'cost of b ' in estimated[0]
  assert 'output tokens assumed to be 100 per query' in estimated[0]


def test_wide_identical_repeats_kept_once(tmp_path):
  path = write(tmp_path, 'w.csv', WIDE + 'q1,What is 2+2?,math,1,0,0.01,0.001\n')
  d = readers.read_wide(path)
  assert d.num_queries == 3
  assert any('1 repeated rows' in n and 'row 4 repeats' in n for n in d.notes)


def test_split_is_stable_when_rows_are_shuffled(tmp_path):
  rng = np.random.default_rng(0)
  lines = [f'question number {i},{rng.integers(2)},{rng.integers(2)}' for i in range(200)]
  first = readers.read_wide(write(tmp_path, 'a.csv', 'prompt,m1,m2\n' + '\n'.join(lines)),
                            pool=[ModelInfo('m1', 1, 1), ModelInfo('m2', 1, 1)])
  rng.shuffle(lines)
  second = readers.read_wide(write(tmp_path, 'b.csv', 'prompt,m1,m2\n' + '\n'.join(lines)),
                             pool=[ModelInfo('m1', 1, 1), ModelInfo('m2', 1, 1)])
  assert first.ids[0] == readers._sha1('question number 0')[:16]
  assert dict(zip(first.ids, first.splits)) == dict(zip(second.ids, second.splits))
  assert set(first.splits.tolist()) == {'train', 'validation', 'test'}
  third = readers.read_wide(tmp_path / 'a.csv', pool=[ModelInfo('m1', 1, 1), ModelInfo('m2', 1, 1)],
                            split_seed=1, split_fractions={'train': 0.5, 'test': 0.5})
  assert set(third.splits.tolist()) == {'train', 'test'}


# ---------------------------------------------------------------- bad wide input


def raises(fn, *fragments):
  """Calls fn, expects DataError, and checks every fragment is in its message."""
  with pytest.raises(DataError) as e:
    fn()
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))
  return str(e.value)


GOOD_HEADER = 'prompt,m1,m1|total_cost\n'


@pytest.mark.parametrize('body, fragments', [
    ('q1,1,0.1\nq2,1.5,0.1\n', ['row 2', "'m1'", '1.5', '[0, 1]']),
    ('q1,1,0.1\nq2,yes,0.1\n', ['row 2', "'m1'", "'yes'", 'not a number']),
    ('q1,1,0.1\nq2,1,-0.1\n', ['row 2', "'m1|total_cost'", '-0.1', '>= 0']),
    ('q1,1,0.1\nq2,1,free\n', ['row 2', "'m1|total_cost'", "'free'", 'not a number']),
    ('q1,1,0.1\n ,1,0.1\n', ['row 2', "'prompt'", 'empty', 'non-empty query']),
    ('q1,1,\n', ['row 1', "'m1|total_cost'", 'empty cost', 'pool price']),
])
def test_wide_bad_cells(tmp_path, body, fragments):
  path = write(tmp_path, 'bad.csv', GOOD_HEADER + body)
  raises(lambda: readers.read_wide(path), 'bad.csv', *fragments)


def test_wide_missing_query_column(tmp_path):
  path = write(tmp_path, 'bad.csv', 'text,m1,m1|total_cost\nhello,1,0.1\n')
  raises(lambda: readers.read_wide(path), 'bad.csv', 'no query column', "['prompt', 'query']",
         "'text'")
  raises(lambda: readers.read_wide(path, query_column='question'), 'bad.csv', "'question'")


def test_wide_model_without_cost_or_price(tmp_path):
  path = write(tmp_path, 'bad.csv', 'prompt,m1\nhello,1\n')
  raises(lambda: readers.read_wide(path, pool=[ModelInfo('other', 1, 1)]),
         f"model 'm1' in {path} has outcomes but no cost column `m1|total_cost` and no price "
         'in the pool file; expected one of them')


def test_wide_cost_column_without_outcome_column(tmp_path):
  path = write(tmp_path, 'bad.csv', 'prompt,m1|total_cost\nhello,0.1\n')
  raises(lambda: readers.read_wide(path), 'bad.csv', "'m1|total_cost'", "'m1'")


def test_wide_conflicting_repeated_ids(tmp_path):
  path = write(tmp_path, 'bad.csv', 'id,' + GOOD_HEADER + 'x,q,1,0.1\ny,r,1,0.1\nx,q,0,0.1\n')
  raises(lambda: readers.read_wide(path), 'bad.csv, row 3', 'bad.csv, row 1', "'x'", "'m1'",
         'outcome 0.0 instead of 1.0')
  # Without an id column the id is the text's hash: same text, different outcome.
  path = write(tmp_path, 'bad2.csv', GOOD_HEADER + 'q,1,0.1\nq,0,0.1\n')
  raises(lambda: readers.read_wide(path), 'bad2.csv, row 2', "'m1'", '0.0 instead of 1.0')


def test_wide_unknown_model_requested(tmp_path):
  path = write(tmp_path, 'bad.csv', GOOD_HEADER + 'q,1,0.1\n')
  raises(lambda: readers.read_wide(path, models=['m1', 'gpt-9']), 'bad.csv', "['gpt-9']", "['m1']")


@pytest.mark.parametrize('text, fragment', [
    ('', 'the file is empty'),
    (GOOD_HEADER, 'no data rows'),
])
def test_wide_empty_file(tmp_path, text, fragment):
  path = write(tmp_path, 'bad.csv', text)
  raises(lambda: readers.read_wide(path), 'bad.csv', fragment)


# ---------------------------------------------------------------- long


LONG = """id,query,model,score,cost,task
1,hi there,a,1,0.5,chat
1,hi there,b,0,,chat
2,2+2?,a,0.25,0.1,math
"""


def test_long_pivots_and_masks_missing_pairs(tmp_path):
  path = write(tmp_path, 'long.csv', LONG + '1,hi there,a,1,0.5,chat\n')
  d = readers.read_long(path, pool=[ModelInfo('b', 4.0, 8.0)], assumed_output_tokens=10)
  assert d.ids.tolist() == ['1', '2'] and d.model_names == ['a', 'b']
  np.testing.assert_array_equal(d.outcome_mask, [[1, 1], [1, 0]])
  np.testing.assert_allclose(d.outcomes, [[1, 0], [0.25, 0]])
  # b has no cost in the file: ceil(8 / 4) = 2 input tokens, 10 assumed output tokens.
  np.testing.assert_allclose(d.costs, [[0.5, (2 * 4 + 10 * 8) / 1e6], [0.1, 0]], rtol=1e-6)
  assert d.tasks.tolist() == ['chat', 'math']
  assert any('1 repeated (id, model) rows' in n and 'long.csv, row 4' in n for n in d.notes)
  assert any('cost of b ' in n for n in d.notes)


def test_long_jsonl_with_split_column(tmp_path):
  rows = [dict(id='x', query='q x', model='a', score=True, cost=0.1, split='train'),
          dict(id='y', query='q y', model='a', score=False, cost=0.2, split='test')]
  path = write(tmp_path, 'long.jsonl', '\n'.join(json.dumps(r) for r in rows))
  d = readers.read_long(path)
  assert d.splits.tolist() == ['train', 'test'] and d.outcomes[:, 0].tolist() == [1, 0]


def test_long_bad_input(tmp_path):
  path = write(tmp_path, 'bad.csv', LONG + '1,hi there,a,0,0.5,chat\n')
  raises(lambda: readers.read_long(path, pool=[ModelInfo('b', 1, 1)]), 'bad.csv, row 4',
         'bad.csv, row 1', "'score'", '0.0 instead of 1.0')
  path = write(tmp_path, 'bad.csv', LONG + '2,other text,b,1,0.1,math\n')
  raises(lambda: readers.read_long(path, pool=[ModelInfo('b', 1, 1)]), 'bad.csv, row 4',
         "'2'", "'other text'", "'2+2?'")
  path = write(tmp_path, 'bad.csv', LONG)
  raises(lambda: readers.read_long(path), "bad.csv: row 2, column 'cost'", "model 'b'",
         'no price')
  path = write(tmp_path, 'bad.csv', 'query,model,cost\nq,a,0.1\n')
  raises(lambda: readers.read_long(path), 'bad.csv', 'no score column')
  path = write(tmp_path, 'bad.csv', 'query,model,score,cost\nq,a,2,0.1\n')
  raises(lambda: readers.read_long(path), 'bad.csv', 'row 1', "'score'", '2.0')


# ---------------------------------------------------------------- RouterDC / RouteLLM, synthetic


def test_routerdc_stem_and_bad_input(tmp_path):
  pool = [ModelInfo('a', 1, 1)]
  path = write(tmp_path, 'arc_challenge_test.json',
               json.dumps([{'question': 'q1', 'scores': {'a': 1}},
                           {'question': 'q2', 'scores': {'a': 2}}]))
  raises(lambda: readers.read_routerdc(path, pool=pool), 'arc_challenge_test.json', 'row 2',
         "'scores.a'", '2.0')
  path.write_text(json.dumps([{'question': 'q1', 'scores': {'a': 1}}]))
  d = readers.read_routerdc(path, pool=pool)
  assert (d.ids[0], d.tasks[0], d.splits[0]) == ('arc_challenge_test/0', 'arc_challenge', 'test')
  empty = write(tmp_path, 'ceval.json', '[]')
  raises(lambda: readers.read_routerdc(empty, pool=pool), 'ceval.json', 'non-empty JSON list')
  path.write_text(json.dumps([{'question': '', 'scores': {'a': 1}}]))
  raises(lambda: readers.read_routerdc(path, pool=pool), 'arc_challenge_test.json', 'row 1',
         "'question'")
  path.write_text(json.dumps([{'question': 'q', 'scores': {'zz': 1}}]))
  raises(lambda: readers.read_routerdc(path, pool=pool), "model 'zz'", 'arc_challenge_test.json')


def test_routellm_conflicting_repeat_and_missing_pool(tmp_path):
  path = write(tmp_path, 'mmlu_x.csv', f'prompt,{MIXTRAL},{GPT4}\nq,True,False\nq,True,True\n')
  raises(lambda: readers.read_routellm(tmp_path, pool=POOL_FILE), 'mmlu_x.csv, row 2',
         f"'{GPT4}'", '1.0 instead of 0.0')
  raises(lambda: readers.read_routellm(path, pool=None), 'mmlu_x.csv', 'pool')


# ---------------------------------------------------------------- pool


def test_pool_layouts(tmp_path):
  expected = [ModelInfo('a', 1.0, 2.0, 4096), ModelInfo('b', 0.5, 0.5)]
  listed = write(tmp_path, 'p.yaml', '- {name: a, price_in: 1, price_out: 2, context_limit: 4096}\n'
                                     '- {name: b, price_in: 0.5, price_out: 0.5}\n')
  wrapped = write(tmp_path, 'p.json', json.dumps({'models': [
      {'name': 'a', 'price_in': 1, 'price_out': 2, 'context_limit': 4096},
      {'name': 'b', 'price_in': 0.5, 'price_out': 0.5}]}))
  mapping = write(tmp_path, 'p.yml', 'a: {price_in: 1, price_out: 2, context_limit: 4096}\n'
                                     'b: {price_in: 0.5, price_out: 0.5}\n')
  for path in (listed, wrapped, mapping):
    assert readers.read_pool(path) == expected
  assert [m.name for m in readers.read_pool(POOL_FILE)] == [GPT4, MIXTRAL]


@pytest.mark.parametrize('text, fragments', [
    ('- {name: a, price_in: 1}\n', ['entry 1', "'a'", 'price_out', 'None']),
    ('- {name: a, price_in: 1, price_out: 1}\n- {name: b, price_in: -2, price_out: 1}\n',
     ['entry 2', "'b'", 'price_in', '-2', '>= 0']),
    ('- {name: a, price_in: 1, price_out: 1, price_input: 3}\n', ['entry 1', "'price_input'"]),
    ('a: {price_in: 1, price_out: cheap}\n', ["entry 'a'", 'price_out', "'cheap'"]),
    ('- {name: a, price_in: 1, price_out: 1}\n- {name: a, price_in: 1, price_out: 1}\n',
     ["['a']", 'more than once']),
    ('a: {price_in: 1, price_out: 1, context_limit: 0}\n', ["entry 'a'", 'context_limit', '0']),
])
def test_pool_bad_entries(tmp_path, text, fragments):
  path = write(tmp_path, 'pool.yaml', text)
  raises(lambda: readers.read_pool(path), 'pool.yaml', *fragments)


# ---------------------------------------------------------------- invalid Unicode, non-standard JSON


def test_csv_bytes_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_bytes(GOOD_HEADER.encode() + b'q1,1,0.1\ncaf\xe9 au lait,1,0.1\n')
  raises(lambda: readers.read_wide(path), 'bad.csv:3:', "b'\\xe9'", 'column 4', 'not UTF-8',
         'expected a UTF-8 text file')


GOOD_LINE = '{"prompt": "fine", "m1": 1, "m1|total_cost": 0.1}\n'


@pytest.mark.parametrize('line, fragments', [
    ('{"prompt": "q2", "m1": NaN, "m1|total_cost": 0.1}', ['m1 is NaN', 'expected a finite number']),
    ('{"prompt": "q2", "m1": 1, "m1|total_cost": Infinity}', ['m1|total_cost is Infinity']),
    ('{"prompt": "q2", "m1": 1, "m1|total_cost": -1e400}', ['m1|total_cost is -1e400']),
    ('{"prompt": "half \\ud83d", "m1": 1, "m1|total_cost": 0.1}',
     ['prompt holds', 'lone surrogate', '\\ud83d', 'expected valid UTF-8 text']),
    ('{"prompt": ["part", "\\udc00"], "m1": 1, "m1|total_cost": 0.1}', ['prompt[1] holds']),
    ('{"prompt": "q2", "m1\\ud800": 1, "m1|total_cost": 0.1}', ['has a key', 'lone surrogate']),
    ('{"prompt": "q2", "m1": 1,}', ['not valid JSON', 'line 1 column']),
    ('["q2", 1, 0.1]', ['a JSON array', 'expected one JSON object']),
])
def test_jsonl_non_standard_json_and_lone_surrogates_name_line_and_field(tmp_path, line, fragments):
  path = write(tmp_path, 'bad.jsonl', GOOD_LINE + '\n' + line + '\n')   # a blank line 2
  raises(lambda: readers.read_wide(path), 'bad.jsonl:3:', *fragments)


def test_jsonl_bytes_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(GOOD_LINE.encode() + b'{"query": "x", "model": "m1", "score": 1, "id": "\xff"}\n')
  raises(lambda: readers.read_long(path), 'bad.jsonl:2:', "b'\\xff'", 'not UTF-8')


def test_jsonl_frame_is_the_one_pandas_read_json_gives(tmp_path):
  path = write(tmp_path, 'w.jsonl', '{"prompt": "a", "m1": 1, "m2": null, "t": true, "x": [1, "y"]}\n'
                                    '\n{"prompt": "b\\u00e9", "m1": 0.25, "m2": 0.5, "t": null}\n'
                                    '{"m1": 0.1, "prompt": "c", "extra": {"k": 2}, "n": 3}\n')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # pandas 3 deprecates convert_dates
    expected = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
  pd.testing.assert_frame_equal(readers._read_table(path), expected, check_exact=True)


def test_routerdc_non_standard_json_names_the_entry_and_field(tmp_path):
  pool = [ModelInfo('a', 1, 1)]
  path = tmp_path / 'gsm8k-test.json'
  good = '{"question": "q", "scores": {"a": 1}}'
  path.write_text(f'[{good},\n {good},\n {{"question": "q\\ud800", "scores": {{"a": 1}}}}]')
  raises(lambda: readers.read_routerdc(path, pool=pool), 'gsm8k-test.json: [2].question',
         'lone surrogate', 'expected valid UTF-8 text')
  path.write_text(f'[{good}, {{"question": "q2", "scores": {{"a": NaN}}}}]')
  raises(lambda: readers.read_routerdc(path, pool=pool), 'gsm8k-test.json: [1].scores.a is NaN',
         'expected a finite number')
  path.write_bytes(f'[{good},\n'.encode() + b' {"question": "\xe9t\xe9", "scores": {"a": 1}}]')
  raises(lambda: readers.read_routerdc(path, pool=pool), 'gsm8k-test.json:2:', 'column 16',
         'not UTF-8')
  path.write_text(f'[{good},\n {good}')
  raises(lambda: readers.read_routerdc(path, pool=pool), 'gsm8k-test.json: not valid JSON',
         'line 2', 'expected a RouterDC list')


def test_parquet_string_that_is_not_utf8_names_the_file(tmp_path):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq
  prompt = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, 3], np.int32)),
                                                  pa.py_buffer(b'ok\xff')])
  pq.write_table(pa.table({'prompt': prompt, 'a': [1.0]}), tmp_path / 'bad.parquet')
  raises(lambda: readers.read_wide(tmp_path / 'bad.parquet'), 'bad.parquet: row 1',
         "column 'prompt'", "byte 2", "b'\\xff'", 'not UTF-8')
  parts = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), prompt)   # RouterBench's lists
  pq.write_table(pa.table({'prompt': parts, 'a': [1.0]}), tmp_path / 'bad.parquet')
  raises(lambda: readers.read_wide(tmp_path / 'bad.parquet'), 'bad.parquet',
         'cannot read it as PARQUET')


@pytest.mark.parametrize('name, data, fragments', [
    ('pool.json', b'[{"name": "a", "price_in": NaN, "price_out": 1}]',
     ['not a valid JSON model-pool file', '[0].price_in is NaN']),
    ('pool.json', b'{"a\\ud800": {"price_in": 1, "price_out": 1}}',
     ['not a valid JSON model-pool file', 'has a key', 'lone surrogate']),
    ('pool.yaml', b'- {name: a, price_in: 1, price_out: 1}\n- {name: "b\\ud800", price_in: 1, '
                  b'price_out: 1}\n', ['entry 2', 'field name', 'lone surrogate']),
    ('pool.yaml', b'- {name: a, price_in: 1, price_out: 1}\n- {name: b\xe9, price_in: 1}\n',
     ['pool.yaml:2:', "b'\\xe9'", 'column 11', 'not UTF-8']),
])
def test_pool_invalid_unicode_and_non_standard_json(tmp_path, name, data, fragments):
  path = tmp_path / name
  path.write_bytes(data)
  raises(lambda: readers.read_pool(path), name, *fragments)


# ---------------------------------------------------------------- dispatch


def test_load_routing_files(tmp_path):
  a = write(tmp_path, 'a.csv', WIDE)
  b = write(tmp_path, 'b.csv', WIDE.replace('q1', 'q4').replace('q2', 'q5').replace('q3', 'q6'))
  d = readers.load_routing_files(f'{a}, {b}', 'wide', models=['a'])
  assert d.num_queries == 6 and d.model_names == ['a'] and d.source == f'{a}, {b}'
  pool = write(tmp_path, 'pool.yaml', '- {name: b, price_in: 1, price_out: 1}\n')
  long = write(tmp_path, 'long.csv', LONG)
  assert readers.load_routing_files([long], 'long', pool=str(pool)).num_models == 2
  raises(lambda: readers.load_routing_files([tmp_path / 'nope.csv'], 'wide'), 'nope.csv',
         'no such file')
  raises(lambda: readers.load_routing_files([a], 'tall'), "'tall'", str(list(readers.FORMATS)))
  raises(lambda: readers.load_routing_files([a], 'wide', colour='red'), "['colour']", 'split_seed')


def test_wide_parquet_list_prompt_reads_as_python_list(tmp_path):
  # RouterBench prompts are lists of parts; the subset CSV spells them str(list).
  pd.DataFrame({'prompt': [['part one', 'part two']], 'a': [1.0], 'a|total_cost': [0.1]}
               ).to_parquet(tmp_path / 'w.parquet')
  d = readers.read_wide(tmp_path / 'w.parquet')
  assert d.queries[0] == "['part one', 'part two']"
