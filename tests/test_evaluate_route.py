"""The evaluate and route entry points on a tiny trained workdir, and their bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from entrorouter_jax import route, router as router_lib, train
from test_train import tiny_config

ENV = dict(os.environ, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('trained')
  config = tiny_config(tmp, sft_steps=40, rl_steps=20)
  train.train_and_evaluate(config, tmp / 'run')
  return tmp / 'run'


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', f'entrorouter_jax.{module}', *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)


def test_evaluate_cli_writes_results_report_and_plots(workdir):
  out = run_cli('evaluate', f'--workdir={workdir}')
  assert out.returncode == 0, out.stderr
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert {'curve', 'aiq', 'baselines', 'router', 'oracle', 'single_models',
          'expected_utility', 'train_seconds'} <= set(results)
  for key in ('retained_accuracy', 'cost_saved', 'aiq', 'share', 'entropy'):
    assert key in results['router']
  for name in ('knn', 'linear', 'mlp', 'random', 'oracle'):
    assert name in results['baselines']
    assert 0.0 <= results['baselines'][name]['aiq'] <= 1.0
  assert {'lambda', 'accuracy', 'cost'} <= set(results['baselines']['knn']['curve'][0])
  assert {'threshold', 'accuracy', 'cost'} <= set(results['curve'][0])
  assert 0.0 <= results['aiq'] <= 1.0
  report = (workdir / 'eval' / 'report.md').read_text()
  assert '**EntroRouter**' in report and '| knn |' in report and '| mlp |' in report
  for png in ('curve.png', 'shares.png', 'training.png'):
    data = (workdir / 'eval' / png).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
  assert 'AIQ: router' in out.stdout


def test_evaluate_cli_bad_workdir(tmp_path):
  out = run_cli('evaluate', f'--workdir={tmp_path}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert 'config.json is missing' in out.stderr


def test_route_cli_one_query(workdir):
  out = run_cli('route', f'--workdir={workdir}', 'Please answer this expert question about patents.')
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  names = json.loads((workdir / 'router.json').read_text())['model_names']
  assert result['model'] in names and set(result['distribution']) == set(names)
  assert result['probability'] == pytest.approx(result['distribution'][result['model']])
  assert result['probability'] == pytest.approx(max(result['distribution'].values()))
  assert sum(result['distribution'].values()) == pytest.approx(1.0, abs=1e-4)


def test_route_cli_file(workdir, tmp_path):
  queries = tmp_path / 'q.jsonl'
  queries.write_text('\n'.join(json.dumps({'id': f'x{i}', 'query': q}) for i, q in enumerate(
      ['Give a basic level explanation of algebra.', 'Write a haiku.', 'sql joins, expert'])))
  out_path = tmp_path / 'routes.jsonl'
  out = run_cli('route', f'--workdir={workdir}', f'--input={queries}', f'--output={out_path}')
  assert out.returncode == 0, out.stderr
  rows = [json.loads(l) for l in out_path.read_text().splitlines()]
  assert [r['id'] for r in rows] == ['x0', 'x1', 'x2']
  assert 'routed 3 queries' in out.stderr


def test_route_knobs(workdir):
  router = router_lib.load_router(workdir)
  queries = ['Give a basic level explanation of algebra.', 'I need help with an expert problem on recursion.']
  probs = router.probs(queries)
  base = route.route_records(router, queries)
  cheap = route.route_records(router, queries, threshold=1e-6)
  cheapest = router.model_names[int(router.model_costs.argmin())]
  assert [r['model'] for r in cheap] == [cheapest, cheapest]
  assert [r['model'] for r in base] == [router.model_names[i] for i in probs.argmax(1)]
  forced = route.route_records(router, queries, fallback_model='frontier', min_confidence=1.01)
  assert all(r['model'] == 'frontier' and r['fallback'] for r in forced)


def test_router_cuts_token_batches_to_the_longest_querys_width(workdir):
  """Short queries run at their width bucket, not data.max_len, with the
  probabilities of the full-width forward."""
  import numpy as np
  from entrorouter_jax import policy
  router = router_lib.load_router(workdir)
  queries = ['Give a basic level explanation of algebra.', 'recursion?']
  widths, forward = [], router.forward
  router.forward = lambda params, batch: widths.append(batch['tokens'].shape[1]) or forward(
      params, batch)
  probs = router.probs(queries)
  max_len = router.config.data.max_len
  assert widths and max(widths) < max_len
  tokens, mask = router.tokenizer.encode_batch(queries, max_len, router.config.data.truncate)
  p_hat, c_bar = router.anchor_tables(queries)
  full = policy.batched(forward, router.params, router.mesh, 8, policy.policy_arrays(
      {'tokens': tokens, 'token_mask': mask}, p_hat, c_bar, router.default_cost_weight))
  np.testing.assert_allclose(probs, full['probs'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('args,message', [
    (['--fallback_model=gpt-9', '--min_confidence=0.5', 'hello'], "'gpt-9' is not in the pool"),
    (['--cost_weight=0.5', 'hello'], 'lambda-conditioned'),
    (['--threshold=0', 'hello'], 'threshold'),
    (['   '], 'empty'),
])
def test_route_cli_bad_input(workdir, args, message):
  out = run_cli('route', f'--workdir={workdir}', *args)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert message in out.stderr


def test_route_cli_missing_checkpoint_and_bad_file(workdir, tmp_path):
  out = run_cli('route', f'--workdir={tmp_path}', 'hello')
  assert out.returncode == 2 and 'missing' in out.stderr and 'Traceback' not in out.stderr
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"query": "fine"}\nnot json\n')
  out = run_cli('route', f'--workdir={workdir}', f'--input={bad}', f'--output={tmp_path / "o"}')
  assert out.returncode == 2 and 'bad.jsonl:2' in out.stderr


def test_read_queries_reads_ids_and_skips_blank_lines(tmp_path):
  path = tmp_path / 'q.jsonl'
  path.write_text('{"query": "first", "id": "a"}\n\n{"prompt": "sécond ✓"}\n')
  assert route.read_queries(path) == (['a', 3], ['first', 'sécond ✓'])


@pytest.mark.parametrize('line, fragments', [
    ('not json', ['not valid JSON (Expecting value']),
    ('["a list"]', ['expected a JSON object with a "query" field, got list']),
    ('{"id": 7}', ['"query" is missing or empty']),
    ('{"query": "hi", "id": NaN}', ['id is NaN', 'not a JSON number', 'expected a finite number']),
    ('{"query": "hi", "id": 1e400}', ['id is 1e400', 'expected a finite number']),
    ('{"query": "hi", "weight": -Infinity}', ['weight is -Infinity']),
    ('{"query": "half a pair \\ud83d"}', ['query holds an invalid Unicode character',
                                           'lone surrogate \\ud83d', 'expected valid UTF-8 text']),
    ('{"query": "ok", "meta": {"tags": ["x", "\\udc00"]}}', ['meta.tags[1] holds']),
])
def test_read_queries_bad_lines_name_file_line_and_field(tmp_path, line, fragments):
  path = tmp_path / 'q.jsonl'
  path.write_text('{"query": "fine"}\n\n' + line + '\n{"query": "after"}\n')
  with pytest.raises(router_lib.RouterError) as e:
    route.read_queries(path)
  for fragment in (f'{path}:3: ', *fragments):
    assert fragment in str(e.value), (fragment, str(e.value))


def test_read_queries_bytes_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / 'q.jsonl'
  path.write_bytes(b'{"query": "fine"}\n{"query": "caf\xe9"}\n')
  with pytest.raises(router_lib.RouterError, match=r"q\.jsonl:2: byte 14 is not UTF-8 "
                                                   r"\(b'\\xe9'\); expected UTF-8"):
    route.read_queries(path)


def test_device_search_finds_the_exact_neighbours_at_every_row_count(monkeypatch):
  import numpy as np
  from entrorouter_jax import capability, neighbours
  exact = neighbours._exact_neighbours
  searched = []   # rows that went to the exact search (by the device's float32 product)
  monkeypatch.setattr(neighbours, '_exact_neighbours',
                      lambda q, *a: searched.append(len(q)) or exact(q, *a))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3000, 24)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  search = router_lib.device_neighbours(x)
  for rows in (1, 1, 1, 3, 8, 13):
    q = x[rng.integers(0, 3000, rows)] + 0.05 * rng.standard_normal((rows, 24)).astype(np.float32)
    got = search(q, 7)
    assert got.shape == (rows, 7) and got.dtype == np.int64
    np.testing.assert_array_equal(got, exact(q, x, 7, False))
  assert searched == [3, 8, 13]   # each single query's neighbours were proven by its screen
  # Exact ties (duplicate rows) go to the lowest index, as in the exact search;
  # here they crowd the screen's rows, so the search falls back to exact.
  dup = np.concatenate([np.repeat(x[:1], 40, 0), x[1:]])
  q = dup[:1] + np.float32(1e-4)
  np.testing.assert_array_equal(router_lib.device_neighbours(dup)(q, 5), exact(q, dup, 5, False))
  assert searched[3:] == [1]
  # A zero query ties with every row: the first k.
  np.testing.assert_array_equal(search(np.zeros((1, 24), np.float32), 4), [[0, 1, 2, 3]])
  assert searched[3:] == [1, 1]
  # The kNN table of routing uses it and gives NumPy's estimates.
  y = (rng.random((3000, 3)) < 0.5).astype(np.float64)
  used = []
  table = capability.KnnTable(x, y, np.ones_like(y, bool), rng.random((3000, 3)), None, k=7,
                              prior='global',
                              exact_search=lambda q, k: used.append(k) or search(q, k))
  plain = capability.KnnTable(x, y, np.ones_like(y, bool), table.cost, None, k=7,
                              prior='global')
  q = x[:13] + 0.01 * rng.standard_normal((13, 24)).astype(np.float32)
  for got, want in zip(table.estimates(q), plain.estimates(q)):
    np.testing.assert_array_equal(got, want)
  assert used == [7]
